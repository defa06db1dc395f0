"""LoRA at run time and textual inversion, image for image against diffusers.

The reference applies each LoRA with `load_lora_weights` + `fuse_lora(lora_scale=w)` and each
embedding with `load_textual_inversion(path, token=stem)`; sdrt applies them per request on the
exported graphs (runtime/adapters/). The bounds are the fp32 parity bounds (MAX_PIXEL_DIFF).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sdrt.runtime.pipeline import Pipeline
from tests.conftest import (
    MAX_PIXEL_DIFF,
    NEGATIVE,
    PROMPT,
    as_array,
    load_reference,
    reference_images,
)
from tests.runtime.adapters.lora_files import SD_KOHYA, SD_PEFT, SDXL_SGM, write_lora

STEPS = 4
SIZE = 64
SEED = 3
SAMPLER = "euler"


def _settings(**extra) -> dict:
    return {"steps": STEPS, "guidance_scale": 7.5, "width": SIZE, "height": SIZE, "seed": SEED,
            "sampler": SAMPLER, "negative_prompt": NEGATIVE, **extra}


def _reference(folder: Path, loras: list[tuple[Path, float]], prompt: str = PROMPT,
               embeddings: list[Path] = ()) -> np.ndarray:
    """diffusers' image with `loras` fused at their weights and `embeddings` loaded, computed
    once per case for both backends."""
    key = (folder, tuple(loras), prompt, tuple(embeddings))
    if key not in _REFERENCES:
        _REFERENCES[key] = _diffusers_image(folder, loras, prompt, embeddings)
    return _REFERENCES[key]


_REFERENCES: dict[tuple, np.ndarray] = {}


def _diffusers_image(folder: Path, loras: list[tuple[Path, float]], prompt: str,
                     embeddings: list[Path]) -> np.ndarray:
    if loras:
        pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft")
    pipe = load_reference(folder)
    for path, weight in loras:  # each fused into the weights, then its layers dropped
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora(lora_scale=weight)
        pipe.unload_lora_weights()
    for path in embeddings:
        pipe.load_textual_inversion(str(path), token=path.stem)
    return reference_images(pipe, SAMPLER, steps=STEPS, guidance=7.5, width=SIZE, height=SIZE,
                            seed=SEED, num_images=1, prompt=prompt)


def _assert_close(images: list, expected: np.ndarray, backend: str) -> None:
    diff = np.abs(as_array(images) - expected).max()
    assert diff <= MAX_PIXEL_DIFF[backend], f"{diff} > {MAX_PIXEL_DIFF[backend]}"


@pytest.fixture(scope="module")
def sd_loras(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    write_lora(folder / "kohya.safetensors", SD_KOHYA, seed=1)
    write_lora(folder / "peft.safetensors", SD_PEFT, peft=True, seed=2)
    return folder


@pytest.fixture(scope="module")
def sd_pipe(tiny_onnx_dir, sd_loras, backend) -> Pipeline:
    return Pipeline.load(tiny_onnx_dir, backend, lora_dir=sd_loras)


def test_kohya_lora_by_tag_and_by_argument_equals_diffusers(sd_pipe, tiny_sd_dir, sd_loras,
                                                           backend):
    """Attention, text-encoder (MLP included) and LoCon conv layers at 0.8, from a prompt tag
    and from `loras=`; the tag is taken out of the text and kept in the metadata."""
    expected = _reference(tiny_sd_dir, [(sd_loras / "kohya.safetensors", 0.8)])
    tagged = sd_pipe.generate(f"{PROMPT} <lora:kohya:0.8>", **_settings())
    _assert_close(tagged, expected, backend)
    given = sd_pipe.generate(PROMPT, loras=[(str(sd_loras / "kohya.safetensors"), 0.8)],
                             **_settings())
    assert np.array_equal(as_array(given), as_array(tagged))
    parameters = tagged[0].info["parameters"]
    assert parameters.startswith(f"{PROMPT} <lora:kohya:0.8>\n")
    assert 'Lora hashes: "kohya: ' in parameters


def test_peft_and_two_loras_equal_diffusers(sd_pipe, tiny_sd_dir, sd_loras, backend):
    """A diffusers/PEFT file; then two LoRAs at once, one at a negative weight."""
    peft = sd_loras / "peft.safetensors"
    _assert_close(sd_pipe.generate(PROMPT, loras=[("peft", 0.7)], **_settings()),
                  _reference(tiny_sd_dir, [(peft, 0.7)]), backend)
    both = [(sd_loras / "kohya.safetensors", 0.6), (peft, -0.5)]
    _assert_close(sd_pipe.generate(PROMPT, loras=[("kohya", 0.6), ("peft", -0.5)],
                                   **_settings()),
                  _reference(tiny_sd_dir, both), backend)


def test_requests_never_stack(sd_pipe, tiny_sd_dir, sd_loras, backend):
    """0.8, none, 0.4, 0.8 in turn: each its own diffusers image, the plain one exactly the
    pipeline's plain image."""
    kohya = sd_loras / "kohya.safetensors"
    plain = as_array(sd_pipe.generate(PROMPT, **_settings()))
    for weight in (0.8, None, 0.4, 0.8):
        loras = [] if weight is None else [("kohya", weight)]
        images = sd_pipe.generate(PROMPT, loras=loras, **_settings())
        if weight is None:
            assert np.array_equal(as_array(images), plain)
        _assert_close(images, _reference(tiny_sd_dir, [] if weight is None
                                         else [(kohya, weight)]), backend)


