"""Write a random-weight diffusers Stable Diffusion folder from the configs in models/configs/.

Real weights cannot be downloaded on the build machines. Each `models/configs/<arch>/` mirrors a
diffusers folder without weights: tests use the tiny ones, benchmarks the full-size ones, since
speed and memory do not depend on the values.

- `tiny_sd` (SD 1.x): diffusers' own tiny test components (its pipeline tests' sizes): UNet
  block_out_channels (32, 64), a 2-block VAE so vae_scale_factor is 2, a 5-layer CLIP text
  encoder with hidden size 32 but SD's 49,408-token vocabulary.
- `tiny_sd2` (SD 2.x 768-v): the same sizes with SD 2.x's features: v-prediction DDIM, linear
  projections and one head count per UNet block, a gelu (OpenCLIP) text encoder, `!` padding,
  and a larger native size (sample_size 48 against 32, as 768 against 512).
- `tiny_turbo` (SD-Turbo): tiny_sd2's architecture at sample_size 32 with SD-Turbo's scheduler
  (epsilon, Euler, trailing spacing).
- `tiny_sd_1k` (SD 1.x): smaller still, for the committed fixtures of tests/fixtures/foreign/:
  UNet block_out_channels (8, 16), a 4-block VAE (8, 16, 16, 16) so vae_scale_factor is SD's 8
  (diffusers' legacy ONNX layout has no configs to say otherwise), 4 norm groups, and a 2-layer
  CLIP text encoder with a 1,000-token vocabulary (as hf-internal-testing's tiny-random-clip).
- `tiny_sdxl` (SDXL): diffusers' tiny SDXL test components: UNet block_out_channels (32, 64)
  with transformer_layers_per_block (1, 2), "text_time" added conditioning (addition_time_embed_dim
  8, so projection_class_embeddings_input_dim 6 × 8 + 32), two 32-wide CLIP encoders (the second
  a CLIPTextModelWithProjection) concatenated to cross_attention_dim 64; `!` pads tokenizer_2.
- `tiny_sdxl_turbo` (SDXL-Turbo): tiny_sdxl's weights' shapes with Euler ancestral, trailing.
- `tiny_sdxl_refiner` (SDXL refiner): diffusers' tiny refiner test components
  (`get_dummy_components(skip_first_text_encoder=True)`, requires_aesthetics_score): no first
  text encoder, tiny_sdxl's text_encoder_2, a UNet with cross_attention_dim 32 and five time ids
  (projection_class_embeddings_input_dim 5 × 8 + 32), StableDiffusionXLImg2ImgPipeline.
- `tiny_sd_lcm` (LCM, as SimianLuo/LCM_Dreamshaper_v7): tiny_sd with a 32-wide guidance-scale
  input (UNet time_cond_proj_dim), LCMScheduler and LatentConsistencyModelPipeline.
- `tiny_sdxl_lcm` (LCM-SDXL, as latent-consistency/lcm-sdxl in the SDXL base pipeline): tiny_sdxl
  with the same guidance input and LCMScheduler.
- `tiny_sd_inpaint` (SD 1.x inpainting, as stable-diffusion-v1-5/stable-diffusion-inpainting):
  tiny_sd with a 9-channel UNet input (latents, mask, masked-image latents) and
  StableDiffusionInpaintPipeline.
- `tiny_sd3` (SD 3, Esser et al. 2024): an MMDiT (SD3Transformer2DModel) with SD 3's patch size
  2 and 16 latent channels, 2 joint blocks 32 wide, joint_attention_dim 96 (wider than the two
  CLIP states side by side, 64, so their zero padding is exercised) and pos_embed_max_size 24
  (the position grid is cropped); two 32-wide CLIPTextModelWithProjection encoders with a
  1,000-token vocabulary (as diffusers' SD 3 tests have them); a 2-block 16-channel VAE with SD
  3's scaling_factor and shift_factor and no quant convs; FlowMatchEulerDiscreteScheduler with
  shift 3; no T5 (model_index.json names text_encoder_3 null, as diffusers allows).
- `tiny_sd3_t5`: tiny_sd3 with a 2-layer T5 encoder (gated-gelu as T5 v1.1 / T5-XXL, d_model 96)
  and a T5 (Unigram) tokenizer written from CLIP's word list (see `_save_t5_tokenizer`).
- `tiny_taesd`: a tiny autoencoder (TAESD architecture, diffusers `AutoencoderTiny`) for
  tiny_sd's latents: 2 blocks of 8 channels each way (vae_scale_factor 2), 4 latent channels.
- `taesd`: the TAESD architecture at full size, the config madebyollin/taesd ships (diffusers'
  AutoencoderTiny defaults: 4 blocks of 64 channels, 1/3/3/3 encoder and 3/3/3/1 decoder
  `AutoencoderTinyBlock`s, scaling_factor 1.0); taesdxl has the same architecture, so this one
  stands in for both. These two are lone model folders (config.json at the top), not pipelines.
- `sd15`, `sd21` (768-v), `sd_turbo`, `sdxl` (base 1.0), `sdxl_turbo`, `sdxl_refiner` (refiner
  1.0's UNet as diffusers converts Stability's sd_xl_refiner.yaml), `sd3_medium` (without T5):
  the full-size architectures.

The tokenizer is `models/clip_tokenizer/` (the vocabulary SD 1.x and 2.x share) with the files of
`models/configs/<arch>/tokenizer/`, when there is one, in place of its own (SD 2.x pads with `!`).
A text encoder vocab_size below CLIP's 49,408 keeps a prefix of the vocabulary (see `_shrink_bpe`).
Each component gets `torch.manual_seed(seed)` before it is built, so a seed gives the same weights
whatever the prediction type.

Usage: python models/build_random_sd.py ARCH OUT_DIR  (ARCH: a folder of models/configs/)
       [--seed 0] [--prediction-type epsilon|v_prediction] [--dtype float32|float16]
(`--dtype float16` halves the disk of a full-size folder; export loads it as float32.)
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
TOKENIZER = HERE / "clip_tokenizer"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TEXT_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection")
DTYPES = ("float32", "float16")
T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as T5's SentencePiece model has them
T5_SPACE = "\u2581"  # SentencePiece's word-start marker
logger = logging.getLogger("sdrt.models.build_random_sd")


def build_random_sd(arch: str, out_dir: str | Path, *, seed: int = 0,
                    prediction_type: str | None = None, dtype: str = "float32") -> Path:
    """Write `models/configs/<arch>` as a diffusers folder with seeded random weights."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, "
                         f"got {prediction_type!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    configs = CONFIGS / arch
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (configs / "config.json").is_file():  # a lone model (AutoencoderTiny), not a pipeline
        if prediction_type is not None:
            raise ValueError(f"{arch} is an autoencoder: prediction_type does not apply")
        class_name = _read(configs / "config.json")["_class_name"]
        _save_diffusers(class_name, out, _model_config(configs), seed, dtype)
        return out
    shutil.copy(configs / "model_index.json", out / "model_index.json")
    scheduler = _read(configs / "scheduler" / "scheduler_config.json")
    mmdit = (configs / "transformer").is_dir()  # SD 3's MMDiT in place of the UNet
    if mmdit and prediction_type is not None:
        raise ValueError("SD 3 predicts the flow velocity: prediction_type does not apply")
    if not mmdit:
        scheduler["prediction_type"] = prediction_type or scheduler.get("prediction_type",
                                                                        "epsilon")
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    if mmdit:
        _save_diffusers("SD3Transformer2DModel", out / "transformer",
                        _model_config(configs / "transformer"), seed, dtype)
    else:
        _save_diffusers("UNet2DConditionModel", out / "unet", _model_config(configs / "unet"),
                        seed, dtype)
    _save_diffusers("AutoencoderKL", out / "vae", _model_config(configs / "vae"), seed, dtype)
    # SDXL: text_encoder_2 and tokenizer_2 beside the first pair.
    for suffix in ("", "_2"):
        encoder = configs / f"text_encoder{suffix}"
        if not encoder.is_dir():
            continue
        config = _read(encoder / "config.json")
        _copy_tokenizer(configs / f"tokenizer{suffix}", out / f"tokenizer{suffix}")
        _shrink_bpe(out / f"tokenizer{suffix}", config["vocab_size"])
        _save_text_encoder(out / encoder.name, _model_config(encoder),
                           config["architectures"][0], seed, dtype)
    if (configs / "text_encoder_3").is_dir():  # SD 3's optional T5
        config = _model_config(configs / "text_encoder_3")
        _save_t5(out / "text_encoder_3", config, seed, dtype)
        _save_t5_tokenizer(out / "tokenizer_3", config["vocab_size"])
    logger.info("wrote %s folder %s (seed %d)", arch, out, seed)
    return out


