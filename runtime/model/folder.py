"""A model folder on disk: which graph files it holds and the numbers the pipeline needs.

The numbers and the model family come from `manifest.json` when sdrt exported the folder, else
from the component `config.json` files that optimum and optimum-intel write (diffusers layout,
one config per component folder), else, for diffusers' legacy ONNX layout, which has no component
configs, from SD 1.x's constants as diffusers' `OnnxStableDiffusionPipeline` hard-codes them.
model_index.json's class names are checked against allow-lists, never imported.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

from sdrt.models import EMBEDDED_MODEL  # noqa: F401  (re-exported: the default model)
from sdrt.runtime.errors import ModelError, first_line
from sdrt.runtime.model.families import Family, detect_family, detect_sd3_family, get_family
from sdrt.runtime.model.manifest import MANIFEST_NAME, Manifest

log = logging.getLogger(__name__)

COMPONENTS = ("text_encoder", "unet", "vae_decoder")
REFINER_COMPONENTS = ("text_encoder_2", "unet", "vae_decoder")  # the SDXL refiner's: one encoder
SD3_COMPONENTS = ("text_encoder", "text_encoder_2", "transformer", "vae_decoder")  # T5 optional
GRAPH_FILES = {"ort": ("model.onnx",), "openvino": ("openvino_model.xml", "model.onnx")}
IR_FILE = "openvino_model.xml"
# model_index.json `_class_name`s of the folders sdrt reads: diffusers' and its legacy ONNX
# pipelines (optimum and optimum-intel keep diffusers' names), and the ORT/OV names optimum's
# docs use; whether the family is supported is families.py's call.
PIPELINE_CLASSES = frozenset({
    "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "OnnxStableDiffusionPipeline",
    "OnnxStableDiffusionImg2ImgPipeline", "ORTStableDiffusionPipeline",
    "OVStableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
    "ORTStableDiffusionXLPipeline", "OVStableDiffusionXLPipeline",
    "LatentConsistencyModelPipeline", "ORTLatentConsistencyModelPipeline",
    "OVLatentConsistencyModelPipeline", "StableDiffusionInpaintPipeline",
    "OnnxStableDiffusionInpaintPipeline", "ORTStableDiffusionInpaintPipeline",
    "OVStableDiffusionInpaintPipeline", "StableDiffusion3Pipeline", "ORTStableDiffusion3Pipeline",
    "OVStableDiffusion3Pipeline",
})
# Classes model_index.json may name for the parts sdrt loads; `OnnxRuntimeModel` is the legacy
# ONNX layout's entry for every graph.
COMPONENT_CLASSES = {
    "text_encoder": {"CLIPTextModel", "CLIPTextModelWithProjection", "OnnxRuntimeModel"},
    "text_encoder_2": {"CLIPTextModelWithProjection", "OnnxRuntimeModel"},
    "text_encoder_3": {"T5EncoderModel", "OnnxRuntimeModel"},  # SD 3's optional T5
    "unet": {"UNet2DConditionModel", "OnnxRuntimeModel"},
    "transformer": {"SD3Transformer2DModel", "OnnxRuntimeModel"},
    "vae": {"AutoencoderKL"},
    "vae_decoder": {"OnnxRuntimeModel"},
    "vae_encoder": {"OnnxRuntimeModel"},
    "tokenizer": {"CLIPTokenizer", "CLIPTokenizerFast"},
    "tokenizer_2": {"CLIPTokenizer", "CLIPTokenizerFast"},
    "tokenizer_3": {"T5TokenizerFast", "T5Tokenizer"},
}
SCHEDULER_CLASS = re.compile(r"[A-Za-z0-9]+Scheduler")  # any diffusers scheduler name
# Parts sdrt does not load but diffusers' own SD folders name (exports null them); anything else
# naming a [library, class] pair is refused, since diffusers would import it by that name.
OTHER_CLASSES = {
    "safety_checker": {"StableDiffusionSafetyChecker"},
    "feature_extractor": {"CLIPImageProcessor", "CLIPFeatureExtractor"},
    "image_encoder": {"CLIPVisionModelWithProjection"},
}
# model_index.json's library names: diffusers, transformers, and "stable_diffusion" (diffusers'
# pipeline module, which SD 1.x releases name for their safety checker).
LIBRARIES = frozenset({"diffusers", "transformers", "stable_diffusion"})
# SD 1.x's numbers: diffusers' config defaults, and the constants its legacy
# OnnxStableDiffusionPipeline hard-codes for folders without component configs.
SD1_SCALING_FACTOR = 0.18215
SD1_LATENT_CHANNELS = 4
SD1_VAE_BLOCKS = 4  # vae_scale_factor 2 ** (4 - 1) = 8
SD1_SAMPLE_SIZE = 64  # latent side: 512 px
# Folders named after the format, not the model, in optimum's `NAME/onnx/` and hub layouts
LAYOUT_FOLDERS = frozenset({"onnx", "openvino"})


@dataclass(frozen=True)
class ModelFacts:
    """What the pipeline must know about a model besides its graphs."""

    name: str
    family: Family
    scaling_factor: float
    latent_channels: int
    vae_scale_factor: int
    sample_size: int
    unet_sha256: str | None  # the denoiser's graph (UNet, or SD 3's transformer)
    shift_factor: float = 0.0  # SD 3's VAE latent shift
    patch_size: int = 1  # SD 3's transformer patches: image sides are multiples of it × VAE's

    @property
    def default_size(self) -> int:
        """Native image side in pixels (diffusers: unet sample_size × VAE scale factor)."""
        return self.sample_size * self.vae_scale_factor


def check_folder(folder: Path) -> None:
    """Refuse a path that is not a model folder, naming what is missing."""
    if not folder.is_dir():
        raise ModelError(f"model folder '{folder}' does not exist or is not a folder")
    if not (folder / "model_index.json").is_file():
        raise ModelError(f"'{folder}' is not a model folder: model_index.json is missing")
    index = read_json(folder / "model_index.json")
    check_index(index)
    for name in folder_parts(index):
        if not (folder / name).is_dir():
            raise ModelError(f"model folder '{folder.name}' is incomplete: '{name}/' is missing")


def is_refiner_index(index: dict) -> bool:
    """model_index.json names text_encoder_2 but no text_encoder: the SDXL refiner's layout."""
    return index.get("text_encoder_2") not in (None, [None, None]) \
        and index.get("text_encoder") in (None, [None, None])