def test_sdxl_sgm_named_lora_with_both_text_encoders(tiny_sdxl_onnx_dir, tiny_sdxl_dir,
                                                     tmp_path, backend):
    lora = write_lora(tmp_path / "sdxl.safetensors", SDXL_SGM, seed=4)
    pipe = Pipeline.load(tiny_sdxl_onnx_dir, backend)
    _assert_close(pipe.generate(PROMPT, loras=[(str(lora), 0.8)], **_settings()),
                  _reference(tiny_sdxl_dir, [(lora, 0.8)]), backend)


def test_two_vector_embedding_equals_diffusers(tiny_onnx_dir, tiny_sd_dir, tmp_path, backend):
    """A 2-vector A1111 embedding (`emb_params`) triggered by its file name."""
    from safetensors.numpy import save_file

    folder = tmp_path / "embeddings"
    folder.mkdir()
    rng = np.random.default_rng(5)
    path = folder / "shinystyle.safetensors"
    save_file({"emb_params": rng.standard_normal((2, 32)).astype(np.float32)}, str(path))
    prompt = "a photo in shinystyle of a circle"
    pipe = Pipeline.load(tiny_onnx_dir, backend, embeddings_dir=folder)
    images = pipe.generate(prompt, **_settings())
    _assert_close(images, _reference(tiny_sd_dir, [], prompt, [path]), backend)
    assert 'TI hashes: "shinystyle: ' in images[0].info["parameters"]
    plain = as_array(pipe.generate(prompt.replace("shinystyle", "style"), **_settings()))
    assert not np.array_equal(as_array(images), plain)  # the embedding changes the image


def test_one_server_process_answers_each_weight_as_diffusers(tiny_onnx_dir, tiny_sd_dir,
                                                            sd_loras):
    """`sdrt serve --lora-dir`, spoken to in A1111's txt2img shape: LoRA weights 0.8, none, 0.4,
    0.8 in turn, each image its own diffusers reference."""
    for module in ("fastapi", "uvicorn", "httpx"):
        pytest.importorskip(module, reason=f"{module} is missing (pip install 'sdrt[serve]')")
    import base64
    import io

    import httpx
    from PIL import Image

    from sdrt.benchmarks.server_load import running_server

    kohya = sd_loras / "kohya.safetensors"
    body = {"negative_prompt": NEGATIVE, "steps": STEPS, "cfg_scale": 7.5, "width": SIZE,
            "height": SIZE, "seed": SEED, "sampler_name": "Euler"}
    with running_server("--model", str(tiny_onnx_dir), "--lora-dir", str(sd_loras)) as server:
        for weight in (0.8, None, 0.4, 0.8):
            tag = "" if weight is None else f" <lora:kohya:{weight}>"
            response = httpx.post(f"{server.url}/sdapi/v1/txt2img",
                                  json={**body, "prompt": PROMPT + tag}, timeout=300)
            assert response.status_code == 200, response.text
            image = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
            _assert_close([image], _reference(tiny_sd_dir, [] if weight is None
                                              else [(kohya, weight)]), "ort")
