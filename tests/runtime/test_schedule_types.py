"""Schedule types apart from samplers (A1111's "Schedule type"): every sampler on every schedule
it takes, on the analytic Gaussian problem of test_samplers.py; the ladders against their
definitions; names that bind a schedule against the explicit pair; requests and metadata."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from sdrt.runtime.errors import InputError
from sdrt.runtime.metadata import parse_parameters
from sdrt.runtime.model.folder import EMBEDDED_MODEL
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.samplers import (
    SAMPLERS,
    display_name,
    make_schedule,
    num_model_calls,
    resolve_pair,
    resolve_sampler,
    sample,
    sampler_names,
    schedules_for,
)
from sdrt.runtime.schedule_types import (
    AUTOMATIC,
    SCHEDULES,
    exponential_ladder,
    karras_ladder,
    resolve_schedule,
    schedule_infotext,
    sgm_uniform_ladder,
    t_to_sigma,
    uniform_ladder,
)
from sdrt.runtime.schedules import KARRAS_RHO, sigma_table, sigma_to_t
from sdrt.runtime.sde_samplers import SDE_SAMPLERS
from tests.runtime.test_samplers import (
    MU,
    ODE_ATOL,
    SD15,
    SD15_TO_ZERO,
    STD_RTOL,
    S,
    gaussian_model,
    noise,
    point_mass_model,
    rng_noise,
)

LADDERS = [name for name, row in SCHEDULES.items() if row.ladder is not None]
# LCM and SD 3's flow sampler take their own timesteps only and have their own tests
# the stochastic samplers on every schedule are test_sde_samplers' (equal seeds, equal images)
PAIRS = [(sampler, schedule) for sampler, spec in SAMPLERS.items()
         if not spec.flow and sampler != "lcm" and sampler not in SDE_SAMPLERS
         for schedule in schedules_for(sampler)]
OWN_TIMESTEPS = [name for name, spec in SAMPLERS.items() if spec.ladder is None]
# SGM Uniform's last step jumps from t ≈ T/n straight to sigma 0: Euler lands ~0.041 off there
SGM_ODE_ATOL = 0.05
TAKERS = ", ".join(spec.display for spec in SAMPLERS.values() if spec.ladder is not None)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler, schedule", PAIRS)
def test_every_sampler_samples_the_gaussian_on_every_schedule_it_takes(sampler, schedule,
                                                                       prediction):
    config = SD15_TO_ZERO if prediction == "epsilon" else \
        type(SD15_TO_ZERO)(**{**SD15_TO_ZERO.__dict__, "prediction_type": prediction})
    start = noise((1, 1, 128, 128))
    out = sample(gaussian_model(config), start, config=config, sampler=sampler,
                 schedule=schedule, steps=200, step_noise=rng_noise())
    assert abs(out.mean() - MU) < 0.02
    assert abs(out.std() / S - 1) < STD_RTOL
    if sampler != "euler_a":  # the deterministic ones solve the probability-flow ODE
        sched = make_schedule(config, sampler, 200, schedule=schedule)
        exact = MU + (start * sched.init_sigma - MU) * S / math.hypot(S, sched.sigmas[0])
        assert np.abs(out - exact).max() < (SGM_ODE_ATOL if schedule == "sgm_uniform"
                                            else ODE_ATOL)


@pytest.mark.parametrize("sampler, schedule", [p for p in PAIRS if p[1] != AUTOMATIC])
@pytest.mark.parametrize("start_step", [0, 4])
def test_schedules_keep_the_sample_contract(sampler, schedule, start_step):
    # a point mass: every denoised estimate is the target, from noise or from init latents
    init = noise(seed=9) * 0.7
    seen = []
    out = sample(point_mass_model(init, sampler, 10, schedule), noise(), config=SD15,
                 sampler=sampler, schedule=schedule, steps=10, start_step=start_step,
                 init_latents=init if start_step else None, step_noise=rng_noise(),
                 callback=lambda i, n, x: seen.append((i, n)))
    calls = num_model_calls(sampler, 10, start_step)
    assert seen == [(i, calls) for i in range(calls)]
    # every step keeps x - init ∝ sigma; UniPC's run ends at sigma_min, the others' at 0
    sched = make_schedule(SD15, sampler, 10, start_step, schedule)
    start = sched.initial(noise(), init if start_step else None)
    end = sched.sigmas[-1]
    np.testing.assert_allclose(out, sched.latents(init + (start - init) * (end / sched.sigmas[0]),
                                                  len(sched)), atol=1e-4)


def test_sampler_own_timesteps_refuse_other_schedules_in_one_line():
    for sampler in OWN_TIMESTEPS:
        for schedule in LADDERS:
            with pytest.raises(InputError) as info:
                resolve_pair(sampler, schedule)
            assert str(info.value) == (
                f"sampler '{sampler}' runs on its own timesteps only (schedule automatic); "
                f"schedule '{schedule}' takes: {TAKERS}")
    assert TAKERS.startswith("Euler, Euler a, DPM++ 2M, UniPC, Heun, LMS, DPM2, DPM2 a")
    with pytest.raises(InputError, match="own timesteps"):
        sample(gaussian_model(SD15), noise(), config=SD15, sampler="PLMS", schedule="Karras",
               steps=4)


# ---- the ladders against their definitions ---------------------------------------------------


def test_karras_ladder_is_eq_5_between_the_models_sigma_range():
    table = sigma_table(SD15)
    ladder = karras_ladder(SD15, 12)
    assert ladder[0] == pytest.approx(table[-1], rel=1e-12)
    assert ladder[-1] == pytest.approx(table[0], rel=1e-12)
    inverse = ladder ** (1 / KARRAS_RHO)  # linear in i: sigma_i^(1/rho) = max + i/(n-1)·(min - max)
    np.testing.assert_allclose(np.diff(inverse), np.diff(inverse)[0], rtol=1e-9)
    assert SCHEDULES["karras"].rho == KARRAS_RHO == 7.0


def test_exponential_ladder_is_log_linear_between_the_models_sigma_range():
    table = sigma_table(SD15)
    ladder = exponential_ladder(SD15, 9)
    np.testing.assert_allclose(ladder[[0, -1]], [table[-1], table[0]], rtol=1e-12)
    steps = np.diff(np.log(ladder))
    np.testing.assert_allclose(steps, math.log(float(table[0]) / float(table[-1])) / 8, rtol=1e-9)


@pytest.mark.parametrize("schedule", LADDERS)
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_laddered_tables_end_at_zero_and_call_the_matching_timestep(sampler, schedule):
    sched = make_schedule(SD15, sampler, 15, schedule=schedule)
    ladder = SCHEDULES[schedule].ladder(SD15, 15)
    np.testing.assert_allclose(sched.sigmas[:-1], ladder, rtol=1e-6)  # float32 tables
    assert sched.sigmas[-1] == 0.0 and len(sched) == 15
    assert all(a > b for a, b in zip(sched.timesteps, sched.timesteps[1:], strict=False))
    if sampler == "dpmpp_2m":  # DPM calls the nearest training timestep, as diffusers
        assert all(float(t).is_integer() for t in sched.timesteps)


def _a1111_t_to_sigma(table, t):
    """k-diffusion's DiscreteSchedule.t_to_sigma, in torch: log sigma linear between integer t."""
    import torch

    log_sigmas = torch.from_numpy(table).double().log()
    low, high = t.floor().long(), t.ceil().long()
    return ((1 - (t - low)) * log_sigmas[low] + (t - low) * log_sigmas[high]).exp().numpy()