def _copy_tokenizer(overrides: Path, folder: Path) -> None:
    """The shared CLIP tokenizer files, each replaced by the config's own copy where it has one."""
    folder.mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        own = overrides / name
        shutil.copy(own if own.is_file() else TOKENIZER / name, folder / name)


def _shrink_bpe(folder: Path, vocab_size: int) -> None:
    """Keep CLIP's first `vocab_size - 2` tokens, the merges that make them, and the 2 specials.

    CLIP's vocab.json lists the 512 byte symbols, then one token per merge in merges.txt order,
    then `<|startoftext|>` and `<|endoftext|>`; every merge joins earlier tokens, so a prefix of
    the merges is a complete BPE over a prefix of the vocabulary.
    """
    vocab = _read(folder / "vocab.json")
    if vocab_size >= len(vocab):
        return
    specials = ("<|startoftext|>", "<|endoftext|>")
    ordered = sorted((token for token in vocab if token not in specials), key=vocab.get)
    kept = [*ordered[: vocab_size - len(specials)], *specials]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(kept)}))
    header, *merges = (folder / "merges.txt").read_text("utf-8").splitlines()
    count = vocab_size - len(specials) - 512  # one merge per token after the byte symbols
    (folder / "merges.txt").write_text("\n".join([header, *merges[:count]]) + "\n", "utf-8")


