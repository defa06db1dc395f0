"""Read and check a diffusers Stable Diffusion pipeline folder (model_index.json layout).

Only configs are read here, no weights: a bad folder is refused before torch loads anything.
Class names from model_index.json are checked against allow-lists and never imported. UNet
pipelines (SD 1.x/2.x, SDXL, the SDXL refiner) are read here, their family told by their configs;
a pipeline of another layout is read by its architecture's module (sdrt.export.architectures).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdrt.runtime.errors import ModelError
from sdrt.runtime.model.families import check_override, detect_family
from sdrt.runtime.model.folder import SCHEDULER_CLASS, SD1_SCALING_FACTOR

# pipeline class → whether it has SDXL's second text encoder.
PIPELINES = {"StableDiffusionPipeline": False, "StableDiffusionImg2ImgPipeline": False,
             "StableDiffusionInpaintPipeline": False, "LatentConsistencyModelPipeline": False,
             "StableDiffusionXLPipeline": True, "StableDiffusionXLImg2ImgPipeline": True}
# component → (library, allowed class names), as model_index.json names them.
COMPONENTS: dict[str, tuple[str, frozenset[str]]] = {
    "unet": ("diffusers", frozenset({"UNet2DConditionModel"})),
    "vae": ("diffusers", frozenset({"AutoencoderKL"})),
    "text_encoder": ("transformers", frozenset({"CLIPTextModel"})),
    "tokenizer": ("transformers", frozenset({"CLIPTokenizer", "CLIPTokenizerFast"})),
}
# SDXL's second pair, required when model_index.json names text_encoder_2.
SDXL_COMPONENTS: dict[str, tuple[str, frozenset[str]]] = {
    "text_encoder_2": ("transformers", frozenset({"CLIPTextModelWithProjection"})),
    "tokenizer_2": COMPONENTS["tokenizer"],
}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
CONFIG_FILES = ("model_index.json", "unet/config.json", "vae/config.json",
                "text_encoder/config.json", "scheduler/scheduler_config.json")
_HUB_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<rev>[^/]+)")


@dataclass(frozen=True)
class SourceModel:
    """A checked diffusers SD folder: its configs and the numbers the export needs."""

    folder: Path
    model_index: dict[str, Any]
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any] | None  # None: the SDXL refiner has text_encoder_2 alone
    scheduler: dict[str, Any]
    family: str
    config_sha256: str
    text_encoder_2: dict[str, Any] | None = None  # SDXL's CLIPTextModelWithProjection
    transformer: dict[str, Any] | None = None  # SD 3's MMDiT, the denoiser (`unet` is empty)
    text_encoder_3: dict[str, Any] | None = None  # SD 3's optional T5 encoder

    @property
    def latent_channels(self) -> int:
        return int(self.vae.get("latent_channels", 4))

    @property
    def vae_scale_factor(self) -> int:
        """diffusers: 2 ** (len(vae.block_out_channels) - 1) (pipeline_stable_diffusion.py)."""
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.get("scaling_factor", SD1_SCALING_FACTOR))


def read_source(folder: str | Path, family: str | None = None) -> SourceModel:
    """Check a diffusers SD folder's model_index.json and configs; raise ModelError if unfit.

    The family is detected from the configs (runtime/model/families.py); `family` overrides it with
    another family of the same architecture (e.g. SD-Turbo weights shipped with a plain config).
    """
    # the architectures import this module (SourceModel and the checks below)
    from sdrt.export.architectures import source_reader

    root = Path(folder)
    if not root.is_dir():
        raise ModelError(f"model folder '{root}' does not exist or is not a folder")
    index = read_json(root, "model_index.json")
    reader = source_reader(index)
    if reader is not None:
        return reader(root, index, family)
    wanted = {**COMPONENTS, **(SDXL_COMPONENTS if "text_encoder_2" in index else {})}
    if "text_encoder_2" in index and index.get("text_encoder") in (None, [None, None]):
        wanted = {name: parts for name, parts in wanted.items()  # the SDXL refiner
                  if name not in ("text_encoder", "tokenizer")}
    check_present(root, wanted)
    configs = {name: read_json(root, rel) for name, rel in (
        ("unet", "unet/config.json"), ("vae", "vae/config.json"),
        ("scheduler", "scheduler/scheduler_config.json"))}
    configs["text_encoder"] = read_json(root, "text_encoder/config.json") \
        if "text_encoder" in wanted else None
    if "text_encoder_2" in wanted:
        configs["text_encoder_2"] = read_json(root, "text_encoder_2/config.json")
    # Families first: a folder sdrt cannot run gets the reason, not "unknown pipeline".
    detected = detect_family(index, **configs)
    _check_index(index, wanted)
    for tokenizer in (name for name in wanted if name.startswith("tokenizer")):
        check_tokenizer(root, tokenizer)
    source = SourceModel(folder=root, model_index=index, config_sha256=_config_hash(root),
                         family=detected if family is None else check_override(detected, family),
                         **configs)
    prediction = source.scheduler.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ModelError(f"scheduler prediction_type {prediction!r} is not one of "
                         f"{', '.join(PREDICTION_TYPES)}")
    return source


def source_info(source: SourceModel, origin: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest's `source`: what the user named (`origin`, else the path), config hash.

    `origin` stands in for a folder that is not what the user gave: a hub id and revision, or a
    checkpoint's file name and sha256 (its folder is a temporary conversion). A folder's path
    comes with the hub id and revision when the folder is a hub cache snapshot.
    """
    if origin is not None:
        return {**origin, "config_sha256": source.config_sha256}
    info: dict[str, Any] = {"path": str(source.folder), "config_sha256": source.config_sha256}
    match = _HUB_SNAPSHOT.search(source.folder.resolve().as_posix())
    if match:
        info.update(hub_id=f"{match['org']}/{match['name']}", revision=match["rev"])
    return info


