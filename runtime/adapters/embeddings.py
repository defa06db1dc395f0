"""Textual-inversion embeddings (Gal et al., 2022, "An Image is Worth One Word") at run time.

An embedding is a few learned token vectors; a prompt word (its file's stem, as AUTOMATIC1111
names it) stands for them. The text encoder's token-embedding table gains one row per vector,
and the prompt's ids point at those rows: AUTOMATIC1111 swaps the vectors in after the lookup,
diffusers' `load_textual_inversion` adds tokens and table rows — both give the same input to
the transformer, so here the rows are appended to the exported graph's table and the chunker
splices their ids in (`EmbeddingIndex.match`).

Files read (safetensors only; pickles can run code when loaded and are refused):

- AUTOMATIC1111: one tensor `emb_params` (n, D), or `string_to_param.*` (the `.pt` layout's
  `string_to_param: {"*": tensor}` flattened by a safetensors conversion);
- diffusers `learned_embeds.safetensors`: one tensor keyed by its token, (D,) or (n, D);
- any other file holding exactly one tensor, read the same way;
- SDXL's two-encoder form: `clip_l` (n, 768) for the first text encoder and `clip_g` (n, 1280)
  for the second.

Which files a model takes follows AUTOMATIC1111: a model with one text encoder takes a single
tensor of its width; a model with two takes only files with a tensor for each (`clip_l` and
`clip_g`). The others are listed as skipped, with the reason, not loaded.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from safetensors import SafetensorError, deserialize

from sdrt.runtime.errors import InputError, first_line
from sdrt.runtime.tokenizer import ClipTokenizer

logger = logging.getLogger(__name__)

SUFFIX = ".safetensors"
# Pickle formats AUTOMATIC1111 also loads; torch.load on them can execute arbitrary code.
PICKLE_SUFFIXES = frozenset({".pt", ".bin", ".ckpt", ".pth"})
# Key of a single-tensor file's vectors: it fits whichever single text encoder has its width.
ANY_ENCODER = ""
# The SDXL form's keys, in text-encoder order.
SDXL_KEYS = ("clip_l", "clip_g")
# An embedding is at most a few hundred KiB (75 vectors × 2,048 floats); a file far beyond that is
# a checkpoint in the wrong folder, refused before it is read into memory.
MAX_FILE_BYTES = 16 * 1024 * 1024
# safetensors dtypes that hold embedding vectors; BF16 is widened by hand (NumPy has no bfloat16,
# which is why the raw views of `safetensors.deserialize` are read here, not safetensors.numpy).
FLOAT_DTYPES = {"F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8")}


class EncoderSpec(NamedTuple):
    """One text encoder as the embeddings see it: its tokenizer, table width and row count."""

    tokenizer: ClipTokenizer
    width: int  # D, the token-embedding table's columns
    vocab_rows: int  # V, the table's rows: the first new id
    key: str  # the SDXL-form tensor meant for it: "clip_l" (first) or "clip_g" (SDXL's second)


@dataclass(frozen=True)
class Embedding:
    """One embedding file: `vectors` maps ANY_ENCODER, or each of SDXL_KEYS, to (n, D) float32."""

    name: str
    path: Path
    vectors: Mapping[str, np.ndarray]
    sha256: str

    @property
    def count(self) -> int:
        """n, the number of prompt tokens it stands for."""
        return next(iter(self.vectors.values())).shape[0]

    @property
    def shape(self) -> int:
        """AUTOMATIC1111's `shape`: the width, summed over both tensors for the SDXL form."""
        return sum(v.shape[1] for v in self.vectors.values())

    @property
    def short_hash(self) -> str:
        """AUTOMATIC1111's `shorthash`: the first 12 hex digits of the whole file's SHA-256."""
        return self.sha256[:12]


def read_embedding(path: str | Path) -> Embedding:
    """Read one embedding file; any problem is an InputError of one line naming the file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise InputError(
            f"embedding {path.name}: {suffix} files are pickles, which can run code when loaded; "
            f"convert it to {SUFFIX}"
        )
    if suffix != SUFFIX:
        raise InputError(f"embedding {path.name}: expected a {SUFFIX} file, got {suffix or 'none'}")
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise InputError(
                f"embedding {path.name}: {size} bytes is too large for an embedding "
                f"(at most {MAX_FILE_BYTES}); is it a checkpoint or a LoRA?"
            )
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"embedding {path.name}: cannot read it: {exc.strerror}") from None
    vectors = _layout(_tensors(data, path.name), path.name)
    return Embedding(path.stem, path, vectors, hashlib.sha256(data).hexdigest())


def _tensors(data: bytes, name: str) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, floats only (safetensors checks header and sizes)."""
    try:
        views = deserialize(data)
    except SafetensorError as exc:
        raise InputError(
            f"embedding {name}: not a valid safetensors file (truncated or corrupt): "
            f"{first_line(exc)}"
        ) from None
    out = {}
    for key, view in views:
        dtype, shape = view["dtype"], tuple(view["shape"])
        if dtype == "BF16":
            # bfloat16 is the top half of a float32: widen by shifting into the high 16 bits.
            bits = np.frombuffer(view["data"], dtype="<u2").astype("<u4") << 16
            out[key] = bits.view("<f4").reshape(shape)
        elif dtype in FLOAT_DTYPES:
            out[key] = np.frombuffer(view["data"], FLOAT_DTYPES[dtype]).reshape(shape)
        else:
            raise InputError(f"embedding {name}: tensor {key!r} is {dtype}; expected float values")
    return out


