"""What `sdrt export` reads: a diffusers folder, a single-file checkpoint, or a hub id.

- A folder: a diffusers pipeline folder (model_index.json), used in place.
- A `.safetensors` file (A1111/civitai layout): converted to a temporary diffusers folder with the
  configs shipped in models/configs/ (sdrt.export.single_file). Pickle files (`.ckpt`, `.pt`,
  `.pth`, `.bin`) only with `allow_pickle`, then read with torch.load(weights_only=True).
- `org/name[@revision]`: huggingface_hub's snapshot of the files a diffusers SD pipeline needs,
  in its cache (huggingface_hub's `snapshot_download`); `HF_HUB_OFFLINE` and local paths never
  touch the network.
  model_index.json comes first and names the components to fetch: `unet` or SD 3's
  `transformer`, the text encoders and tokenizers it names (SDXL's second pair, SD 3's T5 where
  it is not null), the VAE, the scheduler; never a safety checker or fp16/EMA variants.
- A tiny autoencoder (AutoencoderTiny: config.json and weights at the top, as madebyollin/taesd),
  as a folder or a hub id, for `sdrt export` to make a `--vae` folder (sdrt.export.tiny_vae).
- A ControlNet (ControlNetModel, laid out the same way, as lllyasviel/control_v11p_sd15_canny),
  as a folder or a hub id, or a single `.safetensors` file in A1111's or diffusers' key layout
  (sdrt.export.controlnet_file), for `sdrt export` to make a control folder
  (sdrt.export.controlnet).
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
# weight file stems as diffusers/transformers name them: (safetensors, pickle)
_DIFFUSERS = ("diffusion_pytorch_model", "diffusion_pytorch_model")
_TRANSFORMERS = ("model", "pytorch_model")
_CONFIG = ("config.json",)
_CLIP_TOKENIZER = ("*.json", "merges.txt")  # vocab.json + merges.txt, or tokenizer.json
# component (as model_index.json names it) → (weight stems or None, the other files export reads).
# Components not listed (safety_checker, feature_extractor, image_encoder) are never fetched.
_COMPONENTS: dict[str, tuple[tuple[str, str] | None, tuple[str, ...]]] = {
    "unet": (_DIFFUSERS, _CONFIG),
    "transformer": (_DIFFUSERS, _CONFIG),  # SD 3's MMDiT
    "vae": (_DIFFUSERS, _CONFIG),
    "text_encoder": (_TRANSFORMERS, _CONFIG),
    "text_encoder_2": (_TRANSFORMERS, _CONFIG),  # SDXL's and SD 3's second CLIP
    "text_encoder_3": (_TRANSFORMERS, _CONFIG),  # SD 3's T5; model_index.json may name it null
    "tokenizer": (None, _CLIP_TOKENIZER),
    "tokenizer_2": (None, _CLIP_TOKENIZER),
    "tokenizer_3": (None, ("*.json",)),  # T5: the runtime reads tokenizer.json, not spiece.model
    "scheduler": (None, ("scheduler_config.json",)),
    TOP: (_DIFFUSERS, _CONFIG),  # a lone AutoencoderTiny or ControlNetModel
}
# The top configs, fetched first: they say what the repository holds (a pipeline's
# model_index.json, whose components come next, or a lone model's config.json).
_HUB_CONFIGS = ("model_index.json", "config.json")
_UNNAMED = (None, [None, None])  # model_index.json's entry of a component the pipeline lacks


def _prefix(component: str) -> str:
    """Where a component's files sit in a repository: its folder, or the top."""
    return "" if component == TOP else f"{component}/"


def _named(components: Iterable[str]) -> str:
    return ", ".join("the model" if name == TOP else name for name in components)


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
    """A diffusers pipeline folder, or a lone AutoencoderTiny's or ControlNetModel's, whose weights
    are safetensors (pickle only if allowed)."""
    if not (folder / "model_index.json").is_file() and not _is_lone_model(folder):
        raise ModelError(f"folder '{folder}' has no model_index.json: not a diffusers pipeline "
                         "folder")
    pickled = [name for name in _needed(folder) if _weights_format(folder, name) == "pickle"]
    if pickled and not allow_pickle:
        raise ExportError(f"'{folder.name}' has pickle weights only for {_named(pickled)} "
                          "(pickle can run code when loaded); pass --allow-pickle to load them "
                          "with torch.load(weights_only=True)")
    return folder


def _weights_format(folder: Path, component: str) -> str | None:
    """'safetensors' if the component has the weights its loader reads (one file or shards, not
    an fp16 variant), 'pickle' if only .bin ones, else None."""
    for pickle, name in ((False, "safetensors"), (True, "pickle")):
        if any(any(folder.glob(pattern)) for pattern in _weight_files(component, pickle)):
            return name
    return None


