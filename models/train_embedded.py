"""Train sdrt's embedded text-to-image model: a small latent diffusion model on the shapes data set.

Latent diffusion (Rombach et al. 2022) at 64×64, small enough to train on a 2-core CPU:

1. an `AutoencoderKL` (Kingma & Welling 2014; KL-regularised as in LDM) from 64×64×3 images to
   4×16×16 latents, whose `scaling_factor` is 1/std of the encoded training latents, as SD's;
2. the training set is encoded once (posterior mean and std kept; a latent is drawn per batch);
3. a `CLIPTextModel` (real CLIP BPE vocabulary, 77 positions) is pre-trained to state the
   attributes its caption names, then frozen, as SD's pre-trained CLIP text encoder is;
4. a `UNet2DConditionModel` with cross-attention is trained on its hidden states with the
   v-prediction objective (Salimans & Ho 2022), min-SNR capped (Hang et al. 2023), with 10%
   empty captions for classifier-free guidance (Ho & Salimans 2022), AdamW and an EMA; prompt
   adherence on held-out attribute combinations (`sdrt.evaluation.adherence`) is measured every
   few minutes with diffusers' own pipeline on the EMA weights, and logged;
5. the weights are rounded to fp16 and saved as a diffusers StableDiffusionPipeline folder
   (fp16 safetensors, fp32 configs), reloaded to check every key, and evaluated once more.

This module drives the run; the pieces are beside it: the configs in `embedded_config`, phases
1–4 in `embedded_phases`, sampling and scoring with diffusers in `embedded_adherence`, the saved
folder and its reload check in `embedded_folder`, and what the training scripts share (log,
data, EMA, fp16 rounding) in `training_kit`.

Usage: python models/train_embedded.py --out models/embedded/diffusers [--seed 0] [--minutes 115]
The log (JSON lines: phase, step, loss, elapsed, adherence) goes to `--log`
(default: models/embedded/train_log.jsonl).
"""

# ruff: noqa: E402  (the environment must be set before torch loads its OpenMP runtime)
from __future__ import annotations

import os

# On a shared CPU, OpenMP threads that spin while waiting for a descheduled peer made training
# steps up to 10× slower here; passive waiting keeps 2 threads at least as fast as 1.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdrt.models import CLIP_TOKENIZER
from sdrt.models.embedded_adherence import adherence, make_pipeline, target_score
from sdrt.models.embedded_config import (
    BETAS,
    TEXT_CONFIG,
    UNET_CONFIG,
    build_models,
    parameter_count,
    scheduler_config,
)
from sdrt.models.embedded_folder import folder_bytes, save_folder, verify_folder
from sdrt.models.embedded_phases import (
    caption_labels,
    encode_captions,
    encode_latents,
    init_vae,
    latent_scaling_factor,
    reconstruction_adherence,
    tokenize,
    train_text_encoder,
    train_unet,
    train_vae,
)
from sdrt.models.training_kit import EMA, Log, render_dataset, round_to_fp16

HERE = Path(__file__).resolve().parent


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults are the shipped model's recipe."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="diffusers folder to write")
    p.add_argument("--log", type=Path, help="JSON-lines log (default: models/embedded/"
                   "train_log.jsonl, or eval_log.jsonl with --evaluate-only)")
    p.add_argument("--evaluate-only", action="store_true",
                   help="skip training: reload --out and run the final evaluation only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=115.0,
                   help="wall-clock cap: diffusion training stops early past it (logged)")
    p.add_argument("--images", type=int, default=50_000, help="training images rendered")
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--fg-gain", type=float, default=4.0, help="extra loss weight on shapes")
    p.add_argument("--vae-from", type=Path, help="reuse a trained vae/ folder (pilots only)")
    p.add_argument("--text-steps", type=int, default=1500, help="text-encoder pre-training")
    p.add_argument("--text-batch", type=int, default=128)
    p.add_argument("--text-lr", type=float, default=2e-3)
    p.add_argument("--text-from", type=Path, help="reuse a trained text_encoder/ (pilots only)")
    p.add_argument("--steps", type=int, default=12_000, help="diffusion training steps")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--drop", type=float, default=0.1, help="empty-caption rate (CFG)")
    p.add_argument("--min-snr", type=float, default=5.0)
    p.add_argument("--prediction-type", choices=("v_prediction", "epsilon"),
                   default="v_prediction")
    p.add_argument("--beta-schedule", choices=sorted(BETAS), default="linear")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--unet-channels", type=lambda s: tuple(int(c) for c in s.split(",")),
                   default=UNET_CONFIG["block_out_channels"])
    p.add_argument("--eval-minutes", type=float, default=10.0)
    p.add_argument("--eval-n", type=int, default=100, help="captions per in-training check")
    p.add_argument("--final-n", type=int, default=200, help="captions in the final evaluation")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, nargs="+", default=[5.0, 3.0, 7.5],
                   help="scales tried at the end; the first is used during training")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return p.parse_args(argv)


