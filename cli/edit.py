"""`sdrt img2img`, `sdrt inpaint`, `sdrt outpaint`: commands that repaint an input image.

Each reads its inputs and checks -o first, then plans memory for the size the model will work at
(the image's, by `images.output_size`'s rule; for outpainting, one window of the canvas), so a bad
file or a budget too small fails before any model loads.
"""

from __future__ import annotations

from pathlib import Path

import click

from sdrt.cli.control_options import control_options
from sdrt.cli.errors import reports_errors
from sdrt.cli.options import RunOptions, request_options, run_options
from sdrt.cli.prompt_options import prompt_options
from sdrt.cli.running import StepProgress, load_pipeline, output_paths, save_all

STRENGTH_HELP = ("Denoising strength in [0, 1]: the run makes the last int(steps × strength) of "
                 "--steps steps from IMAGE's latents noised to that level; 0 returns IMAGE "
                 "unchanged, 1 generates afresh.")
MASK_BLUR_HELP = "Feather the mask by a Gaussian of this many pixels (A1111's mask blur)."
# A1111's resize modes and masked-content choices, by their index in its API
RESIZE_MODES = {"just-resize": 0, "crop-and-resize": 1, "resize-and-fill": 2,
                "latent-upscale": 3}
INPAINTING_FILLS = {"fill": 0, "original": 1, "noise": 2, "nothing": 3}


def a1111_options(command):
    """--resize-mode and --noise-multiplier, A1111's img2img options both commands take."""
    command = click.option(
        "--noise-multiplier", type=click.FloatRange(0, 2), default=1.0, show_default=True,
        help="Scale the noise the run starts from (A1111's initial noise multiplier, 0 to 2).",
    )(command)
    return click.option(
        "--resize-mode", type=click.Choice(list(RESIZE_MODES)), default="just-resize",
        show_default=True,
        help="How IMAGE takes -W/-H of another aspect ratio (A1111's resize modes): stretched; "
             "scaled to cover and centre-cropped; scaled to fit with its edges stretched over "
             "the rest; latent-upscale resizes pixels as just-resize does.",
    )(command)


def _open(model_dir: Path, run: RunOptions, loras=()):
    """The model folder opened once (checked, facts, variant; auto resolved) for the plan and
    the load."""
    from sdrt.runtime.model.opened import OpenedModel

    return OpenedModel.open(model_dir, run.backend, run.precision, **run.needs(loras))


def _image_command(image: Path, mask: Path | None, prompt: str, model_dir: Path, output: Path,
                   run: RunOptions, width: int | None, height: int | None, input_options: dict,
                   options: dict) -> None:
    """img2img and inpaint: read the inputs and check -o, plan and load the model, then run."""
    from sdrt.runtime.images import output_size, read_image, read_mask
    from sdrt.runtime.pipeline import MAX_SIDE, GenerationRequest

    picture = read_image(image)
    drawn = None if mask is None else read_mask(mask)
    paths = output_paths(output, options["num_images"])
    options.update(deepcache=run.deepcache, generator=run.generator)
    model = _open(model_dir, run, options.get("loras", ()))
    step = max(8, model.facts.vae_scale_factor)  # as Pipeline.image_input sizes
    size = output_size(picture.size, width, height, step, MAX_SIDE)  # "Only masked" too
    pipe = load_pipeline(model, run, GenerationRequest(prompt=prompt, width=size[0],
                                                           height=size[1], **options))
    if pipe is None:  # --dry-run
        return
    init = pipe.image_input(picture, drawn, width=width, height=height,
                            resize_mode=RESIZE_MODES[input_options.pop("resize_mode")],
                            initial_noise_multiplier=input_options.pop("noise_multiplier"),
                            **input_options)
    request = pipe.request_for(init, prompt, **options)
    with StepProgress(request.steps) as progress:
        results = pipe.run(request, callback=progress.update, init=init)
    save_all(paths, results)


@click.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("--strength", type=float, default=0.75, show_default=True, help=STRENGTH_HELP)
@a1111_options
@request_options(sized=True)
@run_options
@prompt_options
@control_options(needs_image=False)
@reports_errors
def img2img(image: Path, prompt: str, strength: float, resize_mode: str,
            noise_multiplier: float, model_dir: Path, output: Path, run: RunOptions,
            width: int | None, height: int | None, **options) -> None:
    """Repaint IMAGE after PROMPT (image-to-image, diffusers' StableDiffusionImg2ImgPipeline).

    IMAGE is read with its EXIF orientation, transparency flattened onto white, and sized as
    -W/-H say; sides must end up between 8 and 2048 pixels.
    """
    _image_command(image, None, prompt, model_dir, output, run, width, height,
                   {"strength": strength, "resize_mode": resize_mode,
                    "noise_multiplier": noise_multiplier}, options)


