"""sdrt's embedded model (models/embedded/): the default of `sdrt generate`, within its size
budget, equal to diffusers on its committed weights, reproduced by re-export, and meeting the
issue's adherence targets on held-out captions."""

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sdrt.cli.main import main
from sdrt.evaluation.adherence import evaluate
from sdrt.evaluation.scenes import held_out_captions
from sdrt.runtime.model.folder import EMBEDDED_MODEL
from sdrt.runtime.model.manifest import Manifest
from sdrt.runtime.pipeline import Pipeline
from tests.conftest import MAX_PIXEL_DIFF, ROOT, as_array, load_reference, reference_images

EMBEDDED_WEIGHTS = ROOT / "models" / "embedded" / "diffusers"
SIZE_BUDGET = 40_000_000  # bytes: all of models/embedded, the 40 MB
NATIVE_SIZE = 64
# The targets on ≥ 200 held-out captions (seeds fixed), at the model's defaults.
TARGETS = {"background": 0.95, "colour": 0.90, "kind": 0.80, "position": 0.80}
HELD_OUT_CAPTIONS = 200


def committed_bytes() -> int:
    """Everything under models/embedded: weights, their export, the tiny VAE, logs."""
    return sum(p.stat().st_size for p in (ROOT / "models" / "embedded").rglob("*")
               if p.is_file())


def test_weights_and_export_fit_the_size_budget():
    assert committed_bytes() < SIZE_BUDGET


def test_generate_without_model_uses_the_embedded_model(tmp_path):
    out = tmp_path / "x.png"
    result = CliRunner().invoke(main, ["generate", "a red circle on a blue background",
                                       "--seed", "1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    image = Image.open(out)
    assert image.size == (NATIVE_SIZE, NATIVE_SIZE)
    assert "Size: 64x64" in image.info["parameters"]


@pytest.mark.parity
def test_images_equal_diffusers(backend):
    pytest.importorskip("diffusers")
    reference = load_reference(EMBEDDED_WEIGHTS)
    pipe = Pipeline.load(EMBEDDED_MODEL, backend=backend)
    options = dict(steps=20, guidance=5.0, width=NATIVE_SIZE, height=NATIVE_SIZE, seed=3,
                   num_images=2, negative=None, prompt="a large green square on the left, "
                   "white background")
    expected = reference_images(reference, "ddim", **options)
    got = as_array(pipe.generate(options["prompt"], steps=20, guidance_scale=5.0, seed=3,
                                 num_images=2, sampler="ddim"))
    assert np.abs(got - expected).max() <= MAX_PIXEL_DIFF[backend]


def test_reexport_reproduces_the_committed_folder(tmp_path):
    pytest.importorskip("torch")
    from sdrt.export.onnx_export import export_pipeline

    committed = Manifest.load(EMBEDDED_MODEL)
    fresh = export_pipeline(EMBEDDED_WEIGHTS, tmp_path / "onnx", defaults=committed.defaults)
    assert Manifest.load(fresh).defaults == committed.defaults
    prompt = "a small yellow triangle in the bottom right on a purple background"
    images = [as_array(Pipeline.load(folder).generate(prompt, seed=5, num_images=2))
              for folder in (EMBEDDED_MODEL, fresh)]
    assert np.array_equal(images[0], images[1])


def test_held_out_adherence_meets_the_targets():
    captions = held_out_captions(HELD_OUT_CAPTIONS, seed=0)
    pipe = Pipeline.load()
    images = [pipe.generate(text, seed=i)[0] for i, text in enumerate(captions)]
    scores = evaluate(images, captions)
    missed = {k: (round(scores[k], 3), v) for k, v in TARGETS.items() if scores[k] < v}
    assert not missed, f"below target (score, target): {missed}"


def test_generation_needs_no_network(monkeypatch, tmp_path):
    import socket

    def no_network(*args, **kwargs):
        raise OSError("network is off in this test")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    test_generate_without_model_uses_the_embedded_model(tmp_path)
