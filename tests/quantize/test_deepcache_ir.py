"""DeepCache on a variant's own UNet (quantize/deepcache_ir.py, runtime/deepcache.py): the cut
made in an int8-hybrid IR UNet, listed with the variant, run by the pipeline, chosen by auto,
refused where a variant was made without it, and gated against fp32. The folder is conftest's
`quantized` (fp32 DeepCache graphs, then every variant); tests that write copy it first."""

import dataclasses
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from sdrt.cli.main import main
from sdrt.quantize import deepcache_gate
from sdrt.runtime.deepcache import FEATURE, FULL_IR, SHALLOW_IR, graph_paths
from sdrt.runtime.errors import InputError, ModelError
from sdrt.runtime.model import auto
from sdrt.runtime.model.auto import choose
from sdrt.runtime.model.manifest import Manifest
from sdrt.runtime.model.speed import StepTime, record_times
from sdrt.runtime.model.variants import ComponentVariant, select_variant
from sdrt.runtime.pipeline import Pipeline
from tests.conftest import PROMPT
from tests.quantize.test_quantize import STEPS, fresh_copy, needs

VARIANT = "int8-hybrid-openvino"
CUT = f"variants/{VARIANT}/unet/deepcache"
# The full graph is the variant's UNet plus one output, and the shallow graph its own nodes:
# the same compiled kernels on the same inputs, so they agree to float32 rounding.
SAME_GRAPH_ATOL = 1e-5
OPTIONS = {"steps": 6, "seed": 3, "guidance_scale": 7.5}


@pytest.fixture(scope="module")
def cut(quantized):
    """The folder and the int8-hybrid variant's manifest entry."""
    needs("openvino")
    folder, entries = quantized
    return folder, entries["int8-hybrid", "openvino"]


def at_f32(folder):
    """The int8-hybrid variant with every graph at f32 execution: where the CPU has native bf16
    the variant runs at bf16, and an extra output (the cached feature) moves where bf16 rounds,
    so the graphs compare exactly only at f32."""
    variant = select_variant(folder, "int8-hybrid", "openvino")
    return dataclasses.replace(variant, components={
        name: ComponentVariant(choice.file) for name, choice in variant.components.items()})


@pytest.fixture(scope="module")
def pipe(cut):
    return Pipeline.load(cut[0], "openvino", precision=at_f32(cut[0]), deepcache=True)


def _latents(pipe, **options):
    seen = []
    pipe.generate(PROMPT, callback=lambda i, n, x: seen.append(x), **{**OPTIONS, **options})
    return seen[-1]


def test_the_variant_lists_its_own_deepcache_graphs(cut):
    folder, entry = cut
    files = Manifest.load(folder).files
    for name in (FULL_IR, SHALLOW_IR):
        assert f"{CUT}/{name}" in files and f"{CUT}/{name[:-4]}.bin" in files
    assert "DeepCache graphs cut" in entry["method"]
    variant = select_variant(folder, "int8-hybrid", "openvino")
    assert graph_paths(folder, variant) == (folder / CUT / FULL_IR, folder / CUT / SHALLOW_IR)


def test_the_full_graph_is_the_variants_unet_and_the_shallow_one_reproduces_it(cut, pipe):
    plain = Pipeline.load(cut[0], "openvino", precision=at_f32(cut[0]))
    graphs = pipe.deepcache()
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)  # (2B, 4, h, w)
    context = rng.standard_normal((2, 77, 32), dtype=np.float32)  # (2B, 77, D)
    feeds = graphs.full.feeds(sample, 321.0, context)
    full = graphs.full.session.run(feeds)
    np.testing.assert_allclose(full["out_sample"], plain.unet.session.run(feeds)["out_sample"],
                               rtol=0, atol=SAME_GRAPH_ATOL)
    shallow = graphs.shallow.run({**{k: v for k, v in feeds.items()
                                     if k in graphs.shallow.inputs}, FEATURE: full[FEATURE]})
    np.testing.assert_allclose(shallow["out_sample"], full["out_sample"], rtol=0,
                               atol=SAME_GRAPH_ATOL)


def test_the_pipeline_runs_deepcache_on_the_variant(cut, pipe, monkeypatch):
    plain = Pipeline.load(cut[0], "openvino", precision=at_f32(cut[0]))
    np.testing.assert_allclose(_latents(pipe, deepcache=1), _latents(plain), rtol=0,
                               atol=SAME_GRAPH_ATOL)
    graphs = pipe.deepcache()
    calls = []
    for name, session in (("full", graphs.full.session), ("shallow", graphs.shallow)):
        monkeypatch.setattr(session, "run", lambda feeds, name=name, run=session.run:
                            calls.append(name) or run(feeds))
    image = pipe.generate(PROMPT, deepcache=3, **OPTIONS)[0]
    assert len(calls) >= OPTIONS["steps"]  # one guided call a step (the tiny model's PNDM: +1)
    assert calls == [("full", "shallow", "shallow")[i % 3] for i in range(len(calls))]
    assert image.info and "DeepCache: 3" in image.info["parameters"]


