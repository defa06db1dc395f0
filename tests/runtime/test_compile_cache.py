"""OpenVINO's compile cache (runtime/compile_cache.py): where it lives, when it is on, and that
images from imported blobs equal freshly compiled ones."""

from __future__ import annotations

import locale
import logging
import os

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


def test_by_default_under_xdg_cache_home_with_blobs_for_gpus_and_quantized_graphs(
        tmp_path, monkeypatch):
    monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = compile_cache.cache_dir()
    assert folder.parent == tmp_path / "sdrt"
    assert compile_cache.options(folder, "gpu")["CACHE_DIR"] == str(folder)
    assert compile_cache.options(folder, "cpu") == {}  # measured: blobs buy nothing on the CPU
    quantized = compile_cache.options(folder, "cpu", quantized=True)  # except quantized graphs'
    assert quantized == {"CACHE_DIR": str(folder), "CACHE_MODE": "OPTIMIZE_SPEED"}
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path))
    assert compile_cache.options(folder, "cpu")["CACHE_DIR"] == str(folder)  # asked for


def test_off_turns_it_off(monkeypatch):
    monkeypatch.setenv(compile_cache.ENV_VAR, "OFF")
    assert compile_cache.cache_dir() is None
    assert compile_cache.options(None, "gpu") == {}


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
    ctype = locale.setlocale(locale.LC_CTYPE)
    compiled = _image(tiny_onnx_dir)
    # OpenVINO switches the process to the C locale around blobs; compiles on several threads
    # (runtime/compile_ahead.py) once left it there, and Python then decoded text as ASCII
    assert locale.setlocale(locale.LC_CTYPE) == ctype
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


def _read_sources(monkeypatch) -> list[str]:
    """Records which graphs were read from their ONNX files rather than the cache's IR."""
    from sdrt.runtime import session
    sources: list[str] = []
    real = session._read_ov_source

    def spy(core, path):
        sources.append(path.parent.name)
        return real(core, path)

    monkeypatch.setattr(session, "_read_ov_source", spy)
    return sources


def test_inline_weight_graphs_are_read_from_their_ir_once_converted(
        tiny_onnx_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path))
    monkeypatch.setattr(compile_cache, "INLINE_WEIGHTS_MIN_BYTES", 0)  # tiny graphs count too
    sources = _read_sources(monkeypatch)
    from_onnx = _image(tiny_onnx_dir)
    assert sorted(sources) == ["text_encoder", "unet", "vae_decoder"]
    assert len(list(tmp_path.rglob("graphs/*/model.xml"))) == 3
    assert not list(tmp_path.rglob(".partial-*"))
    sources.clear()
    np.testing.assert_array_equal(_image(tiny_onnx_dir), from_onnx)
    assert sources == []  # every graph came from its IR


