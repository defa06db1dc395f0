"""The A1111 ControlNet extension's API on `sdrt serve`: units of `alwayson_scripts.controlnet`
as webuiapi's ControlNetUnit sends them (and older clients' forms) read into ControlUnits; the
/controlnet routes' answers; detect's canny equal to OpenCV's own call; the infotext as the
extension v3 writes it; bad units as one-line 422s with the queue still serving."""

from __future__ import annotations

import base64
import io
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

for _module in ("fastapi", "httpx", "webuiapi", "cv2"):
    pytest.importorskip(_module, reason=f"{_module} is missing (pip install 'sdrt[serve,dev]')")

import cv2  # noqa: E402
import webuiapi  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from sdrt.runtime.control.infotext import control_infotext  # noqa: E402
from sdrt.runtime.control.library import ControlLibrary  # noqa: E402
from sdrt.runtime.control.manifest import CONTROLNET, ControlManifest  # noqa: E402
from sdrt.runtime.control.unit import ControlUnit  # noqa: E402
from sdrt.runtime.errors import InputError  # noqa: E402
from sdrt.runtime.metadata import GenerationInfo, format_parameters, parse_parameters  # noqa: E402
from sdrt.runtime.model.folder import EMBEDDED_MODEL  # noqa: E402
from sdrt.runtime.model.manifest import ComponentSpec, FileEntry  # noqa: E402
from sdrt.runtime.pipeline import Pipeline  # noqa: E402
from sdrt.runtime.server.app import create_app  # noqa: E402
from sdrt.runtime.server.controlnet import ControlModels, control_units  # noqa: E402
from sdrt.runtime.server.settings import ServerSettings  # noqa: E402

SIZE = 64  # the embedded model's native side
FAST = {"prompt": "a red circle", "width": SIZE, "height": SIZE, "steps": 2, "seed": 1}
LIMIT = 256 * 256  # pixels an input may have in the parsing tests
HASHES = {"canny_sd15": "0123abcd", "depth_xl": "89abcdef"}
ARCHITECTURES = {"canny_sd15": ("sd1", 768), "depth_xl": ("sdxl", 2048)}


def manifest_only(root: Path, name: str) -> Path:
    """A control folder whose manifest.json alone is real (enough for listing and parsing)."""
    architecture, width = ARCHITECTURES[name]
    folder = root / name
    (folder / CONTROLNET).mkdir(parents=True)
    ControlManifest(
        name=name, architecture=architecture, cross_attention_dim=width,
        conditioning_channels=3, global_pool_conditions=False, residual_channels=(32, 32, 64),
        source={"weights_sha256": "0" * 64}, hash=HASHES[name], opset=18, versions={},
        components={CONTROLNET: ComponentSpec("model.onnx", {}, {})},
        files={f"{CONTROLNET}/model.onnx": FileEntry("0" * 64, 1)}).save(folder)
    return folder


@pytest.fixture(scope="module")
def control_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("controlnets")
    for name in HASHES:
        manifest_only(root, name)
    (root / "not-a-controlnet").mkdir()
    return root


@pytest.fixture(scope="module")
def models(control_dir) -> ControlModels:
    return ControlModels(ControlLibrary.open(control_dir))


