"""What the training scripts here share: a JSON-lines run log, the shapes data set rendered as
tensors, shuffled batches, warm-up then cosine learning rates, an EMA of the weights, the
shape-weighted reconstruction loss, and fp16 rounding of the weights that are shipped."""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sdrt.evaluation.scenes import training_samples
from sdrt.models.embedded_config import IMAGE_SIZE

# --- logging --------------------------------------------------------------------------------------


class Log:
    """JSON-lines training log with wall time since the run started; echoes to stdout."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.start = time.perf_counter()
        path.write_text("")

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self.start

    def write(self, **record: Any) -> None:
        """Append one record (with `elapsed`) to the log and print it."""
        line = json.dumps({**record, "elapsed": round(self.elapsed(), 1)})
        with self.path.open("a") as f:
            f.write(line + "\n")
        print(line, flush=True)


# --- data -----------------------------------------------------------------------------------------


def render_dataset(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """`n` training (image, caption) pairs from the procedural shapes data set."""
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    captions = []
    for i, (image, text) in enumerate(training_samples(n, seed, size=IMAGE_SIZE)):
        images[i] = image
        captions.append(text)
    return images, captions


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the VAE's range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(pixels: torch.Tensor) -> list[np.ndarray]:
    """float (N, 3, H, W) in [-1, 1] -> list of uint8 (H, W, 3)."""
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    return list(array.numpy())


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches of size `batch_size`, reshuffled each epoch, forever."""
    while True:
        order = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield order[i:i + batch_size]


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


# --- optimisation and loss ------------------------------------------------------------------------


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr


class EMA:
    """Exponential moving average of a model's weights, with the usual warm-up of the decay."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Move the average towards `model`'s current weights."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        averaged = list(self.model.parameters())
        torch._foreach_lerp_(averaged, [p.detach() for p in model.parameters()], 1.0 - decay)


def foreground_weight(pixels: torch.Tensor, gain: float) -> torch.Tensor:
    """Per-pixel loss weight 1 + gain·(distance from the border's median colour): shapes cover
    a few % of an image, and their colour and outline are what the captions name."""
    ring = torch.cat([pixels[..., 0, :], pixels[..., -1, :], pixels[..., 0], pixels[..., -1]], -1)
    background = ring.median(dim=-1).values[..., None, None]
    return 1.0 + gain * (pixels - background).norm(dim=1, keepdim=True)


# --- shipping -------------------------------------------------------------------------------------


def round_to_fp16(module: torch.nn.Module) -> None:
    """Round every weight to fp16 in place (kept in fp32), so evaluation sees what is shipped."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())


def to_fp16_file(path: Path) -> None:
    """Rewrite a safetensors file with its floating-point tensors in fp16 (half the bytes)."""
    tensors = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(path).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    path.chmod(0o644)
