"""The four training phases of the embedded model, which `train_embedded.py` runs in order:

1. the autoencoder (Kingma & Welling 2014; LDM's first stage without LPIPS or GAN);
2. the training set's latents, encoded once, and SD's latent scaling factor;
3. the CLIP text encoder, pre-trained to state what its caption names, then frozen;
4. the UNet, with v- or epsilon-prediction, min-SNR weighting, caption dropout and an EMA.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

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
)
from sdrt.models import CLIP_TOKENIZER
from sdrt.models.embedded_config import IMAGE_SIZE, MAX_LENGTH, TEXT_CONFIG
from sdrt.models.training_kit import (
    EMA,
    Log,
    batches,
    foreground_weight,
    lr_factor,
    set_lr,
    to_pixels,
    to_uint8,
)

# --- data -----------------------------------------------------------------------------------------


def tokenize(tokenizer: CLIPTokenizer, captions: Sequence[str]) -> torch.Tensor:
    """CLIP token ids padded to 77, as StableDiffusionPipeline tokenises prompts."""
    return tokenizer(list(captions), padding="max_length", max_length=MAX_LENGTH,
                     truncation=True, return_tensors="pt").input_ids


def held_out_images(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """True renderings of `n` held-out captions (to score the autoencoder alone)."""
    captions = held_out_captions(n, seed)
    rng = np.random.default_rng([seed, 2])
    images = np.stack([render(parse_caption(c), IMAGE_SIZE, rng) for c in captions])
    return images, captions


# --- phase 1: autoencoder -------------------------------------------------------------------------


def init_vae(vae: AutoencoderKL, log_std: float = -4.0) -> None:
    """Start the posterior narrow (std e^-4): with the default std 1 the decoder first fights
    noise as large as the latents, and the weak KL term takes thousands of steps to matter."""
    channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.bias[channels:] = 2 * log_std


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
        set_lr(optimizer, args.vae_lr * lr_factor(step, args.vae_steps, 100))
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


@torch.no_grad()
def reconstruction_adherence(vae: AutoencoderKL, n: int, seed: int) -> dict[str, float]:
    """Adherence of VAE round trips of held-out renderings: the ceiling the decoder allows."""
    images, captions = held_out_images(n, seed)
    decoded = vae.decode(vae.encode(to_pixels(images)).latent_dist.mean).sample
    return evaluate(to_uint8(decoded), captions)


# --- phase 2: latents -----------------------------------------------------------------------------


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


# --- phase 3: text encoder ------------------------------------------------------------------------

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
        set_lr(optimizer, args.text_lr * lr_factor(step, args.text_steps, 100))
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
    ids = tokenize(CLIPTokenizer.from_pretrained(CLIP_TOKENIZER), captions)
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


# --- phase 4: UNet --------------------------------------------------------------------------------


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
        set_lr(optimizer, args.lr * lr_factor(step, args.steps, args.warmup))
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
