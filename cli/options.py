"""The options the generating commands share, each defined once.

`run_options` (how a model runs: backend, precision, threads, device and memory, VAE, DeepCache,
noise generator, the LoRA and embeddings folders) is accepted by generate, img2img, inpaint,
outpaint, serve and batch, which receive it as one `run=RunOptions`, as they do the prompt and
LoRA options (cli/prompt_options.py); `request_options` (what to make: model, prompt settings,
size, count, output) by the four commands that make images from the command line.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import click

from sdrt.cli.memory_options import MemoryOptions, memory_options
from sdrt.cli.prompt_options import EMBEDDINGS_DIR_HELP, LORA_DIR_HELP
from sdrt.runtime.errors import InputError
from sdrt.runtime.model.auto import AUTO
from sdrt.runtime.model.families import FAMILIES
from sdrt.runtime.model.folder import EMBEDDED_MODEL
from sdrt.runtime.model.variants import PRECISIONS
from sdrt.runtime.samplers import SAMPLERS, sampler_names
from sdrt.runtime.schedules import AUTOMATIC, SCHEDULES

SIZE_HELP = "Pixels; default: the model's native size (768 for SD 2.x 768-v, else 512)."
IMAGE_SIZE_HELP = ("Pixels; default: IMAGE's size rounded down to a multiple of 8 (with one of "
                   "-W/-H the other keeps IMAGE's aspect ratio); IMAGE is resized (Lanczos) to "
                   "the output size.")
VAE_HELP = ("A tiny autoencoder folder (TAESD; `sdrt export` of an AutoencoderTiny) that decodes "
            "(and encodes) in the model's VAE's place: much faster, approximate.")
MODEL_HELP = ("Exported model folder (see `sdrt export`); default: sdrt's embedded 64×64 shapes "
              "model (models/embedded/).")
DEFAULT_GENERATOR = "torch"


def family_defaults(field: str) -> str:
    """Help text listing each model family's default for one generation field."""
    return ", ".join(f"{family.title} {getattr(family, field):g}" for family in FAMILIES.values())


def model_option(help_text: str = MODEL_HELP, default: Path | None = EMBEDDED_MODEL):
    """--model: the exported model folder a command runs."""
    return click.option("--model", "model_dir", default=default, type=click.Path(path_type=Path),
                        help=help_text)


@dataclass(frozen=True)
class RunOptions:
    """How a command runs its model (the `run_options` it was given)."""

    backend: str
    precision: str
    threads: int | None
    generator: str
    vae: Path | None
    deepcache: int | None
    memory: MemoryOptions
    lora_dir: Path | None = None
    embeddings_dir: Path | None = None

    def load_options(self, low_memory: bool) -> dict:
        """Pipeline.load's keyword arguments, with the plan's choice of low-memory mode."""
        return {"backend": self.backend, "threads": self.threads, "precision": self.precision,
                **self.device_options(low_memory)}

    def device_options(self, low_memory: bool) -> dict:
        """Pipeline.load's options other than backend, precision and threads (what a batch
        gives every worker, whose jobs name those three)."""
        return {"low_memory": low_memory, "device": self.memory.device,
                "vram_limit": self.memory.vram_limit,
                "vae": None if self.vae is None else str(self.vae), **self.adapter_options()}

    def adapter_options(self) -> dict:
        """Pipeline.load's folders of LoRAs and embeddings, those given (absolute, as a batch's
        workers may run elsewhere)."""
        folders = {"lora_dir": self.lora_dir, "embeddings_dir": self.embeddings_dir}
        return {name: str(folder.expanduser().absolute()) for name, folder in folders.items()
                if folder is not None}

    def needs(self, loras=()) -> dict:
        """What the run needs of the denoiser, which auto's precision then keeps to
        (model/auto.py): the fp32 graph for LoRAs, DeepCache graphs gated at --deepcache's N."""
        return {"keeps_unet": self.lora_dir is not None or bool(loras),
                "deepcache": self.deepcache}

    def refuse_deepcache(self, command: str, why: str) -> None:
        """InputError when --deepcache was given to a command it does not apply to."""
        if self.deepcache is not None:
            raise InputError(f"--deepcache does not apply to {command}: {why}")


