"""The memory options of `sdrt generate`: --low-memory, --max-memory, --dry-run, --device,
--max-vram; they reach the command as one `MemoryOptions` (runtime/memory/plan.py plans)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import click

from sdrt.runtime.devices import DEVICES
from sdrt.runtime.memory import estimate as memory


@dataclass(frozen=True)
class MemoryOptions:
    """What the user asked about memory and devices."""

    low_memory: bool = False
    max_memory: str | None = None
    dry_run: bool = False
    device: str = "cpu"
    max_vram: str | None = None

    @property
    def vram_limit(self) -> int | None:
        return None if self.max_vram is None else memory.parse_size(self.max_vram)

    def budget(self) -> int | None:
        """--max-memory, else (on the CPU) what the machine has free; on a GPU the VRAM cap."""
        if self.max_memory is not None:
            return memory.parse_size(self.max_memory)
        if self.device == "gpu":
            return self.vram_limit
        return memory.available_memory()


def memory_options(command):
    """Add the memory options to a click command; it receives them as `memory=`."""
    options = [
        click.option("--low-memory", is_flag=True,
                     help="One model component in memory at a time, the CFG pair as two "
                          "batch-1 UNet calls, tiled VAE: SD 1.5 int8 in about 1 GB."),
        click.option("--max-memory", default=None, metavar="SIZE",
                     help="Memory budget, e.g. 1.2G (default: what the machine has free). A "
                          "run estimated over it switches to --low-memory, or is refused."),
        click.option("--dry-run", is_flag=True,
                     help="Print the memory estimate per component and the chosen plan; "
                          "load nothing."),
        click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True,
                     help="gpu: ONNX Runtime's CUDA provider or OpenVINO's GPU device; the CPU "
                          "with a warning where there is none."),
        click.option("--max-vram", default=None, metavar="SIZE",
                     help="GPU memory cap (ORT gpu_mem_limit; checked against the estimate)."),
    ]

    @functools.wraps(command)
    def wrapper(*args, low_memory, max_memory, dry_run, device, max_vram, **kwargs):
        return command(*args, memory=MemoryOptions(low_memory, max_memory, dry_run, device,
                                                   max_vram), **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper
