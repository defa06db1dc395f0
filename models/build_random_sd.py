"""Write a random-weight diffusers Stable Diffusion folder from the configs in models/configs/.

Real weights cannot be downloaded on the build machines. Each `models/configs/<arch>/` mirrors a
diffusers folder without weights: tests use the tiny ones, benchmarks the full-size ones, since
speed and memory do not depend on the values.

- `tiny_sd` (SD 1.x): diffusers' own tiny test components (research/users.md §5.1): UNet
  block_out_channels (32, 64), a 2-block VAE so vae_scale_factor is 2, a 5-layer CLIP text
  encoder with hidden size 32 but SD's 49,408-token vocabulary.
- `tiny_sd2` (SD 2.x 768-v): the same sizes with SD 2.x's features: v-prediction DDIM, linear
  projections and one head count per UNet block, a gelu (OpenCLIP) text encoder, `!` padding,
  and a larger native size (sample_size 48 against 32, as 768 against 512).
- `tiny_turbo` (SD-Turbo): tiny_sd2's architecture at sample_size 32 with SD-Turbo's scheduler
  (epsilon, Euler, trailing spacing).
- `sd15`, `sd21` (768-v), `sd_turbo`: the full-size architectures.

The tokenizer is `models/clip_tokenizer/` (the vocabulary SD 1.x and 2.x share) with the files of
`models/configs/<arch>/tokenizer/`, when there is one, in place of its own (SD 2.x pads with `!`).
Each component gets `torch.manual_seed(seed)` before it is built, so a seed gives the same weights
whatever the prediction type.

Usage: python models/build_random_sd.py {tiny_sd,tiny_sd2,tiny_turbo,sd15,sd21,sd_turbo} OUT_DIR
       [--seed 0] [--prediction-type epsilon|v_prediction]
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
logger = logging.getLogger("sdrt.models.build_random_sd")


def build_random_sd(arch: str, out_dir: str | Path, *, seed: int = 0,
                    prediction_type: str | None = None) -> Path:
    """Write `models/configs/<arch>` as a diffusers folder with seeded random weights."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, "
                         f"got {prediction_type!r}")
    configs = CONFIGS / arch
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(configs / "model_index.json", out / "model_index.json")
    scheduler = _read(configs / "scheduler" / "scheduler_config.json")
    scheduler["prediction_type"] = prediction_type or scheduler.get("prediction_type", "epsilon")
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    _copy_tokenizer(configs / "tokenizer", out / "tokenizer")
    _save_unet(out / "unet", _model_config(configs / "unet"), seed)
    _save_vae(out / "vae", _model_config(configs / "vae"), seed)
    _save_text_encoder(out / "text_encoder", _model_config(configs / "text_encoder"), seed)
    logger.info("wrote %s folder %s (seed %d)", arch, out, seed)
    return out


def _copy_tokenizer(overrides: Path, folder: Path) -> None:
    """The shared CLIP tokenizer files, each replaced by the config's own copy where it has one."""
    folder.mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        own = overrides / name
        shutil.copy(own if own.is_file() else TOKENIZER / name, folder / name)


def save_text_encoder(model, folder: Path) -> None:
    """Save a CLIPTextModel with SD's key layout (the `text_model.` prefix kept).

    transformers 5.x saves it without the prefix, and other versions then silently
    re-initialise every weight of such a folder (DESIGN.md, pitfalls), so write keys ourselves.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model.config.architectures = ["CLIPTextModel"]  # as SD folders have it; readers check it
    model.config.save_pretrained(folder)
    state = {key if key.startswith("text_model.") else f"text_model.{key}": value.contiguous()
             for key, value in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _save_unet(folder: Path, config: dict[str, Any], seed: int) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    UNet2DConditionModel.from_config(config).save_pretrained(folder)


def _save_vae(folder: Path, config: dict[str, Any], seed: int) -> None:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL.from_config(config).save_pretrained(folder)


def _save_text_encoder(folder: Path, config: dict[str, Any], seed: int) -> None:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    save_text_encoder(CLIPTextModel(CLIPTextConfig(**config)), folder)


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
    args = parser.parse_args()
    print(build_random_sd(args.arch, args.out_dir, seed=args.seed,
                          prediction_type=args.prediction_type))


if __name__ == "__main__":
    main()
