"""The pixel evaluator of prompt adherence, checked on true renderings (clean and degraded)."""

from __future__ import annotations

import itertools
import json
import sys
import types
from collections import deque

import numpy as np
import pytest
from PIL import Image

from sdrt.evaluation import adherence
from sdrt.evaluation.adherence import ATTRIBUTES, evaluate, score
from sdrt.evaluation.degrade import degrade, gaussian_blur
from sdrt.evaluation.detect import analyse
from sdrt.evaluation.pixels import connected_components, nearest_colour, srgb_to_lab
from sdrt.evaluation.scenes import (
    COLOURS,
    KINDS,
    POSITIONS,
    SIZES,
    Scene,
    Shape,
    caption,
    parse_caption,
    random_scene,
    render,
)


def _samples(n: int, seed: int, degraded: bool, two_shapes_prob: float = 0.4):
    """(image, caption) pairs of random scenes, optionally degraded."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        scene = random_scene(rng, two_shapes_prob)
        image = render(scene, 64, rng)
        yield (degrade(image, rng) if degraded else image), caption(scene, rng)


def test_lab_and_nearest_colour():
    np.testing.assert_allclose(srgb_to_lab(np.array([255, 255, 255])), [100, 0, 0], atol=0.1)
    np.testing.assert_allclose(srgb_to_lab(np.zeros(3)), [0, 0, 0], atol=1e-9)
    for name, rgb in COLOURS.items():
        assert nearest_colour(np.array(rgb)) == name
    assert nearest_colour(np.array(COLOURS["red"]), exclude="red") != "red"


def _bfs_count(mask: np.ndarray) -> int:
    """Reference: number of 8-connected components by breadth-first search."""
    seen = np.zeros_like(mask)
    count = 0
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        count += 1
        queue = deque([start])
        seen[start] = True
        while queue:
            y, x = queue.popleft()
            for dy, dx in itertools.product((-1, 0, 1), repeat=2):
                ny, nx = y + dy, x + dx
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] \
                        and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
    return count


@pytest.mark.parametrize("density", [0.2, 0.45, 0.6])
def test_connected_components_match_a_reference(density):
    rng = np.random.default_rng(int(density * 100))
    mask = rng.random((40, 50)) < density
    labels, count = connected_components(mask)
    assert count == _bfs_count(mask)
    assert set(np.unique(labels[mask])) == set(range(1, count + 1))
    assert (labels[~mask] == 0).all()


def test_connected_components_join_a_long_comb():
    mask = np.zeros((33, 33), dtype=bool)
    mask[::4, :] = True
    mask[:, 0] = True  # a comb: one component with a long geodesic path
    labels, count = connected_components(mask)
    assert count == 1 and (labels[mask] == 1).all()


def test_gaussian_blur_keeps_mass_and_shape():
    image = np.zeros((21, 21, 3))
    image[10, 10] = 1.0
    blurred = gaussian_blur(image, 1.5)
    assert blurred.shape == image.shape
    np.testing.assert_allclose(blurred.sum(axis=(0, 1)), 1.0)
    np.testing.assert_allclose(blurred[..., 0], blurred[..., 0].T)  # isotropic
    np.testing.assert_allclose(gaussian_blur(image[..., 0], 1.5), blurred[..., 0])


def test_every_kind_position_and_size_is_read_correctly():
    for kind, position, size in itertools.product(KINDS, POSITIONS, SIZES):
        scene = Scene("white", (Shape(kind, "blue", position, size),))
        found = analyse(render(scene, 64, np.random.default_rng(0)))
        assert found.background == "white"
        (shape,) = found.shapes
        assert (shape.kind, shape.colour, shape.position, shape.size) == \
            (kind, "blue", position, size)


@pytest.mark.parametrize(("colour", "background"), [
    ("orange", "yellow"), ("blue", "purple"), ("gray", "green"), ("white", "cyan"),
    ("red", "orange"), ("pink", "purple"),
])
def test_closest_colour_pairs_survive_blur(colour, background):
    rng = np.random.default_rng(1)
    for kind in KINDS:
        scene = Scene(background, (Shape(kind, colour, "bottom left", "small"),))
        image = gaussian_blur(render(scene, 64, rng), 1.0)
        result = score(np.clip(np.rint(image), 0, 255).astype(np.uint8), caption(scene, rng))
        assert result["all"], (kind, colour, background, result)


def test_ground_truth_is_read_perfectly():
    images, captions = zip(*_samples(150, seed=10, degraded=False), strict=True)
    accuracy = evaluate(images, captions)
    assert accuracy == {**dict.fromkeys((*ATTRIBUTES, "all"), 1.0), "n": 150}


def test_degraded_ground_truth_is_read_almost_perfectly():
    images, captions = zip(*_samples(150, seed=11, degraded=True), strict=True)
    accuracy = evaluate(images, captions)
    assert accuracy["all"] >= 0.98, accuracy


@pytest.mark.slow
def test_thousands_of_degraded_samples():
    images, captions = zip(*_samples(3000, seed=12, degraded=True), strict=True)
    accuracy = evaluate(images, captions)
    assert accuracy["all"] >= 0.995, accuracy


def test_wrong_attributes_are_caught():
    scene = Scene("green", (Shape("circle", "red", "top right", "large"),))
    image = render(scene, 64)
    assert score(image, "a large red circle in the top right on a green background")["all"]
    result = score(image, "a small blue square in the bottom left on a black background")
    assert not any(result[a] for a in (*ATTRIBUTES, "all") if a != "count")
    assert result["count"]
    assert score(image, "a red circle")["all"]  # unsaid attributes are not held against it


def test_missing_and_extra_shapes_fail_count():
    two = Scene("white", (Shape("square", "red", "left", "large"),
                          Shape("triangle", "blue", "right", "small")))
    one = Scene("white", (Shape("square", "red", "left", "large"),))
    rng = np.random.default_rng(2)
    two_text, one_text = caption(two, rng), caption(one, rng)
    assert score(render(two), two_text)["all"]
    missing = score(render(one), two_text)
    assert not missing["count"] and not missing["colour"] and missing["background"]
    extra = score(render(two), one_text)
    assert not extra["count"] and extra["colour"] and extra["kind"]


def test_blank_image_has_no_shapes():
    blank = np.full((64, 64, 3), COLOURS["cyan"], dtype=np.uint8)
    found = analyse(blank)
    assert found.background == "cyan" and found.shapes == ()
    result = score(blank, "a big red circle in the centre on a cyan background")
    assert result["background"] and not result["colour"] and not result["all"]


def test_accepts_pil_images_and_other_sizes():
    scene = Scene("black", (Shape("triangle", "yellow", "top", "large"),
                            Shape("circle", "pink", "bottom right", "small")))
    text = caption(scene, np.random.default_rng(3))
    for size in (48, 128):
        assert score(Image.fromarray(render(scene, size)), text)["all"]


def test_two_shape_assignment_ignores_caption_order():
    scene = Scene("gray", (Shape("circle", "red", "top left", "small"),
                           Shape("square", "blue", "bottom right", "large")))
    image = render(scene, 64)
    forward = "a small red circle in the top left and a big blue square in the bottom right"
    backward = "a big blue square in the bottom right and a small red circle in the top left"
    assert score(image, forward + ", on gray")["all"]
    assert score(image, backward + ", on gray")["all"]


def test_evaluate_checks_lengths():
    with pytest.raises(ValueError, match="captions"):
        evaluate([np.zeros((64, 64, 3), np.uint8)], [])


def test_cli_ground_truth_writes_results(tmp_path, capsys):
    out = tmp_path / "results.json"
    summary = adherence.main(["--ground-truth", "--n", "20", "--out", str(out),
                              "--save-images", str(tmp_path / "images")])
    assert summary["all"] == 1.0 and summary["n"] == 20
    saved = json.loads(out.read_text())
    assert saved["accuracy"] == summary and len(saved["samples"]) == 20
    assert len(list((tmp_path / "images").glob("*.png"))) == 20
    assert '"all": 1.0' in capsys.readouterr().out


def test_cli_model_calls_the_pipeline_api(monkeypatch, tmp_path):
    calls = []

    class FakePipeline:
        """Stands in for the runtime: 'generates' the caption's true rendering."""

        @classmethod
        def load(cls, folder):
            calls.append(("load", folder))
            return cls()

        def generate(self, prompt, **options):
            calls.append(("generate", prompt, options))
            return [Image.fromarray(render(parse_caption(prompt), options["width"]))]

    module = types.ModuleType("sdrt.runtime.pipeline")
    module.Pipeline = FakePipeline
    monkeypatch.setitem(sys.modules, "sdrt.runtime.pipeline", module)
    summary = adherence.main(["--model", str(tmp_path), "--n", "5", "--seed", "3",
                              "--steps", "7", "--split", "seen"])
    assert summary["all"] == 1.0
    assert calls[0] == ("load", str(tmp_path))
    options = [call[2] for call in calls[1:]]
    assert [o["seed"] for o in options] == [3, 4, 5, 6, 7]
    assert all(o["steps"] == 7 and o["width"] == o["height"] == 64 and "guidance_scale" in o
               for o in options)
