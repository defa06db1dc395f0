"""ControlNet preprocessors and control images without a model: canny against OpenCV's own call,
invert, none, the resize modes against diffusers' image processor and the A1111 extension's
rules, pixel-perfect resolution, a network preprocessor graph, and one-line errors."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sdrt.runtime import images
from sdrt.runtime.control import preprocess
from sdrt.runtime.control.image import control_image, pixel_perfect_resolution, resize_control
from sdrt.runtime.control.preprocess import detect
from sdrt.runtime.control.unit import ControlUnit
from sdrt.runtime.errors import InputError, ModelError

cv2 = pytest.importorskip("cv2")


def drawing(width: int, height: int, seed: int = 0) -> Image.Image:
    """Shapes on a noisy background: edges of every strength for Canny."""
    rng = np.random.default_rng(seed)
    picture = Image.fromarray(rng.integers(90, 130, (height, width, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(picture)
    draw.ellipse((width // 8, height // 8, width // 2, height // 2), fill=(250, 30, 30))
    draw.rectangle((width // 2, height // 3, width - 9, height - 9), fill=(20, 40, 220))
    draw.line((0, height - 1, width - 1, 0), fill=(255, 255, 255), width=3)
    return picture


def unit(image, **fields) -> ControlUnit:
    return ControlUnit(model="unused", image=image, **fields)


@pytest.mark.parametrize("thresholds", [(None, None), (50, 150), (180, 60)])
def test_canny_equals_opencv_on_the_same_thresholds(thresholds):
    picture = drawing(192, 128)  # sides multiples of 64: no padding; res = short side: no resize
    low, high = thresholds
    got = np.asarray(detect("canny", picture, processor_res=128, threshold_a=low,
                            threshold_b=high))
    want = cv2.Canny(np.asarray(picture), 100 if low is None else low,
                     200 if high is None else high)
    assert got.shape == (128, 192, 3)
    assert want.any() and not want.all()  # the picture has edges and background
    for channel in range(3):
        np.testing.assert_array_equal(got[:, :, channel], want)


def test_canny_scales_the_short_side_to_processor_res():
    picture = drawing(256, 128)
    got = np.asarray(detect("canny", picture, processor_res=64))[:, :, 0]
    # the extension's rule: INTER_AREA down to short side 64, then Canny
    want = cv2.Canny(cv2.resize(np.asarray(picture), (128, 64), interpolation=cv2.INTER_AREA),
                     100, 200)
    np.testing.assert_array_equal(got, want)
    odd = detect("canny", drawing(100, 70), processor_res=50)  # 100 × 50/70 = 71.4 → 71
    assert odd.size == (71, 50)
    assert detect("canny", drawing(64, 64)).size == (512, 512)  # default processor_res


def test_invert_and_none():
    picture = drawing(40, 24)
    pixels = np.asarray(picture)
    np.testing.assert_array_equal(np.asarray(detect("invert", picture, processor_res=512)),
                                  255 - pixels)  # no resizing: the extension hides the slider
    np.testing.assert_array_equal(np.asarray(detect("none", picture)), pixels)


def test_control_image_is_float_rgb_in_unit_range(tmp_path):
    path = tmp_path / "map.png"
    drawing(64, 64).save(path)
    cond = control_image(unit(path, module="canny", processor_res=64), 64, 64)
    assert cond.shape == (1, 3, 64, 64) and cond.dtype == np.float32
    assert set(np.unique(cond)) == {0.0, 1.0}  # Canny's 0/255 map as 0/1
    plain = control_image(unit(path), 64, 64)
    np.testing.assert_array_equal(plain[0].transpose(1, 2, 0) * 255,
                                  np.asarray(drawing(64, 64)).astype(np.float32))


def test_just_resize_matches_diffusers_image_processor():
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(do_convert_rgb=True, do_normalize=False)  # the ControlNet
    picture = drawing(96, 40)                                               # pipelines' own
    for width, height in ((64, 48), (96, 40)):  # stretched; and the same size, unchanged
        want = processor.preprocess(picture, height=height, width=width).numpy()
        got = control_image(unit(picture, resize="resize"), width, height)
        np.testing.assert_array_equal(got, want)


def test_crop_and_resize_keeps_the_centre():
    picture = drawing(128, 64)
    got = control_image(unit(picture, resize="crop"), 64, 64)
    want = np.asarray(picture)[:, 32:96].astype(np.float32) / 255  # already 64 high: no scaling
    np.testing.assert_array_equal(got[0].transpose(1, 2, 0), want)
    assert resize_control(picture, (32, 48), "crop").size == (32, 48)


@pytest.mark.parametrize(("border", "band"), [((0, 0, 0), (255, 255, 255)),
                                              ((255, 255, 255), (0, 0, 0))])
def test_resize_and_fill_pads_with_the_median_border_colour(border, band):
    picture = Image.new("RGB", (64, 32), border)
    ImageDraw.Draw(picture).rectangle((8, 8, 55, 23), fill=band)  # inside, off the border
    got = np.asarray(resize_control(picture, (64, 64), "fill"))
    np.testing.assert_array_equal(got[16:48], np.asarray(picture))  # centred, not scaled
    assert (got[:16] == border).all() and (got[48:] == border).all()
    assert resize_control(picture, (48, 80), "fill").size == (48, 80)


def test_pixel_perfect_resolution_follows_the_extension():
    # short side × max(target/picture ratios), or × min for "fill"
    assert pixel_perfect_resolution((1024, 512), 512, 512, "crop") == 512
    assert pixel_perfect_resolution((1024, 512), 512, 512, "resize") == 512
    assert pixel_perfect_resolution((1024, 512), 512, 512, "fill") == 256
    assert pixel_perfect_resolution((300, 200), 768, 512, "crop") == 512


def test_pixel_perfect_runs_canny_at_the_covering_resolution():
    picture = drawing(128, 64)  # to 64 × 64 by crop: k = max(1, 0.5), res = 64 = its short side
    got = control_image(unit(picture, module="canny", pixel_perfect=True, processor_res=512),
                        64, 64)
    want = cv2.Canny(np.asarray(picture), 100, 200)[:, 32:96]
    np.testing.assert_array_equal(got[0, 0] * 255, want.astype(np.float32))


def test_network_preprocessor_graph_from_a_folder(tmp_path, monkeypatch):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["image"], ["map"], axes=[1], keepdims=1)], "mean",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, None, None])],
        [helper.make_tensor_value_info("map", TensorProto.FLOAT, [1, 1, None, None])])
    folder = tmp_path / "preprocessors" / "grey"
    folder.mkdir(parents=True)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, folder / "model.onnx")
    (folder / "preprocessor.json").write_text(
        '{"format": "sdrt-preprocessor", "format_version": 1, "name": "grey", "resolution": 64}')
    monkeypatch.setattr(preprocess, "PREPROCESSORS", dict(preprocess.PREPROCESSORS))
    assert preprocess.register_network_preprocessors(tmp_path / "preprocessors") == ("grey",)
    assert preprocess.PREPROCESSORS["grey"].resolution.value == 64
    picture = drawing(128, 64)
    got = np.asarray(detect("grey", picture))
    want = np.asarray(picture).astype(np.float32).mean(axis=2)
    assert got.shape == (64, 128, 3)
    assert np.abs(got[:, :, 1].astype(np.float32) - want).max() <= 0.5  # rounded to uint8
    with pytest.raises(ModelError, match="names built-in modules: canny"):
        (folder / "preprocessor.json").write_text(
            '{"format": "sdrt-preprocessor", "format_version": 1, "name": "canny"}')
        preprocess.register_network_preprocessors(tmp_path / "preprocessors")


def test_unknown_module_lists_the_known_ones():
    with pytest.raises(InputError, match="unknown ControlNet preprocessor 'depth'; choose one "
                                         "of: none, canny, invert"):
        detect("depth", drawing(32, 32))
    with pytest.raises(InputError, match="unknown ControlNet preprocessor"):
        control_image(unit(None, module="hed"), 64, 64)  # before the image is asked for


@pytest.mark.parametrize(("fields", "fragment"), [
    ({"image": None}, "needs a control image"),
    ({"resize": "stretch"}, "unknown control resize mode 'stretch'"),
    ({"module": "canny", "threshold_a": -1.0}, "threshold_a (Low Threshold) must be a number"),
    ({"module": "canny", "processor_res": 0}, "processor_res must be a positive integer"),
    ({"module": "canny", "processor_res": 10**5}, "more than 64,000,000 pixels"),
])
def test_bad_settings_are_one_line_errors(fields, fragment):
    settings = {"image": drawing(64, 64), **fields}
    with pytest.raises(InputError) as caught:
        control_image(unit(**settings), 64, 64)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_unreadable_and_too_large_images(tmp_path, monkeypatch):
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(InputError, match="control image 'notes.png' is not an image file"):
        control_image(unit(text), 64, 64)
    with pytest.raises(InputError, match="does not exist"):
        control_image(unit(tmp_path / "missing.png"), 64, 64)
    path = tmp_path / "big.png"
    drawing(64, 64).save(path)
    monkeypatch.setattr(images, "MAX_INPUT_PIXELS", 64 * 63)  # the image inputs' own cap
    with pytest.raises(InputError, match="more than 4,032 pixels, sdrt's limit for an input"):
        control_image(unit(path), 64, 64)
