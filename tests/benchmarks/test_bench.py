"""`sdrt bench`: every scenario runs in its own process and reports first run, steady state,
peak RSS and the machine; bad requests fail in one line before any process starts."""

import json

import pytest
from PIL import Image

from sdrt.benchmarks.bench import SCENARIOS, machine_facts
from tests.cli.test_cli import assert_one_line_error, run


def test_bench_reports_every_scenario_with_json_and_chart(tiny_onnx_dir, tmp_path):
    report_path, chart = tmp_path / "bench.json", tmp_path / "bench.png"
    result = run("bench", tiny_onnx_dir, "--num-runs", 2, "--steps", 2, "--json", report_path,
                 "--plot", chart)
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert [row["scenario"] for row in report["scenarios"]] == list(SCENARIOS)
    for row in report["scenarios"]:
        assert len(row["times_s"]) == 2 and row["median_s"] > 0
        assert row["first_run_s"] >= row["load_s"] > 0  # load + first call, apart from steady
        assert row["p90_s"] >= row["median_s"]
        assert row["peak_rss_mb"] > 10  # a whole interpreter with a model loaded
        assert row["scenario"] in result.output
    assert report["options"]["steps"] == 2 and report["machine"]["cores"] >= 1
    assert Image.open(chart).size[0] > 0


def test_bench_runs_a_variant_on_openvino(tiny_onnx_dir, tmp_path):
    pytest.importorskip("openvino")
    result = run("bench", tiny_onnx_dir, "--backend", "openvino", "--num-runs", 1,
                 "--scenarios", "unet_b1,vae_encode")
    assert result.exit_code == 0, result.output
    assert "unet_b1" in result.output and "openvino fp32" in result.output


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
    assert facts["cpu"] and facts["versions"]["numpy"]
