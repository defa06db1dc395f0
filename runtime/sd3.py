"""SD 3 (Esser et al., 2024, "Scaling Rectified Flow Transformers"): the MMDiT component, the
joint text conditioning, and guidance (CFG, optional skip-layer guidance) over the velocity.

Conditioning, as diffusers' StableDiffusion3Pipeline.encode_prompt builds it (fig. 2 of the
paper): each CLIP encoder's penultimate hidden state (B, 77, D1) and (B, 77, D2) side by side,
zero-padded to the transformer's joint_attention_dim, followed by T5's 256 token states (zeros
when the folder has no T5: the paper trains with T5 dropped at random so that it may be left
out at inference); pooled projections are both encoders' `text_embeds` side by side. The
negative prompt, empty or not, is encoded (SD 3 has no force_zeros_for_empty_prompt).

Skip-layer guidance (diffusers' `skip_guidance_layers`, from Stability AI's SD 3.5 reference
code): on steps i with start·n < i < stop·n, the conditional batch runs again with the given
joint blocks skipped, and the guided velocity moves by scale · (cond − skipped).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from sdrt.runtime.components import TextEncoder
from sdrt.runtime.components import _require as require_io
from sdrt.runtime.conditioning import DEFAULT_STYLE, Conditioning, penultimate_output
from sdrt.runtime.conditioning import tokenize as tokenize_clip
from sdrt.runtime.errors import InputError, ModelError, first_line
from sdrt.runtime.guidance import ModelFn, cfg_combine
from sdrt.runtime.model.folder import read_json
from sdrt.runtime.prompts import PromptStyle
from sdrt.runtime.session import Session
from sdrt.runtime.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

SKIP_LAYERS = "skip_layers"  # sdrt's extra transformer input (export/architectures/sd3.py)
T5_MAX_LENGTH = 256  # diffusers' max_sequence_length default for SD 3
POOLED = "pooled_projections"
TRANSFORMER_INPUTS = frozenset({"hidden_states", "timestep", "encoder_hidden_states", POOLED})
# diffusers' StableDiffusion3Pipeline defaults for skip-layer guidance
SLG_SCALE, SLG_START, SLG_STOP = 2.8, 0.01, 0.2


class Transformer:
    """SD 3's MMDiT: latents (B, C, h, w), timestep, joint context and pooled projections →
    velocity (B, C, h, w). Called like the UNet component, so the pipeline drives either."""

    added = frozenset({POOLED})
    guidance_dim = None  # no LCM guidance input

    def __init__(self, session: Session) -> None:
        require_io(session, "transformer", set(TRANSFORMER_INPUTS), {"out_hidden_states"})
        unknown = set(session.inputs) - TRANSFORMER_INPUTS - {SKIP_LAYERS}
        if unknown:
            raise ModelError(f"transformer: inputs {sorted(unknown)} are not supported")
        self.session = session
        self.in_channels = session.inputs["hidden_states"].shape[1]
        self.context_width = session.inputs["encoder_hidden_states"].shape[2]
        mask = session.inputs.get(SKIP_LAYERS)
        self.num_layers = mask.shape[0] if mask is not None else None  # None: no SLG input
        self._timestep_rank = len(session.inputs["timestep"].shape)

    def __call__(self, sample: np.ndarray, t: float, context: np.ndarray,
                 added: dict[str, np.ndarray] | None = None, timestep_cond: None = None,
                 skip: tuple[int, ...] = ()) -> np.ndarray:
        if set(added or {}) != self.added:
            raise ModelError(f"transformer: takes {POOLED}, the conditioning gives "
                             f"{sorted(added or {})}")
        # optimum exports a (batch,) timestep
        timestep = np.full(sample.shape[0], t, np.float32) if self._timestep_rank else np.array(t)
        feeds = {"hidden_states": sample, "timestep": timestep, "encoder_hidden_states": context,
                 POOLED: added[POOLED]}
        if self.num_layers is not None:
            mask = np.zeros(self.num_layers, np.float32)
            mask[list(skip)] = 1.0
            feeds[SKIP_LAYERS] = mask
        elif skip:
            raise ModelError("transformer: this graph has no skip_layers input (skip-layer "
                             "guidance needs a transformer exported by sdrt)")
        return self.session.run(feeds)["out_hidden_states"]


class T5Tokenizer:
    """T5's SentencePiece Unigram tokenizer from the folder's `tokenizer.json` (the Rust pipeline
    transformers' T5TokenizerFast runs): pieces, `</s>`, then `<pad>` up to 256 ids."""

    def __init__(self, tokenizer: Tokenizer, max_length: int = T5_MAX_LENGTH) -> None:
        pad = tokenizer.token_to_id("<pad>")
        if pad is None:
            raise ModelError("tokenizer_3: tokenizer.json has no <pad> token (not T5's)")
        tokenizer.enable_truncation(max_length)
        tokenizer.enable_padding(length=max_length, pad_id=pad, pad_token="<pad>")
        self.tokenizer, self.max_length = tokenizer, max_length

    @classmethod
    def from_dir(cls, folder: Path) -> T5Tokenizer:
        try:
            return cls(Tokenizer.from_file(str(folder / "tokenizer.json")))
        except Exception as exc:  # the Rust library raises its own exception type
            raise ModelError(f"tokenizer_3: cannot read tokenizer.json: {first_line(exc)}") \
                from exc

    def __call__(self, texts: list[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(texts)
        if any(e.overflowing for e in encodings):
            log.warning("prompt longer than %d T5 tokens; the rest is ignored", self.max_length)
        return np.array([e.ids for e in encodings], np.int64)  # (N, 256)


@dataclass(frozen=True)
class Sd3Conditioner:
    """SD 3's joint context (N, 77 + 256, joint_attention_dim) and pooled projections (N, P)."""

    tokenizer: ClipTokenizer
    tokenizer_2: ClipTokenizer
    encoder: TextEncoder
    encoder_2: TextEncoder
    hidden: tuple[str, str]  # each CLIP encoder's penultimate hidden-state output
    width: int  # the transformer's joint_attention_dim
    t5: tuple[T5Tokenizer, TextEncoder] | None = None

    def __call__(self, prompt: str, negative: str, *, guided: bool, width: int,
                 height: int, style: PromptStyle = DEFAULT_STYLE) -> Conditioning:
        # `style` is not read yet: SD 3's context joins the CLIP states with T5's along the
        # sequence (77 + 256 tokens), a layout that A1111's 77-token chunks and emphasis do not
        # carry over to unchanged; SD 3 prompts are plain text for now.
        texts = [negative, prompt] if guided else [prompt]
        first, pooled_1 = self.encoder.outputs(tokenize_clip(self.tokenizer, texts),
                                               (self.hidden[0], "text_embeds"))
        second, pooled_2 = self.encoder_2.outputs(tokenize_clip(self.tokenizer_2, texts),
                                                  (self.hidden[1], "text_embeds"))
        clip = np.concatenate([first, second], axis=-1)  # (N, 77, D1 + D2)
        clip = np.pad(clip, ((0, 0), (0, 0), (0, self.width - clip.shape[-1])))
        if self.t5 is None:
            t5 = np.zeros((len(texts), T5_MAX_LENGTH, self.width), np.float32)
        else:
            tokenizer, encoder = self.t5
            t5 = encoder(tokenizer(texts))  # (N, 256, joint_attention_dim)
        context = np.concatenate([clip, t5], axis=1)  # (N, 333, joint_attention_dim)
        return Conditioning(context, {POOLED: np.concatenate([pooled_1, pooled_2], axis=-1)})


def load_sd3_conditioner(folder: Path, open_graph: Callable[[str], Session],
                         context_width: int) -> Sd3Conditioner:
    """The conditioner of an SD 3 folder (T5 when it has text_encoder_3/)."""
    configs = [read_json(folder / name / "config.json")
               for name in ("text_encoder", "text_encoder_2")]
    t5 = None
    if (folder / "text_encoder_3").is_dir():
        t5 = (T5Tokenizer.from_dir(folder / "tokenizer_3"),
              TextEncoder(open_graph("text_encoder_3"), "text_encoder_3"))
    return Sd3Conditioner(
        ClipTokenizer.from_dir(folder / "tokenizer"),
        ClipTokenizer.from_dir(folder / "tokenizer_2"),
        TextEncoder(open_graph("text_encoder")),
        TextEncoder(open_graph("text_encoder_2"), "text_encoder_2"),
        hidden=(penultimate_output(configs[0]), penultimate_output(configs[1])),
        width=context_width, t5=t5)


@dataclass(frozen=True)
class SkipLayerGuidance:
    """Which joint blocks the extra conditional pass skips, how strongly, and on which steps."""

    layers: tuple[int, ...]
    scale: float = SLG_SCALE
    start: float = SLG_START
    stop: float = SLG_STOP

    def active(self, i: int, steps: int) -> bool:
        """diffusers' window: start · steps < i < stop · steps."""
        return steps * self.start < i < steps * self.stop

    def check(self, transformer: Transformer) -> None:
        if transformer.num_layers is None:
            raise InputError("skip-layer guidance needs a transformer exported by sdrt (with a "
                             "skip_layers input)")
        bad = [n for n in self.layers if not 0 <= n < transformer.num_layers]
        if bad or not self.layers:
            raise InputError(f"skip layers must be block indices in 0..{transformer.num_layers - 1}"
                             f", got {list(self.layers)}")
        if not 0 <= self.start < self.stop <= 1:
            raise InputError(f"skip-layer guidance needs 0 ≤ start < stop ≤ 1, got "
                             f"{self.start} and {self.stop}")


def velocity_fn(transformer: Transformer, cond: Conditioning, scale: float, guided: bool,
                steps: int, slg: SkipLayerGuidance | None = None) -> ModelFn:
    """(x, t) → the guided velocity: CFG over uncond-then-cond rows, plus skip-layer guidance
    on its steps (calls are counted: the sampler calls once per step, in order)."""
    context, pooled = cond.context, cond.added[POOLED]
    if slg is not None:
        slg.check(transformer)
    calls = 0

    def model(x: np.ndarray, t: float) -> np.ndarray:
        nonlocal calls
        i, calls = calls, calls + 1
        if not guided:
            return transformer(x, t, context, cond.added)
        out = transformer(np.concatenate([x, x]), t, context, cond.added)  # (2B, C, h, w)
        uncond, text = np.split(out, 2)
        velocity = cfg_combine(uncond, text, scale)
        if slg is not None and slg.active(i, steps):
            rows = len(context) // 2  # the conditional half
            skipped = transformer(x, t, context[rows:], {POOLED: pooled[rows:]}, skip=slg.layers)
            velocity = velocity + (text - skipped) * np.float32(slg.scale)
        return velocity

    return model

