"""Read and check a LoRA file (Hu et al. 2021, "LoRA: Low-Rank Adaptation") for run-time use.

A LoRA layer holds two factors, `down` (rank, in[, kh, kw]) and `up` (out, rank[, 1, 1]), and
optionally `alpha`; it adds scale · (alpha / rank) · up @ down to one Linear or Conv2d weight
(alpha = rank when absent). Key layouts read (safetensors only: pickle files can run code):

- kohya/A1111: `lora_unet_<name>`, `lora_te_<name>` (SDXL: `lora_te1_`/`lora_te2_`) with
  `.lora_down.weight`, `.lora_up.weight`, `.alpha`; LoCon convs (3×3 down, 1×1 up) alike;
- diffusers/PEFT: `unet.<path>`, `text_encoder.<path>`, `text_encoder_2.<path>` with
  `.lora_A.weight`/`.lora_B.weight` (PEFT's Embedding: `.lora_embedding_A`/`_B`), optional
  `.alpha`; diffusers before PEFT: `.lora.down.weight`/`.lora.up.weight`, and attention
  processors' `attn1.processor.to_q_lora.down.weight` (for `attn1.to_q`; `to_out_lora`:
  `to_out.0`).

Module names stay as the file writes them (lora_names.py maps them onto a model). Refused, in one
line naming the file: another suffix, a missing, truncated or corrupt file, no LoRA keys, NaN/Inf
values, LyCORIS' other algorithms (LoHa `hada_`, LoKr `lokr_`, DoRA `dora_scale`, LoCon's Tucker
`lora_mid`), factors whose shapes do not pair. Hashes are A1111's: sha256 of the file, and the
"addnet" hash (sha256 of the tensor bytes after the safetensors header, the sd-webui-additional-
networks convention), whose first 12 hex digits A1111 writes as `Lora hashes: "name: …"`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdrt.runtime.errors import InputError, first_line

SUFFIX = ".safetensors"
SHORT_HASH = 12  # hex digits A1111 shows of a hash
_CHUNK = 1 << 20
# safetensors dtypes read: NumPy's, and bfloat16 (widened to float32); float8 has no NumPy type.
READ_DTYPES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"}
_HEADER_SIZE = 8  # safetensors: u64 little-endian header length, then the JSON header
# component prefix → component; kohya's underscored, diffusers' dotted.
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
DIFFUSERS_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder",
                      "text_encoder_2.": "text_encoder_2"}
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# key ending → the factor it holds.
_PARTS = {".lora_down.weight": "down", ".lora_up.weight": "up",  # kohya
          ".lora_A.weight": "down", ".lora_B.weight": "up",  # PEFT
          ".lora_embedding_A": "down", ".lora_embedding_B": "up",  # PEFT's Embedding
          ".lora.down.weight": "down", ".lora.up.weight": "up",  # diffusers < 0.25
          "_lora.down.weight": "down", "_lora.up.weight": "up",  # diffusers' attn processors
          ".alpha": "alpha"}
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)$")
# Key fragments of LyCORIS algorithms other than LoRA/LoCon → what to call them.
_OTHER_ALGORITHMS = {"hada_": "LoHa (hada_ keys)", "lokr_": "LoKr (lokr_ keys)",
                     "dora_scale": "DoRA (dora_scale keys)",
                     "lora_mid": "LoCon with a Tucker-decomposed conv (lora_mid keys)"}


@dataclass(frozen=True)
class LoraLayer:
    """One layer's factors as stored (float16/float32) and its alpha (None: alpha = rank)."""

    down: np.ndarray  # (rank, in) or (rank, in, kh, kw)
    up: np.ndarray  # (out, rank) or (out, rank, 1, 1)
    alpha: float | None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def factor(self) -> float:
        """alpha / rank, what scales up @ down before the user's weight does."""
        return 1.0 if self.alpha is None else self.alpha / self.rank


@dataclass(frozen=True)
class LoraFile:
    """A read LoRA file: `layers` by (component, module name as the file writes it)."""

    path: Path
    name: str
    sha256: str
    addnet_hash: str
    layers: Mapping[tuple[str, str], LoraLayer]

    @property
    def short_hash(self) -> str:
        """What A1111 writes in `Lora hashes`: the addnet hash's first 12 hex digits."""
        return self.addnet_hash[:SHORT_HASH]

    @property
    def components(self) -> frozenset[str]:
        """The models it changes: unet, text_encoder, text_encoder_2."""
        return frozenset(component for component, _ in self.layers)


def read_lora(path: str | Path) -> LoraFile:
    """Read and check a LoRA .safetensors file; InputError, one line, when it cannot be used."""
    path = Path(path)
    if path.suffix.lower() != SUFFIX:
        raise InputError(f"LoRA '{path.name}' is not a .safetensors file (pickle LoRAs can run "
                         "code when loaded and are not read)")
    if not path.is_file():
        raise InputError(f"LoRA file '{path}' does not exist")
    sha256, addnet, header, data_start = _hashes(path)
    tensors = _tensors(path, header, data_start)
    return LoraFile(path, path.stem, sha256, addnet, _layers(path.name, tensors))


