"""Files sdrt ships beside its code: the embedded model, the CLIP vocabulary and the diffusers
configs single-file checkpoints are converted with. This module names their paths and imports
nothing, so any stage may use it; the scripts beside it (training, random full-size models) are
tools of their own and import the stages."""

from pathlib import Path

HERE = Path(__file__).resolve().parent
EMBEDDED_MODEL = HERE / "embedded" / "onnx"  # the default model of every command
SHIPPED_CONFIGS = HERE / "configs"  # models/configs/NAME: complete diffusers configs, no weights
CLIP_TOKENIZER = HERE / "clip_tokenizer"  # the vocabulary SD 1.x and 2.x share