@click.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.argument("mask", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("--strength", type=float, default=1.0, show_default=True, help=STRENGTH_HELP)
@click.option("--mask-blur", type=float, default=4, show_default=True, help=MASK_BLUR_HELP)
@click.option("--paste-back/--no-paste-back", default=True, show_default=True,
              help="Put IMAGE's own pixels back outside the feathered mask (A1111's overlay).")
@click.option("--inpaint-area", type=click.Choice(["whole", "masked"]), default="whole",
              show_default=True,
              help="Work on the whole picture, or on a crop around the mask at the full -W/-H "
                   "size, pasted back into IMAGE at its own size (A1111's \"Only masked\").")
@click.option("--masked-padding", type=click.IntRange(0, 2048), default=32, show_default=True,
              help="Pixels of context around the mask for --inpaint-area masked.")
@click.option("--inpainting-fill", type=click.Choice(list(INPAINTING_FILLS)), default="original",
              show_default=True,
              help="What the masked area starts from (A1111's masked content): the colours "
                   "around it, the original, noise, or zeros in the latents.")
@a1111_options
@request_options(sized=True)
@run_options
@prompt_options
@control_options(needs_image=False)
@reports_errors
def inpaint(image: Path, mask: Path, prompt: str, strength: float, mask_blur: float,
            paste_back: bool, inpaint_area: str, masked_padding: int, inpainting_fill: str,
            resize_mode: str, noise_multiplier: float, model_dir: Path, output: Path,
            run: RunOptions, width: int | None, height: int | None, **options) -> None:
    """Repaint IMAGE where MASK is white after PROMPT (inpainting).

    MASK is stretched to IMAGE's size when it differs (transparent counts as black = keep).
    Inpainting models (9-channel UNet) get the mask and masked image as inputs; other models
    blend the original back into the latents outside the mask after every step, as diffusers
    does.
    """
    _image_command(image, mask, prompt, model_dir, output, run, width, height,
                   {"strength": strength, "mask_blur": mask_blur, "paste_back": paste_back,
                    "inpaint_full_res": inpaint_area == "masked",
                    "inpaint_full_res_padding": masked_padding,
                    "inpainting_fill": INPAINTING_FILLS[inpainting_fill],
                    "resize_mode": resize_mode, "noise_multiplier": noise_multiplier},
                   options)


@click.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("--left", type=int, default=0, show_default=True, help="Pixels to add on the left.")
@click.option("--right", type=int, default=0, show_default=True, help="Pixels to add on the right.")
@click.option("--top", type=int, default=0, show_default=True, help="Pixels to add on top.")
@click.option("--bottom", type=int, default=0, show_default=True, help="Pixels to add below.")
@click.option("--strength", type=float, default=1.0, show_default=True,
              help="Denoising strength of the new area (below 1 it starts from the pre-fill).")
@click.option("--mask-blur", type=float, default=4, show_default=True, help=MASK_BLUR_HELP)
@click.option("--fill", type=click.Choice(["edge", "mirror"]), default="edge", show_default=True,
              help="Pre-fill of the new area: IMAGE's edge pixels stretched, or mirrored; "
                   "blurred.")
@request_options(sized=None)
@run_options
@prompt_options
@reports_errors
def outpaint(image: Path, prompt: str, left: int, right: int, top: int, bottom: int,
             strength: float, mask_blur: float, fill: str, model_dir: Path, output: Path,
             run: RunOptions, **options) -> None:
    """Extend IMAGE's canvas and paint the new area after PROMPT (outpainting).

    Canvases larger than the model's native size are painted in overlapping windows of that
    size; the seam with IMAGE is repainted and feathered. The memory plan is for one window.
    """
    from sdrt.runtime.images import ceil_to, read_image
    from sdrt.runtime.outpaint import Extension
    from sdrt.runtime.outpaint import outpaint as outpaint_image
    from sdrt.runtime.pipeline import MAX_SIDE, GenerationRequest

    picture = read_image(image)
    paths = output_paths(output, options["num_images"])
    extension = Extension(left, right, top, bottom).validate(MAX_SIDE)
    options.update(deepcache=run.deepcache, generator=run.generator)
    model = _open(model_dir, run, options.get("loras", ()))
    facts = model.facts
    step = max(8, facts.vae_scale_factor)
    # Each image is painted alone, window by window, a window at most the native size a side.
    window = [min(ceil_to(side, step), facts.default_size) for side in (
        picture.width + left + right, picture.height + top + bottom)]
    pipe = load_pipeline(model, run, GenerationRequest(
        prompt=prompt, width=window[0], height=window[1], **{**options, "num_images": 1}))
    if pipe is None:  # --dry-run
        return
    with StepProgress(None) as progress:
        results = outpaint_image(pipe, picture, prompt, extension, strength=strength,
                                 mask_blur=mask_blur, fill=fill, callback=progress.update,
                                 **options)
    save_all(paths, results)
