"""Image inputs without a model: reading (EXIF, alpha, broken files), the sizing rule, mask
arithmetic, strength rules, paste-back, and outpainting's canvas, mask and windows."""

import numpy as np
import pytest
from PIL import Image

from sdrt.runtime import images
from sdrt.runtime.errors import InputError
from sdrt.runtime.img2img import ImageInput, check_strength, prepare
from sdrt.runtime.outpaint import Extension, extend, plan_windows

EXIF_ORIENTATION = 0x0112
ROTATED_90_CW = 6  # EXIF: the stored pixels must be turned 90° clockwise to display


def save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 20))  # red on the stored left edge
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATED_90_CW
    path = save(stored, tmp_path / "photo.png", exif=exif)
    shown = images.read_image(path)
    assert shown.size == (20, 40)
    assert shown.getpixel((10, 2)) == (255, 0, 0)  # the left edge is now the top


def test_alpha_is_flattened_onto_white_and_mask_alpha_onto_black(tmp_path):
    rgba = Image.new("RGBA", (16, 16), (10, 20, 30, 0))
    rgba.paste((10, 20, 30, 255), (0, 0, 8, 16))
    picture = images.read_image(save(rgba, tmp_path / "a.png"))
    assert picture.mode == "RGB"
    assert picture.getpixel((2, 2)) == (10, 20, 30) and picture.getpixel((12, 2)) == (255,) * 3
    white = Image.new("LA", (16, 16), (255, 0))
    white.paste((255, 255), (0, 0, 8, 16))
    drawn = images.read_mask(save(white, tmp_path / "m.png"))
    assert drawn.mode == "L" and drawn.getpixel((2, 2)) == 255 and drawn.getpixel((12, 2)) == 0


@pytest.mark.parametrize(("make", "fragment"), [
    (lambda p: p, "does not exist"),
    (lambda p: (p.write_text("not a picture"), p)[1], "not an image file"),
    (lambda p: p.parent, "is a folder"),
])
def test_unreadable_inputs_are_one_line_errors(tmp_path, make, fragment):
    with pytest.raises(InputError, match=fragment) as info:
        images.read_image(make(tmp_path / "x.png"))
    assert "\n" not in str(info.value)


def test_truncated_file_is_an_input_error(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = save(Image.fromarray(noise), tmp_path / "full.png")
    data = path.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or corrupt"):
        images.read_image(tmp_path / "cut.png")


def test_too_many_pixels_is_refused_before_decoding(tmp_path):
    side = int(images.MAX_INPUT_PIXELS**0.5) + 1
    path = save(Image.new("1", (side, side)), tmp_path / "huge.png")
    with pytest.raises(InputError, match="pixels"):
        images.read_image(path)


@pytest.mark.parametrize(("size", "width", "height", "want"), [
    ((100, 60), None, None, (96, 56)),  # rounded down to the step, as diffusers does
    ((100, 60), 64, None, (64, 40)),  # aspect kept, to the nearest step
    ((100, 60), None, 32, (56, 32)),
    ((100, 60), 48, 80, (48, 80)),  # both given: exactly
])
def test_output_size_rule(size, width, height, want):
    assert images.output_size(size, width, height, 8, 2048) == want


@pytest.mark.parametrize(("size", "fragment"), [((7, 100), "at least 8"),
                                                ((3000, 64), "--width/--height")])
def test_output_size_out_of_range(size, fragment):
    with pytest.raises(InputError, match=fragment):
        images.output_size(size, None, None, 8, 2048)


def test_model_pixels_and_mask_arithmetic():
    image = Image.fromarray(np.array([[[0, 255, 128]]], dtype=np.uint8))
    np.testing.assert_allclose(images.to_model(image)[0, :, 0, 0], [-1, 1, 128 / 127.5 - 1],
                               atol=1e-6)
    drawn = Image.fromarray(np.array([[127, 128, 255, 0]], dtype=np.uint8))
    assert images.binarize(drawn).tolist() == [[0, 1, 1, 0]]


def test_latent_grid_is_torch_nearest():
    torch = pytest.importorskip("torch")
    mask = (np.random.default_rng(1).random((56, 72)) < 0.5).astype(np.float32)
    for h, w in ((7, 9), (14, 18), (5, 11)):
        want = torch.nn.functional.interpolate(torch.from_numpy(mask)[None, None], size=(h, w))
        np.testing.assert_array_equal(images.to_latent_grid(mask, h, w), want[0, 0].numpy())


def test_bad_masks_are_refused(tmp_path):
    picture = Image.new("RGB", (64, 64), (0, 0, 255))
    common = dict(strength=1.0, width=None, height=None, step=8, max_side=2048, latent_scale=8)
    cases = [(Image.new("L", (64, 64), 0), "mask is empty"),
             (Image.new("L", (64, 64), 255), "whole image"),
             (Image.new("L", (32, 64), 0), "mask is empty")]  # another size: stretched
    speck = Image.new("L", (64, 64), 0)
    speck.paste(255, (3, 3, 6, 6))  # inside one 8×8 block, off its sampled corner
    cases.append((speck, "too small"))
    for drawn, fragment in cases:
        with pytest.raises(InputError, match=fragment):
            prepare(picture, drawn, mask_blur=0, **common)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), "0.5", True])