@pytest.mark.parametrize("steps", [1, 2, 5, 20, 33])
def test_uniform_ladders_are_a1111s_definitions(steps):
    torch = pytest.importorskip("torch")
    table = sigma_table(SD15)
    top = len(table) - 1
    # A1111's uniform: inner_model.get_sigmas(n) = t_to_sigma(linspace(t_max, 0, n)) (then 0)
    expected = _a1111_t_to_sigma(table, torch.linspace(top, 0, steps, dtype=torch.float64))
    np.testing.assert_allclose(uniform_ladder(SD15, steps), expected, rtol=1e-12)
    # sgm_uniform: t from sigma_to_t(sigma_max) to sigma_to_t(sigma_min), n + 1 points, last off
    ends = sigma_to_t(np.array([table[-1], table[0]]), table)
    np.testing.assert_allclose(ends, [top, 0], atol=1e-9)
    ts = torch.linspace(float(ends[0]), float(ends[1]), steps + 1, dtype=torch.float64)[:-1]
    # (A1111's t(sigma_max) is 999 to ~1e-9 through the log table)
    np.testing.assert_allclose(sgm_uniform_ladder(SD15, steps), _a1111_t_to_sigma(table, ts),
                               rtol=1e-8)


def test_t_to_sigma_and_sigma_to_t_invert_each_other():
    table = sigma_table(SD15)
    ts = np.array([999.0, 749.25, 499.5, 0.75, 0.0])
    np.testing.assert_allclose(sigma_to_t(t_to_sigma(ts, table), table), ts, atol=1e-6)
    np.testing.assert_allclose(t_to_sigma(np.arange(1000.0), table), table, rtol=1e-14)


