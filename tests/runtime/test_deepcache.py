"""DeepCache (export/deepcache.py, runtime/deepcache.py, quantize/deepcache_gate.py): the cut
graphs, the per-generation cache, a torch reference, threads, errors and the fidelity gate."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from sdrt.export.deepcache import make_deepcache
from sdrt.runtime.deepcache import DEEPCACHE_DIR, FEATURE, gate_record
from sdrt.runtime.errors import ExportError, InputError, ModelError
from sdrt.runtime.model.manifest import Manifest
from sdrt.runtime.pipeline import Pipeline
from tests.conftest import MAX_PIXEL_DIFF, PROMPT, as_array, load_reference, reference_images

EMBEDDED = Path(__file__).resolve().parents[2] / "models" / "embedded"
# The full graph is the UNet plus one Identity output, and the shallow graph the same nodes on
# the same inputs: ONNX Runtime may fuse them differently, float32 rounding is all that differs.
SAME_GRAPH_ATOL = 1e-5
OPTIONS = {"steps": 12, "seed": 5, "width": 64, "height": 64, "guidance_scale": 7.5}


def _folder(tmp_path_factory: pytest.TempPathFactory, branch: int) -> Path:
    folder = tmp_path_factory.mktemp(f"deepcache{branch}") / "model"
    shutil.copytree(EMBEDDED / "onnx", folder)
    make_deepcache(folder, branch)
    return folder


@pytest.fixture(scope="module")
def cached_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _folder(tmp_path_factory, 0)


@pytest.fixture(scope="module")
def pipe(cached_dir: Path) -> Pipeline:
    return Pipeline.load(cached_dir)


def _latents(pipe: Pipeline, **options) -> np.ndarray:
    seen = []
    pipe.generate(PROMPT, callback=lambda i, n, x: seen.append(x), **{**OPTIONS, **options})
    return seen[-1]


def test_interval_one_equals_the_plain_pipeline(pipe: Pipeline) -> None:
    np.testing.assert_allclose(_latents(pipe, deepcache=1), _latents(pipe), rtol=0,
                               atol=SAME_GRAPH_ATOL)


def test_larger_intervals_run_the_shallow_graph_and_change_the_result(
        pipe: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    graphs = pipe.deepcache()
    calls = []
    for name, session in (("full", graphs.full.session), ("shallow", graphs.shallow)):
        original = session.run
        monkeypatch.setattr(session, "run", lambda feeds, name=name, run=original:
                            calls.append(name) or run(feeds))
    plain = _latents(pipe)
    cached = _latents(pipe, deepcache=3)
    assert calls == ["full", "shallow", "shallow"] * 4  # 12 steps, one guided call each
    assert np.abs(cached - plain).max() > 1e-3


@pytest.mark.parametrize("branch", [0, 1])
def test_shallow_graph_on_the_same_steps_feature_reproduces_the_full_output(
        tmp_path_factory: pytest.TempPathFactory, branch: int) -> None:
    graphs = Pipeline.load(_folder(tmp_path_factory, branch)).deepcache()
    rng = np.random.default_rng(branch)
    sample = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)  # (2B, 4, h, w)
    context = rng.standard_normal((2, 77, 64), dtype=np.float32)  # (2B, 77, D)
    feeds = graphs.full.feeds(sample, 321.0, context)
    full = graphs.full.session.run(feeds)
    shallow = graphs.shallow.run({**{k: v for k, v in feeds.items()
                                     if k in graphs.shallow.inputs},
                                  FEATURE: full[FEATURE]})
    np.testing.assert_allclose(shallow["out_sample"], full["out_sample"], rtol=0,
                               atol=SAME_GRAPH_ATOL)
    # and it depends on the feature: another one gives another output
    other = graphs.shallow.run({**{k: v for k, v in feeds.items() if k in graphs.shallow.inputs},
                                FEATURE: full[FEATURE] + 1})
    assert np.abs(other["out_sample"] - full["out_sample"]).max() > 1e-3


def test_deeper_branch_runs_more_of_the_graph(tmp_path_factory: pytest.TempPathFactory) -> None:
    import onnx

    sizes = []
    for branch in (0, 1):
        shallow = _folder(tmp_path_factory, branch) / DEEPCACHE_DIR / "shallow.onnx"
        sizes.append(len(onnx.load(str(shallow)).graph.node))
    assert sizes[0] < sizes[1]


def _torch_deepcache(unet, interval: int) -> None:
    """DeepCache branch 0 on a diffusers UNet by hooks: on call k % interval != 0 the last up
    block's last resnet gets the cached up-path state in place of the fresh one (the deep part
    still runs, its result is dropped: the same outputs as skipping it)."""
    import torch

    skip_channels = unet.config.block_out_channels[0]  # conv_in's output, the branch-0 skip
    state = {"calls": 0, "cache": None}

    def count(module, args, kwargs):
        state["calls"] += 1

    def swap(module, args):
        hidden = args[0]  # (2B, C + skip, h, w): the up path's state ‖ the skip
        if (state["calls"] - 1) % interval == 0:
            state["cache"] = hidden[:, :-skip_channels].clone()
            return None
        return (torch.cat([state["cache"], hidden[:, -skip_channels:]], dim=1), *args[1:])

    unet.register_forward_pre_hook(count, with_kwargs=True)
    unet.up_blocks[-1].resnets[-1].register_forward_pre_hook(swap)


@pytest.mark.parity
@pytest.mark.parametrize("interval", [2, 3])
def test_matches_a_torch_deepcache_on_diffusers(pipe: Pipeline, interval: int) -> None:
    pytest.importorskip("diffusers")
    reference = load_reference(EMBEDDED / "diffusers")
    _torch_deepcache(reference.unet, interval)
    expected = reference_images(reference, "ddim", steps=12, guidance=7.5, width=64, height=64,
                                seed=5, num_images=1)
    got = as_array(pipe.generate(PROMPT, negative_prompt="blurry, text", sampler="ddim",
                                 deepcache=interval, **OPTIONS))
    plain = as_array(pipe.generate(PROMPT, negative_prompt="blurry, text", sampler="ddim",
                                   **OPTIONS))
    assert np.abs(got - expected).max() <= MAX_PIXEL_DIFF["ort"]
    assert np.abs(plain - expected).max() > MAX_PIXEL_DIFF["ort"]  # the cache mattered


def test_two_threads_at_once_give_the_images_of_one_by_one(pipe: Pipeline) -> None:
    jobs = [{"deepcache": 2, "seed": 1}, {"deepcache": 3, "seed": 2}]
    alone = [as_array(pipe.generate(PROMPT, **{**OPTIONS, **job})) for job in jobs]
    together: list = [None, None]

    def run(i: int) -> None:
        together[i] = as_array(pipe.generate(PROMPT, **{**OPTIONS, **jobs[i]}))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for one, both in zip(alone, together, strict=True):
        np.testing.assert_array_equal(one, both)


def test_metadata_names_the_interval(pipe: Pipeline) -> None:
    from sdrt.runtime.metadata import parse_parameters

    (image,) = pipe.generate(PROMPT, deepcache=4, **OPTIONS)
    assert parse_parameters(image.info["parameters"])["DeepCache"] == "4"
    (plain,) = pipe.generate(PROMPT, **OPTIONS)
    assert "DeepCache" not in plain.info["parameters"]


@pytest.mark.parametrize("bad", [0, -2, True, 2.5])
def test_bad_interval_is_an_input_error(pipe: Pipeline, bad) -> None:
    with pytest.raises(InputError, match="deepcache must be an interval"):
        pipe.generate(PROMPT, deepcache=bad, **{k: v for k, v in OPTIONS.items()})


def test_missing_graphs_say_how_to_make_them() -> None:
    with pytest.raises(ModelError, match="python -m sdrt.export.deepcache"):
        Pipeline.load(EMBEDDED / "onnx").generate(PROMPT, deepcache=2, **OPTIONS)


def test_bad_branch_is_an_export_error(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(EMBEDDED / "onnx", folder)
    with pytest.raises(ExportError, match="--branch must be between 0 and 1"):
        make_deepcache(folder, 2)


def test_cli_errors_are_one_line(cached_dir: Path, tmp_path: Path) -> None:
    sdrt = Path(sys.executable).with_name("sdrt")
    for args in (["--model", str(cached_dir), "--deepcache", "0"],
                 ["--model", str(EMBEDDED / "onnx"), "--deepcache", "2"]):
        done = subprocess.run([str(sdrt), "generate", PROMPT, "-o", str(tmp_path / "x.png"),
                               *args], capture_output=True, text=True, check=False)
        assert done.returncode != 0
        assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("error:")
    done = subprocess.run([sys.executable, "-m", "sdrt.export.deepcache", str(cached_dir),
                           "--branch", "7"], capture_output=True, text=True, check=False)
    assert done.returncode != 0 and done.stderr.strip().startswith("error: --branch")


def test_a_budget_that_forces_low_memory_refuses_deepcache_before_loading(
        cached_dir: Path, tmp_path: Path) -> None:
    from sdrt.runtime.memory.plan import plan_request
    from sdrt.runtime.pipeline import GenerationRequest

    plan = plan_request(cached_dir, "ort", "fp32", GenerationRequest(PROMPT, deepcache=3),
                        mode="auto", budget=None)
    between = (plan.estimate.low_memory_peak + plan.estimate.default_peak) // 2
    assert plan.estimate.low_memory_peak < between < plan.estimate.default_peak
    done = subprocess.run([str(Path(sys.executable).with_name("sdrt")), "generate", PROMPT,
                           "--model", str(cached_dir), "--deepcache", "3", "--max-memory",
                           str(between), "-o", str(tmp_path / "x.png")],
                          capture_output=True, text=True, check=False)
    assert done.returncode != 0
    assert done.stderr.strip().count("\n") == 0, done.stderr  # no "switching to" line first
    assert done.stderr.startswith("error: --deepcache does not combine with low-memory mode")
    assert not (tmp_path / "x.png").exists()


def test_gate_records_pass_and_fail(cached_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sdrt.quantize import deepcache_gate

    settings = deepcache_gate.gate_settings("scenes", 4, 8, None)
    records = deepcache_gate.gate_intervals(cached_dir, [2], settings)
    assert records["fp32-ort/2"]["passed"], records
    monkeypatch.setattr(deepcache_gate, "MIN_IMAGE_PSNR_DB", 99.0)  # no cached run is that close
    failed = deepcache_gate.gate_intervals(cached_dir, [5], settings)["fp32-ort/5"]
    assert not failed["passed"] and "image PSNR" in failed["reasons"][0]
    extra = Manifest.load(cached_dir).extra
    assert gate_record(extra, "fp32", "ort", 2)["figures"]["image_psnr_db"] >= 20
    assert gate_record(extra, "fp32", "ort", 5) is None


def test_peers_benchmark_adds_deepcache_rows_for_fp32_unets(cached_dir: Path) -> None:
    from sdrt.benchmarks.bench import BenchOptions
    from sdrt.benchmarks.peers.compare import sdrt_configs

    keys = {c.key: c.deepcache for c in sdrt_configs(cached_dir, (3,))}
    assert keys["sdrt-ort-fp32-deepcache3"] == 3 and keys["sdrt-ort-fp32"] is None
    assert "--deepcache" in BenchOptions(str(cached_dir), deepcache=3).argv()


def test_optimum_node_names_without_sdrts_prefix_are_found() -> None:
    """optimum's exporter names nodes '/up_blocks.N/…' (sdrt's wrapper adds '/model')."""
    import onnx
    from onnx import TensorProto, helper

    from sdrt.export.deepcache import find_feature, shallow_graph

    nodes = [helper.make_node("Relu", ["sample"], ["skip"], name="/conv_in/Conv"),
             helper.make_node("Neg", ["skip"], ["deep"], name="/up_blocks.0/resnets.0/Neg"),
             helper.make_node("Concat", ["deep", "skip"], ["cat"], name="/up_blocks.1/Concat",
                              axis=1),
             helper.make_node("Sigmoid", ["cat"], ["out_sample"],
                              name="/up_blocks.1/resnets.0/norm1/Sigmoid")]
    spec = helper.make_tensor_value_info("sample", TensorProto.FLOAT, [1, 2])
    model = helper.make_model(helper.make_graph(
        nodes, "unet", [spec], [helper.make_tensor_value_info("out_sample", TensorProto.FLOAT,
                                                              [1, 4])]))
    assert find_feature(model.graph, 0) == "deep"
    shallow = shallow_graph(model, "deep")
    onnx.checker.check_model(shallow)
    assert [n.name for n in shallow.graph.node] == ["/conv_in/Conv", "/up_blocks.1/Concat",
                                                    "/up_blocks.1/resnets.0/norm1/Sigmoid"]
    assert [i.name for i in shallow.graph.input] == ["sample", FEATURE]


def test_an_adherence_drop_of_exactly_the_limit_passes() -> None:
    from sdrt.quantize.deepcache_gate import failures

    figures = {"image_psnr_db": 40.0, "adherence_uncached": 0.885}
    assert failures({**figures, "adherence": 0.855}) == []  # 3.0 points: at the limit
    assert "adherence" in failures({**figures, "adherence": 0.85})[0]  # 3.5 points


def test_loading_for_deepcache_runs_the_unet_from_the_full_graph(cached_dir: Path,
                                                                 pipe: Pipeline) -> None:
    loaded = Pipeline.load(cached_dir, deepcache=True)
    assert FEATURE in loaded.unet.session.outputs  # one UNet graph in memory, not two
    assert loaded.deepcache().full.session is loaded.unet.session
    np.testing.assert_allclose(_latents(loaded, deepcache=3), _latents(pipe, deepcache=3),
                               rtol=0, atol=SAME_GRAPH_ATOL)
    np.testing.assert_allclose(_latents(loaded), _latents(pipe), rtol=0, atol=SAME_GRAPH_ATOL)
    with pytest.raises(ModelError, match="python -m sdrt.export.deepcache"):
        Pipeline.load(EMBEDDED / "onnx", deepcache=True)
    with pytest.raises(InputError, match="low-memory"):
        Pipeline.load(cached_dir, deepcache=True, low_memory=True)
