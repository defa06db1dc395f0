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
import copy
import importlib.util
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdrt.evaluation.adherence import evaluate
from sdrt.evaluation.scenes import (
    BACKGROUND_COLOURS,
    KINDS,
    POSITIONS,
    SHAPE_COLOURS,
    SIZES,
    held_out_captions,
    parse_caption,
    render,
    training_samples,
)

HERE = Path(__file__).resolve().parent
TOKENIZER_DIR = HERE / "clip_tokenizer"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
MAX_LENGTH = 77
IMAGE_SIZE = 64
TARGETS = {"background": 0.95, "colour": 0.90, "kind": 0.80, "position": 0.80}

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (16, 32, 64),  # three blocks: 64×64 -> 16×16 latents
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,  # ≥ 2 channels a group, so a flat colour is not normalised away
    "sample_size": IMAGE_SIZE,
    "mid_block_add_attention": False,  # a 4× slower step for nothing these scenes need
}
UNET_CONFIG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE // 4,
    "in_channels": 4,
    "out_channels": 4,
    # Cross-attention at 8×8 and 4×4 (and the mid block) only: self-attention over 16×16 tokens
    # was most of the step time, and positions on a 3×3 grid need no finer map.
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "cross_attention_dim": 64,
    "attention_head_dim": 4,  # diffusers' name for the number of heads
    "norm_num_groups": 16,
}
TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,  # the real CLIP BPE vocabulary, so sdrt's tokenizer ids fit
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": MAX_LENGTH,
    "hidden_act": "quick_gelu",
    "projection_dim": 64,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
# DDPM's linear betas (Ho et al. 2020) end at alpha_bar ≈ 4e-5: at 16×16 latents SD's
# scaled_linear schedule would leave the mean colour visible at t = 999 (Lin et al. 2024), which
# the sampler's pure noise lacks. "trailing" spacing starts sampling at t = 999.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "v_prediction",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,  # only "leading" spacing reads it; StableDiffusionPipeline wants 1
    "timestep_spacing": "trailing",
}
BETAS = {"linear": (0.0001, 0.02), "scaled_linear": (0.00085, 0.012)}  # DDPM's and SD's


def scheduler_config(beta_schedule: str, prediction_type: str) -> dict[str, Any]:
    """The shipped DDIM config with DDPM's linear or SD's scaled_linear betas."""
    start, end = BETAS[beta_schedule]
    return {**SCHEDULER_CONFIG, "beta_schedule": beta_schedule, "beta_start": start,
            "beta_end": end, "prediction_type": prediction_type}


# --- logging ------------------------------------------------------------------------------------


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


# --- data ---------------------------------------------------------------------------------------


