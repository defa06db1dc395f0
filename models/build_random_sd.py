"""Write a random-weight diffusers Stable Diffusion folder from the configs in models/configs/.

Real weights cannot be downloaded on the build machines; speed and memory do not depend on the
values, so full-size random-weight folders of each architecture stand in for them in benchmarks.
Usage: python models/build_random_sd.py sd15 OUT_DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
TOKENIZER = HERE / "clip_tokenizer"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def build_random_sd(arch: str, out_dir: Path, *, seed: int = 0) -> Path:
    """Instantiate each component of `models/configs/<arch>` with seeded random weights and save."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    config_dir = CONFIGS / arch
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(config_dir / "model_index.json", out_dir / "model_index.json")
    shutil.copytree(config_dir / "scheduler", out_dir / "scheduler", dirs_exist_ok=True)
    (out_dir / "tokenizer").mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(TOKENIZER / name, out_dir / "tokenizer" / name)

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(_config(config_dir / "unet"))
    unet.save_pretrained(out_dir / "unet")
    del unet
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config(_config(config_dir / "vae"))
    vae.save_pretrained(out_dir / "vae")
    del vae
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**_config(config_dir / "text_encoder")))
    save_text_encoder(text_encoder, out_dir / "text_encoder")
    return out_dir


def save_text_encoder(model, folder: Path) -> None:
    """Save a CLIPTextModel with the standard SD key layout (`text_model.` prefix kept).

    transformers 5.x drops the prefix on save, and older versions then silently re-initialise
    every weight of such a folder (DESIGN.md, pitfalls); writing the keys ourselves avoids both.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    state = {key if key.startswith("text_model.") else f"text_model.{key}": value.contiguous()
             for key, value in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _config(folder: Path) -> dict:
    data = json.loads((folder / ("scheduler_config.json" if folder.name == "scheduler"
                                 else "config.json")).read_text())
    return {key: value for key, value in data.items() if not key.startswith("_")
            and key not in ("architectures", "torch_dtype")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arch", choices=sorted(p.name for p in CONFIGS.iterdir() if p.is_dir()))
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build_random_sd(args.arch, args.out_dir, seed=args.seed))


if __name__ == "__main__":
    main()