def check_present(root: Path, components: Mapping[str, Any]) -> None:
    """Each component's folder, and scheduler/, must be in `root`."""
    for component in (*components, "scheduler"):
        if not (root / component).is_dir():
            raise ModelError(f"model folder '{root.name}' is incomplete: '{component}/' is missing")


def check_component_classes(index: dict[str, Any],
                            components: Mapping[str, tuple[str, frozenset[str]]]) -> None:
    """Each component's [library, class] entry in model_index.json must be on its allow-list
    (class names are checked, never imported)."""
    for component, (library, classes) in components.items():
        entry = index.get(component)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] == library
                and entry[1] in classes):
            raise ModelError(f"model_index.json {component} is {entry!r}, expected "
                             f"['{library}', one of {', '.join(sorted(classes))}]")


def _check_index(index: dict[str, Any], components: Mapping[str, tuple[str, frozenset[str]]]
                 ) -> None:
    name = index.get("_class_name")
    if name not in PIPELINES:
        raise ModelError(f"model_index.json _class_name {name!r} is not a supported pipeline "
                         f"({', '.join(sorted(PIPELINES))})")
    if PIPELINES[name] != ("text_encoder_2" in components):
        raise ModelError(f"model_index.json _class_name {name!r} does not fit its components: "
                         f"text_encoder_2 is {'missing' if PIPELINES[name] else 'present'}")
    check_component_classes(index, components)
    entry = index.get("scheduler")
    if not (isinstance(entry, list) and len(entry) == 2 and entry[0] == "diffusers"
            and isinstance(entry[1], str) and SCHEDULER_CLASS.fullmatch(entry[1])):
        raise ModelError(f"model_index.json scheduler is {entry!r}, expected a diffusers scheduler")


def check_tokenizer(root: Path, name: str) -> None:
    """A tokenizer folder holds vocab.json + merges.txt (BPE) or tokenizer.json."""
    folder = root / name
    has_bpe = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not (has_bpe or (folder / "tokenizer.json").is_file()):
        raise ModelError(f"model folder '{root.name}' is incomplete: {name}/ has neither "
                         "vocab.json + merges.txt nor tokenizer.json")


def read_json(root: Path, rel: str) -> dict[str, Any]:
    """The JSON object at `root/rel`; ModelError naming the file if missing or not an object."""
    path = root / rel
    try:
        data = json.loads(path.read_text("utf-8"))
    except FileNotFoundError as exc:
        raise ModelError(f"model folder '{root.name}' is incomplete: '{rel}' is missing") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"'{rel}' in '{root.name}' is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"'{rel}' in '{root.name}' must hold a JSON object")
    return data


def _config_hash(root: Path) -> str:
    """sha256 over the config files (names and bytes): identifies the source without weights."""
    digest = hashlib.sha256()
    sdxl = ("text_encoder_2/config.json",) if (root / "text_encoder_2").is_dir() else ()
    for rel in (*CONFIG_FILES, *sdxl):
        if rel == "text_encoder/config.json" and not (root / rel).is_file():
            continue  # the SDXL refiner's (read_source checked what the folder needs)
        digest.update(rel.encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    return digest.hexdigest()