def test_strength_must_be_in_range(value):
    with pytest.raises(InputError, match="strength"):
        check_strength(value)


def test_strength_that_leaves_no_step_names_the_fix():
    init = ImageInput(Image.new("RGB", (8, 8)), 0.04)
    with pytest.raises(InputError, match="at least 25 steps"):
        init.start_step(20)
    assert ImageInput(Image.new("RGB", (8, 8)), 0.5).start_step(20) == 10


def test_paste_back_keeps_the_original_outside_the_feathered_mask():
    rng = np.random.default_rng(2)
    old = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    new = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    drawn = Image.new("L", (32, 32), 0)
    drawn.paste(255, (8, 8, 24, 24))
    alpha = images.blur(drawn, 2)
    out = np.asarray(images.paste_back(new, old, alpha))
    outside, inside = np.asarray(alpha) == 0, np.asarray(alpha) == 255
    assert np.array_equal(out[outside], np.asarray(old)[outside])
    assert np.array_equal(out[inside], np.asarray(new)[inside])


def test_outpaint_canvas_mask_and_fill():
    picture = Image.new("RGB", (60, 40), (0, 0, 200))
    picture.paste((200, 0, 0), (0, 0, 60, 4))  # a red top edge
    canvas, mask, out = extend(picture, Extension(left=16, top=10), step=8, band=4, fill="edge")
    assert out == (76, 50) and canvas.size == (80, 56)
    assert canvas.crop((16, 10, 76, 50)).tobytes() == picture.tobytes()
    assert canvas.getpixel((40, 0))[0] > 150  # the red edge stretched upwards
    assert mask.shape == (56, 80)
    assert mask[:10].all() and mask[:, :16].all()  # the new area
    assert mask[10:14, 16:76].all() and mask[10:50, 16:20].all()  # the band on extended sides
    assert not mask[14:50, 20:76].any()  # the picture elsewhere (the right side is not extended)


def test_outpaint_windows_cover_the_canvas_nearest_first():
    boxes = plan_windows((192, 160), 64, 8, (64, 48, 128, 112))
    covered = np.zeros((160, 192), dtype=bool)
    for left, top, right, bottom in boxes:
        assert right - left == 64 and bottom - top == 64 and left % 8 == 0 and top % 8 == 0
        covered[top:bottom, left:right] = True
    assert covered.all()
    first = boxes[0]
    assert first[0] < 128 and first[2] > 64 and first[1] < 112 and first[3] > 48  # overlaps it
    assert plan_windows((48, 40), 64, 8, (0, 0, 48, 40)) == [(0, 0, 48, 40)]


def test_extension_is_validated():
    with pytest.raises(InputError, match="at least one"):
        Extension().validate(2048)
    with pytest.raises(InputError, match="left must be"):
        Extension(left=-8).validate(2048)