def test_a_replaced_graph_or_a_damaged_entry_is_converted_again(
        tiny_onnx_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.setattr(compile_cache, "INLINE_WEIGHTS_MIN_BYTES", 0)
    graph = tiny_onnx_dir / "vae_decoder" / "model.onnx"
    folder = compile_cache.cache_dir()
    first = compile_cache.converted_graph(folder, graph)
    os.utime(graph, ns=(graph.stat().st_atime_ns, graph.stat().st_mtime_ns + 10**9))
    assert compile_cache.converted_graph(folder, graph) != first  # a new file, a new key
    expected = _image(tiny_onnx_dir)
    converted = compile_cache.converted_graph(folder, graph)
    (converted.parent / "model.bin").write_bytes(b"damaged")
    sources = _read_sources(monkeypatch)
    with caplog.at_level(logging.WARNING):
        np.testing.assert_array_equal(_image(tiny_onnx_dir), expected)
    assert sources == ["vae_decoder"] and "unreadable" in caplog.text
    assert (converted.parent / "model.bin").stat().st_size > len(b"damaged")  # written anew


def test_small_graphs_and_external_weight_graphs_are_not_copied(tmp_path):
    small = tmp_path / "model.onnx"
    small.write_bytes(b"x" * 1024)
    assert compile_cache.converted_graph(tmp_path, small) is None  # weights outside, or tiny
    assert compile_cache.converted_graph(None, small) is None  # cache off


def _external_weights_copy(graph, out):
    """`graph` saved again with its weights in `model.onnx_data`, as large exports are."""
    import onnx

    out.mkdir()
    onnx.save_model(onnx.load(str(graph)), str(out / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx_data", size_threshold=0)
    return out / "model.onnx"


def test_bf16_copies_external_weight_graphs_transformed_with_float16_weights(
        tiny_onnx_dir, tmp_path, monkeypatch):
    from sdrt.runtime.session import OpenVinoSession

    graph = _external_weights_copy(tiny_onnx_dir / "vae_decoder" / "model.onnx",
                                   tmp_path / "vae_decoder")
    weights = graph.with_name("model.onnx_data")
    # between the graph's own size and its size with weights, as SD 1.5's UNet is
    monkeypatch.setattr(compile_cache, "INLINE_WEIGHTS_MIN_BYTES", graph.stat().st_size + 1)
    folder = tmp_path / "cache"
    assert not compile_cache.half_weights(graph, "f32")
    assert compile_cache.converted_graph(folder, graph) is None  # fp32: read in place
    assert compile_cache.half_weights(graph, "bf16")
    # inline weights keep the as-read copy at bf16 too (a float16 text encoder compiled slower)
    assert not compile_cache.half_weights(tiny_onnx_dir / "vae_decoder" / "model.onnx", "bf16")
    converted = compile_cache.converted_graph(folder, graph, half=True)
    assert converted is not None
    sources = _read_sources(monkeypatch)
    latent = np.random.default_rng(0).standard_normal((1, 4, 4, 4), dtype=np.float32)

    first = OpenVinoSession(graph, precision_hint="bf16", cache_dir=folder)
    assert sources == ["vae_decoder"] and converted.exists()
    assert 'element_type="f16"' in converted.read_text()  # float16 weights: half the bytes
    assert converted.with_name("model.bin").stat().st_size < weights.stat().st_size * 0.6
    sources.clear()
    second = OpenVinoSession(graph, precision_hint="bf16", cache_dir=folder)
    assert sources == []  # read from the copy
    # the first run compiled the copy too, so a seed gives one image from the first run on
    np.testing.assert_array_equal(first.run({"latent_sample": latent})["sample"],
                                  second.run({"latent_sample": latent})["sample"])
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert compile_cache.converted_graph(folder, graph, half=True) != converted  # new weights


def test_quantized_graphs_keep_full_blobs_on_the_cpu_by_default(
        tiny_onnx_dir, tmp_path, monkeypatch):
    """An int8 IR (FakeQuantize nodes) gets a blob with its weights; its image equals the
    freshly compiled one's, and a float graph beside it gets none."""
    nncf = pytest.importorskip("nncf")
    import openvino as ov

    monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    source = ov.Core().read_model(str(tiny_onnx_dir / "vae_decoder" / "model.onnx"))
    latents = np.random.default_rng(0).standard_normal((1, 4, 32, 32), dtype=np.float32)
    quantized = nncf.quantize(source, nncf.Dataset([{"latent_sample": latents}]), subset_size=1)
    assert compile_cache.is_quantized(quantized) and not compile_cache.is_quantized(source)
    graph = tmp_path / "int8" / "openvino_model.xml"
    ov.save_model(quantized, str(graph))
    ov.save_model(source, str(tmp_path / "fp32" / "openvino_model.xml"))
    from sdrt.runtime.session import open_session

    fp32 = open_session(tmp_path / "fp32" / "openvino_model.xml", "openvino")
    fp32.run({"latent_sample": latents})
    assert not list(tmp_path.rglob("*.blob"))
    compiled = open_session(graph, "openvino").run({"latent_sample": latents})
    blobs = list(tmp_path.rglob("*.blob"))
    assert len(blobs) == 1
    imported = open_session(graph, "openvino").run({"latent_sample": latents})
    assert list(tmp_path.rglob("*.blob")) == blobs  # found, not compiled again
    for name, value in compiled.items():
        np.testing.assert_array_equal(imported[name], value)
    blobs[0].unlink()
    open_session(graph, "openvino", low_memory=True).run({"latent_sample": latents})
    assert not list(tmp_path.rglob("*.blob"))  # low-memory mode: no blob held in memory


def test_blobs_are_pruned_oldest_first_past_the_limit(tmp_path):
    for age, name in enumerate(["new", "mid", "old"]):
        blob = tmp_path / f"{name}.blob"
        blob.write_bytes(b"x" * 100)
        os.utime(blob, ns=(10**18 - age * 10**9,) * 2)
    (tmp_path / "graphs").mkdir()  # IR copies are never pruned
    compile_cache.prune_blobs(tmp_path, limit=250)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graphs", "mid.blob", "new.blob"]
    compile_cache.prune_blobs(tmp_path, limit=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graphs", "new.blob"]  # newest kept