def _hashes(path: Path) -> tuple[str, str, dict, int]:
    """(sha256 of the file, addnet hash, the JSON header, where the tensor bytes start), in one
    pass over the file."""
    whole, body = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb") as handle:
        head = handle.read(_HEADER_SIZE)
        size = int.from_bytes(head, "little") if len(head) == _HEADER_SIZE else -1
        if not 0 < size <= path.stat().st_size - _HEADER_SIZE:
            raise InputError(f"LoRA '{path.name}' is truncated or not a safetensors file "
                             "(its header length does not fit the file)")
        header_bytes = handle.read(size)
        whole.update(head + header_bytes)
        while chunk := handle.read(_CHUNK):
            whole.update(chunk)
            body.update(chunk)
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InputError(f"LoRA '{path.name}' is corrupt: its safetensors header is not "
                         "JSON") from None
    if not isinstance(header, dict):
        raise InputError(f"LoRA '{path.name}' is corrupt: its safetensors header is not a map")
    return whole.hexdigest(), body.hexdigest(), header, _HEADER_SIZE + size


def _tensors(path: Path, header: Mapping, data_start: int) -> dict[str, np.ndarray]:
    """Every tensor of the file, as stored; bfloat16 (no NumPy type) widened to float32."""
    from safetensors import SafetensorError, safe_open

    for name, entry in header.items():
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if name != "__metadata__" and dtype not in READ_DTYPES:
            raise InputError(f"LoRA '{path.name}': tensor '{name}' is {str(dtype)[:20]}, a type "
                             "sdrt does not read")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            names = list(handle.keys())
            tensors = {name: handle.get_tensor(name) for name in names
                       if header[name].get("dtype") != "BF16"}
    except (SafetensorError, OSError) as exc:
        raise InputError(f"LoRA '{path.name}' is truncated or corrupt: "
                         f"{first_line(exc)}") from None
    for name in names:
        if name not in tensors:
            tensors[name] = _bfloat16(path, header[name], data_start)
    return tensors


def _bfloat16(path: Path, entry: Mapping, data_start: int) -> np.ndarray:
    """A bfloat16 tensor as float32: its 16 bits are float32's upper half."""
    start, end = entry["data_offsets"]  # safe_open has checked them against the file
    raw = np.fromfile(path, dtype="<u2", count=(end - start) // 2, offset=data_start + start)
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(entry["shape"])


def _layers(label: str, tensors: Mapping[str, np.ndarray]) -> dict[tuple[str, str], LoraLayer]:
    parts: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    unread = []
    for key, value in tensors.items():
        algorithm = next((name for part, name in _OTHER_ALGORITHMS.items() if part in key), None)
        if algorithm:
            raise InputError(f"LoRA '{label}' is a LyCORIS {algorithm} file; sdrt reads LoRA "
                             "and LoCon only")
        found = _split(key)
        if found is None:
            unread.append(key)
            continue
        component, module, part = found
        if component is None:
            raise InputError(f"LoRA '{label}' was made for another kind of model: its key "
                             f"'{key}' names none of {', '.join(COMPONENTS)}")
        if not np.isfinite(value).all():
            raise InputError(f"LoRA '{label}' has NaN or infinite values in '{key}'")
        parts.setdefault((component, module), {})[part] = value
    if not parts:
        raise InputError(f"LoRA '{label}' holds no LoRA weights (no lora_down/lora_up or "
                         "lora_A/lora_B keys)")
    if unread:
        raise InputError(f"LoRA '{label}' has {len(unread)} keys sdrt does not read, e.g. "
                         f"'{unread[0]}'")
    return {layer: _layer(label, layer[1], factors) for layer, factors in parts.items()}


def _split(key: str) -> tuple[str | None, str, str] | None:
    """(component, module name, factor) of a LoRA key (component None: a part no SD model has),
    or None for any other key."""
    ending = next((end for end in _PARTS if key.endswith(end)), None)
    if ending is None:
        return None
    stem = key[: -len(ending)]
    for prefixes, dotted in ((KOHYA_PREFIXES, False), (DIFFUSERS_PREFIXES, True)):
        # longest first: `lora_te1_` before `lora_te_`, `text_encoder_2.` before `text_encoder.`
        for prefix in sorted(prefixes, key=len, reverse=True):
            if stem.startswith(prefix):
                module = stem[len(prefix):]
                if dotted:
                    module = _PROCESSOR.sub(_processor_layer, module)
                return prefixes[prefix], module, _PARTS[ending]
    return None, stem, _PARTS[ending]


def _processor_layer(match: re.Match) -> str:
    """`.processor.to_q` → `.to_q`; the output projection is `to_out.0` in the model."""
    name = match.group(1)
    return ".to_out.0" if name == "to_out" else f".{name}"


def _layer(label: str, module: str, factors: Mapping[str, np.ndarray]) -> LoraLayer:
    missing = [part for part in ("down", "up") if part not in factors]
    if missing:
        raise InputError(f"LoRA '{label}': layer '{module}' has no {missing[0]} factor")
    down, up = factors["down"], factors["up"]
    alpha = factors.get("alpha")
    if down.ndim not in (2, 4) or up.ndim not in (2, 4) or up.shape[2:] not in ((), (1, 1)):
        raise InputError(f"LoRA '{label}': layer '{module}' has factors of shapes "
                         f"{tuple(down.shape)} and {tuple(up.shape)}, not a LoRA's")
    if down.shape[0] != up.shape[1]:
        raise InputError(f"LoRA '{label}': layer '{module}' has down rank {down.shape[0]} but up "
                         f"rank {up.shape[1]}")
    if alpha is not None and alpha.size != 1:
        raise InputError(f"LoRA '{label}': layer '{module}' has an alpha of shape "
                         f"{tuple(alpha.shape)}, not one number")
    return LoraLayer(down, up, None if alpha is None else float(alpha.reshape(())))
