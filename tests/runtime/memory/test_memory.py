"""Memory estimate, budget parsing and plan choice (runtime/memory/: estimate.py, low_memory.py),
and the CLI's --dry-run / --max-memory."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from sdrt.cli.main import main
from sdrt.runtime.errors import InputError, ModelError
from sdrt.runtime.memory import estimate as memory
from sdrt.runtime.memory.low_memory import plan_for
from sdrt.runtime.memory.plan import plan_request
from sdrt.runtime.model.folder import EMBEDDED_MODEL
from sdrt.runtime.model.manifest import Manifest, scan_files
from sdrt.runtime.pipeline import GenerationRequest
from tests.conftest import ROOT

SD15_UNET = {"attention_head_dim": 8, "down_block_types": ["CrossAttnDownBlock2D"] * 3
             + ["DownBlock2D"]}
SDXL_UNET = {"attention_head_dim": [5, 10, 20],
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]}


@pytest.mark.parametrize("text,expected", [("1.2G", int(1.2 * 2**30)), ("900M", 900 * 2**20),
                                           ("4GiB", 4 * 2**30), ("512000", 512000),
                                           (" 2 gb ", 2 * 2**30), ("1t", 2**40)])
def test_parse_size(text, expected):
    assert memory.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "1.2Q", "-1G", "0", "one gig"])
def test_parse_size_refuses_bad_sizes(text):
    with pytest.raises(InputError, match="memory size"):
        memory.parse_size(text)


def test_available_memory_reads_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 100 kB\nMemFree: 10 kB\nMemAvailable:   2048 kB\n")
    assert memory.available_memory(meminfo) == 2048 * 1024
    assert memory.available_memory(tmp_path / "missing") is None


def test_graph_bytes_counts_the_graph_and_its_weights_only(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"x" * 10)
    (tmp_path / "model.onnx_data").write_bytes(b"x" * 100)
    (tmp_path / "config.json").write_bytes(b"x" * 1000)
    (tmp_path / "openvino_model.bin").write_bytes(b"x" * 10000)
    assert memory.graph_bytes(tmp_path / "model.onnx") == 110


def test_attention_levels_and_sliced_scores():
    sd15 = memory.UNetShape.from_config(SD15_UNET, sliced=False)
    assert sd15.levels == ((1, 8), (2, 8), (4, 8))
    # 512×512: 4096 tokens at the first level, 8 heads, batch 2
    assert sd15.score_bytes(64, 64, 2) == 2 * 8 * 4096**2 * 4
    sliced = memory.UNetShape.from_config(SD15_UNET, sliced=True)
    assert sliced.score_bytes(64, 64, 2) * 8 == sd15.score_bytes(64, 64, 2)
    sdxl = memory.UNetShape.from_config(SDXL_UNET, sliced=False)
    assert sdxl.levels == ((2, 10), (4, 20))  # 1024×1024: 4096 tokens × 10 heads is the largest
    assert sdxl.score_bytes(128, 128, 1) == 10 * 4096**2 * 4


def test_a_graph_loading_peak_counts_in_the_low_memory_plan():
    rows = (memory.ComponentEstimate("text_encoder", 500, 500, 10, loading=900),
            memory.ComponentEstimate("unet", 800, 800, 50))
    found = memory.MemoryEstimate("ort", 100, rows, rows)
    assert found.low_memory_peak == 100 + 900


def test_working_memory_grows_with_size_and_batch_and_tiles_bound_the_vae():
    unet = memory.UNetShape.from_config(SD15_UNET, sliced=False)
    small, big = memory.Shapes(512, 512, 1), memory.Shapes(768, 768, 1)
    assert memory.working_bytes("unet", big, unet) > memory.working_bytes("unet", small, unet)
    assert (memory.working_bytes("unet", memory.Shapes(512, 512, 2), unet)
            == 2 * memory.working_bytes("unet", small, unet))
    tiled = memory.Shapes(2048, 2048, 1, tile=48)
    assert (memory.working_bytes("vae_decoder", tiled, unet)
            == memory.working_bytes("vae_decoder", memory.Shapes(384, 384, 1), unet))


def _estimate(resident: int, working: int, low_working: int) -> memory.MemoryEstimate:
    rows = (memory.ComponentEstimate("unet", resident, resident, working),
            memory.ComponentEstimate("vae_decoder", 10, 10, working // 2))
    low = (memory.ComponentEstimate("unet", resident, resident, low_working),
           memory.ComponentEstimate("vae_decoder", 10, 10, low_working // 2))
    return memory.MemoryEstimate("ort", 100, rows, low)


def test_plan_choice_by_budget():
    found = _estimate(1000, 1000, 200)
    assert found.default_peak == 100 + 1010 + int(memory.DEFAULT_WORKING_FACTOR * 1500)
    assert found.low_memory_peak == 100 + 1200
    assert not plan_for(found, "auto", None).low_memory
    assert not plan_for(found, "auto", found.default_peak).low_memory
    switched = plan_for(found, "auto", 1500)
    assert switched.low_memory and "exceeds" in switched.reason
    assert plan_for(found, "low", None).low_memory
    with pytest.raises(InputError, match="even in low-memory mode"):
        plan_for(found, "auto", 1000)
    with pytest.raises(InputError, match="add --low-memory"):
        plan_for(found, "default", 1500)


def test_estimate_of_a_real_folder_reads_its_graphs():
    plan = plan_request(EMBEDDED_MODEL, "ort", "fp32", GenerationRequest("a red circle"),
                        mode="auto", budget=None)
    names = [c.name for c in plan.estimate.components]
    assert names == ["text_encoder", "unet", "vae_decoder"]
    unet = plan.estimate.components[1]
    assert unet.file_bytes == memory.graph_bytes(EMBEDDED_MODEL / "unet" / "model.onnx")
    assert plan.estimate.low_memory_peak <= plan.estimate.default_peak


def test_graphs_read_from_float16_copies_count_half_their_bytes(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"x" * 10)
    (tmp_path / "model.onnx_data").write_bytes(b"x" * 990)
    shapes = memory.Shapes(512, 512, 2, 8)
    graphs = {"unet": tmp_path / "model.onnx"}

    def unet_row(halved):
        found = memory.estimate(graphs, "openvino", shapes=shapes, low_shapes=shapes, unet=None,
                                halved=halved)
        return found.components[0]

    full, half = unet_row(frozenset()), unet_row(frozenset({"unet"}))
    assert (full.file_bytes, half.file_bytes) == (1000, 500)
    assert half.resident == memory.resident_bytes(500, "openvino", compressed=False)
    assert half.working == full.working


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_dry_run_prints_the_estimate_and_loads_nothing(tmp_path):
    result = run_cli("generate", "a red circle", "--dry-run", "-o", tmp_path / "x.png")
    assert result.exit_code == 0, result.output
    assert "unet" in result.output and "estimated peak: default" in result.output
    assert "plan: default" in result.output
    assert not (tmp_path / "x.png").exists()
    low = run_cli("generate", "a red circle", "--dry-run", "--low-memory")
    assert "plan: low-memory" in low.output


def test_max_memory_refuses_in_one_line(tmp_path):
    result = run_cli("generate", "a red circle", "--max-memory", "10M", "-o", tmp_path / "x.png")
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "even in low-memory mode" in result.output
    bad = run_cli("generate", "a red circle", "--max-memory", "lots")
    assert bad.exit_code == 1 and "memory size" in bad.output


def test_max_memory_between_the_plans_switches_to_low_memory(tmp_path):
    plan = plan_request(EMBEDDED_MODEL, "ort", "fp32", GenerationRequest("x", width=256,
                                                                          height=256),
                        mode="auto", budget=None)
    budget = (plan.estimate.default_peak + plan.estimate.low_memory_peak) // 2
    result = run_cli("generate", "a red circle", "-W", 256, "-H", 256, "--steps", 2, "--seed", 0,
                     "--max-memory", budget, "-o", tmp_path / "x.png")
    assert result.exit_code == 0, result.output
    assert "switching to --low-memory" in result.output
    assert (tmp_path / "x.png").exists()


# ------------------------------------------------------------------------------ DeepCache's graph

SD15_FULL_SIZE = ROOT / "models" / "generated" / "sd15-random-onnx"
# What DeepCache (--deepcache 3) added to a fresh process's peak RSS on SD 1.5 at 512², 2 steps
# (benchmarks/low_memory.py generate, 2026-11-26; memory/estimate.py's DEEPCACHE_SHALLOW notes).
MEASURED_SHALLOW_MIB = {"ort": 2205, "openvino": 198}  # means of 2 and 4 pairs of runs
SD15_SHALLOW_WEIGHTS = 32_083_340  # memory.referenced_bytes of the SD 1.5 shallow graph


@pytest.fixture(scope="module")
def deepcache_dir(tmp_path_factory) -> Path:
    """The embedded model with its UNet's weights in model.onnx_data (SD 1.5's layout) and the
    DeepCache graphs cut from it, sharing that file through a hard link."""
    onnx = pytest.importorskip("onnx")
    from sdrt.export.deepcache import make_deepcache

    folder = tmp_path_factory.mktemp("deepcache") / "model"
    shutil.copytree(EMBEDDED_MODEL, folder)
    graph = folder / "unet" / "model.onnx"
    onnx.save_model(onnx.load(str(graph)), str(graph), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx_data", size_threshold=0)
    replace(Manifest.load(folder), files=scan_files(folder)).save(folder)
    make_deepcache(folder, 0)
    return folder


def test_the_shallow_graph_counts_only_the_weights_it_names(deepcache_dir):
    onnx = pytest.importorskip("onnx")
    shallow = deepcache_dir / "unet" / "deepcache" / "shallow.onnx"
    model = onnx.load(str(shallow), load_external_data=False)  # onnx refuses hard links
    named = sum(math.prod(tensor.dims)
                * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
                for tensor in model.graph.initializer
                if tensor.data_location == onnx.TensorProto.EXTERNAL)  # from shapes and dtypes
    assert 0 < named < (deepcache_dir / "unet" / "model.onnx_data").stat().st_size / 2
    assert memory.referenced_bytes(shallow) == shallow.stat().st_size + named
    inline = EMBEDDED_MODEL / "unet" / "model.onnx"
    assert memory.referenced_bytes(inline) == inline.stat().st_size


def test_the_shallow_graph_working_memory_by_backend():
    sd15 = memory.UNetShape.from_config(SD15_UNET, sliced=False)
    at = memory.Shapes(512, 512, 2)
    maps = 2 * 64 * 64 * memory.SHALLOW_BYTES_PER_LATENT_PIXEL
    scores = 2 * 8 * 4096**2 * 4  # the finest level's, as the whole UNet's largest
    assert sd15.score_bytes(64, 64, 2, finest_only=True) == scores
    shallow = memory.DEEPCACHE_SHALLOW
    assert memory.working_bytes(shallow, at, sd15, "ort") == maps + memory.ATTENTION_COPIES * scores
    assert memory.working_bytes(shallow, at, sd15, "openvino") == maps
    sdxl = memory.UNetShape.from_config(SDXL_UNET, sliced=False)  # no attention at full size
    assert sdxl.score_bytes(128, 128, 2, finest_only=True) == 0
    assert (memory.working_bytes(shallow, memory.Shapes(1024, 1024, 2), sdxl, "ort")
            == 2 * 128 * 128 * memory.SHALLOW_BYTES_PER_LATENT_PIXEL)


@pytest.mark.parametrize("backend", ["ort", "openvino"])
def test_the_shallow_term_matches_what_deepcache_added_to_measured_peaks(backend):
    """SD 1.5 at 512², batch 2: the term's own weights and working memory against the peak RSS
    DeepCache added in fresh processes (MEASURED_SHALLOW_MIB)."""
    sd15 = memory.UNetShape.from_config(SD15_UNET, sliced=False)
    term = (memory.resident_bytes(SD15_SHALLOW_WEIGHTS, backend, compressed=False)
            + memory.working_bytes(memory.DEEPCACHE_SHALLOW, memory.Shapes(512, 512, 2), sd15,
                                   backend))
    measured = MEASURED_SHALLOW_MIB[backend] * memory.MIB
    assert abs(term / measured - 1) <= memory.ESTIMATE_TOLERANCE


def test_deepcache_adds_its_shallow_graph_to_the_estimate(deepcache_dir, tmp_path):
    plain = plan_request(deepcache_dir, "ort", "fp32", GenerationRequest("x"), mode="default",
                         budget=None).estimate
    cached = plan_request(deepcache_dir, "ort", "fp32", GenerationRequest("x", deepcache=3),
                          mode="default", budget=None).estimate
    names = [c.name for c in cached.components]
    assert names == [*(c.name for c in plain.components), memory.DEEPCACHE_SHALLOW]
    shallow = cached.components[-1]
    assert shallow.file_bytes == memory.referenced_bytes(
        deepcache_dir / "unet" / "deepcache" / "shallow.onnx")
    added = shallow.resident + memory.DEFAULT_WORKING_FACTOR * shallow.working
    assert abs(cached.default_peak - plain.default_peak - added) <= 1  # int() of the sum
    with pytest.raises(ModelError, match="python -m sdrt.export.deepcache"):
        plan_request(EMBEDDED_MODEL, "ort", "fp32", GenerationRequest("x", deepcache=3),
                     mode="default", budget=None)
    from sdrt.benchmarks.low_memory import scenario_estimate

    bench = {(name, interval): scenario_estimate(name, str(deepcache_dir), "ort", "fp32", None,
                                                 None, interval)
             for name in ("end_to_end", "unet_b2") for interval in (None, 3)}
    assert bench["end_to_end", 3] == cached.default_peak > bench["end_to_end", None]
    assert bench["unet_b2", 3] == bench["unet_b2", None]  # `sdrt bench --deepcache`: e2e only
    dry = run_cli("generate", "x", "--model", deepcache_dir, "--deepcache", 3, "--dry-run",
                  "-o", tmp_path / "x.png")
    assert dry.exit_code == 0, dry.output
    assert memory.DEEPCACHE_SHALLOW in dry.output and not (tmp_path / "x.png").exists()


@pytest.mark.slow
@pytest.mark.skipif(not (SD15_FULL_SIZE / "unet" / "deepcache").is_dir(),
                    reason="needs models/generated/sd15-random-onnx with its DeepCache graphs")
@pytest.mark.parametrize("deepcache", [[], ["--deepcache", "3"]])
def test_full_size_estimate_with_and_without_deepcache(deepcache, tmp_path):
    """SD 1.5, OpenVINO bf16, 512², 2 steps: the estimate within tolerance of a fresh process's
    peak RSS (several GB: run alone)."""
    done = subprocess.run([sys.executable, "-m", "sdrt.benchmarks.low_memory", "generate",
                           str(SD15_FULL_SIZE), "--backend", "openvino", "--precision", "bf16",
                           "--size", "512", "--steps", "2", "--output", str(tmp_path),
                           *deepcache], capture_output=True, text=True, check=True)
    row = json.loads(done.stdout.splitlines()[-1])
    assert row["within_tolerance"], row
