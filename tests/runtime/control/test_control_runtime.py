"""ControlNet at run time on fake sessions: the UNet's residual inputs (zeros without control),
which rows each ControlNet call sees in every CFG layout, scales, keep, pooling and sums
(diffusers' StableDiffusionControlNetPipeline rules; end to end against diffusers itself in
test_control_parity.py), units, the fit check, the control dir, low-memory residency and the
memory estimate."""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from sdrt.runtime.architectures import ARCHITECTURES
from sdrt.runtime.architectures.base import DEEPCACHE_CONTROL, check_request
from sdrt.runtime.architectures.unet import SplitBatchUNet, guided_unet
from sdrt.runtime.components import CONTROL_REFUSAL, UNet
from sdrt.runtime.conditioning import Conditioning
from sdrt.runtime.control.apply import ControlRun, PreparedControl
from sdrt.runtime.control.controlnet import ControlNet
from sdrt.runtime.control.folder import ModelFit, check_fit
from sdrt.runtime.control.library import ControlLibrary
from sdrt.runtime.control.manifest import CONTROLNET, ControlManifest
from sdrt.runtime.control.residuals import guess_scales, level_size, residual_names
from sdrt.runtime.control.unit import ControlUnit, control_unit, control_units
from sdrt.runtime.errors import InputError, ModelError
from sdrt.runtime.memory import estimate as memory
from sdrt.runtime.memory.low_memory import LOOP, LazySession, Residency
from sdrt.runtime.model.manifest import ComponentSpec, FileEntry
from sdrt.runtime.request import GenerationRequest
from sdrt.runtime.session import TensorSpec

LEVELS = (0, 0, 1, 1)  # three downs and the mid: conv_in, a resnet, a downsampler, mid
CHANNELS = (4, 4, 8, 8)
NAMES = residual_names(len(LEVELS) - 1)
WIDTH = 6  # context features
HW = (5, 3)  # latent size, odd: level 1 is (3, 2)


def _spec(name: str, *shape) -> TensorSpec:
    return TensorSpec(name, tuple(shape), np.float32)


class FakeUNetSession:
    """out = sample + each residual's per-row sum (so a residual's rows show in the output)."""

    def __init__(self, residuals: bool = True) -> None:
        self.inputs = {"sample": _spec("sample", None, 4, None, None),
                       "timestep": _spec("timestep"),
                       "encoder_hidden_states": _spec("encoder_hidden_states", None, None, WIDTH)}
        if residuals:
            self.inputs.update({name: _spec(name, None, c, None, None)
                                for name, c in zip(NAMES, CHANNELS, strict=True)})
        self.outputs = {"out_sample": _spec("out_sample", None, 4, None, None)}
        self.feeds = []

    def run(self, feeds):
        self.feeds.append(feeds)
        for name, spec in self.inputs.items():
            spec.check(feeds[name], "unet")
        total = sum(feeds[name].sum(axis=(1, 2, 3)) for name in NAMES if name in feeds)
        return {"out_sample": feeds["sample"] + np.reshape(total, (-1, 1, 1, 1))}


class FakeControlSession:
    """Residual j of a row: (j + 1) · (mean of the row's sample + context + cond), broadcast."""

    def __init__(self) -> None:
        self.inputs = {"sample": _spec("sample", None, 4, None, None),
                       "timestep": _spec("timestep"),
                       "encoder_hidden_states": _spec("encoder_hidden_states", None, None, WIDTH),
                       "controlnet_cond": _spec("controlnet_cond", None, 3, None, None)}
        self.outputs = {name: _spec(name, None, c, None, None)
                        for name, c in zip(NAMES, CHANNELS, strict=True)}
        self.rows = []

    def run(self, feeds):
        self.rows.append(len(feeds["sample"]))
        row = (feeds["sample"].mean(axis=(1, 2, 3)) + feeds["encoder_hidden_states"].mean(
            axis=(1, 2)) + feeds["controlnet_cond"].mean(axis=(1, 2, 3)))
        h, w = feeds["sample"].shape[2:]
        return {name: np.broadcast_to((j + 1) * row[:, None, None, None],
                                      (len(row), c, level_size(h, k), level_size(w, k))).copy()
                for j, (name, k, c) in enumerate(zip(NAMES, LEVELS, CHANNELS, strict=True))}


