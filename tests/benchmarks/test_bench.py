"""`sdrt bench`: every scenario runs in its own process and reports first run, steady state,
peak RSS, the machine, and each stage's FLOPs against torch's own count with its share of the
matmul ceiling; the guided step lands in the manifest; bad requests fail in one line before any
process starts."""

import json
import shutil

import pytest
from PIL import Image

from sdrt.benchmarks import matmul_peak
from sdrt.benchmarks.bench import SCENARIOS, machine_facts
from sdrt.runtime.model.speed import recorded_times
from tests.cli.test_cli import assert_one_line_error, run

# Stand-in ceilings (GFLOP/s), so that no test measures the real ones at 4096³.
CEILINGS = {"fp32": 50.0, "bf16": 100.0, "int8": 200.0}
LATENT = (4, 32, 32)  # the tiny SD's native latent (64² pixels, VAE scale factor 2)
# The fractions are floats divided in one order here and in another in bench: equal to rounding.
RTOL = 1e-9


@pytest.fixture(scope="module")
def ceilings_faked(tmp_path_factory):
    """A private cache folder (no real ceilings or counts touched) and `measure` faked."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SDRT_CACHE_DIR", str(tmp_path_factory.mktemp("sdrt-cache")))
        patch.setattr(matmul_peak, "measure", lambda precision, size, runs, threads: {
            "precision": precision, "gflops": CEILINGS[precision], "seconds": 1.0,
            "kernel": "faked"})
        yield


@pytest.fixture(scope="module")
def model(tiny_onnx_dir, tmp_path_factory):
    """A copy of the tiny export: bench files its step time in the manifest."""
    return shutil.copytree(tiny_onnx_dir, tmp_path_factory.mktemp("bench") / "tiny")


@pytest.fixture(scope="module")
def report(model, ceilings_faked, tmp_path_factory):
    """One `sdrt bench` of every scenario: its JSON report, output and chart."""
    out = tmp_path_factory.mktemp("report")
    result = run("bench", model, "--num-runs", 2, "--steps", 2, "--json", out / "bench.json",
                 "--plot", out / "bench.png")
    assert result.exit_code == 0, result.output
    return json.loads((out / "bench.json").read_text()), result.output, out / "bench.png"


def rows(report) -> dict[str, dict]:
    return {row["scenario"]: row for row in report[0]["scenarios"]}


def test_bench_reports_every_scenario_with_json_and_chart(report):
    data, output, chart = report
    assert [row["scenario"] for row in data["scenarios"]] == list(SCENARIOS)
    for row in data["scenarios"]:
        assert len(row["times_s"]) == 2 and row["median_s"] > 0
        assert row["first_run_s"] >= row["load_s"] > 0  # load + first call, apart from steady
        assert row["p90_s"] >= row["median_s"]
        assert row["peak_rss_mb"] > 10  # a whole interpreter with a model loaded
        assert row["scenario"] in output
    assert data["options"]["steps"] == 2 and data["machine"]["cores"] >= 1
    assert "GFLOP/s" in output and "% ceiling" in output and "fp32 50" in output
    assert Image.open(chart).size[0] > 0


def test_each_stage_is_held_to_the_fp32_ceiling(report):
    for row in report[0]["scenarios"]:
        assert row["ceiling_precision"] == "fp32"  # every graph of the export runs fp32
        assert row["ceiling_gflops"] == CEILINGS["fp32"]
        assert row["gflops_per_s"] == pytest.approx(row["flops"] / row["median_s"] / 1e9,
                                                    rel=RTOL)
        assert row["ceiling_fraction"] == pytest.approx(
            row["gflops_per_s"] / CEILINGS["fp32"], rel=RTOL)


def test_stage_flops_equal_torch_flop_counter(report, tiny_sd_dir):
    """The UNet at batch 2 and the VAE decoder, counted from the graphs the scenarios ran,
    against torch's FlopCounterMode on the diffusers models (bmm attention: the counter does
    not count CPU SDPA)."""
    torch = pytest.importorskip("torch")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet")
    vae = AutoencoderKL.from_pretrained(tiny_sd_dir / "vae")
    for module in (unet, vae):
        module.set_attn_processor(AttnProcessor())
    context = torch.zeros(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad(), FlopCounterMode(display=False) as unet_flops:
        unet(torch.zeros(2, *LATENT), torch.tensor(999.0), context)
    with torch.no_grad(), FlopCounterMode(display=False) as vae_flops:
        vae.decode(torch.zeros(1, *LATENT))
    found = rows(report)
    assert found["unet_b2"]["flops"] == unet_flops.get_total_flops()
    assert found["vae_decode"]["flops"] == vae_flops.get_total_flops()


def test_end_to_end_flops_are_its_stages(report):
    """A guided generation: the prompts encoded, `unet_calls` guided steps, one decode."""
    found = rows(report)
    end = found["end_to_end"]
    assert end["unet_calls"] >= 2
    assert end["flops"] == (found["text_encoder"]["flops"]
                            + end["unet_calls"] * found["unet_b2"]["flops"]
                            + found["vae_decode"]["flops"])


def test_the_guided_step_is_recorded_for_auto(report, model):
    unet_b2 = rows(report)["unet_b2"]
    recorded = recorded_times(model)["fp32-ort"]
    assert recorded.step_s == round(unet_b2["median_s"], 4)
    assert recorded.shape == (2, 64, 64) and recorded.by == "sdrt bench"
    assert report[0]["recorded"]["variant"] == "fp32-ort"


def test_bench_runs_a_variant_on_openvino(model, ceilings_faked):
    pytest.importorskip("openvino")
    result = run("bench", model, "--backend", "openvino", "--num-runs", 1, "--threads", 1,
                 "--scenarios", "unet_b1,vae_encode")
    assert result.exit_code == 0, result.output
    assert "unet_b1" in result.output and "openvino fp32" in result.output
    assert "fp32-openvino" not in recorded_times(model)  # no unet_b2, and --threads


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--scenarios", "unet_b3"], "unknown scenario 'unet_b3'"),
        (["--backend", "tpu"], "unknown backend 'tpu'"),
        (["--precision", "int8"], "int8"),
    ],
)
def test_bench_refuses_bad_requests_in_one_line(tiny_onnx_dir, args, fragment):
    assert_one_line_error(run("bench", tiny_onnx_dir, *args), fragment)


def test_bench_refuses_a_missing_folder(tmp_path):
    assert_one_line_error(run("bench", tmp_path / "nothing"), "nothing")


def test_machine_facts_name_the_cpu_and_versions():
    facts = machine_facts()
    assert facts["cpu"] and facts["versions"]["numpy"] and len(facts["machine_id"]) == 12
