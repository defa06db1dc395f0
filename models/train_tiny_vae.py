"""Distil a tiny VAE (TAESD architecture, diffusers `AutoencoderTiny`) for the embedded model.

TAESD (Bohan, madebyollin) replaces SD's VAE with a few plain conv blocks whose decoder reads the
latents as the UNet sees them (scaling_factor 1.0) and whose encoder writes them. Here both halves
are distilled from the embedded model's `AutoencoderKL` on the shapes data set:

- decoder: student(z) ≈ teacher.decode(z / scaling_factor), z = scaling_factor × a posterior
  sample of a training image, half of each batch with extra Gaussian noise (UNet outputs are not
  exact encoder outputs); loss = shape-weighted L1 + L2, as the embedded VAE was trained;
- encoder: student(x) ≈ scaling_factor × the posterior mean of x (L2).

Three blocks of 32 channels each way (64×64×3 ↔ 4×16×16, scale factor 4, as the teacher), one
`AutoencoderTinyBlock` per block: ≈ 0.2 M parameters, saved as fp16 safetensors.

Usage: python models/train_tiny_vae.py --out models/embedded/tiny_vae/taesd-shapes [--seed 0]
The log (JSON lines) goes to `--log` (default: models/embedded/tiny_vae/train_log.jsonl).
"""

# ruff: noqa: E402  (the environment must be set before torch loads its OpenMP runtime)
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train_embedded.py

import argparse
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, AutoencoderTiny

from sdrt.models.training_kit import (
    Log,
    batches,
    foreground_weight,
    lr_factor,
    render_dataset,
    round_to_fp16,
    to_fp16_file,
    to_pixels,
)

HERE = Path(__file__).resolve().parent
TEACHER = HERE / "embedded" / "diffusers" / "vae"
TINY_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "encoder_block_out_channels": (32, 32, 32),  # three blocks: 64×64 ↔ 16×16, as the teacher
    "decoder_block_out_channels": (32, 32, 32),
    "num_encoder_blocks": (1, 1, 1),
    "num_decoder_blocks": (1, 1, 1),
    "latent_channels": 4,
    "upsampling_scaling_factor": 2,
    "act_fn": "relu",
    "upsample_fn": "nearest",
    "scaling_factor": 1.0,  # TAESD reads and writes the latents as the UNet sees them
    "shift_factor": 0.0,
    "force_upcast": False,
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults are the shipped decoder's recipe."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="diffusers AutoencoderTiny folder")
    p.add_argument("--log", type=Path, default=HERE / "embedded" / "tiny_vae" / "train_log.jsonl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=10_000, help="training images rendered")
    p.add_argument("--steps", type=int, default=3600)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--latent-noise", type=float, default=0.1,
                   help="std of the extra noise on half of each batch's latents (UNet scale)")
    p.add_argument("--fg-gain", type=float, default=4.0, help="extra loss weight on shapes")
    p.add_argument("--minutes", type=float, default=60.0,
                   help="wall-clock cap on training; stopping early is logged")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def load_teacher() -> AutoencoderKL:
    """The embedded model's VAE in fp32, frozen."""
    return AutoencoderKL.from_pretrained(TEACHER, torch_dtype=torch.float32).eval() \
        .requires_grad_(False)


@torch.no_grad()
def teacher_batch(teacher: AutoencoderKL, pixels: torch.Tensor, noise: float,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(UNet-scale latents, the teacher's decoding of them, the scaled posterior means)."""
    scale = teacher.config.scaling_factor
    posterior = teacher.encode(pixels).latent_dist
    latents = posterior.sample(generator) * scale  # (B, 4, 16, 16)
    half = len(latents) // 2
    latents[half:] += noise * torch.randn(latents[half:].shape, generator=generator)
    return latents, teacher.decode(latents / scale).sample, posterior.mean * scale


def distil_loss(student: AutoencoderTiny, teacher: AutoencoderKL, pixels: torch.Tensor,
                args: argparse.Namespace, generator: torch.Generator
                ) -> tuple[torch.Tensor, float, float]:
    """Weighted L1 + L2 of the decoder against the teacher's pixels, plus the encoder's L2."""
    latents, target, means = teacher_batch(teacher, pixels, args.latent_noise, generator)
    error = (student.decode(latents).sample - target).abs()
    decoder = (foreground_weight(target, args.fg_gain) * (error + error.square())).mean()
    encoder = (student.encode(pixels).latents - means).square().mean()
    return decoder + encoder, decoder.item(), encoder.item()


def train(student: AutoencoderTiny, teacher: AutoencoderKL, images: np.ndarray,
          args: argparse.Namespace, log: Log) -> int:
    """AdamW with warm-up and cosine decay; returns the steps run (fewer if --minutes ran out)."""
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    student.train()
    running: list[tuple[float, float]] = []
    step = 0
    for step, index in zip(range(args.steps), batches(len(images), args.batch, generator),
                           strict=False):
        if log.elapsed() > args.minutes * 60:
            log.write(phase="train", stopped_early=True, step=step)
            break
        for group in optimizer.param_groups:
            group["lr"] = args.lr * lr_factor(step, args.steps, 30)
        loss, decoder, encoder = distil_loss(student, teacher, to_pixels(images[index.numpy()]),
                                             args, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        running.append((decoder, encoder))
        if (step + 1) % args.log_every == 0:
            dec, enc = np.mean(running, axis=0)
            log.write(phase="train", step=step + 1, decoder=round(float(dec), 5),
                      encoder=round(float(enc), 6))
            running = []
    else:
        step = args.steps
    student.eval()
    return step


def save(student: AutoencoderTiny, out: Path) -> None:
    """The diffusers folder (config.json + fp16 safetensors), reloaded to check every weight."""
    if out.exists():
        shutil.rmtree(out)
    student.save_pretrained(out)
    to_fp16_file(out / "diffusion_pytorch_model.safetensors")
    reloaded, info = AutoencoderTiny.from_pretrained(out, output_loading_info=True)
    bad = {kind: keys for kind, keys in info.items() if keys}
    if bad:
        raise SystemExit(f"reloading {out} found {bad}")
    for name, tensor in student.state_dict().items():
        if not torch.equal(reloaded.state_dict()[name], tensor):
            raise SystemExit(f"reloaded weight {name} differs from the trained one")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(args.seed)
    log = Log(args.log)
    log.write(phase="start", args={k: str(v) for k, v in vars(args).items()})
    teacher = load_teacher()
    student = AutoencoderTiny(**TINY_CONFIG)
    log.write(phase="model", parameters=sum(p.numel() for p in student.parameters()))
    images, _ = render_dataset(args.images, args.seed)
    log.write(phase="data", images=len(images))
    steps = train(student, teacher, images, args, log)
    round_to_fp16(student)
    save(student, args.out)
    size = (args.out / "diffusion_pytorch_model.safetensors").stat().st_size
    log.write(phase="done", steps=steps, safetensors_bytes=size)


if __name__ == "__main__":
    main()
