"""Memory estimate, budget parsing and plan choice (runtime/memory.py, runtime/low_memory.py),
and the CLI's --dry-run / --max-memory."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from sdrt.runtime import memory
from sdrt.runtime.cli import main
from sdrt.runtime.errors import InputError
from sdrt.runtime.low_memory import plan_for, plan_request
from sdrt.runtime.model_folder import EMBEDDED_MODEL
from sdrt.runtime.pipeline import GenerationRequest

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