@contextlib.contextmanager
def _converted(path: Path, *, allow_pickle: bool, config: str | None,
               scratch: Path | None) -> Iterator[tuple[Path, Origin]]:
    from sdrt.export.controlnet_file import (
        convert_controlnet_file,
        global_pool_beside,
        is_controlnet_checkpoint,
    )
    from sdrt.export.single_file import convert_checkpoint, open_checkpoint
    from sdrt.runtime.control.manifest import control_hash

    checkpoint = open_checkpoint(path, allow_pickle=allow_pickle)
    control = is_controlnet_checkpoint(checkpoint.shapes)
    if control and config is not None:
        raise InputError(f"--config applies to SD checkpoints; '{path.name}' is a ControlNet")
    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
    # Beside OUT_DIR rather than in /tmp: an SD checkpoint needs GBs, and /tmp is often RAM.
    with tempfile.TemporaryDirectory(prefix=".sdrt-convert-", dir=scratch) as tmp:
        folder = Path(tmp) / path.stem
        if control:  # the extension titles it "name [hash]" by its own short hash
            convert_controlnet_file(checkpoint, folder, global_pool=global_pool_beside(path))
            yield folder, {"file": path.name, "sha256": sha256_file(path),
                           "hash": control_hash(path)}
            return
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

    def fetch(rev: str | None, patterns: list[str]) -> Path:
        return Path(snapshot_download(repo, revision=rev, cache_dir=cache,
                                      local_files_only=offline, allow_patterns=patterns))

    with _hub_errors(repo, cache, offline):
        folder = fetch(revision, list(_HUB_CONFIGS))
        # the commit just resolved: components of the same revision as the index that names them
        if parts := _parts(folder):
            fetch(folder.name, _file_patterns(parts))
        if (lacking := _lacking_weights(folder)) and allow_pickle and not offline:
            # safetensors first; pickle .bin files only where there are no others
            fetch(folder.name, _weight_patterns(lacking, pickle=True))
    if lacking := _lacking_weights(folder):
        hint = "" if allow_pickle else "; if it has .bin (pickle) weights, pass --allow-pickle"
        raise ModelError(f"'{repo}' at {folder.name} has no weights for {_named(lacking)}{hint}")
    # Cached snapshots are folders of symlinks into blobs/: loaders follow them, and the
    # export copies file contents, never links (a link out of the folder would not travel with it).
    logger.info("%s: snapshot %s in %s", repo, folder.name, cache)
    return check_folder(folder, allow_pickle=allow_pickle), {"hub_id": repo,
                                                             "revision": folder.name}


def _lacking_weights(folder: Path) -> list[str]:
    return [name for name in _needed(folder) if _weights_format(folder, name) is None]


def _needed(folder: Path) -> list[str]:
    """The components with weights that export reads from `folder`."""
    return [name for name in _parts(folder) if _COMPONENTS[name][0] is not None]


def _parts(folder: Path) -> list[str]:
    """The components export reads: those model_index.json names (null entries are absent
    components, as SD 3 without T5 or the SDXL refiner without text_encoder); a lone
    AutoencoderTiny's or ControlNetModel's at the top."""
    if _is_lone_model(folder):
        return [TOP]
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        index = None
    if not isinstance(index, dict):
        return []  # check_folder or read_source says what is wrong with the folder
    return [name for name in _COMPONENTS if name != TOP and index.get(name) not in _UNNAMED]


def _is_lone_model(folder: Path) -> bool:
    """A model whose config.json and weights sit at the top: AutoencoderTiny, ControlNetModel."""
    from sdrt.runtime.control.manifest import is_controlnet_folder
    from sdrt.runtime.vae.tiny import is_tiny_vae_folder

    return is_tiny_vae_folder(folder) or is_controlnet_folder(folder)


def _file_patterns(components: Iterable[str]) -> list[str]:
    """Each component's configs (tokenizer files) and safetensors weights."""
    parts = list(components)
    configs = [f"{_prefix(name)}{file}" for name in parts for file in _COMPONENTS[name][1]]
    return [*configs, *_weight_patterns(parts, pickle=False)]


def _weight_patterns(components: Iterable[str], *, pickle: bool) -> list[str]:
    """The weight files of those components that have them, and a sharded set's index."""
    patterns: list[str] = []
    for name in components:
        if files := _weight_files(name, pickle):
            patterns += [*files, f"{files[0]}.index.json"]
    return patterns


def _weight_files(component: str, pickle: bool) -> tuple[str, ...]:
    """A component's weights as diffusers and transformers name them: one file, or shards
    (`model-00001-of-00002.safetensors`, listed by `model.safetensors.index.json`); none for a
    component without weights (a tokenizer)."""
    stems = _COMPONENTS[component][0]
    if stems is None:
        return ()
    ext = "bin" if pickle else "safetensors"
    stem = f"{_prefix(component)}{stems[pickle]}"
    return f"{stem}.{ext}", f"{stem}-*-of-*.{ext}"


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
