"""Several models behind one server: A1111's checkpoint list, titles and switching.

`sdrt serve --models-dir DIR` lists every exported model folder one level under DIR (a folder
with model_index.json and manifest.json, or optimum's `NAME/onnx/`), each titled as A1111 titles
a checkpoint, "name [hash10]", where A1111's short hash is the first 10 hex digits of the
checkpoint file's sha256 and sdrt's is the exported UNet's (manifest.json). One model is
resident at a time: a switch waits for the jobs running on the old one, drops it, and only then
loads the new one, so two models never share the memory budget.

The selected model (A1111's `sd_model_checkpoint` option) serves jobs that name none; a job's
`override_settings.sd_model_checkpoint` runs on its own model, and the next job that names none
switches back to the selected one (A1111 restores the option after such a request; here the
reload waits until a job needs it, so consecutive requests for one model load it once).
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sdrt.runtime.errors import InputError, ModelError, SdrtError, first_line
from sdrt.runtime.model.folder import ModelFacts, read_facts
from sdrt.runtime.model.manifest import MANIFEST_NAME
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.schedules import SchedulerConfig

log = logging.getLogger(__name__)

SHORT_HASH = 10  # A1111's short model hash: sha256's first 10 hex digits
LAYOUT_SUBFOLDER = "onnx"  # optimum's `NAME/onnx/` layout


@dataclass(frozen=True)
class Checkpoint:
    """One model the server can run (A1111's SDModelItem source)."""

    title: str  # "name [hash10]" (A1111)
    name: str
    hash: str | None
    sha256: str | None
    folder: Path  # never sent to clients


def checkpoint_for(folder: Path, facts: ModelFacts) -> Checkpoint:
    """A model folder's checkpoint entry, from its facts (name and UNet sha256)."""
    sha256 = facts.unet_sha256
    short = sha256[:SHORT_HASH] if sha256 else None
    return Checkpoint(title=f"{facts.name} [{short}]" if short else facts.name, name=facts.name,
                      hash=short, sha256=sha256, folder=folder)


def scan(models_dir: Path) -> list[Checkpoint]:
    """Every exported model folder one level under `models_dir`, sorted by folder name; a folder
    that cannot be read is skipped with a warning naming it (never the server's end)."""
    found = []
    for entry in sorted(models_dir.iterdir(), key=lambda path: path.name):
        for folder in (entry, entry / LAYOUT_SUBFOLDER):
            if (folder / "model_index.json").is_file() and (folder / MANIFEST_NAME).is_file():
                try:
                    found.append(checkpoint_for(folder, read_facts(folder)))
                except SdrtError as exc:
                    log.warning("skipped model folder '%s': %s", entry.name, first_line(exc))
                break
    return found


class ModelHost:
    """The loaded model, the checkpoints of --models-dir, and switching between them."""

    def __init__(self, pipe: Pipeline, models_dir: Path | None = None,
                 load: Callable[[Path], Pipeline] | None = None) -> None:
        self.models_dir = models_dir
        # by default a model loads as the first did: same backend and precision, or "auto"
        # where the first was chosen so (the lambda must not hold `pipe`, or the first model
        # could never be released)
        backend, precision = pipe.choice.asked if pipe.choice else (pipe.backend,
                                                                     pipe.precision)
        self._load = load or (lambda folder: Pipeline.load(folder, backend, precision=precision))
        self._cond = threading.Condition()
        self._pipe: Pipeline | None = pipe
        self._initial = checkpoint_for(pipe.folder, pipe.facts)
        self._scanned: list[Checkpoint] = []
        self.refresh()
        self._loaded: Checkpoint | None = self._same(self._initial)
        self._selected = self._loaded  # A1111's sd_model_checkpoint
        self._active = 0  # jobs running on the loaded model
        self._switching = False

    @property
    def pipe(self) -> Pipeline:
        """The loaded model; after an unload (or a failed switch) the selected one, loaded."""
        pipe = self._pipe
        if pipe is None:
            with self._cond:
                self._ensure(lambda: self._selected)
                pipe = self._pipe
        if pipe is None:
            raise ModelError("no model is loaded: the last switch failed (see the server log)")
        return pipe

    @property
    def selected(self) -> Checkpoint:
        """The model jobs run on unless they name another (A1111's sd_model_checkpoint)."""
        return self._selected

    def checkpoints(self) -> list[Checkpoint]:
        """The models of --models-dir, and the loaded one where it lies elsewhere."""
        listed = list(self._scanned)
        for extra in (self._selected, self._loaded):
            if extra is not None and extra not in listed:
                listed.insert(0, extra)
        return listed

    def find(self, name: str) -> Checkpoint:
        """A checkpoint by title, name, short hash or sha256 (A1111's aliases)."""
        listed = self.checkpoints()
        for matches in (lambda c: c.title == name, lambda c: c.name == name,
                        lambda c: name in (c.hash, c.sha256)):
            for checkpoint in listed:
                if matches(checkpoint):
                    return checkpoint
        raise InputError(f"unknown checkpoint {name!r}; choose one of: "
                         f"{', '.join(c.title for c in listed)}")

    def facts(self, name: str | None) -> tuple[ModelFacts, SchedulerConfig]:
        """The facts and scheduler a job for checkpoint `name` (None: the selected) resolves
        against, read from its folder without loading it."""
        target = self.find(name) if name else self._selected
        pipe = self._pipe
        if pipe is not None and target == self._loaded:
            return pipe.facts, pipe.scheduler
        scheduler = SchedulerConfig.from_file(target.folder / "scheduler" /
                                              "scheduler_config.json")
        return read_facts(target.folder), scheduler

    @contextmanager
    def use(self, name: str | None) -> Iterator[Pipeline]:
        """The pipeline a job runs on: checkpoint `name`'s, or the selected one's for None,
        switching first where another is loaded (after the jobs running on it finish)."""
        target = self.find(name) if name else None
        with self._cond:
            self._ensure(lambda: target or self._selected)
            self._active += 1
            pipe = self._pipe
        try:
            yield pipe
        finally:
            del pipe  # the job's reference, before a waiting switch drops the model
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    def switch(self, name: str) -> None:
        """Select checkpoint `name` (A1111's POST /options sd_model_checkpoint) and load it."""
        target = self.find(name)
        with self._cond:
            self._ensure(lambda: target)
            self._selected = target

    def unload(self) -> None:
        """Release the loaded model once no job runs on it (A1111's unload-checkpoint); the
        next job, or `reload`, loads the selected one again."""
        with self._cond:
            while self._switching or self._active:
                self._cond.wait()
            self._pipe, self._loaded = None, None
        gc.collect()

    def reload(self) -> None:
        """Load the selected model afresh (A1111's reload-checkpoint)."""
        self.unload()
        with self._cond:
            self._ensure(lambda: self._selected)

    def refresh(self) -> None:
        """Scan --models-dir again (A1111's refresh-checkpoints)."""
        scanned = scan(self.models_dir) if self.models_dir is not None else []
        with self._cond:
            self._scanned = scanned

    def _same(self, checkpoint: Checkpoint) -> Checkpoint:
        """The scanned entry of `checkpoint`'s folder (its listed title), else itself."""
        where = checkpoint.folder.resolve()
        return next((c for c in self._scanned if c.folder.resolve() == where), checkpoint)

    def _ensure(self, wanted: Callable[[], Checkpoint]) -> None:
        """Have `wanted()` loaded (called and returning with the condition held)."""
        while self._switching or self._loaded != wanted():
            if self._switching:
                self._cond.wait()
            else:
                self._switch_to(wanted())

    def _switch_to(self, target: Checkpoint) -> None:
        """Drop the loaded model once no job runs on it, then load `target`; if that fails,
        load the old one back and raise (called with the condition held)."""
        self._switching = True
        try:
            while self._active:
                self._cond.wait()
            old, self._loaded, self._pipe = self._loaded, None, None
            self._cond.release()  # the load takes seconds: /options and the routes go on
            try:
                pipe = self._load_released(target, old)
            finally:
                self._cond.acquire()
            self._pipe, self._loaded = pipe, target
            log.info("loaded model %s", target.title)
        finally:
            self._switching = False
            self._cond.notify_all()

    def _load_released(self, target: Checkpoint, old: Checkpoint | None) -> Pipeline:
        gc.collect()  # the old model's sessions go before the new one's arrive
        try:
            return self._load(target.folder)
        except Exception as exc:
            log.error("loading model %s failed: %s", target.title, first_line(exc))
            if old is not None:
                pipe = self._load(old.folder)
                with self._cond:
                    self._pipe, self._loaded = pipe, old
            raise


def first_model(models_dir: Path, wanted: Path | None) -> Path:
    """The folder `sdrt serve --models-dir` loads first: `wanted` (a folder, or the name or
    title of a model in `models_dir`), else the first of `models_dir`, sorted by name."""
    if not models_dir.is_dir():
        raise InputError(f"--models-dir '{models_dir}' is not a folder")
    found = scan(models_dir)
    if wanted is not None:
        named = [c.folder for c in found if str(wanted) in (c.name, c.title)]
        return wanted if wanted.is_dir() or not named else named[0]
    if not found:
        raise InputError(f"--models-dir '{models_dir}' holds no exported model folder (one "
                         f"with model_index.json and manifest.json, or NAME/{LAYOUT_SUBFOLDER}/)")
    return found[0].folder