@pytest.fixture(scope="module")
def client(control_dir):
    app = create_app(Pipeline.load(EMBEDDED_MODEL), ServerSettings(),
                     ControlLibrary.open(control_dir))
    with TestClient(app) as client:
        yield client


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def picture(width: int = SIZE, height: int = SIZE) -> Image.Image:
    """A picture with edges: a bright square on a dark ground, and a gradient."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[height // 4:3 * height // 4, width // 4:3 * width // 4] = (230, 200, 40)
    pixels[:, :, 2] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    return Image.fromarray(pixels)


def scripts(*units: dict, title: str = "ControlNet") -> dict:
    return {title: {"args": list(units)}}


def one(models: ControlModels, unit: dict, init: Image.Image | None = None) -> ControlUnit:
    (parsed,) = control_units(scripts(unit), models, LIMIT, init)
    return parsed


def test_webuiapi_units_read_as_the_extension_reads_them(models, control_dir):
    unit = webuiapi.ControlNetUnit(image=picture(), module="canny", model="canny_sd15 [0123abcd]",
                                   weight=0.8, resize_mode="Just Resize", guidance_start=0.1,
                                   guidance_end=0.6, control_mode=2, pixel_perfect=True)
    parsed = one(models, unit.to_dict())
    assert parsed.model == (control_dir / "canny_sd15").resolve()
    assert (parsed.module, parsed.scale, parsed.start, parsed.end) == ("canny", 0.8, 0.1, 0.6)
    assert (parsed.mode, parsed.resize, parsed.pixel_perfect) == ("control", "resize", True)
    # webuiapi's defaults (512, 64, 64) lie inside canny's sliders: used as sent
    assert (parsed.processor_res, parsed.threshold_a, parsed.threshold_b) == (512, 64.0, 64.0)
    assert np.array_equal(np.asarray(parsed.image), np.asarray(picture()))
    assert parsed.mask is None


@pytest.mark.parametrize("fields, expected", [
    ({"resize_mode": 0}, {"resize": "resize"}),
    ({"resize_mode": 2}, {"resize": "fill"}),
    ({"resize_mode": "Crop and Resize"}, {"resize": "crop"}),
    ({"resize_mode": "Envelope (Outer Fit)"}, {"resize": "fill"}),  # the extension's old name
    ({}, {"resize": "crop", "mode": "balanced", "scale": 1.0}),  # the extension's defaults
    ({"control_mode": 1}, {"mode": "prompt"}),
    ({"control_mode": "My prompt is more important"}, {"mode": "prompt"}),
    ({"control_mode": "ControlNet is more important"}, {"mode": "control"}),
    ({"guidance": 0.5}, {"end": 0.5}),  # legacy names
    ({"lowvram": True, "low_vram": True, "hr_option": "Both"}, {}),  # ignored
    ({"threshold_a": -1, "threshold_b": 300, "processor_res": 64},  # outside: defaults
     {"threshold_a": None, "threshold_b": None, "processor_res": None}),
    ({"module": "invert (from white bg & black line)", "threshold_a": 0.7},  # alias; hidden
     {"module": "invert", "threshold_a": None, "processor_res": None}),
    ({"model": "canny_sd15"}, {}),  # by name, without the hash
])
def test_unit_fields_and_their_other_forms(models, fields, expected):
    unit = {"image": b64(picture()), "module": "canny", "model": "canny_sd15 [0123abcd]",
            **fields}
    parsed = one(models, unit)
    assert {name: getattr(parsed, name) for name in expected} == expected


def test_image_forms_masks_skipped_units_and_the_img2img_fallback(models):
    image, mask = picture(), Image.new("L", (SIZE, SIZE), 255)
    base = {"module": "none", "model": "canny_sd15"}
    for unit in ({**base, "image": {"image": b64(image), "mask": b64(mask)}},
                 {**base, "image": [b64(image), b64(mask)]},
                 {**base, "input_image": b64(image), "mask_image": b64(mask)}):
        parsed = one(models, unit)
        assert parsed.image.size == (SIZE, SIZE) and parsed.mask.size == (SIZE, SIZE)
    skipped = [{**base, "image": b64(image), "enabled": False},
               {**base, "image": b64(image), "model": "None"}]
    assert control_units(scripts(*skipped), models, LIMIT) == ()
    assert control_units({"other": {"args": [1]}} | scripts(), models, LIMIT) == ()
    init = picture(SIZE, SIZE // 2)
    assert one(models, {**base, "image": ""}, init).image is init  # the extension's fallback


BAD_UNITS = [  # (unit fields over a good unit, words the one-line message must hold)
    ({"module": "depth"}, "unknown alwayson_scripts.controlnet.args[0].module 'depth'; "
                          "choose one of: none, canny, invert"),
    ({"model": "nope"}, "unknown ControlNet model 'nope'; the ControlNet dir has: "
                        "canny_sd15 [0123abcd], depth_xl [89abcdef]"),
    ({"image": "not base64!"}, "args[0].image is not valid base64"),
    ({"image": "aGVsbG8="}, "args[0].image is not an image Pillow can read"),
    ({"image": b64(picture(512, 512))}, "more than 65,536 pixels"),
    ({"image": ""}, "no image (a txt2img ControlNet unit needs one)"),
    ({"weight": 3}, "args[0].weight: Input should be less than or equal to 2"),
    ({"weight": True}, "args[0].weight: Input should be a valid number"),
    ({"guidance_start": 0.8, "guidance_end": 0.2}, "ControlNet unit 0: guidance start and end"),
    ({"resize_mode": 7}, "unknown alwayson_scripts.controlnet.args[0].resize_mode 7"),
    ({"control_mode": "Bogus"}, "choose one of: Balanced, My prompt is more important, "
                                "ControlNet is more important"),
    ({"image": {}}, "no image"),
]


@pytest.mark.parametrize("fields, words", BAD_UNITS, ids=[str(f)[:30] for f, _ in BAD_UNITS])
def test_bad_units_are_one_line_input_errors(models, fields, words):
    unit = {"image": b64(picture()), "module": "canny", "model": "canny_sd15", **fields}
    with pytest.raises(InputError) as caught:
        control_units(scripts(unit), models, LIMIT)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_bad_unit_lists(models):
    for bad, words in (({"ControlNet": {"args": {}}}, "args must be a list of units"),
                       (scripts("unit"), "args[0] must be an object"),
                       (scripts(*[{"model": "None"}] * 9), "at most 8")):
        with pytest.raises(InputError, match=words.replace("[", r"\[")):
            control_units(bad, models, LIMIT)
    with pytest.raises(InputError, match="has none .start it with --controlnet-dir DIR"):
        control_units(scripts({"model": "x", "image": b64(picture())}), ControlModels(None),
                      LIMIT)


def test_version_settings_and_model_list(client):
    assert client.get("/controlnet/version").json() == {"version": 3}
    assert client.get("/controlnet/settings").json() == {"control_net_unit_count": 8}
    assert client.get("/controlnet/model_list").json() == {
        "model_list": ["canny_sd15 [0123abcd]", "depth_xl [89abcdef]"]}


def test_module_list_as_the_extension_answers(client):
    plain = client.get("/controlnet/module_list").json()
    assert plain["module_list"] == ["none", "canny", "invert"]
    assert plain["module_detail"]["canny"] == {"model_free": False, "sliders": [
        {"name": "Resolution", "value": 512, "min": 128, "max": 2048, "step": 8},
        {"name": "Low Threshold", "value": 100, "min": 0, "max": 256, "step": 1},
        {"name": "High Threshold", "value": 200, "min": 0, "max": 256, "step": 1}]}
    assert plain["module_detail"]["invert"] == {"model_free": False, "sliders": []}
    assert plain["module_detail"]["none"]["sliders"] == plain["module_detail"]["canny"][
        "sliders"][:1]  # the extension's none keeps the Resolution slider
    aliased = client.get("/controlnet/module_list", params={"alias_names": True}).json()
    assert aliased["module_list"][2] == "invert (from white bg & black line)"
    assert set(aliased["module_detail"]) == set(aliased["module_list"])


def test_detect_canny_equals_opencvs_own_call(client):
    image = picture(128, 128)  # short side = processor_res, sides multiples of 64: no resize
    for key in ("controlnet_input_images", "controlnet_images"):  # the extension's; webuiapi's
        answer = client.post("/controlnet/detect", json={
            "controlnet_module": "canny", key: [b64(image), b64(image)],
            "controlnet_processor_res": 128, "controlnet_threshold_a": 50,
            "controlnet_threshold_b": 120})
        assert answer.status_code == 200 and answer.json()["info"] == "Success"
        edges = cv2.Canny(np.asarray(image), 50, 120)
        for data in answer.json()["images"]:
            got = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))
            assert np.array_equal(got, np.repeat(edges[:, :, None], 3, axis=2))
    inverted = client.post("/controlnet/detect", json={
        "controlnet_module": "invert (from white bg & black line)",
        "controlnet_input_images": [b64(image)]}).json()["images"][0]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(inverted)))),
                          255 - np.asarray(image))


@pytest.mark.parametrize("body, words", [
    ({"controlnet_module": "depth", "controlnet_input_images": ["x"]},
     "unknown controlnet_module 'depth'; choose one of: none, canny, invert"),
    ({"controlnet_module": "canny"}, "controlnet_input_images is empty"),
    ({"controlnet_module": "canny", "controlnet_input_images": ["aGVsbG8="]},
     "controlnet_input_images[0] is not an image Pillow can read"),
    ({"controlnet_module": "canny", "controlnet_input_images": [b64(picture())],
      "controlnet_threshold_a": "low"}, "body.controlnet_threshold_a: Input should be"),
])
def test_detect_bad_input_is_one_line_422(client, body, words):
    answer = client.post("/controlnet/detect", json=body)
    assert answer.status_code == 422, answer.text
    assert words in answer.json()["detail"] and "\n" not in answer.json()["detail"]


def test_bad_units_through_txt2img_are_422_and_the_queue_goes_on(client):
    unit = {"image": b64(picture()), "module": "canny", "model": "canny_sd15"}
    for fields, words in (({"module": "depth"}, "unknown"), ({"model": "nope"}, "nope"),
                          ({"image": "aGVsbG8="}, "Pillow")):
        body = {**FAST, "alwayson_scripts": scripts({**unit, **fields})}
        answer = client.post("/sdapi/v1/txt2img", json=body)
        assert answer.status_code == 422 and words in answer.json()["detail"]
    other = client.post("/sdapi/v1/txt2img", json={**FAST, "alwayson_scripts": {"ADetailer": {
        "args": []}}})
    assert other.status_code == 422 and "alwayson_scripts" in other.json()["detail"]
    empty = {**FAST, "alwayson_scripts": scripts(title="controlnet")}  # webuiapi's "no units"
    assert client.post("/sdapi/v1/txt2img", json=empty).status_code == 200


UNIT_TEXT = ("Module: canny, Model: canny_sd15 [0123abcd], Weight: 0.8, Resize Mode: Just Resize, "
             "Processor Res: 512, Threshold A: 64.0, Threshold B: 64.0, Guidance Start: 0.1, "
             "Guidance End: 0.6, Pixel Perfect: True, Control Mode: ControlNet is more important")


def test_infotext_as_the_extension_writes_it(models):
    units = control_units(scripts(
        webuiapi.ControlNetUnit(image=picture(), module="canny", model="canny_sd15", weight=0.8,
                                resize_mode="Just Resize", guidance_start=0.1, guidance_end=0.6,
                                control_mode=2, pixel_perfect=True).to_dict(),
        {"image": b64(picture()), "module": "canny", "model": "canny_sd15"},
        {"image": b64(picture()), "module": "invert", "model": "canny_sd15", "weight": 1}),
        models, LIMIT)
    texts = control_infotext(units, ["canny_sd15 [0123abcd]"] * 3)
    assert texts["ControlNet 0"] == UNIT_TEXT
    # left out: the sliders' defaults as the extension stores them (hidden ones 0.5)
    assert "Processor Res: 512, Threshold A: 100, Threshold B: 200," in texts["ControlNet 1"]
    assert ("Weight: 1.0, Resize Mode: Crop and Resize, Processor Res: 0.5, Threshold A: 0.5, "
            "Threshold B: 0.5, Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: False, "
            "Control Mode: Balanced") in texts["ControlNet 2"]
    assert control_infotext(units[:1], ["a, b [0123abcd]"]) == {"ControlNet 0": ""}
    info = GenerationInfo(prompt="p", negative_prompt="", steps=2, sampler="Euler", cfg_scale=7,
                          seed=1, width=64, height=64, extra=texts)
    text = format_parameters(info)
    assert f'ControlNet 0: "{UNIT_TEXT}"' in text  # A1111 quotes a value with commas
    assert parse_parameters(text)["ControlNet 0"] == UNIT_TEXT


# --------------------------------------------- through a real server, against diffusers (parity)

CONTROL_SCALE, CONTROL_END = 0.8, 0.5  # a partial weight, and control off for the last half
# The control must move some pixel far beyond the parity bound, or matching would prove nothing.
CONTROL_EFFECT = 10


@pytest.fixture(scope="module")
def parity_dir(tiny_sd_dir, tmp_path_factory) -> Path:
    """--controlnet-dir holding one tiny ControlNet made from tiny_sd's UNet (non-zero zero
    convolutions: control changes the picture), exported by sdrt."""
    pytest.importorskip("torch")
    from sdrt.export.onnx_export import export_pipeline
    from tests.export.controlnet_checkpoint import tiny_controlnet

    scratch = tmp_path_factory.mktemp("parity-controlnet")
    source = tiny_controlnet(tiny_sd_dir / "unet", scratch / "source")
    export_pipeline(source, scratch / "dir" / "tinycn")
    return scratch


def control_picture() -> Image.Image:
    """A ready map (module none) at the output size: no resize on either side."""
    pixels = np.zeros((SIZE, SIZE, 3), np.uint8)
    pixels[8:40, 16:56] = 255
    pixels[44:60, 4:30] = (255, 0, 0)
    return Image.fromarray(pixels)


# diffusers' schedulers call NumPy in ways NumPy 2 deprecates
@pytest.mark.parity
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_webuiapi_controlnet_unit_equals_diffusers(tiny_sd_dir, tiny_onnx_dir, parity_dir):
    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from sdrt.benchmarks.server_load import running_server
    from tests.conftest import MAX_PIXEL_DIFF, NEGATIVE, PROMPT, load_reference, use_sampler

    (title,) = ControlModels(ControlLibrary.open(parity_dir / "dir")).titles()  # "tinycn [hash]"
    unit = webuiapi.ControlNetUnit(image=control_picture(), module="none", model=title,
                                   weight=CONTROL_SCALE, resize_mode="Just Resize",
                                   guidance_end=CONTROL_END)
    with running_server("--model", str(tiny_onnx_dir), "--controlnet-dir",
                        str(parity_dir / "dir")) as server:
        port = int(server.url.rsplit(":", 1)[1])
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port)
        assert api.controlnet_model_list() == [title]
        # webuiapi writes the units into its mutable default `alwayson_scripts={}`, which every
        # later call of every client would send again: pass a dict of this call's own.
        result = api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, seed=7, steps=4,
                             cfg_scale=6.0, width=SIZE, height=SIZE, sampler_name="Euler",
                             alwayson_scripts={}, controlnet_units=[unit])
    base = load_reference(tiny_sd_dir)
    use_sampler(base, "euler")
    reference = StableDiffusionControlNetPipeline(
        **base.components, controlnet=ControlNetModel.from_pretrained(parity_dir / "source"))
    reference.set_progress_bar_config(disable=True)
    same = dict(negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=6.0, width=SIZE,
                height=SIZE, output_type="np")
    expected = reference(PROMPT, image=control_picture(), **same,
                         generator=[torch.Generator().manual_seed(7)],
                         controlnet_conditioning_scale=CONTROL_SCALE,
                         control_guidance_end=CONTROL_END).images[0]
    uncontrolled = base(PROMPT, **same, generator=[torch.Generator().manual_seed(7)]).images[0]
    expected, uncontrolled = (np.round(image * 255).astype(np.int16)
                              for image in (expected, uncontrolled))
    assert np.abs(expected - uncontrolled).max() > CONTROL_EFFECT  # the control shows
    got = np.asarray(result.image, dtype=np.int16)
    assert np.abs(got - expected).max() <= MAX_PIXEL_DIFF["ort"]
    assert (f'ControlNet 0: "Module: none, Model: {title}, Weight: 0.8, Resize Mode: Just Resize,'
            " Processor Res: 512, Threshold A: 0.5, Threshold B: 0.5, Guidance Start: 0.0, "
            'Guidance End: 0.5, Pixel Perfect: False, Control Mode: Balanced"'
            ) in result.info["infotexts"][0]


def test_control_a_model_cannot_take_is_422_and_the_queue_goes_on(tiny_onnx_dir, parity_dir,
                                                                   tmp_path):
    """A ControlNet for another family (its manifest made SDXL's), and any ControlNet on the
    embedded model, whose UNet was exported before residual inputs existed."""
    shutil.copytree(parity_dir / "dir" / "tinycn", tmp_path / "xl")
    manifest = ControlManifest.load(tmp_path / "xl")
    replace(manifest, architecture="sdxl", cross_attention_dim=2048).save(tmp_path / "xl")
    shutil.copytree(parity_dir / "dir" / "tinycn", tmp_path / "tinycn")
    for model, control, words in ((tiny_onnx_dir, "xl", "is a ControlNet for SDXL"),
                                  (EMBEDDED_MODEL, "tinycn", "takes no ControlNet residuals")):
        app = create_app(Pipeline.load(model), ServerSettings(), ControlLibrary.open(tmp_path))
        unit = {"image": b64(control_picture()), "module": "none", "model": control}
        with TestClient(app) as client:
            answer = client.post("/sdapi/v1/txt2img",
                                 json={**FAST, "alwayson_scripts": scripts(unit)})
            assert answer.status_code == 422, answer.text
            assert words in answer.json()["detail"] and "\n" not in answer.json()["detail"]
            assert client.post("/sdapi/v1/txt2img", json=FAST).status_code == 200