def is_sd3_index(index: dict) -> bool:
    """model_index.json names an SD 3 pipeline (an MMDiT `transformer/`, not a UNet)."""
    return str(index.get("_class_name", "")).endswith("StableDiffusion3Pipeline")


def folder_parts(index: dict) -> tuple[str, ...]:
    """The folders a model folder with this model_index.json must have."""
    if is_sd3_index(index):
        return (*SD3_COMPONENTS, "tokenizer", "tokenizer_2", "scheduler")
    if is_refiner_index(index):
        return (*REFINER_COMPONENTS, "tokenizer_2", "scheduler")
    return (*COMPONENTS, "tokenizer", "scheduler")


def graph_file(folder: Path, component: str, backend: str) -> Path:
    """The graph file of one component the backend can read (OpenVINO IR preferred there)."""
    for name in GRAPH_FILES[backend]:
        path = folder / component / name
        if path.is_file():
            return path
    if (folder / component / IR_FILE).is_file():
        raise ModelError(f"{component}/ holds only OpenVINO IR ({IR_FILE}), which the "
                         f"{backend} backend cannot read: use the openvino backend")
    wanted = " or ".join(GRAPH_FILES[backend])
    raise ModelError(f"model folder '{folder.name}' is incomplete: {component}/{wanted} is missing")


def read_facts(folder: Path) -> ModelFacts:
    """Facts from manifest.json, or from the component configs when there is no manifest."""
    if (folder / MANIFEST_NAME).is_file():
        manifest = Manifest.load(folder)
        unet_file = manifest.files.get("unet/model.onnx") \
            or manifest.files.get("transformer/model.onnx")
        return ModelFacts(
            name=model_name(folder, manifest.extra.get("name")),
            # this model's own defaults (sdrt export --default-*) over its family's
            family=replace(get_family(manifest.family), **manifest.defaults),
            scaling_factor=manifest.scaling_factor,
            latent_channels=manifest.latent_channels,
            vae_scale_factor=manifest.vae_scale_factor,
            sample_size=manifest.sample_size,
            unet_sha256=unet_file.sha256 if unet_file else None,
            shift_factor=manifest.shift_factor,
            patch_size=_patch_size(folder),
        )
    if (folder / "transformer").is_dir():
        return _sd3_facts(folder)
    if not any((folder / name / "config.json").is_file() for name in COMPONENTS):
        return _legacy_facts(folder)
    vae = read_json(folder / "vae_decoder" / "config.json")
    unet = read_json(folder / "unet" / "config.json")
    second = folder / "text_encoder_2" / "config.json"  # SDXL's
    first = folder / "text_encoder" / "config.json"  # all but the SDXL refiner's
    family = detect_family(read_json(folder / "model_index.json"), unet, vae,
                           read_json(first) if first.parent.is_dir() else None,
                           read_json(folder / "scheduler" / "scheduler_config.json"),
                           read_json(second) if second.parent.is_dir() else None)
    return ModelFacts(
        name=model_name(folder),
        family=get_family(family),
        scaling_factor=float(vae.get("scaling_factor", SD1_SCALING_FACTOR)),
        latent_channels=int(vae.get("latent_channels", SD1_LATENT_CHANNELS)),
        vae_scale_factor=2 ** (len(vae.get("block_out_channels", [0] * SD1_VAE_BLOCKS)) - 1),
        sample_size=int(unet.get("sample_size", SD1_SAMPLE_SIZE)),
        unet_sha256=None,
    )