def _control(mode: str = "balanced", scale: float = 1.0, end: float = 1.0, pooled: bool = False,
             session: FakeControlSession | None = None) -> PreparedControl:
    net = ControlNet(session or FakeControlSession())
    return PreparedControl(net, np.full((1, 3, 10, 6), 0.5, np.float32), scale, 0.0, end, mode,
                           pooled)


def _inputs(rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, 4, *HW), dtype=np.float32),
            rng.standard_normal((rows, 3, WIDTH), dtype=np.float32))


def _unscaled(x, context) -> np.ndarray:
    """FakeControlSession's per-row value (before the residual index factor)."""
    return x.mean(axis=(1, 2, 3)) + context.mean(axis=(1, 2)) + 0.5


def test_unet_feeds_zero_residuals_without_control():
    session = FakeUNetSession()
    unet = UNet(session, LEVELS)
    x, context = _inputs(2)
    np.testing.assert_array_equal(unet(x, 10.0, context), x)
    feeds = session.feeds[-1]
    assert [feeds[name].shape for name in NAMES] == [(2, 4, 5, 3), (2, 4, 5, 3), (2, 8, 3, 2),
                                                     (2, 8, 3, 2)]
    assert not any(feeds[name].any() for name in NAMES)
    assert unet.feed_shapes(2, HW, 77)[NAMES[-1]] == (2, 8, 3, 2)


def test_unet_residual_inputs_checked():
    with pytest.raises(ModelError, match="levels are unknown"):
        UNet(FakeUNetSession()).feeds(*_inputs(1)[:1], 1.0, _inputs(1)[1])
    session = FakeUNetSession()
    del session.inputs[NAMES[1]]
    with pytest.raises(ModelError, match="residual inputs must be"):
        UNet(session, LEVELS)
    old = UNet(FakeUNetSession(residuals=False))
    assert old.residuals == ()
    with pytest.raises(ModelError, match="takes no ControlNet residuals"):
        old.feeds(*_inputs(1)[:1], 1.0, _inputs(1)[1], residuals={})


def test_balanced_runs_the_cfg_pair_in_one_call_with_scale():
    session = FakeControlSession()
    run = ControlRun((_control(scale=0.5, session=session),), calls=4)
    x, context = _inputs(4)
    res = run.residuals(x, 1.0, context, None, uncond_rows=2)
    assert session.rows == [4]
    for j, name in enumerate(NAMES):
        np.testing.assert_allclose(res[name][:, 0, 0, 0], 0.5 * (j + 1) * _unscaled(x, context),
                                   rtol=1e-6)


def test_control_mode_is_guess_mode():
    """diffusers' guess_mode: the net sees the prompt's rows, the negative's get zeros, and
    residual j is scaled by logspace(-1, 0, n_down + 1)[j]."""
    session = FakeControlSession()
    run = ControlRun((_control("control", scale=2.0, session=session),), calls=4)
    x, context = _inputs(4)
    res = run.residuals(x, 1.0, context, None, uncond_rows=2)
    assert session.rows == [2]
    scales = guess_scales(len(NAMES) - 1)
    for j, name in enumerate(NAMES):
        assert not res[name][:2].any()
        np.testing.assert_allclose(res[name][2:, 0, 0, 0],
                                   2.0 * scales[j] * (j + 1) * _unscaled(x[2:], context[2:]),
                                   rtol=1e-6)
    assert run.residuals(x[:2], 1.0, context[:2], None, uncond_rows=2) is None  # apart: uncond


def test_prompt_mode_scales_every_row():
    run = ControlRun((_control("prompt"),), calls=4)
    x, context = _inputs(2)
    res = run.residuals(x, 1.0, context, None, uncond_rows=1)
    np.testing.assert_allclose(res[NAMES[0]][:, 0, 0, 0],
                               guess_scales(len(NAMES) - 1)[0] * _unscaled(x, context), rtol=1e-6)


def test_pooled_net_averages_over_space_on_the_prompt_rows():
    x, context = _inputs(2)
    pooled = ControlRun((_control(pooled=True),), calls=1).residuals(x, 1.0, context, None, 1)
    assert not pooled[NAMES[0]][0].any()
    assert np.ptp(pooled[NAMES[0]][1]) == 0  # constant over space (and plain scales)
    np.testing.assert_allclose(pooled[NAMES[0]][1, 0, 0, 0], _unscaled(x[1:], context[1:])[0],
                               rtol=1e-6)


