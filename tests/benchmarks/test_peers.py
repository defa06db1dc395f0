"""The peer comparison (benchmarks/peers): sdrt and every peer whose venv exists run the same
request on one weights in three layouts, and the table, JSON and chart come out; a peer without
its venv or model is reported as skipped, never a crash (CI has no peer venvs).

The model is the committed foreign-layout fixture set (tests/fixtures/foreign): one tiny random
SD 1.x in diffusers, optimum ONNX and optimum-intel IR layouts, all made by the real tools from
the same weights, so no export runs here.
"""

import json
from pathlib import Path

import pytest
from PIL import Image

from sdrt.benchmarks.peers import compare
from tests.conftest import ROOT

FOREIGN = ROOT / "tests" / "fixtures" / "foreign"
SIZE = 64  # the fixture's 4-block VAE makes this an 8×8 latent
VENVS = ["--optimum-venv", ROOT / ".venv-optimum", "--optimum-intel-venv",
         ROOT / ".venv-optimum-intel", "--genai-venv", ROOT / ".venv-optimum-intel"]
# One precision per peer keeps the test near 30 s where every venv exists; between them the
# runners' fp32 and bf16 paths both run. The full matrix is the benchmark's, not the test's.
ONLY = "sdrt,diffusers-fp32,optimum-ort-fp32,optimum-openvino-bf16,openvino-genai-fp32"


def test_compare_runs_sdrt_and_the_available_peers(tmp_path):
    paths = {kind: tmp_path / f"peers.{kind}" for kind in ("json", "png", "md")}
    report = compare.main([
        "--diffusers-model", str(FOREIGN / "source"), "--onnx-model", str(FOREIGN / "optimum_onnx"),
        "--ov-model", str(FOREIGN / "optimum_openvino"), "--size", str(SIZE), "--steps", "2",
        "--runs", "1", "--only", ONLY, "--json", str(paths["json"]), "--plot", str(paths["png"]),
        "--markdown", str(paths["md"]), *map(str, VENVS)])

    rows = {row["config"]: row for row in json.loads(paths["json"].read_text())["rows"]}
    assert rows == {row["config"]: row for row in report["rows"]}
    assert set(rows) == {"sdrt-ort-fp32", "sdrt-openvino-fp32", "diffusers-fp32",
                         "optimum-ort-fp32", "optimum-openvino-bf16", "openvino-genai-fp32"}
    assert rows["sdrt-ort-fp32"]["status"] == "ok"  # the sdrt side always runs
    for row in rows.values():
        assert row["status"] in ("ok", "skipped"), row  # nothing may fail outright
        if row["status"] == "skipped":
            assert row["reason"]
            continue
        assert row["median_s"] > 0 and len(row["times_s"]) == 1
        assert row["first_run_s"] >= row["load_s"] > 0
        assert row["peak_rss_mb"] > 10
        assert row["unet_calls"] == 2  # DDIM everywhere: one UNet call per step
        assert row["versions"]
    if _venv_has(".venv-optimum"):  # where the venv exists, the peer must have run
        assert rows["optimum-ort-fp32"]["status"] == "ok", rows["optimum-ort-fp32"]
    if _venv_has(".venv-optimum-intel"):
        assert rows["openvino-genai-fp32"]["status"] == "ok", rows["openvino-genai-fp32"]

    table = paths["md"].read_text()
    assert "| sdrt ONNX Runtime fp32 | 2 |" in table and "python -m sdrt.benchmarks.peers" in table
    assert json.loads(paths["json"].read_text())["machine"]["cores"] >= 1
    assert Image.open(paths["png"]).size[0] > 0


def _venv_has(name: str) -> bool:
    return (ROOT / name / "bin" / "python").exists()


def test_missing_venvs_and_models_are_skipped_with_the_reason(tmp_path):
    opts = compare.CompareOptions(onnx_model=FOREIGN / "optimum_onnx", width=SIZE, height=SIZE,
                                  optimum_venv=tmp_path / "no-venv", only=("optimum-ort",
                                                                           "openvino-genai"))
    report = compare.compare(opts)
    reasons = {row["config"]: (row["status"], row["reason"]) for row in report["rows"]}
    assert reasons["optimum-ort-fp32"] == ("skipped", f"venv {tmp_path / 'no-venv'} not found "
                                                      "(benchmarks/peers/README.md makes it)")
    assert reasons["openvino-genai-bf16"] == ("skipped", "no --ov-model given")


def test_ratios_table_and_chart_from_a_report(tmp_path):
    def row(config, engine, median, status="ok"):
        base = {"config": config, "label": config, "engine": engine, "precision": "fp32",
                "model": "m", "status": status}
        if status != "ok":
            return {**base, "reason": "venv missing"}
        return {**base, "load_s": 1.0, "first_call_s": 2.0, "median_s": median, "p90_s": median,
                "peak_rss_mb": 100.0, "unet_calls": 20, "versions": {"x": "1"}, "notes": "n"}

    rows = [row("sdrt-ort-fp32", "sdrt", 4.0), row("diffusers-fp32", "diffusers", 16.0),
            row("openvino-genai-bf16", "openvino-genai", 8.0),
            row("optimum-ort-fp32", "optimum-ort", 0, status="skipped")]
    compare.add_ratios(rows)
    assert rows[0]["vs_fastest_peer"] == 0.5 and rows[0]["vs_diffusers_fp32"] == 0.25
    assert rows[0]["fastest_peer"] == "openvino-genai-bf16"
    report = {"options": {"width": 512, "height": 512, "steps": 20, "sampler": "ddim",
                          "guidance": 7.5, "runs": 2},
              "machine": {"cpu": "cpu", "cpu_flags": [], "cores": 2, "memory_gb": 8,
                          "git_commit": "abc", "python": "3.11"},
              "date": "today", "rows": rows}
    table = compare.markdown(report, "python -m sdrt.benchmarks.peers --steps 20")
    assert "| sdrt-ort-fp32 | 20 | 1.00 | 2.00 | 4.00 | 4.00 | 100 | 0.50× | 0.25× |" in table
    assert "- optimum-ort-fp32: skipped: venv missing" in table
    assert Image.open(compare.chart(report, tmp_path / "c.png")).size[1] > 0


def test_sdrt_configs_follow_the_manifest_variants(monkeypatch, tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    listed = [{"precision": "int8", "backend": "openvino", "components": {}},
              {"precision": "bf16", "backend": "openvino",
               "components": {"unet": {"execution": "bf16"}}}]
    monkeypatch.setattr(compare.Manifest, "load",
                        classmethod(lambda cls, folder: type("M", (), {"variants": listed})))
    keys = [config.key for config in compare.sdrt_configs(Path(tmp_path))]
    assert keys == ["sdrt-ort-fp32", "sdrt-openvino-fp32", "sdrt-openvino-bf16",
                    "sdrt-openvino-int8"]


@pytest.mark.parametrize(("only", "expected"), [
    ("sdrt", {"sdrt-ort-fp32", "sdrt-openvino-fp32"}),
    ("optimum", {"optimum-ort-fp32", "optimum-openvino-fp32", "optimum-openvino-bf16"}),
    ("diffusers-bf16,openvino-genai", {"diffusers-bf16", "openvino-genai-fp32",
                                       "openvino-genai-bf16"}),
])
def test_only_selects_configs_by_key_or_prefix(only, expected):
    opts = compare.CompareOptions(only=tuple(only.split(",")))
    assert {config.key for config in compare.chosen_configs(opts)} == expected