@pytest.mark.parametrize("schedule", ["automatic", *LADDERS])
def test_dpm2_discards_the_next_to_last_sigma_as_a1111(schedule):
    ladder = SCHEDULES["karras" if schedule == AUTOMATIC else schedule].ladder(SD15, 9)
    sched = make_schedule(SD15, "DPM2", 8, schedule=schedule)
    assert len(sched) == 2 * 8 - 1 == num_model_calls("dpm2", 8)
    # the ladder made for 9, its last (smallest) sigma dropped; float32 tables
    np.testing.assert_allclose(sched.sigmas[0::2], ladder[:-1], rtol=1e-6)
    assert sched.sigmas[-1] == 0.0
    mids = np.sqrt(np.array(sched.sigmas[0:-2:2]) * np.array(sched.sigmas[2::2]))
    np.testing.assert_allclose(sched.sigmas[1:-1:2], mids, rtol=1e-6)


@pytest.mark.parametrize("sampler, calls, from_step_3", [
    ("heun", 15, 9), ("dpm2", 15, 9), ("lms", 8, 5), ("unipc", 8, 5), ("dpm2_a", 15, 9),
    ("dpmpp_2s_a", 15, 9), ("dpmpp_sde", 15, 9), ("dpmpp_2m_sde", 8, 5)])
def test_model_calls_per_sampler(sampler, calls, from_step_3):
    # second order: two calls a step but the last (k-diffusion's Euler step to sigma 0)
    assert num_model_calls(sampler, 8) == calls == len(make_schedule(SD15, sampler, 8))
    assert num_model_calls(sampler, 8, 3) == from_step_3 == len(make_schedule(SD15, sampler, 8, 3))


# ---- names -----------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler, schedule, pair", [
    ("Euler a", "Karras", ("euler_a", "karras")),  # the 422: now any sampler × schedule
    ("UniPC", "SGM Uniform", ("unipc", "sgm_uniform")), ("Heun", "SGMUniform",
                                                         ("heun", "sgm_uniform")),
    ("LMS Karras", None, ("lms", "karras")), ("DPM2", "uniform", ("dpm2", "uniform")),
    ("DPM2 a Karras", "Automatic", ("dpm2_a", "karras")), ("DPM++ 2M SDE", None,
                                                            ("dpmpp_2m_sde", "automatic")),
    ("KDPM2DiscreteScheduler", "Exponential", ("dpm2", "exponential")),
    ("DPMSolverMultistepScheduler", None, ("dpmpp_2m", "automatic")),  # the first on that class
])
def test_a1111_names_and_schedule_types_resolve(sampler, schedule, pair):
    assert resolve_pair(sampler, schedule) == pair


def test_unknown_names_list_a1111s_names():
    with pytest.raises(InputError) as info:
        resolve_pair("Restart")
    listed = str(info.value).split("choose one of: ")[1].split(", ")
    assert listed == [spec.display for spec in SAMPLERS.values()]
    assert {"Euler a", "DPM++ 2M", "UniPC", "Heun", "LMS", "DPM2", "DPM2 a", "DPM++ 2S a",
            "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE"} <= set(listed)
    with pytest.raises(InputError, match="Automatic, Karras, Exponential, Uniform, SGM Uniform"):
        resolve_pair("Euler", "Polyexponential")




@pytest.mark.parametrize("sampler, schedule", [
    ("dpmpp_2m_karras", None), ("DPM++ 2M Karras", None), ("dpmpp_2m", "karras"),
    ("DPM++ 2M", "Karras"), ("dpmpp_2m_karras", "Automatic"), (" dpm++ 2m karras ", "KARRAS"),
    ("DPMSolverMultistepScheduler", "karras"),
])
def test_names_binding_a_schedule_give_the_explicit_pairs_numbers(sampler, schedule):
    assert resolve_pair(sampler, schedule) == ("dpmpp_2m", "karras")
    runs = [sample(gaussian_model(SD15), noise(), config=SD15, sampler=name, schedule=chosen,
                   steps=12)
            for name, chosen in ((sampler, schedule), ("dpmpp_2m", "karras"))]
    np.testing.assert_array_equal(runs[0], runs[1])


