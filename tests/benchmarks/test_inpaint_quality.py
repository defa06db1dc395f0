"""Inpainting and outpainting quality on sdrt's embedded shapes model, read from the pixels:
benchmarks/inpaint_quality.py's three measurements on fewer cases (its RESULTS.md section has
the full-size figures)."""

import numpy as np
import pytest

from sdrt.benchmarks.inpaint_quality import (
    COLOUR_TARGET,
    SEAM_RATIO_TARGET,
    inpaint_adherence,
    inpaint_cases,
    outpaint_seams,
    outside_errors,
)
from sdrt.runtime import images
from sdrt.runtime.pipeline import Pipeline

ADHERENCE_CASES = 40  # held-out colour/kind/background combinations, one inpainting each
OUTSIDE_CASES = 12
# Paste-back off, the pixels outside the mask are the model's own: their latents are the
# original's (a posterior sample), but the VAE decoder's GroupNorm layers spread the statistics of
# the new content over the whole picture, so they are not the round trip's pixels, only about as
# far from the input (1.17× its mean error over 100 cases, benchmarks/RESULTS.md).
OUTSIDE_FACTOR = 1.5
OUTPAINT_CASES = 2
BORDER = 64  # pixels outpainted on each side of the 64×64 picture


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load()


def test_inpainted_region_follows_its_prompt(pipe):
    accuracy = inpaint_adherence(pipe, inpaint_cases(ADHERENCE_CASES, seed=0))
    assert accuracy["colour"] >= COLOUR_TARGET, accuracy


def test_pixels_outside_the_feathered_mask_are_kept(pipe):
    cases = inpaint_cases(OUTSIDE_CASES, seed=1)
    for case in cases[:3]:  # paste-back on (the default): exactly the input there
        (out,) = pipe.inpaint(case.picture, case.mask, case.prompt, seed=case.seed)
        outside = np.asarray(images.blur(case.mask, 4)) == 0
        assert np.array_equal(np.asarray(out)[outside], np.asarray(case.picture)[outside])
    errors = outside_errors(pipe, cases)  # paste-back off
    assert errors["output_mean_abs"] <= OUTSIDE_FACTOR * errors["round_trip_mean_abs"], errors


def test_outpainted_border_leaves_no_visible_seam(pipe):
    seams = outpaint_seams(pipe, OUTPAINT_CASES, BORDER, seed=0)
    assert seams["worst_ratio"] <= SEAM_RATIO_TARGET, seams