def _with_gates(folder, gates):
    manifest = Manifest.load(folder)
    dataclasses.replace(manifest, extra={**manifest.extra, "deepcache": {
        **manifest.extra["deepcache"], "gates": gates}}).save(folder)


def test_auto_picks_the_variant_for_deepcache_only_where_cut_and_gated_at_n(cut, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setattr(auto, "has_native_bf16", lambda: False)  # fp32 is the reference
    folder = fresh_copy(cut[0], tmp_path / "timed")
    record_times(folder, {"fp32-openvino": StepTime(1.0, (2, 64, 64), "test"),
                          VARIANT: StepTime(0.5, (2, 64, 64), "test")})
    _with_gates(folder, {f"{VARIANT}/2": {"passed": True}, f"{VARIANT}/3": {"passed": False}})
    chosen = {n: choose(folder, "openvino", deepcache=n).precision for n in (None, 2, 3, 4, 0)}
    # no DeepCache, or its gate passed at N; failed at 3, none at 4, N not known yet (0)
    assert chosen == {None: "int8-hybrid", 2: "int8-hybrid", 3: "fp32", 4: "fp32", 0: "fp32"}
    assert "gated for DeepCache N=3" in choose(folder, "openvino", deepcache=3).reason
    assert choose(folder, "openvino", keeps_unet=True).precision == "fp32"  # LoRAs: fp32 graph
    shown = CliRunner().invoke(main, ["generate", "a cat", "--model", str(folder), "--backend",
                                      "openvino", "--deepcache", "2", "--dry-run"])
    assert "runs on: openvino int8-hybrid" in shown.output, shown.output
    uncut = fresh_copy(folder, tmp_path / "uncut")
    shutil.rmtree(uncut / CUT)
    manifest = Manifest.load(uncut)
    dataclasses.replace(manifest, files={p: e for p, e in manifest.files.items()
                                         if not p.startswith(CUT)}).save(uncut)
    assert choose(uncut, "openvino").precision == "int8-hybrid"
    assert choose(uncut, "openvino", deepcache=2).precision == "fp32"
    with pytest.raises(InputError, match="--precision int8-hybrid --backend openvino --force"):
        Pipeline.load(uncut, "openvino", precision="int8-hybrid", deepcache=True)
    with pytest.raises(ModelError, match="variant of 'uncut' has no DeepCache graphs"):
        graph_paths(uncut, select_variant(uncut, "int8-hybrid", "openvino"))


def test_the_gate_holds_a_variants_cached_run_to_fp32(cut, tmp_path, monkeypatch):
    shares = {"fp32": 0.90, "int8-hybrid": 0.89}
    cost = {None: 0.0, 2: 0.02, 3: 0.025}  # N=2: 3.0 points below fp32, N=3: 3.5

    def adherence(pipe, captions, steps, deepcache=None):  # tiny random models draw nothing
        return shares[pipe.precision] - cost[deepcache]

    monkeypatch.setattr(deepcache_gate.gates, "adherence", adherence)
    settings = deepcache_gate.gate_settings("scenes", 2, STEPS, None)
    folder = fresh_copy(cut[0], tmp_path / "gated")
    records = deepcache_gate.gate_intervals(folder, [2, 3], settings, backend="openvino",
                                            precision="int8-hybrid")
    passed, failed = records[f"{VARIANT}/2"], records[f"{VARIANT}/3"]
    assert passed["figures"]["adherence_fp32"] == 0.90
    assert passed["figures"]["adherence_uncached"] == 0.89
    assert passed["passed"], passed  # at the limit
    assert not failed["passed"] and "below fp32 0.900" in failed["reasons"][0]


def test_the_estimate_and_the_flop_count_read_the_variants_cut(cut):
    from sdrt.benchmarks.flops import counted_graph
    from sdrt.benchmarks.low_memory import scenario_estimate

    folder = cut[0]
    plain, cached = (scenario_estimate("end_to_end", folder, "openvino", "int8-hybrid", 64, 64,
                                       interval) for interval in (None, 2))
    assert cached > plain  # the shallow IR graph's own files and session, one row more
    for name in (FULL_IR, SHALLOW_IR):  # counted as the fp32 cut's operations
        assert counted_graph(folder, folder / CUT / name) == \
            folder / "unet" / "deepcache" / name.replace(".xml", ".onnx")
