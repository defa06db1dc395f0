"""What `sdrt export` reads: a diffusers folder, a single-file checkpoint, or a hub id.

- A folder: a diffusers pipeline folder (model_index.json), used in place.
- A `.safetensors` file (A1111/civitai layout): converted to a temporary diffusers folder with the
  configs shipped in models/configs/ (sdrt.export.single_file). Pickle files (`.ckpt`, `.pt`,
  `.pth`, `.bin`) only with `allow_pickle`, then read with torch.load(weights_only=True).
- `org/name[@revision]`: huggingface_hub's snapshot of the files a diffusers SD pipeline needs,
  in its cache (huggingface_hub's `snapshot_download`); `HF_HUB_OFFLINE` and local paths never
  touch the network.
  SDXL repositories add text_encoder_2/ and tokenizer_2/, required where model_index.json
  names them.
- A tiny autoencoder (AutoencoderTiny: config.json and weights at the top, as madebyollin/taesd),
  as a folder or a hub id, for `sdrt export` to make a `--vae` folder (sdrt.export.tiny_vae).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sdrt.runtime.errors import ExportError, InputError, ModelError, first_line
from sdrt.runtime.model.manifest import sha256_file

logger = logging.getLogger("sdrt.export")

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")  # torch pickles: code runs when loaded
Origin = dict[str, Any]  # the manifest's `source` entries that name what the user gave
# Hub ids: `org/name`, optionally `@revision`; a path that exists is never taken for one.
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?")
TOP = "."  # a lone model's folder itself: its config.json and weights sit at the top
# component → weight file stems as diffusers/transformers name them: (safetensors, pickle).
_WEIGHTS = {"unet": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
            "vae": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
            "text_encoder": ("model", "pytorch_model"),
            "text_encoder_2": ("model", "pytorch_model"),  # SDXL only
            TOP: ("diffusion_pytorch_model", "diffusion_pytorch_model")}  # AutoencoderTiny only
_SDXL_ONLY = frozenset({"text_encoder_2"})  # needed only where model_index.json names them


def _prefix(component: str) -> str:
    """Where a component's files sit in a repository: its folder, or the top."""
    return "" if component == TOP else f"{component}/"


def _named(components: Iterable[str]) -> str:
    return ", ".join("the autoencoder" if name == TOP else name for name in components)


# The files of a diffusers SD pipeline that export reads; no safety checker, no fp16/EMA variants.
# Patterns that match nothing (an SD 1.x repo has no tokenizer_2/) fetch nothing.
_HUB_CONFIGS = ("model_index.json", "scheduler/scheduler_config.json",
                *(f"{folder}/{name}" for folder in ("tokenizer", "tokenizer_2")
                  for name in ("*.json", "merges.txt")),
                *(f"{_prefix(name)}config.json" for name in _WEIGHTS))


@contextlib.contextmanager
def resolve_source(spec: str, *, allow_pickle: bool = False,
                   cache_dir: str | Path | None = None, revision: str | None = None,
                   config: str | None = None,
                   scratch: Path | None = None) -> Iterator[tuple[Path, Origin | None]]:
    """Yield (diffusers folder, manifest origin or None for a plain folder) for SOURCE `spec`.

    A single-file checkpoint is converted under `scratch` (default: the system's temporary
    folder) and removed on exit; `config` names the shipped config when its shapes fit several.
    """
    path = Path(spec).expanduser()
    hub = None if path.exists() or _is_checkpoint_name(path) else _HUB_ID.fullmatch(spec)
    if revision is not None and hub is None:
        raise InputError(f"--revision applies to hub ids only, not to '{spec}'")
    if config is not None and not path.is_file():
        raise InputError(f"--config applies to single-file checkpoints only, not to '{spec}'")
    if path.is_dir():
        yield check_folder(path, allow_pickle=allow_pickle), None
    elif path.is_file():
        with _converted(path, allow_pickle=allow_pickle, config=config, scratch=scratch) as found:
            yield found
    elif hub is not None:
        yield _snapshot(hub["repo"], _revision(hub["rev"], revision), cache_dir, allow_pickle)
    else:
        raise ModelError(f"source '{spec}' does not exist: give a diffusers folder, a .safetensors "
                         "checkpoint or a Hugging Face hub id (org/name)")


def _is_checkpoint_name(path: Path) -> bool:
    """A missing `dir/x.safetensors` is a wrong path, never a hub repository to download."""
    return path.suffix.lower() in (".safetensors", *PICKLE_SUFFIXES)


def check_folder(folder: Path, *, allow_pickle: bool = False) -> Path:
    """A diffusers pipeline folder, or a lone AutoencoderTiny's, whose weights are safetensors
    (pickle only if allowed)."""
    from sdrt.runtime.vae.tiny import is_tiny_vae_folder

    if not (folder / "model_index.json").is_file() and not is_tiny_vae_folder(folder):
        raise ModelError(f"folder '{folder}' has no model_index.json: not a diffusers pipeline "
                         "folder")
    pickled = [name for name in _needed(folder) if _weights_format(folder / name) == "pickle"]
    if pickled and not allow_pickle:
        raise ExportError(f"'{folder.name}' has pickle weights only for {_named(pickled)} "
                          "(pickle can run code when loaded); pass --allow-pickle to load them "
                          "with torch.load(weights_only=True)")
    return folder


