"""The `sdrt` command line (click): the group, its commands, the entry point.

Heavy modules are imported inside the command that needs them, so `sdrt --help` is instant and
`sdrt generate` never imports torch. Errors of sdrt's own types print as one line and exit 1
(cli/errors.py); `--verbose` shows the traceback too.
"""

from __future__ import annotations

import logging

import click

from sdrt.cli.apps import batch, serve
from sdrt.cli.edit import img2img, inpaint, outpaint
from sdrt.cli.generate import generate
from sdrt.cli.stages import bench, check, export, quantize


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log details and show tracebacks on errors.")
@click.version_option(package_name="sdrt")
def main(verbose: bool) -> None:
    """sdrt: Stable Diffusion on CPUs and small GPUs, from exported ONNX/OpenVINO graphs.

    \b
    Typical use:
      sdrt export ./stable-diffusion-v1-5 ./sd15-onnx     # once, needs the export extra
      sdrt generate "a lighthouse at dusk" --model ./sd15-onnx
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


for command in (export, quantize, check, generate, img2img, inpaint, outpaint, serve, batch,
                bench):
    main.add_command(command)