def test_keep_skips_the_net_and_nets_sum():
    first, second = FakeControlSession(), FakeControlSession()
    run = ControlRun((_control(end=0.5, session=first), _control(scale=0.25, session=second)),
                     calls=4)
    x, context = _inputs(2)
    both = run.residuals(x, 1.0, context, None, uncond_rows=1)
    np.testing.assert_allclose(both[NAMES[0]][:, 0, 0, 0], 1.25 * _unscaled(x, context),
                               rtol=1e-6)
    run.step_done(1)  # calls 2 and 3 of 4: past end 0.5
    later = run.residuals(x, 1.0, context, None, uncond_rows=1)
    assert first.rows == [2] and second.rows == [2, 2]
    np.testing.assert_allclose(later[NAMES[0]], 0.25 * both[NAMES[0]] / 1.25, rtol=1e-6)


@pytest.mark.parametrize("mode", ["balanced", "control"])
def test_guided_unet_feeds_the_residuals_of_each_layout(mode):
    """One batched CFG call, and the negative prompt apart (another context length): the UNet's
    rows get the residuals the ControlNet made for the same rows."""
    x, context = _inputs(1)
    cond = Conditioning(context, {})
    apart = Conditioning(context, {}, uncond=Conditioning(np.concatenate([context] * 2, 1), {}))
    outs = []
    for conditioning in (Conditioning.stack([cond, cond]), apart):
        session = FakeUNetSession()
        run = ControlRun((_control(mode),), calls=2)
        model = guided_unet(UNet(session, LEVELS), conditioning, 3.0, True, control=run)
        outs.append(model(x, 10.0))
        got = np.concatenate([feeds[NAMES[-1]] for feeds in session.feeds])  # uncond, cond
        assert (got[0].any()) == (mode == "balanced")
        assert got[1].any()
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5)


def test_split_batch_unet_splits_residual_rows():
    x, context = _inputs(2)
    residuals = ControlRun((_control(),), calls=1).residuals(x, 1.0, context, None, 1)
    whole = UNet(FakeUNetSession(), LEVELS)(x, 1.0, context, residuals=residuals)
    session = FakeUNetSession()
    split = SplitBatchUNet(UNet(session, LEVELS))(x, 1.0, context, residuals=residuals)
    assert [len(feeds["sample"]) for feeds in session.feeds] == [1, 1]
    np.testing.assert_allclose(split, whole, rtol=1e-6)


def test_controlnet_rows_split_alike():
    x, context = _inputs(3)
    cond = np.full((3, 3, 10, 6), 0.5, np.float32)
    session = FakeControlSession()
    whole = ControlNet(FakeControlSession())(x, 1.0, context, cond)
    split = ControlNet(session, rows=1)(x, 1.0, context, cond)
    assert session.rows == [1, 1, 1]
    for name in NAMES:
        np.testing.assert_allclose(split[name], whole[name], rtol=1e-6)


@pytest.mark.parametrize("fields,message", [
    ({"scale": -1}, "scale must be finite"), ({"start": 0.5, "end": 0.5}, "start < end"),
    ({"mode": "strong"}, "mode must be one of"), ({"resize": "stretch"}, "resize must be"),
    ({"module": "depth"}, "unknown ControlNet preprocessor"), ({"model": ""}, "model must be"),
    ({"image": 3}, "image must be a path"), ({"scale": "1"}, "scale must be a number"),
])
def test_unit_validation(fields, message):
    with pytest.raises(InputError, match=message):
        control_unit({"model": "canny", **fields})


def test_units_from_dicts():
    assert control_units([{"model": "a", "scale": 0.5}])[0] == ControlUnit("a", scale=0.5)
    with pytest.raises(InputError, match="unknown field 'weight'"):
        control_unit({"model": "a", "weight": 1})
    with pytest.raises(InputError, match="must be a list"):
        control_units(ControlUnit("a"))
    assert GenerationRequest("p", controls=[{"model": "a"}]).controls  # resolved later