def _weights_format(component: Path) -> str | None:
    """'safetensors' if the component has such weights, 'pickle' if only .bin ones, else None."""
    if any(component.glob("*.safetensors")):
        return "safetensors"
    return "pickle" if any(component.glob("*.bin")) else None


@contextlib.contextmanager
def _converted(path: Path, *, allow_pickle: bool, config: str | None,
               scratch: Path | None) -> Iterator[tuple[Path, Origin]]:
    from sdrt.export.single_file import convert_checkpoint, open_checkpoint

    checkpoint = open_checkpoint(path, allow_pickle=allow_pickle)
    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
    # Beside OUT_DIR rather than in /tmp: an SD checkpoint needs GBs, and /tmp is often RAM.
    with tempfile.TemporaryDirectory(prefix=".sdrt-convert-", dir=scratch) as tmp:
        folder = Path(tmp) / path.stem
        name = convert_checkpoint(checkpoint, folder, config=config)
        # A1111's "Model hash" is the first 10 hex digits of this sha256 (A1111's `sd_models.py`).
        yield folder, {"file": path.name, "sha256": sha256_file(path), "config": name}


def _revision(in_spec: str | None, option: str | None) -> str | None:
    if in_spec is not None and option is not None and in_spec != option:
        raise InputError(f"two revisions given: '@{in_spec}' and --revision {option}")
    return in_spec or option


def _snapshot(repo: str, revision: str | None, cache_dir: str | Path | None,
              allow_pickle: bool) -> tuple[Path, Origin]:
    """The repo's snapshot folder in the hub cache, downloading what is missing unless offline."""
    from huggingface_hub import constants, snapshot_download

    cache = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    offline = bool(constants.HF_HUB_OFFLINE)
    with _hub_errors(repo, cache, offline):
        folder = Path(snapshot_download(
            repo, revision=revision, cache_dir=cache, local_files_only=offline,
            allow_patterns=[*_HUB_CONFIGS, *_weight_patterns(_WEIGHTS, pickle=False)]))
        if (lacking := _lacking_weights(folder)) and allow_pickle and not offline:
            # safetensors first; pickle .bin files only where there are no others
            snapshot_download(repo, revision=folder.name, cache_dir=cache,
                              allow_patterns=_weight_patterns(lacking, pickle=True))
    if lacking := _lacking_weights(folder):
        hint = "" if allow_pickle else "; if it has .bin (pickle) weights, pass --allow-pickle"
        raise ModelError(f"'{repo}' at {folder.name} has no weights for {_named(lacking)}{hint}")
    # Cached snapshots are folders of symlinks into blobs/: loaders follow them, and the
    # export copies file contents, never links (a link out of the folder would not travel with it).
    logger.info("%s: snapshot %s in %s", repo, folder.name, cache)
    return check_folder(folder, allow_pickle=allow_pickle), {"hub_id": repo,
                                                             "revision": folder.name}


def _lacking_weights(folder: Path) -> list[str]:
    return [name for name in _needed(folder) if _weights_format(folder / name) is None]


def _needed(folder: Path) -> list[str]:
    """The components with weights: SDXL's second text encoder where model_index.json names it;
    a lone AutoencoderTiny's at the top."""
    from sdrt.runtime.vae.tiny import is_tiny_vae_folder

    if is_tiny_vae_folder(folder):
        return [TOP]
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        index = {}  # check_folder says what is wrong with the folder
    return [name for name in _WEIGHTS
            if name != TOP and (name not in _SDXL_ONLY or name in index)]


def _weight_patterns(components: Iterable[str], *, pickle: bool) -> list[str]:
    """A component's weights, one file or sharded with an index (diffusers' naming)."""
    ext = "bin" if pickle else "safetensors"
    return [f"{_prefix(name)}{_WEIGHTS[name][pickle]}{tail}" for name in components
            for tail in (f".{ext}", f"-*-of-*.{ext}", f".{ext}.index.json")]


@contextlib.contextmanager
def _hub_errors(repo: str, cache: Path, offline: bool) -> Iterator[None]:
    """huggingface_hub's multi-line exceptions as one-line ModelErrors that say what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except IncompleteSnapshotError as exc:  # its message says which files and what to do
        raise ModelError(first_line(exc)) from exc
    except LocalEntryNotFoundError as exc:
        if offline:
            raise ModelError(f"'{repo}' is not in the Hugging Face cache ({cache}) and "
                             "HF_HUB_OFFLINE is set; download it once online or pass a local "
                             "folder") from exc
        raise ModelError(f"cannot reach the Hugging Face Hub for '{repo}' and it is not in the "
                         f"cache ({cache}); check the connection or pass a local folder") from exc
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as exc:
        raise ModelError(f"hub repository '{repo}' is not available (missing, private, gated or "
                         f"no such revision): {first_line(exc)}") from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelError(f"cannot get '{repo}' from the Hugging Face Hub: "
                         f"{first_line(exc)}") from exc