def _layout(tensors: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    """Which of the known layouts the file's tensors form (see the module docstring)."""
    if not tensors:
        raise InputError(f"embedding {name}: holds no tensor")
    keys = sorted(tensors)
    if set(SDXL_KEYS) <= set(keys):
        extra = [k for k in keys if k not in SDXL_KEYS]
        if extra:
            raise InputError(f"embedding {name}: tensors {extra[:3]} beside clip_l and clip_g")
        out = {key: _vectors(tensors[key], key, name) for key in SDXL_KEYS}
        rows = [out[key].shape[0] for key in SDXL_KEYS]
        if rows[0] != rows[1]:
            raise InputError(f"embedding {name}: clip_l has {rows[0]} vectors, clip_g {rows[1]}")
        return out
    if len(keys) > 1:
        raise InputError(
            f"embedding {name}: holds {len(keys)} unrelated tensors ({', '.join(keys[:3])}, ...); "
            f"expected one (emb_params, string_to_param.*, a token) or clip_l + clip_g"
        )
    return {ANY_ENCODER: _vectors(tensors[keys[0]], keys[0], name)}


def _vectors(tensor: np.ndarray, key: str, name: str) -> np.ndarray:
    """A (D,) or (n, D) tensor as (n, D) float32, refusing other ranks, no vectors, NaN/Inf."""
    if tensor.ndim not in (1, 2):
        raise InputError(
            f"embedding {name}: tensor {key!r} has shape {tensor.shape}; expected (D,) or (n, D)"
        )
    vectors = tensor.reshape(-1, tensor.shape[-1]).astype(np.float32)  # (n, D)
    if vectors.size == 0:
        raise InputError(f"embedding {name}: tensor {key!r} of shape {tensor.shape} is empty")
    if not np.isfinite(vectors).all():
        raise InputError(f"embedding {name}: tensor {key!r} holds NaN or Inf values")
    return vectors


class TriggerIndex:
    """Trigger-word token sequences → the ids of their rows (the chunker's `EmbeddingIndex`)."""

    def __init__(self, triggers: Sequence[tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
        # Keyed by the first token, longest trigger first, as AUTOMATIC1111 looks them up: a
        # trigger that starts another one (`style` and `style-two`) must not hide the longer.
        self._by_first: dict[int, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
        for tokens, ids in triggers:
            self._by_first.setdefault(tokens[0], []).append((tokens, ids))
        for candidates in self._by_first.values():
            candidates.sort(key=lambda pair: -len(pair[0]))  # stable: equal lengths keep order

    def match(self, tokens: Sequence[int], position: int) -> tuple[tuple[int, ...], int] | None:
        """(ids standing for the embedding's vectors, prompt tokens used) or None."""
        if not 0 <= position < len(tokens):
            return None
        for trigger, ids in self._by_first.get(int(tokens[position]), ()):
            if tuple(int(t) for t in tokens[position : position + len(trigger)]) == trigger:
                return ids, len(trigger)
        return None


@dataclass
class EmbeddingLibrary:
    """The embeddings of a folder that fit one model, with each text encoder's rows and index.

    Ids: for each text encoder, the loaded embeddings' vectors take ids V, V+1, … (V = the rows of
    its table) in sorted name order. diffusers' `load_textual_inversion` gives added tokens the
    next ids in the order it loads them, so it gives the same ids when it loads the same files in
    sorted name order (any other order permutes the rows and ids alike: the same images).
    """

    encoders: tuple[EncoderSpec, ...]
    loaded: dict[str, Embedding] = field(default_factory=dict)
    skipped: dict[str, tuple[Embedding, str]] = field(default_factory=dict)  # name → (file, why)
    errors: dict[str, str] = field(default_factory=dict)  # file name → one-line message
    _indexes: tuple[TriggerIndex, ...] = field(default=(), init=False)
    _first_ids: dict[str, int] = field(default_factory=dict, init=False)  # name → offset past V

    @classmethod
    def load(cls, folder: str | Path, encoders: Sequence[EncoderSpec]) -> EmbeddingLibrary:
        """Every embedding under `folder` (subfolders too, as AUTOMATIC1111 walks them)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"embeddings dir not found: {folder}")
        library = cls(tuple(EncoderSpec(*e) for e in encoders))
        if not library.encoders:
            raise InputError("an embedding library needs at least one text encoder")
        files = {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            if path.suffix.lower() not in PICKLE_SUFFIXES | {SUFFIX}:
                continue
            try:
                embedding = read_embedding(path)
            except InputError as exc:
                library.errors[path.name] = str(exc)
                logger.warning("%s", exc)
                continue
            if embedding.name in files:
                message = f"embedding {path}: same name as {files[embedding.name].path}; not loaded"
                library.errors[path.name] = message
                logger.warning("%s", message)
                continue
            files[embedding.name] = embedding
        for name in sorted(files):
            library._add(files[name])
        library._build_indexes()
        return library

    def _add(self, embedding: Embedding) -> None:
        """Load the embedding, or list it as skipped with why it does not fit this model."""
        reason = _misfit(embedding, self.encoders)
        if reason is None:
            self._first_ids[embedding.name] = sum(e.count for e in self.loaded.values())
            self.loaded[embedding.name] = embedding
        else:
            self.skipped[embedding.name] = (embedding, reason)
            logger.warning("embedding %s skipped: %s", embedding.name, reason)

    def _build_indexes(self) -> None:
        indexes = []
        for spec in self.encoders:
            triggers = []
            for name, embedding in self.loaded.items():
                first = spec.vocab_rows + self._first_ids[name]
                ids = tuple(range(first, first + embedding.count))
                triggers.append((_trigger_tokens(spec.tokenizer, name), ids))
            indexes.append(TriggerIndex(triggers))
        self._indexes = tuple(indexes)

    def index(self, encoder_index: int) -> TriggerIndex:
        """The `EmbeddingIndex` for text encoder `encoder_index` (0, or 1 for SDXL's second)."""
        return self._indexes[encoder_index]

    def extra_rows(self, encoder_index: int) -> np.ndarray:
        """Rows to append to that encoder's token-embedding table, (n_total, D) float32."""
        spec = self.encoders[encoder_index]
        key = ANY_ENCODER if len(self.encoders) == 1 else spec.key
        rows = [embedding.vectors[key] for embedding in self.loaded.values()]
        return np.concatenate(rows) if rows else np.zeros((0, spec.width), np.float32)

    def used(self, ids: Iterable[int], encoder_index: int = 0) -> list[str]:
        """Names of the loaded embeddings whose ids appear in `ids` (for the TI hashes field)."""
        offsets = {int(i) - self.encoders[encoder_index].vocab_rows for i in ids}
        return [
            name
            for name, embedding in self.loaded.items()
            if offsets & set(range(self._first_ids[name], self._first_ids[name] + embedding.count))
        ]

    def ti_hashes(self, names: Iterable[str]) -> str:
        """AUTOMATIC1111's `TI hashes` value, "name: hash, …" (`:` and `,` dropped from names)."""
        parts = []
        for name in dict.fromkeys(names):
            clean = name.replace(":", "").replace(",", "")
            parts.append(f"{clean}: {self.loaded[name].short_hash}")
        return ", ".join(parts)

    def embeddings_response(self) -> dict[str, dict[str, dict[str, object]]]:
        """The body of AUTOMATIC1111's `GET /sdapi/v1/embeddings`."""
        skipped = {name: pair[0] for name, pair in self.skipped.items()}
        return {
            "loaded": {name: _a1111_entry(e) for name, e in self.loaded.items()},
            "skipped": {name: _a1111_entry(e) for name, e in skipped.items()},
        }


def _a1111_entry(embedding: Embedding) -> dict[str, object]:
    # Training step and checkpoint come from AUTOMATIC1111's own .pt files; safetensors files
    # carry neither, so AUTOMATIC1111 reports null for them too.
    return {
        "step": None,
        "sd_checkpoint": None,
        "sd_checkpoint_name": None,
        "shape": embedding.shape,
        "vectors": embedding.count,
    }


def _misfit(embedding: Embedding, encoders: Sequence[EncoderSpec]) -> str | None:
    """Why the embedding does not fit these text encoders, or None when it does."""
    widths = " + ".join(f"{e.key} ({e.width})" for e in encoders)
    if len(encoders) == 1:
        vectors = embedding.vectors.get(ANY_ENCODER)
        width = f"this model's text encoder takes vectors {encoders[0].width} wide"
        if vectors is None:
            return f"an SDXL embedding (clip_l + clip_g); {width}"
        if vectors.shape[1] != encoders[0].width:
            return f"its vectors are {vectors.shape[1]} wide; {width}"
    else:
        for spec in encoders:
            vectors = embedding.vectors.get(spec.key)
            if vectors is None:
                return f"this model's text encoders need tensors {widths}; the file has one tensor"
            if vectors.shape[1] != spec.width:
                return f"its {spec.key} is {vectors.shape[1]} wide; this model needs {widths}"
    limit = min(e.tokenizer.max_length for e in encoders) - 2
    if embedding.count > limit:
        return f"{embedding.count} vectors do not fit one {limit}-token prompt chunk"
    for spec in encoders:
        tokens = len(_trigger_tokens(spec.tokenizer, embedding.name))
        if not 0 < tokens <= limit:
            return f"its name is {tokens} tokens; a trigger word needs 1 to {limit}"
    return None


def _trigger_tokens(tokenizer: ClipTokenizer, word: str) -> tuple[int, ...]:
    """The word's token ids as they appear inside a prompt (CLIP splits text into words before
    its BPE, so a word tokenizes alike alone and within a prompt)."""
    return tuple(tokenizer.token_ids(word))