_RUN_OPTIONS = [
    click.option("--backend", default=AUTO, show_default=True,
                 help="ort, openvino, or auto: openvino where installed, except for small "
                      "models (ort starts faster); see docs/auto.md."),
    click.option("--precision", default=AUTO, show_default=True,
                 help=f"{', '.join(PRECISIONS)}: a variant `sdrt quantize` listed for this "
                      "backend; auto: bf16 where the CPU has it natively and its gate passed, "
                      "else fp32, or a gated variant recorded faster on this machine."),
    click.option("--threads", type=int, default=None,
                 help="Backend threads (default: all cores; batch: per worker, the cores / "
                      "--workers)."),
    click.option("--generator", default=DEFAULT_GENERATOR, show_default=True,
                 help="torch (same starting noise as diffusers on CPU) or numpy."),
    click.option("--vae", type=click.Path(path_type=Path), default=None, help=VAE_HELP),
    click.option("--deepcache", type=int, default=None,
                 help="DeepCache interval N: the full UNet on every N-th call, only its shallow "
                      "branch on a cached deep feature between (make the graphs with `python -m "
                      "sdrt.export.deepcache MODEL`); generate, img2img, inpaint, outpaint."),
    click.option("--lora-dir", type=click.Path(path_type=Path), default=None,
                 help=LORA_DIR_HELP),
    click.option("--embeddings-dir", type=click.Path(path_type=Path), default=None,
                 help=EMBEDDINGS_DIR_HELP),
]


def run_options(command):
    """Add the run options (and the memory options) to a click command; it receives them as
    `run=`."""

    @functools.wraps(command)
    def wrapper(*args, backend, precision, threads, generator, vae, deepcache, lora_dir,
                embeddings_dir, memory, **kwargs):
        return command(*args, run=RunOptions(backend, precision, threads, generator, vae,
                                             deepcache, memory, lora_dir, embeddings_dir),
                       **kwargs)

    for option in reversed(_RUN_OPTIONS):
        wrapper = option(wrapper)
    return memory_options(wrapper)


def request_options(sized: bool | None):
    """What to make: model, prompt settings, -W/-H (none when `sized` is None; True says in
    their help how an input image is sized), count and output."""
    size_help = IMAGE_SIZE_HELP if sized else SIZE_HELP
    options = [
        model_option(),
        click.option("-n", "--negative-prompt", default="",
                     help="What the image should not show."),
        click.option("--steps", type=int, default=None,
                     help="Sampler steps; default: the model family's "
                          f"({family_defaults('steps')})."),
        click.option("--guidance-scale", "--cfg-scale", "guidance_scale", type=float,
                     default=None,
                     help="Classifier-free guidance (≤ 1 runs the UNet once per step), or an "
                          "LCM UNet's guidance input (always one call per step); default: the "
                          f"model family's ({family_defaults('guidance_scale')})."),
        click.option("--sampler", default=None,
                     help=f"{', '.join(sampler_names())} (A1111 names too, e.g. \"Euler a\", "
                          "\"UniPC\", \"DPM++ 2M SDE\"; "
                          "a name ending in a schedule, as \"DPM++ 2M Karras\", sets "
                          "--schedule); default: the model family's, else the model folder's own "
                          "scheduler."),
        click.option("--schedule", type=click.Choice(list(SCHEDULES), case_sensitive=False),
                     default=None,
                     help=f"Noise schedule (A1111's Schedule type): {AUTOMATIC} is the "
                          "sampler's own (for A1111's samplers, what A1111 runs them on); the "
                          "others run with every sampler but "
                          f"{', '.join(n for n, spec in SAMPLERS.items() if not spec.ladder)}. "
                          f"Default: {AUTOMATIC}, or the one the --sampler name ends in."),
        click.option("--seed", type=int, default=None,
                     help="Seed of the first image; image i uses seed+i."),
        *([click.option("-W", "--width", type=int, default=None, help=size_help),
           click.option("-H", "--height", type=int, default=None, help=size_help)]
          if sized is not None else []),
        click.option("--num-images", default=1, show_default=True, help="Images to make."),
        click.option("-o", "--output", type=click.Path(path_type=Path),
                     default=Path("outputs"), show_default=True,
                     help="A .png file, or a folder to number images in."),
    ]

    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command

    return apply