def _manifest(architecture: str = "sd1", width: int = 768,
              channels: tuple[int, ...] = CHANNELS) -> ControlManifest:
    data = b"graph"
    return ControlManifest(
        name="cn", architecture=architecture, cross_attention_dim=width, conditioning_channels=3,
        global_pool_conditions=False, residual_channels=channels,
        source={"weights_sha256": "0" * 64}, hash="abcd1234", opset=17, versions={},
        components={CONTROLNET: ComponentSpec("model.onnx", {}, {})},
        files={f"{CONTROLNET}/model.onnx": FileEntry(hashlib.sha256(data).hexdigest(),
                                                     len(data))})


def test_fit_check_refuses_in_one_line():
    fit = ModelFit("sdxl", 2048, CHANNELS)
    with pytest.raises(InputError, match=r"^control folder 'cn' is a ControlNet for SD 1.x "
                                         r"\(cross-attention 768\); this model is SDXL \(2048\)$"):
        check_fit("cn", _manifest(), fit)
    with pytest.raises(InputError, match="returns residuals of channels"):
        check_fit("cn", _manifest("sdxl", 2048, (4, 4, 8)), fit)
    with pytest.raises(InputError, match=re.escape(CONTROL_REFUSAL)):
        check_fit("cn", _manifest("sdxl", 2048), replace(fit, residual_channels=()))
    check_fit("cn", _manifest("sdxl", 2048), fit)


def test_control_dir_names_folders(tmp_path: Path):
    for name in ("canny", "depth"):
        folder = tmp_path / name
        (folder / CONTROLNET).mkdir(parents=True)
        (folder / CONTROLNET / "model.onnx").write_bytes(b"graph")
        _manifest().save(folder)
    (tmp_path / "notes").mkdir()
    library = ControlLibrary.open(tmp_path)
    assert [entry.title for entry in library.entries()] == ["canny [abcd1234]",
                                                            "depth [abcd1234]"]
    assert library.find("depth [abcd1234]").folder == tmp_path / "depth"
    with pytest.raises(InputError, match="unknown ControlNet model 'pose'; the ControlNet dir "
                                         "has: canny"):
        library.find("pose")


def test_refusals():
    req = GenerationRequest("p", controls=(ControlUnit("cn"),))
    for name in ("sd3", "sdxl-refiner"):
        with pytest.raises(InputError, match="ControlNet is not supported"):
            check_request(ARCHITECTURES[name], req)
    with pytest.raises(InputError, match=re.escape(DEEPCACHE_CONTROL)):
        check_request(ARCHITECTURES["sd1"], replace(req, deepcache=3))
    check_request(ARCHITECTURES["sdxl"], req)


class CountedSession:
    open_now = 0

    def __init__(self) -> None:
        CountedSession.open_now += 1
        self.inputs, self.outputs = {}, {}

    def __del__(self) -> None:
        CountedSession.open_now -= 1

    def run(self, feeds):
        return {"open": CountedSession.open_now}


def test_residency_keeps_the_loop_group_open_together():
    CountedSession.open_now = 0
    residency = Residency()
    text = LazySession(CountedSession, residency)
    unet, control = (LazySession(CountedSession, residency, LOOP) for _ in range(2))
    for _ in range(2):
        control.run({})
        assert unet.run({})["open"] == 2  # the ControlNet stayed open beside the UNet
    assert text.run({})["open"] == 1
    residency.release_all()


def test_low_memory_estimate_counts_the_controlnet_beside_the_unet():
    def row(name, resident, working):
        return memory.ComponentEstimate(name, resident, resident, working)

    parts = (row("text_encoder", 100, 1), row("unet", 1000, 300),
             row(memory.CONTROLNET_ROW.format(0), 400, 150), row("vae_decoder", 200, 900))
    found = memory.MemoryEstimate("ort", 10, parts, parts)
    assert found.low_memory_peak == 10 + 1000 + 400 + 300
    alone = memory.MemoryEstimate("ort", 10, parts[:2] + parts[3:], parts[:2] + parts[3:])
    assert alone.low_memory_peak == 10 + 1300
    assert memory.working_bytes(memory.CONTROLNET_ROW.format(0), memory.Shapes(512, 512, 2),
                                None) == memory.working_bytes("unet", memory.Shapes(512, 512, 2),
                                                              None) // 2
