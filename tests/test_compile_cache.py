"""OpenVINO's compile cache (runtime/compile_cache.py): where it lives, when it is on, and that
images from imported blobs equal freshly compiled ones."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from sdrt.runtime import compile_cache
from sdrt.runtime.pipeline import Pipeline

pytest.importorskip("openvino", reason="the compile cache is OpenVINO's")
pytestmark = pytest.mark.openvino


def test_folder_is_per_openvino_version_under_the_chosen_root(tmp_path, monkeypatch):
    import openvino as ov

    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path))
    folder = compile_cache.cache_dir()
    assert folder.parent == tmp_path and folder.is_dir()
    assert folder.name.startswith("openvino-" + ov.get_version().split("-")[0])
    assert "/" not in folder.name


def test_by_default_on_for_gpus_under_xdg_cache_home_and_off_for_the_cpu(tmp_path, monkeypatch):
    monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.cache_dir("gpu").parent == tmp_path / "sdrt"
    assert compile_cache.cache_dir("cpu") is None  # measured: no gain on the CPU


def test_off_turns_it_off(monkeypatch):
    monkeypatch.setenv(compile_cache.ENV_VAR, "OFF")
    assert compile_cache.cache_dir("gpu") is None
    assert compile_cache.options(None) == {}


def test_an_unmakeable_root_warns_and_compiles_without_cache(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(compile_cache.ENV_VAR, str(blocker / "cache"))
    with caplog.at_level(logging.WARNING):
        assert compile_cache.cache_dir() is None
    assert "compile cache off" in caplog.text


def _image(folder, **options):
    pipe = Pipeline.load(folder, "openvino")
    return np.asarray(pipe.generate("a red circle", seed=3, steps=2, **options)[0])


def test_generation_writes_blobs_and_imported_blobs_give_the_same_image(
        tiny_onnx_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path))
    compiled = _image(tiny_onnx_dir)
    blobs = sorted(tmp_path.rglob("*.blob"))
    assert len(blobs) == 3  # text encoder, UNet, VAE decoder at this shape
    imported = _image(tiny_onnx_dir)
    assert sorted(tmp_path.rglob("*.blob")) == blobs  # found, not compiled again
    np.testing.assert_array_equal(imported, compiled)
    _image(tiny_onnx_dir, width=48, height=48)  # a new shape is a new blob
    assert len(list(tmp_path.rglob("*.blob"))) > len(blobs)


@pytest.mark.parametrize("setting", ["off", None])  # None: the CPU's default
def test_off_writes_nothing(tiny_onnx_dir, tmp_path, monkeypatch, setting):
    if setting is None:
        monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(compile_cache.ENV_VAR, setting)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    _image(tiny_onnx_dir)
    assert not list(tmp_path.rglob("*.blob"))
