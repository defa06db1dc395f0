"""Build a tiny random-weight SD 1.x pipeline folder in diffusers' save_pretrained layout.

The configs live in `models/configs/tiny_sd/` and follow diffusers' own tiny test components
(tests/pipelines/stable_diffusion, 2023 variant; research/users.md §5.1): UNet
block_out_channels (32, 64), 2 layers per block, cross_attention_dim 32, sample_size 32, blocks in
SD 1.5's order (cross-attention first); a 2-block AutoencoderKL, so vae_scale_factor is 2 and
the default image is 64×64 (a factor other than 8 also catches code that hard-codes `// 8`);
a 5-layer CLIPTextModel with hidden size 32 but SD's 49,408-token vocabulary and 77 positions,
so the real CLIP tokenizer's ids fit. The scheduler is SD 1.5's PNDM config.

Each component gets `torch.manual_seed(seed)` before it is built, so a seed gives the same
weights whatever the prediction type. Usage: python models/make_tiny_sd.py OUT_DIR [--seed 0]
[--prediction-type epsilon|v_prediction]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs" / "tiny_sd"
TOKENIZER = HERE / "clip_tokenizer"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
logger = logging.getLogger("sdrt.models.make_tiny_sd")


def make_tiny_sd(out_dir: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Write the tiny SD 1.x diffusers folder (model_index.json + 5 component folders)."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, "
                         f"got {prediction_type!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(CONFIGS / "model_index.json", out / "model_index.json")
    write_scheduler(out / "scheduler", prediction_type)
    (out / "tokenizer").mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(TOKENIZER / name, out / "tokenizer" / name)
    _save_unet(out / "unet", seed)
    _save_vae(out / "vae", seed)
    _save_text_encoder(out / "text_encoder", seed)
    logger.info("wrote tiny SD folder %s (seed %d, %s)", out, seed, prediction_type)
    return out


def write_scheduler(folder: Path, prediction_type: str) -> None:
    """SD 1.5's PNDMScheduler config with the given prediction type."""
    config = _read(CONFIGS / "scheduler" / "scheduler_config.json")
    config["prediction_type"] = prediction_type
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scheduler_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _save_unet(folder: Path, seed: int) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    UNet2DConditionModel.from_config(_model_config("unet")).save_pretrained(folder)


def _save_vae(folder: Path, seed: int) -> None:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL.from_config(_model_config("vae")).save_pretrained(folder)


def _save_text_encoder(folder: Path, seed: int) -> None:
    """Save CLIPTextModel weights under SD's `text_model.` key prefix.

    transformers 5.x saves them without the prefix, and other versions then silently
    re-initialise every weight of such a folder (DESIGN.md, pitfalls), so write keys ourselves.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(**_model_config("text_encoder")))
    folder.mkdir(parents=True, exist_ok=True)
    model.config.architectures = ["CLIPTextModel"]  # as SD folders have it; readers check it
    model.config.save_pretrained(folder)
    state = {key if key.startswith("text_model.") else f"text_model.{key}": value.contiguous()
             for key, value in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _model_config(component: str) -> dict[str, Any]:
    data = _read(CONFIGS / component / "config.json")
    return {key: value for key, value in data.items()
            if not key.startswith("_") and key not in ("architectures", "torch_dtype")}


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text("utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prediction-type", choices=PREDICTION_TYPES, default="epsilon")
    args = parser.parse_args()
    print(make_tiny_sd(args.out_dir, seed=args.seed, prediction_type=args.prediction_type))


if __name__ == "__main__":
    main()