def _save_t5_tokenizer(folder: Path, vocab_size: int) -> None:
    """A T5 (SentencePiece Unigram) tokenizer over CLIP's whole words, written by transformers.

    T5's own vocabulary cannot be downloaded here. Pieces: T5's three specials, the word-start
    marker, the letters and digits alone and word-initial (so any ASCII word splits into known
    pieces), then CLIP's word tokens in merge order as word-initial pieces, up to `vocab_size`;
    scores fall with rank, so frequent whole words win the Unigram segmentation.
    """
    from transformers import T5Tokenizer

    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    pieces = [T5_SPACE, *chars, *(T5_SPACE + c for c in chars)]
    clip = _read(TOKENIZER / "vocab.json")
    words = [token[:-4] for token in sorted(clip, key=clip.get)
             if token.endswith("</w>") and len(token) > 5 and token[:-4].isalpha()]
    for word in words:
        if len(T5_SPECIALS) + len(pieces) >= vocab_size:
            break
        pieces.append(T5_SPACE + word)
    vocab = [(token, 0.0) for token in T5_SPECIALS]
    vocab += [(piece, -1.0 - rank / 100.0) for rank, piece in enumerate(pieces)]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=256)
    tokenizer.save_pretrained(folder)


def save_text_encoder(model, folder: Path) -> None:
    """Save a CLIPTextModel(WithProjection) with SD's key layout (`text_model.` prefix kept).

    transformers 5.x saves it without the prefix, and other versions then silently
    re-initialise every weight of such a folder, so write keys ourselves.
    SDXL's CLIPTextModelWithProjection keeps `text_projection.weight` at the top level.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    # As SD folders have it; readers check it.
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    state = {_sd_text_key(key): value.contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _sd_text_key(key: str) -> str:
    if key.startswith(("text_model.", "text_projection.")):
        return key
    return f"text_model.{key}"


def _save_diffusers(class_name: str, folder: Path, config: dict[str, Any], seed: int,
                    dtype: str) -> None:
    import diffusers
    import torch

    torch.manual_seed(seed)
    model = getattr(diffusers, class_name).from_config(config)
    _cast(model, dtype).save_pretrained(folder)


def _save_t5(folder: Path, config: dict[str, Any], seed: int, dtype: str) -> None:
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.T5EncoderModel(transformers.T5Config(**config))
    model.config.architectures = ["T5EncoderModel"]
    _cast(model, dtype).save_pretrained(folder)


def _save_text_encoder(folder: Path, config: dict[str, Any], architecture: str,
                       seed: int, dtype: str = "float32") -> None:
    import torch
    import transformers

    if architecture not in TEXT_ENCODERS:
        raise ValueError(f"text encoder architecture must be one of {TEXT_ENCODERS}, "
                         f"got {architecture!r}")
    torch.manual_seed(seed)
    model_class = getattr(transformers, architecture)
    save_text_encoder(_cast(model_class(transformers.CLIPTextConfig(**config)), dtype), folder)


def _cast(model, dtype: str):
    """The model in `dtype`; float32 models are left alone (they are built in float32)."""
    import torch

    return model if dtype == "float32" else model.to(getattr(torch, dtype))


def _model_config(folder: Path) -> dict[str, Any]:
    data = _read(folder / "config.json")
    return {key: value for key, value in data.items()
            if not key.startswith("_") and key not in ("architectures", "torch_dtype")}


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text("utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arch", choices=sorted(p.name for p in CONFIGS.iterdir() if p.is_dir()))
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prediction-type", choices=PREDICTION_TYPES, default=None)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    args = parser.parse_args()
    print(build_random_sd(args.arch, args.out_dir, seed=args.seed,
                          prediction_type=args.prediction_type, dtype=args.dtype))


if __name__ == "__main__":
    main()
