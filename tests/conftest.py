"""Session fixtures: tiny random models of each family (diffusers layout) and their ONNX exports,
and the parity helpers that compare sdrt's images with diffusers' (imported by test modules).

Built once per test run into a temporary folder, never fetched from the network. Tests that
need them skip, with the reason, when the export stack (torch, diffusers, ...) is missing.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPORT_STACK = ("torch", "diffusers", "transformers", "onnx", "safetensors")


def _need_export_stack() -> None:
    for name in EXPORT_STACK:
        pytest.importorskip(name, reason=f"{name} is not installed (pip install 'sdrt[export]')")


def _model_builder() -> ModuleType:
    """models/build_random_sd.py, which is a script, not an installed module."""
    path = ROOT / "models" / "build_random_sd.py"
    spec = importlib.util.spec_from_file_location("build_random_sd", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(arch: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/configs/<arch> with seed-0 random weights, in a fresh temporary folder."""
    _need_export_stack()
    return _model_builder().build_random_sd(arch, tmp_path_factory.mktemp(arch) / arch, seed=0)


def _export(src: Path, tmp_path_factory: pytest.TempPathFactory, *, check: bool = True) -> Path:
    """`src` exported to optimum's ONNX layout with manifest.json."""
    from sdrt.export.onnx_export import export_pipeline

    name = f"{src.name}-onnx"
    return export_pipeline(src, tmp_path_factory.mktemp(name) / name, check=check)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny SD 1.x diffusers folder (epsilon prediction, seed 0): models/configs/tiny_sd."""
    return _build("tiny_sd", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_onnx_dir(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_sd_dir exported to optimum's ONNX layout with manifest.json (graphs checked)."""
    return _export(tiny_sd_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_sd_v_dir(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_sd_dir's weights with a v_prediction scheduler config."""
    out = tmp_path_factory.mktemp("tiny_sd_v") / "tiny-sd-v"
    shutil.copytree(tiny_sd_dir, out)
    config_path = out / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    return out


@pytest.fixture(scope="session")
def tiny_onnx_v_dir(tiny_sd_v_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_sd_v_dir exported (graphs equal tiny_onnx_dir's, so not re-checked)."""
    return _export(tiny_sd_v_dir, tmp_path_factory, check=False)


@pytest.fixture(scope="session")
def tiny_sd2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny SD 2.x 768-v diffusers folder (v-prediction DDIM, `!` padding): tiny_sd2."""
    return _build("tiny_sd2", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_sd2_onnx_dir(tiny_sd2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_sd2_dir exported (graphs checked)."""
    return _export(tiny_sd2_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_turbo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny SD-Turbo diffusers folder (Euler, trailing spacing, epsilon): tiny_turbo."""
    return _build("tiny_turbo", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny SDXL diffusers folder (two text encoders, text_time UNet, Euler): tiny_sdxl."""
    return _build("tiny_sdxl", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_sdxl_onnx_dir(tiny_sdxl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_sdxl_dir exported (graphs checked)."""
    return _export(tiny_sdxl_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_sdxl_turbo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny SDXL-Turbo diffusers folder (Euler ancestral, trailing spacing): tiny_sdxl_turbo."""
    return _build("tiny_sdxl_turbo", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_sdxl_turbo_onnx_dir(tiny_sdxl_turbo_dir: Path,
                             tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_sdxl_turbo_dir exported (its graphs equal tiny_sdxl_onnx_dir's, so not re-checked)."""
    return _export(tiny_sdxl_turbo_dir, tmp_path_factory, check=False)


@pytest.fixture(scope="session")
def tiny_turbo_onnx_dir(tiny_turbo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_turbo_dir exported (graphs checked)."""
    return _export(tiny_turbo_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_lcm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny LCM diffusers folder (SD 1.x UNet with time_cond_proj_dim, LCMScheduler):
    tiny_sd_lcm."""
    return _build("tiny_sd_lcm", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_lcm_onnx_dir(tiny_lcm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_lcm_dir exported (graphs checked; the UNet takes timestep_cond)."""
    return _export(tiny_lcm_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_lcm_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny LCM-SDXL diffusers folder (tiny_sdxl with time_cond_proj_dim, LCMScheduler):
    tiny_sdxl_lcm."""
    return _build("tiny_sdxl_lcm", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_lcm_sdxl_onnx_dir(tiny_lcm_sdxl_dir: Path,
                           tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_lcm_sdxl_dir exported (graphs checked)."""
    return _export(tiny_lcm_sdxl_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_inpaint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny SD 1.x inpainting diffusers folder (9-channel UNet input, PNDM,
    StableDiffusionInpaintPipeline): tiny_sd_inpaint."""
    return _build("tiny_sd_inpaint", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_inpaint_onnx_dir(tiny_inpaint_dir: Path,
                          tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_inpaint_dir exported (graphs checked; the UNet takes 9 channels)."""
    return _export(tiny_inpaint_dir, tmp_path_factory)


@pytest.fixture(scope="module", params=["ort", "openvino"])
def backend(request: pytest.FixtureRequest) -> str:
    """Each runtime backend in turn (OpenVINO skipped where it is not installed)."""
    if request.param == "openvino":
        pytest.importorskip("openvino")
    return request.param


# ---------------------------------------------------------------- helpers shared by test modules

# The bounds, in 8-bit steps: ORT runs the same float32 kernels as torch up to operator
# fusion order; OpenVINO fp32 reorders more aggressively (optimum-intel uses atol 6e-3 ≈ 1.5/255).
MAX_PIXEL_DIFF = {"ort": 2, "openvino": 4}
# Image sizes of the parity tests, (width, height): 72 and 56 are not multiples of 64.
PARITY_SIZES = [(64, 64), (72, 56)]

PROMPT = "a small red circle in the top left on a blue background"
NEGATIVE = "blurry, text"

REFERENCE_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "lcm": ("LCMScheduler", {}),
}


# model_index.json's pipeline → what keeps diffusers' output pure: no safety checker; no invisible
# watermark, which SDXL adds to the pixels when the invisible-watermark package is installed.
REFERENCE_PIPELINES = {
    "StableDiffusionPipeline": {"safety_checker": None, "requires_safety_checker": False},
    "StableDiffusionXLPipeline": {"add_watermarker": False},
    "StableDiffusionXLImg2ImgPipeline": {"add_watermarker": False},
    "LatentConsistencyModelPipeline": {"safety_checker": None, "requires_safety_checker": False},
    "StableDiffusionInpaintPipeline": {"safety_checker": None, "requires_safety_checker": False},
    "StableDiffusionImg2ImgPipeline": {"safety_checker": None, "requires_safety_checker": False},
}


def load_reference(folder: Path, pipeline: str | None = None):
    """The diffusers pipeline model_index.json names (SD or SDXL), or `pipeline` (e.g.
    StableDiffusionImg2ImgPipeline on the same weights), the parity reference."""
    import diffusers

    name = pipeline or json.loads((folder / "model_index.json").read_text())["_class_name"]
    pipe = getattr(diffusers, name).from_pretrained(folder, **REFERENCE_PIPELINES[name])
    pipe.set_progress_bar_config(disable=True)
    pipe.folder_scheduler_config = pipe.scheduler.config  # each test starts from the folder's own
    return pipe


def reference_images(pipe, sampler: str, *, steps: int, guidance: float, width: int, height: int,
                     seed: int, num_images: int, negative: str | None = NEGATIVE,
                     prompt: str = PROMPT) -> np.ndarray:
    """diffusers' images, (B, H, W, 3) int16 in 0..255, with sdrt's sampler and seed+i rule
    (`negative` None is left out: diffusers' LCM pipeline takes no negative prompt)."""
    import torch

    use_sampler(pipe, sampler)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(num_images)]
    negative_option = {} if negative is None else {"negative_prompt": negative}
    out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, width=width,
               height=height, generator=generators, num_images_per_prompt=num_images,
               output_type="np", **negative_option)
    return np.round(out.images * 255).astype(np.int16)


def use_sampler(pipe, sampler: str) -> None:
    """Give a diffusers pipeline the scheduler that matches sdrt's `sampler`."""
    import diffusers

    class_name, overrides = REFERENCE_SCHEDULERS[sampler]
    scheduler_class = getattr(diffusers, class_name)
    pipe.scheduler = scheduler_class.from_config(pipe.folder_scheduler_config, **overrides)


def as_array(images: list) -> np.ndarray:
    """sdrt's PIL images as one (B, H, W, 3) int16 array, comparable to reference_images."""
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def count_unet_calls(pipe, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The `sample` shape of every UNet call `pipe` makes from now on (a live list)."""
    calls = []
    original = pipe.unet.session.run

    def counting_run(feeds):
        calls.append(feeds["sample"].shape)
        return original(feeds)

    monkeypatch.setattr(pipe.unet.session, "run", counting_run)
    return calls


@pytest.fixture(scope="session")
def split_embedded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the embedded model with its VAE decoder split into a whole-image head and a
    shared-statistics tail (export/split_vae_decoder.py; the shipped folder stays unsplit)."""
    import shutil

    from sdrt.export.split_vae_decoder import split_folder
    from sdrt.runtime.model.folder import EMBEDDED_MODEL

    folder = tmp_path_factory.mktemp("split") / "embedded"
    shutil.copytree(EMBEDDED_MODEL, folder)
    split_folder(folder)
    return folder