def render_dataset(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """`n` training (image, caption) pairs from the procedural shapes data set."""
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    captions = []
    for i, (image, text) in enumerate(training_samples(n, seed, size=IMAGE_SIZE)):
        images[i] = image
        captions.append(text)
    return images, captions


def tokenize(tokenizer: CLIPTokenizer, captions: Sequence[str]) -> torch.Tensor:
    """CLIP token ids padded to 77, as StableDiffusionPipeline tokenises prompts."""
    return tokenizer(list(captions), padding="max_length", max_length=MAX_LENGTH,
                     truncation=True, return_tensors="pt").input_ids


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the VAE's range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def held_out_images(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """True renderings of `n` held-out captions (to score the autoencoder alone)."""
    captions = held_out_captions(n, seed)
    rng = np.random.default_rng([seed, 2])
    images = np.stack([render(parse_caption(c), IMAGE_SIZE, rng) for c in captions])
    return images, captions


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


# --- models -------------------------------------------------------------------------------------


def build_models(unet_channels: Sequence[int]) -> tuple[AutoencoderKL, UNet2DConditionModel]:
    """Fresh VAE and UNet from the module's configs (the text encoder is built in phase 3)."""
    vae = AutoencoderKL(**VAE_CONFIG)
    unet = UNet2DConditionModel(**{**UNET_CONFIG, "block_out_channels": tuple(unet_channels)})
    return vae, unet


def parameter_count(module: torch.nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in module.parameters())


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


# --- phase 1: autoencoder -----------------------------------------------------------------------


def init_vae(vae: AutoencoderKL, log_std: float = -4.0) -> None:
    """Start the posterior narrow (std e^-4): with the default std 1 the decoder first fights
    noise as large as the latents, and the weak KL term takes thousands of steps to matter."""
    channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.bias[channels:] = 2 * log_std


def foreground_weight(pixels: torch.Tensor, gain: float) -> torch.Tensor:
    """Per-pixel loss weight 1 + gain·(distance from the border's median colour): shapes cover
    a few % of an image, and their colour and outline are what the captions name."""
    ring = torch.cat([pixels[..., 0, :], pixels[..., -1, :], pixels[..., 0], pixels[..., -1]], -1)
    background = ring.median(dim=-1).values[..., None, None]
    return 1.0 + gain * (pixels - background).norm(dim=1, keepdim=True)


def vae_loss(vae: AutoencoderKL, pixels: torch.Tensor, kl_weight: float, gain: float,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted L1 + MSE reconstruction of a posterior sample plus weighted KL (Kingma & Welling
    2014; LDM's first stage without LPIPS or GAN)."""
    posterior = vae.encode(pixels).latent_dist
    decoded = vae.decode(posterior.sample(generator)).sample
    error = (decoded - pixels).abs()
    reconstruction = (foreground_weight(pixels, gain) * (error + error.square())).mean()
    kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
    return reconstruction + kl_weight * kl, reconstruction


def train_vae(vae: AutoencoderKL, images: np.ndarray, args: argparse.Namespace, log: Log) -> None:
    """Train the autoencoder on data-set images (LDM's first stage, without LPIPS or GAN)."""
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    vae.train()
    running = []
    for step, index in zip(range(args.vae_steps), batches(len(images), args.vae_batch, generator),
                           strict=False):
        _set_lr(optimizer, args.vae_lr * lr_factor(step, args.vae_steps, 100))
        loss, reconstruction = vae_loss(vae, to_pixels(images[index.numpy()]), args.kl_weight,
                                        args.fg_gain, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        running.append(reconstruction.item())
        if (step + 1) % args.log_every == 0:
            log.write(phase="vae", step=step + 1, loss=round(float(np.mean(running)), 5))
            running = []
    vae.eval()


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def reconstruction_adherence(vae: AutoencoderKL, n: int, seed: int) -> dict[str, float]:
    """Adherence of VAE round trips of held-out renderings: the ceiling the decoder allows."""
    images, captions = held_out_images(n, seed)
    decoded = vae.decode(vae.encode(to_pixels(images)).latent_dist.mean).sample
    return evaluate(to_uint8(decoded), captions)


def to_uint8(pixels: torch.Tensor) -> list[np.ndarray]:
    """float (N, 3, H, W) in [-1, 1] -> list of uint8 (H, W, 3)."""
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    return list(array.numpy())


# --- phase 2: latents ---------------------------------------------------------------------------


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: np.ndarray,
                   batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every training image, computed once (LDM trains on latents)."""
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        posterior = vae.encode(to_pixels(images[i:i + batch_size])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def latent_scaling_factor(mean: torch.Tensor, std: torch.Tensor, seed: int) -> float:
    """1 / std of posterior samples, so the diffusion model sees unit-variance latents (as SD)."""
    generator = torch.Generator().manual_seed(seed)
    sample = mean + std * torch.randn(mean.shape, generator=generator)
    return float(1.0 / sample.std())


# --- phase 3: text encoder ----------------------------------------------------------------------

# What a caption says, as class indices per slot (shapes in the scene's position order);
# IGNORE where the caption does not say (e.g. no size word, or no second shape).
SLOTS: dict[str, tuple[str, ...]] = {
    "background": BACKGROUND_COLOURS,
    "count": ("1", "2"),
    **{f"{slot}_{name}": values for slot in ("first", "second")
       for name, values in (("colour", SHAPE_COLOURS), ("kind", KINDS),
                            ("position", tuple(POSITIONS)), ("size", SIZES))},
}
IGNORE = -100


def caption_labels(captions: Sequence[str]) -> torch.Tensor:
    """(N, len(SLOTS)) class indices of what each caption names, from `parse_caption`."""
    rows = []
    for text in captions:
        scene = parse_caption(text)
        said: dict[str, str | None] = {"background": scene.background,
                                       "count": str(len(scene.shapes))}
        for slot, shape in zip(("first", "second"), scene.shapes, strict=False):
            said |= {f"{slot}_colour": shape.colour, f"{slot}_kind": shape.kind,
                     f"{slot}_position": shape.position, f"{slot}_size": shape.size}
        rows.append([values.index(said[name]) if said.get(name) is not None else IGNORE
                     for name, values in SLOTS.items()])
    return torch.tensor(rows)


def sentence_features(text_encoder: CLIPTextModel, ids: torch.Tensor) -> torch.Tensor:
    """Mean final hidden state over the end-of-text and padding positions, which (causal
    attention) have read the whole caption; the UNet cross-attends to these same states."""
    hidden = text_encoder(ids).last_hidden_state
    after_text = (ids == TEXT_CONFIG["eos_token_id"]).float()[..., None]
    return (hidden * after_text).sum(1) / after_text.sum(1)


def train_text_encoder(text_encoder: CLIPTextModel, ids: torch.Tensor, labels: torch.Tensor,
                       args: argparse.Namespace, log: Log) -> dict[str, float]:
    """Pre-train the text encoder to state every attribute its caption names (linear heads on
    `sentence_features`), then freeze it, as SD freezes its pre-trained CLIP text encoder.

    A supervised stand-in for CLIP's contrastive pre-training (Radford et al. 2021): the UNet
    then learns to read attributes that are already linearly separable, instead of waiting for
    a jointly trained encoder to discover them. Returns held-out-caption accuracy per slot.
    """
    generator = torch.Generator().manual_seed(args.seed + 2)
    sizes = [len(values) for values in SLOTS.values()]
    heads = torch.nn.Linear(TEXT_CONFIG["hidden_size"], sum(sizes))
    params = list(text_encoder.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.text_lr, weight_decay=0.01)
    text_encoder.train()
    running = []
    for step, index in zip(range(args.text_steps), batches(len(ids), args.text_batch, generator),
                           strict=False):
        _set_lr(optimizer, args.text_lr * lr_factor(step, args.text_steps, 100))
        logits = heads(sentence_features(text_encoder, ids[index])).split(sizes, dim=-1)
        loss = sum(torch.nn.functional.cross_entropy(out, labels[index, i], ignore_index=IGNORE)
                   for i, out in enumerate(logits))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running.append(loss.item())
        if (step + 1) % args.log_every == 0:
            log.write(phase="text", step=step + 1, loss=round(float(np.mean(running)), 5))
            running = []
    text_encoder.eval().requires_grad_(False)
    return slot_accuracy(text_encoder, heads, sizes)


@torch.no_grad()
def slot_accuracy(text_encoder: CLIPTextModel, heads: torch.nn.Linear,
                  sizes: list[int]) -> dict[str, float]:
    """Per-slot accuracy of the attribute heads on 1,000 held-out captions."""
    captions = held_out_captions(1000, 3)
    ids = tokenize(CLIPTokenizer.from_pretrained(TOKENIZER_DIR), captions)
    labels = caption_labels(captions)
    logits = heads(sentence_features(text_encoder, ids)).split(sizes, dim=-1)
    scores = {}
    for i, (name, out) in enumerate(zip(SLOTS, logits, strict=True)):
        known = labels[:, i] != IGNORE
        if not known.any():  # held-out captions name one shape: no second-shape labels
            continue
        scores[name] = round(float((out.argmax(-1)[known] == labels[known, i]).float().mean()), 4)
    return scores


@torch.no_grad()
def encode_captions(text_encoder: CLIPTextModel, ids: torch.Tensor,
                    batch_size: int = 512) -> torch.Tensor:
    """The frozen text encoder's hidden states for every training caption, computed once."""
    return torch.cat([text_encoder(ids[i:i + batch_size]).last_hidden_state
                      for i in range(0, len(ids), batch_size)])


# --- phase 4: UNet ------------------------------------------------------------------------------


def diffusion_loss(unet: UNet2DConditionModel, latents: torch.Tensor, context: torch.Tensor,
                   alphas_cumprod: torch.Tensor, prediction_type: str, min_snr: float,
                   generator: torch.Generator) -> torch.Tensor:
    """Denoising loss for epsilon (Ho et al. 2020) or v prediction (Salimans & Ho 2022),
    weighted by `loss_weight`."""
    t = torch.randint(0, len(alphas_cumprod), (len(latents),), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    alpha_bar = alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    if prediction_type == "v_prediction":
        target = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    else:
        target = noise
    predicted = unet(noisy, t, context).sample
    snr = alpha_bar.flatten() / (1 - alpha_bar.flatten())
    weight = loss_weight(snr, prediction_type, min_snr)
    return (weight * (predicted - target).square().mean(dim=(1, 2, 3))).mean()


def loss_weight(snr: torch.Tensor, prediction_type: str, min_snr: float) -> torch.Tensor:
    """Per-sample weights that cap the x0-error weight at low noise (Hang et al. 2023, min-SNR-γ).

    Epsilon: x0 weight min(SNR, γ). v: x0 weight min(1 + SNR, 1 + γ), i.e. the v loss ("SNR+1"
    weighting, Salimans & Ho 2022) capped; unlike min-SNR on epsilon it keeps weight ≥ 1 at high
    noise, where only the caption can decide the background and the layout of a 16×16 latent.
    """
    if prediction_type == "v_prediction":
        return ((1.0 + min_snr) / (1.0 + snr)).clamp(max=1.0)
    return snr.clamp(max=min_snr) / snr


def drop_captions(context: torch.Tensor, empty: torch.Tensor, p: float,
                  generator: torch.Generator) -> torch.Tensor:
    """Replace a fraction `p` of captions by the empty prompt (Ho & Salimans 2022, CFG)."""
    drop = torch.rand(len(context), generator=generator) < p
    return torch.where(drop[:, None, None], empty[None], context)


def train_unet(unet: UNet2DConditionModel, ema: EMA, data: dict[str, Any],
               args: argparse.Namespace, log: Log,
               monitor: Callable[[int], dict[str, float]]) -> int:
    """Train the UNet on the frozen text encoder's states; call `monitor` every `eval_minutes`.
    Returns the steps done."""
    generator = torch.Generator().manual_seed(args.seed + 1)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01)
    alphas_cumprod = DDIMScheduler(**data["scheduler"]).alphas_cumprod.float()
    prediction_type = data["scheduler"]["prediction_type"]
    deadline = time.perf_counter() + 60 * args.minutes - log.elapsed()
    last_eval = time.perf_counter()
    unet.train()
    running, step = [], 0
    stream = batches(len(data["context"]), args.batch, generator)
    for step, index in zip(range(args.steps), stream, strict=False):
        _set_lr(optimizer, args.lr * lr_factor(step, args.steps, args.warmup))
        latents = data["mean"][index] + data["std"][index] * torch.randn(
            data["mean"][index].shape, generator=generator)
        context = drop_captions(data["context"][index], data["empty"], args.drop, generator)
        loss = diffusion_loss(unet, latents * data["scale"], context, alphas_cumprod,
                              prediction_type, args.min_snr, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        ema.update(unet)
        running.append(loss.item())
        if (step + 1) % args.log_every == 0:
            log.write(phase="diffusion", step=step + 1, loss=round(float(np.mean(running)), 5),
                      lr=round(optimizer.param_groups[0]["lr"], 7))
            running = []
        if time.perf_counter() - last_eval > 60 * args.eval_minutes:
            log.write(phase="diffusion", step=step + 1, adherence=monitor(step + 1))
            last_eval = time.perf_counter()
        if time.perf_counter() > deadline:
            log.write(phase="diffusion", step=step + 1, note="stopped at the --minutes budget")
            break
    return step + 1


# --- sampling and adherence ---------------------------------------------------------------------


def make_pipeline(vae: AutoencoderKL, text_encoder: CLIPTextModel, unet: UNet2DConditionModel,
                  tokenizer: CLIPTokenizer, scheduler: dict[str, Any]) -> StableDiffusionPipeline:
    """diffusers' StableDiffusionPipeline over in-memory components, with the shipped scheduler."""
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=DDIMScheduler(**scheduler),
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: StableDiffusionPipeline, captions: Sequence[str], *, seed: int, steps: int,
             guidance: float, batch_size: int = 50) -> list[np.ndarray]:
    """One 64×64 image per caption; image i starts from torch's noise for seed `seed + i`."""
    images: list[np.ndarray] = []
    for start in range(0, len(captions), batch_size):
        chunk = list(captions[start:start + batch_size])
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        out = pipe(chunk, height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=steps,
                   guidance_scale=guidance, generator=generators, output_type="np").images
        images.extend(np.clip(np.rint(out * 255), 0, 255).astype(np.uint8))
    return images


def adherence(pipe: StableDiffusionPipeline, n: int, caption_seed: int, *, steps: int,
              guidance: float) -> dict[str, float]:
    """Adherence on `n` held-out captions (generation seeds 0, 1, ...), rounded for the log."""
    captions = held_out_captions(n, caption_seed)
    scores = evaluate(generate(pipe, captions, seed=0, steps=steps, guidance=guidance), captions)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()}


def target_score(scores: dict[str, float]) -> float:
    """How a guidance scale is chosen: the worst margin over the four targets."""
    return min(scores[k] - v for k, v in TARGETS.items())


# --- phase 5: save, reload, check ---------------------------------------------------------------


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


def load_save_text_encoder() -> Callable[[CLIPTextModel, Path], None]:
    """`save_text_encoder` from models/build_random_sd.py (SD's `text_model.` key layout)."""
    spec = importlib.util.spec_from_file_location("build_random_sd", HERE / "build_random_sd.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.save_text_encoder


def save_folder(out: Path, scheduler: dict[str, Any], vae: AutoencoderKL,
                text_encoder: CLIPTextModel, unet: UNet2DConditionModel) -> None:
    """Write the diffusers StableDiffusionPipeline folder, weights in fp16 safetensors."""
    import diffusers

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    DDIMScheduler(**scheduler).save_pretrained(out / "scheduler")
    (out / "tokenizer").mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(TOKENIZER_DIR / name, out / "tokenizer" / name)
    unet.save_pretrained(out / "unet")
    vae.save_pretrained(out / "vae")
    # transformers 5 loads a folder in its weights' dtype unless the config names one: fp16
    # weights must still load as the fp32 model that sdrt's exporter expects.
    text_encoder.config.dtype = torch.float32
    text_encoder.config.architectures = ["CLIPTextModel"]
    load_save_text_encoder()(text_encoder, out / "text_encoder")
    for path in out.glob("*/*.safetensors"):
        to_fp16_file(path)


def verify_folder(out: Path, components: dict[str, torch.nn.Module]) -> StableDiffusionPipeline:
    """Reload the folder in fp32, fail on any missing or unexpected key or changed weight."""
    _, info = CLIPTextModel.from_pretrained(out / "text_encoder", output_loading_info=True)
    _check_info("text_encoder", info)
    for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        _, info = cls.from_pretrained(out / name, output_loading_info=True)
        _check_info(name, info)
    pipe = StableDiffusionPipeline.from_pretrained(out, torch_dtype=torch.float32)
    for name, module in components.items():
        loaded = getattr(pipe, name).state_dict()
        for key, value in module.state_dict().items():
            if not torch.equal(loaded[key], value):
                raise RuntimeError(f"{name}: weight {key} differs after reloading {out}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_info(name: str, info: dict[str, Any]) -> None:
    """Raise if a from_pretrained loading report lists any missing or unexpected key."""
    bad = {k: list(v) for k, v in info.items()
           if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise RuntimeError(f"{name} does not load cleanly: {bad}")


def folder_bytes(out: Path) -> dict[str, int]:
    """Bytes of safetensors weights per component folder."""
    return {p.parent.name: p.stat().st_size for p in sorted(out.glob("*/*.safetensors"))}


# --- driver -------------------------------------------------------------------------------------


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
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
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