def test_ancestral_names_with_a_schedule_draw_the_same_noise():
    runs = [sample(gaussian_model(SD15), noise(), config=SD15, sampler=name, schedule=chosen,
                   steps=8, step_noise=rng_noise())
            for name, chosen in (("Euler a Exponential", None), ("euler_a", "exponential"),
                                 ("euler_a_exponential", "automatic"))]
    np.testing.assert_array_equal(runs[0], runs[1])
    np.testing.assert_array_equal(runs[0], runs[2])


def test_resolve_names_and_their_errors():
    assert resolve_sampler("Euler Karras") == "euler_karras"
    assert display_name("euler_a_karras") == "Euler a Karras"
    assert display_name("dpmpp_2m") == "DPM++ 2M"
    assert sampler_names().index("dpmpp_2m_karras") == sampler_names().index("dpmpp_2m") + 1
    assert [resolve_schedule(n) for n in (None, "Automatic", "KARRAS", " exponential ")] == \
        ["automatic", "automatic", "karras", "exponential"]
    with pytest.raises(InputError) as info:
        resolve_schedule("beta")
    assert str(info.value) == ("unknown schedule 'beta'; choose one of: Automatic, Karras, "
                               "Exponential, Uniform, SGM Uniform")
    with pytest.raises(InputError, match="unknown schedule 7"):
        resolve_schedule(7)
    with pytest.raises(InputError, match="names schedule 'karras', not 'exponential'"):
        resolve_pair("DPM++ 2M Karras", "exponential")
    assert schedules_for("ddim") == ["automatic"]
    assert schedules_for("euler_a") == list(SCHEDULES)


def test_registries_are_read_only():
    with pytest.raises(TypeError):
        SAMPLERS["heun"] = SAMPLERS["euler"]  # type: ignore[index]
    with pytest.raises(TypeError):
        SCHEDULES["beta"] = SCHEDULES["karras"]  # type: ignore[index]


def test_infotext_names_a_chosen_schedule_only():
    assert schedule_infotext("automatic") == {}
    assert schedule_infotext("karras") == {"Schedule type": "Karras"}


# ---- through the pipeline (the embedded model) -----------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(EMBEDDED_MODEL)


def test_pipeline_writes_and_reads_back_the_schedule_type(pipe):
    explicit = pipe.generate("a red circle", steps=3, seed=4, sampler="DPM++ 2M",
                             schedule="Karras", generator="numpy")[0]
    named = pipe.generate("a red circle", steps=3, seed=4, sampler="dpmpp_2m_karras",
                          generator="numpy")[0]
    assert np.array_equal(np.asarray(explicit), np.asarray(named))
    params = parse_parameters(explicit.info["parameters"])
    assert (params["Sampler"], params["Schedule type"]) == ("DPM++ 2M", "Karras")
    assert "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale" in explicit.info["parameters"]
    assert resolve_pair(params["Sampler"], params.get("Schedule type")) == ("dpmpp_2m", "karras")
    plain = pipe.generate("a red circle", steps=3, seed=4, sampler="dpmpp_2m",
                          generator="numpy")[0]
    assert "Schedule type" not in parse_parameters(plain.info["parameters"])
    assert not np.array_equal(np.asarray(plain), np.asarray(explicit))


def test_batch_jobs_take_a_schedule_and_resume_only_on_the_same_one(tmp_path):
    from sdrt.runtime.batch.runner import run_batch

    job = {"id": "a", "prompt": "a red circle", "steps": 2, "sampler": "euler", "size": 64,
           "seed": 1, "schedule": "Karras"}
    assert run_batch([job], tmp_path).counts["done"] == 1
    params = parse_parameters(Image.open(tmp_path / "a.png").info["parameters"])
    assert params["Schedule type"] == "Karras"
    assert run_batch([job], tmp_path).counts["skipped"] == 1
    assert run_batch([{**job, "schedule": None}], tmp_path).counts["done"] == 1
    [record] = run_batch([{**job, "schedule": "beta"}], tmp_path).records
    assert record["status"] == "invalid" and "unknown schedule 'beta'" in record["error"]