def phase_vae(args: argparse.Namespace, vae: AutoencoderKL, images: np.ndarray,
              log: Log) -> None:
    """Phase 1: train (or load) the autoencoder and log its round-trip adherence."""
    if args.vae_from:
        vae.load_state_dict(AutoencoderKL.from_pretrained(args.vae_from).state_dict())
    else:
        torch.manual_seed(args.seed)
        init_vae(vae)
        train_vae(vae, images, args, log)
    vae.eval().requires_grad_(False)
    log.write(phase="vae", step=args.vae_steps,
              adherence=reconstruction_adherence(vae, args.eval_n, 1))


def run(args: argparse.Namespace) -> None:
    """All five phases, each timed in the log."""
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(args.seed)
    log = Log(args.log)
    log.write(phase="start", args={k: str(v) for k, v in vars(args).items()})
    tokenizer = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER)
    vae, unet = build_models(args.unet_channels)
    log.write(phase="models", parameters={"vae": parameter_count(vae),
                                          "unet": parameter_count(unet)})
    timings: dict[str, float] = {}

    mark = log.elapsed()
    images, captions = render_dataset(args.images, args.seed)
    ids = tokenize(tokenizer, captions)
    timings["data"] = log.elapsed() - mark

    mark = log.elapsed()
    phase_vae(args, vae, images, log)
    timings["vae"] = log.elapsed() - mark

    mark = log.elapsed()
    mean, std = encode_latents(vae, images)
    del images
    scale = latent_scaling_factor(mean, std, args.seed)
    vae.register_to_config(scaling_factor=scale)
    timings["encode"] = log.elapsed() - mark
    log.write(phase="encode", scaling_factor=scale, latents=list(mean.shape))

    mark = log.elapsed()
    if args.text_from:
        text_encoder = CLIPTextModel.from_pretrained(args.text_from).eval().requires_grad_(False)
    else:
        torch.manual_seed(args.seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
        accuracy = train_text_encoder(text_encoder, ids, caption_labels(captions), args, log)
        log.write(phase="text", step=args.text_steps, held_out_accuracy=accuracy)
    context = encode_captions(text_encoder, ids)
    empty = encode_captions(text_encoder, tokenize(tokenizer, [""]))[0]
    timings["text"] = log.elapsed() - mark

    unet_ema = EMA(unet, args.ema)
    scheduler = scheduler_config(args.beta_schedule, args.prediction_type)
    monitor_pipe = make_pipeline(vae, text_encoder, unet_ema.model, tokenizer, scheduler)
    eval_time = [0.0]

    def monitor(step: int) -> dict[str, float]:
        """Held-out adherence of the EMA weights now (time spent is logged apart)."""
        start = time.perf_counter()
        scores = adherence(monitor_pipe, args.eval_n, 1, steps=args.sample_steps,
                           guidance=args.guidance[0])
        eval_time[0] += time.perf_counter() - start
        return scores

    mark = log.elapsed()
    torch.manual_seed(args.seed + 1)
    data = {"mean": mean, "std": std, "context": context, "scale": torch.tensor(scale),
            "empty": empty, "scheduler": scheduler}
    steps = train_unet(unet, unet_ema, data, args, log, monitor)
    timings["diffusion"] = log.elapsed() - mark - eval_time[0]
    timings["monitoring"] = eval_time[0]

    mark = log.elapsed()
    shipped = {"vae": vae, "text_encoder": text_encoder, "unet": unet_ema.model}
    for module in shipped.values():
        round_to_fp16(module)
    save_folder(args.out, scheduler, **shipped)
    pipe = verify_folder(args.out, shipped)
    timings["save"] = log.elapsed() - mark
    log.write(phase="save", out=str(args.out), bytes=folder_bytes(args.out), steps=steps)

    mark = log.elapsed()
    final_evaluation(pipe, args, log)
    timings["final_eval"] = log.elapsed() - mark
    log.write(phase="done", timings_s={k: round(v, 1) for k, v in timings.items()})


def final_evaluation(pipe: StableDiffusionPipeline, args: argparse.Namespace, log: Log) -> None:
    """Pick guidance on the monitoring captions (seed 1), then score ≥ 200 held-out captions
    (seed 0, generation seeds 0, 1, ...) with the reloaded folder at every scale tried."""
    choice = {g: adherence(pipe, args.eval_n, 1, steps=args.sample_steps, guidance=g)
              for g in args.guidance}
    best = max(args.guidance, key=lambda g: target_score(choice[g]))
    log.write(phase="guidance", monitor=choice, chosen=best)
    for g in args.guidance:
        scores = adherence(pipe, args.final_n, 0, steps=args.sample_steps, guidance=g)
        log.write(phase="final", guidance=g, steps=args.sample_steps, sampler="DDIM",
                  caption_seed=0, adherence=scores, chosen=g == best)


def evaluate_only(args: argparse.Namespace) -> None:
    """Re-run the final evaluation on a saved folder, loaded as a user would (fp32)."""
    torch.set_num_threads(args.threads)
    log = Log(args.log)
    pipe = StableDiffusionPipeline.from_pretrained(args.out, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    final_evaluation(pipe, args, log)


def main(argv: Sequence[str] | None = None) -> None:
    """Train and save the model, or only evaluate a saved one."""
    args = parse_args(argv)
    if args.log is None:
        name = "eval_log.jsonl" if args.evaluate_only else "train_log.jsonl"
        args.log = HERE / "embedded" / name
    (evaluate_only if args.evaluate_only else run)(args)


if __name__ == "__main__":
    main()