def model_name(folder: Path, declared: object = None) -> str:
    """The model's name: a manifest's `name` when it has one, else its folder's, or for
    optimum's `NAME/onnx/` layout (and `NAME/openvino/`) the folder above."""
    if isinstance(declared, str) and declared.strip():
        return declared.strip()
    folder = folder.resolve()
    if folder.name.lower() in LAYOUT_FOLDERS and folder.parent.name:
        return folder.parent.name
    return folder.name


def _patch_size(folder: Path) -> int:
    """SD 3's transformer patch size from its config (1 for UNet models)."""
    config = folder / "transformer" / "config.json"
    return int(read_json(config).get("patch_size", 1)) if config.is_file() else 1


def _sd3_facts(folder: Path) -> ModelFacts:
    """SD 3's facts from optimum's component configs (a folder without manifest.json)."""
    vae = read_json(folder / "vae_decoder" / "config.json")
    transformer = read_json(folder / "transformer" / "config.json")
    configs = [read_json(folder / name / "config.json")
               for name in ("text_encoder", "text_encoder_2")]
    t5 = folder / "text_encoder_3" / "config.json"
    family = detect_sd3_family(transformer, vae, *configs, read_json(t5) if t5.is_file() else None,
                               read_json(folder / "scheduler" / "scheduler_config.json"))
    return ModelFacts(
        name=model_name(folder), family=get_family(family),
        scaling_factor=float(vae["scaling_factor"]), latent_channels=int(vae["latent_channels"]),
        vae_scale_factor=2 ** (len(vae["block_out_channels"]) - 1),
        sample_size=int(transformer["sample_size"]), unet_sha256=None,
        shift_factor=float(vae.get("shift_factor") or 0.0),
        patch_size=int(transformer.get("patch_size", 1)))


def _legacy_facts(folder: Path) -> ModelFacts:
    """SD 1.x's numbers for diffusers' legacy ONNX layout, whose graphs come without configs."""
    log.warning("'%s' has no manifest.json and no component config.json (diffusers' legacy "
                "ONNX layout): assuming SD 1.x (VAE scaling factor %s, 8x VAE, 512 px)",
                folder.name, SD1_SCALING_FACTOR)
    # SD 2.x's generation defaults are the same, and the prediction type is the scheduler
    # config's, which this layout keeps.
    return ModelFacts(
        name=model_name(folder),
        family=get_family("sd1"),
        scaling_factor=SD1_SCALING_FACTOR,
        latent_channels=SD1_LATENT_CHANNELS,
        vae_scale_factor=2 ** (SD1_VAE_BLOCKS - 1),
        sample_size=SD1_SAMPLE_SIZE,
        unet_sha256=None,
    )


def check_index(index: dict) -> None:
    """Refuse a model_index.json whose pipeline or part classes are not on the allow-lists."""
    name = index.get("_class_name")
    if not isinstance(name, str) or name not in PIPELINE_CLASSES:
        raise ModelError(f"model_index.json _class_name {name!r} is not a supported pipeline "
                         f"({', '.join(sorted(PIPELINE_CLASSES))})")
    known = {**COMPONENT_CLASSES, **OTHER_CLASSES, "scheduler": None}
    for part in sorted(set(index) - set(known)):  # any other [library, class] pair
        entry = index[part]
        if isinstance(entry, list) and len(entry) == 2 and entry != [None, None]:
            raise ModelError(f"model_index.json names an unknown part {part!r} as {entry!r}; "
                             f"sdrt reads {', '.join(sorted(known))}")
    for part, classes in known.items():
        entry = index.get(part)
        if entry is None or entry == [None, None]:
            continue
        ok = isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str) and (
            entry[1] in classes if classes else SCHEDULER_CLASS.fullmatch(entry[1]) is not None)
        if not ok:
            wanted = f"one of {', '.join(sorted(classes))}" if classes else "a scheduler class"
            raise ModelError(f"model_index.json {part} is {entry!r}, expected {wanted}")
        if not isinstance(entry[0], str) or entry[0] not in LIBRARIES:
            raise ModelError(f"model_index.json {part} names library {entry[0]!r}, expected "
                             f"one of {', '.join(sorted(LIBRARIES))}")


def read_json(path: Path) -> dict:
    """A component's JSON file; ModelError naming it when missing or malformed."""
    try:
        data = json.loads(path.read_text("utf-8"))
    except FileNotFoundError as exc:
        raise ModelError(f"'{path.parent.name}/{path.name}' is missing") from exc
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: [[[[…
        raise ModelError(f"'{path.parent.name}/{path.name}' is not valid JSON: "
                         f"{first_line(exc)}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"'{path.parent.name}/{path.name}' must hold a JSON object, "
                         f"not {type(data).__name__}")
    return data
