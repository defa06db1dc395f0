"""CLIP BPE tokenizer (Radford et al., 2021) on the Rust `tokenizers` library, id-for-id with
`transformers.CLIPTokenizer`.

The pipeline mirrors the one transformers builds for CLIP (checked id-for-id in
tests/runtime/test_tokenizer.py against transformers 5.x, whose `CLIPTokenizer` is this same Rust
pipeline; transformers 4.x's `CLIPTokenizerFast` used the same settings):

- normaliser: NFC, then every run of whitespace → one space, then lower-case;
- pre-tokeniser: CLIP's split regex (the two special tokens, the contractions 's 't 're 've 'm
  'll 'd, letter runs, single digits, runs of other non-space symbols; whitespace dropped), then
  GPT-2's byte-level mapping so that every byte has a symbol (emoji and CJK become byte tokens);
- model: BPE over vocab.json / merges.txt with `</w>` appended to the last symbol of each word,
  no continuing-subword prefix, unknown → `unk_token`;
- post-processing: `<|startoftext|>` + tokens + `<|endoftext|>`; truncation keeps the first
  `max_length - 2` tokens between them; padding with the folder's pad token.

Special tokens (bos, eos, unk, pad, and any `added_tokens_decoder` entry) are matched in the raw
prompt before the BPE, with the flags the folder gives them, as transformers does. So with an SD 2.x
tokenizer, whose pad token is `!`, every `!` in a prompt becomes its own token (id 0) instead of
merging into `!!` / `!!!`: that is what transformers (and so diffusers) feeds the SD 2.x text
encoder, and parity is the point here (diffusers#4153 discusses the difference from open_clip).

Known differences from OpenAI's original `SimpleTokenizer`, shared with transformers and kept for
parity: no `ftfy.fix_text` mojibake repair and no `html.unescape` (`&amp;` stays `&amp;`, not `&`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from sdrt.runtime.errors import InputError, ModelError

logger = logging.getLogger(__name__)

VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
# transformers 5's save_pretrained writes only tokenizer.json + tokenizer_config.json (no
# vocab.json / merges.txt), so folders exported with it carry the vocabulary here instead.
TOKENIZER_JSON_FILE = "tokenizer.json"

# CLIP's pre-tokenisation pattern (OpenAI CLIP `simple_tokenizer.py`); text is lower-cased first.
CLIP_SPLIT_PATTERN = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)
END_OF_WORD_SUFFIX = "</w>"
# CLIP's text context length, used only when tokenizer_config.json does not give model_max_length.
DEFAULT_MAX_LENGTH = 77
# A model_max_length above this is a "no limit" sentinel (transformers writes 1e30), not a length.
MAX_SANE_LENGTH = 16384
# Defaults of transformers' CLIPTokenizer for a folder that names no special tokens.
DEFAULT_SPECIAL_TOKENS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}


class ClipTokenizer:
    """CLIP BPE tokenizer giving `transformers.CLIPTokenizer` ids, padded to `max_length`."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        max_length: int,
        bos_id: int,
        eos_id: int,
        pad_id: int,
        pad_token: str,
    ) -> None:
        # `tokenizer` has no truncation/padding state: both are applied here in NumPy, so one
        # encoding serves the ids, the token count and the truncated text, and nothing on the
        # shared Rust object is ever mutated after load (safe to use from several threads).
        self._tokenizer = tokenizer
        self.max_length = max_length
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.pad_token = pad_token

    @classmethod
    def from_dir(cls, folder: str | Path) -> ClipTokenizer:
        """Load a Hugging Face CLIP tokenizer folder (vocab.json + merges.txt or tokenizer.json)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelError(f"tokenizer folder not found: {folder}")
        config = _read_json_object(folder / CONFIG_FILE, required=False)
        special_map = _read_json_object(folder / SPECIAL_TOKENS_FILE, required=False)
        _check_tokenizer_class(folder / CONFIG_FILE, config)
        model = _load_bpe(folder)
        tokenizer = _build_pipeline(model)
        specials = _special_tokens(config, special_map)
        extra_added = _added_tokens_decoder(folder / CONFIG_FILE, config)
        ids = _register_special_tokens(tokenizer, folder, specials, extra_added)
        bos, eos = specials["bos_token"].content, specials["eos_token"].content
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}",
            special_tokens=[(bos, ids["bos_token"]), (eos, ids["eos_token"])],
        )
        return cls(
            tokenizer,
            max_length=_max_length(folder / CONFIG_FILE, config),
            bos_id=ids["bos_token"],
            eos_id=ids["eos_token"],
            pad_id=ids["pad_token"],
            pad_token=specials["pad_token"].content,
        )

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (49,408 for CLIP)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """Token ids, shape (B, max_length) int64: BOS, tokens, EOS, then pad (truncated to fit)."""
        texts = _check_prompts(prompts)
        encodings = self._tokenizer.encode_batch(texts)
        out = np.full((len(texts), self.max_length), self.pad_id, dtype=np.int64)  # (B, L)
        for row, encoding in zip(out, encodings, strict=True):
            ids = encoding.ids
            if len(ids) > self.max_length:
                # Same as transformers' truncation: keep BOS and the first L-2 tokens, end on EOS.
                ids = ids[: self.max_length - 1] + [self.eos_id]
            row[: len(ids)] = ids
        return out

    def token_ids(self, text: str) -> list[int]:
        """The ids of a piece of text alone: no BOS/EOS, no truncation, no padding."""
        _check_single(text)
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    @property
    def comma_id(self) -> int | None:
        """The id of `,</w>` (a comma ending a word), where chunking backtracks; None if absent."""
        return self._tokenizer.token_to_id(f",{END_OF_WORD_SUFFIX}")

    def token_count(self, prompt: str) -> int:
        """Number of tokens the prompt needs, without BOS/EOS and before truncation."""
        _check_single(prompt)
        return len(self._tokenizer.encode(prompt).ids) - 2

    def truncated(self, prompt: str, length: int | None = None) -> str:
        """The end of `prompt` that does not fit in `length` tokens, BOS and EOS included
        (default `max_length`; '' when it all fits)."""
        _check_single(prompt)
        length = self.max_length if length is None else length
        encoding = self._tokenizer.encode(prompt)
        if len(encoding.ids) <= length:
            return ""
        # Index length-1 is the first dropped token (index 0 is BOS). Offsets point into the
        # original prompt, so the user sees their own text, not lower-cased BPE pieces. A
        # character split across byte tokens (emoji) on the cut is reported whole.
        start = encoding.offsets[length - 1][0]
        return prompt[start:]


def _check_single(prompt: str) -> None:
    if not isinstance(prompt, str):
        raise InputError(f"prompt must be a str, got {type(prompt).__name__}")
    _check_prompts(prompt)


def _check_prompts(prompts: str | Sequence[str]) -> list[str]:
    """Prompts as a list of str; anything else is an InputError naming what was passed."""
    texts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(texts, Sequence) or isinstance(texts, bytes):
        raise InputError(f"prompt must be a str or a list of str, got {type(prompts).__name__}")
    out = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"prompt {i} must be a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            # Lone surrogates (e.g. from a badly decoded file) cannot reach the Rust tokenizer.
            raise InputError(
                f"prompt {i} is not valid unicode (lone surrogate at position {exc.start})"
            ) from None
        out.append(text)
    return out


def _read_json_object(path: Path, *, required: bool) -> dict[str, Any]:
    """A JSON file holding an object; {} when absent and optional; ModelError when unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if required:
            raise ModelError(f"tokenizer file missing: {path}") from None
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"tokenizer file {path} is not valid JSON: {_one_line(exc)}") from None
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ModelError(f"tokenizer file {path} must hold a JSON object, got {kind}")
    return data


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _check_tokenizer_class(path: Path, config: dict[str, Any]) -> None:
    """Refuse a folder that declares a tokenizer other than CLIP's (e.g. T5 for SD3's third)."""
    name = config.get("tokenizer_class")
    if name is not None and not str(name).startswith("CLIPTokenizer"):
        raise ModelError(f"{path} declares tokenizer_class {name!r}; expected CLIPTokenizer")


def _load_bpe(folder: Path) -> BPE:
    """The BPE model from vocab.json + merges.txt, falling back to tokenizer.json's model."""
    vocab, merges = folder / VOCAB_FILE, folder / MERGES_FILE
    if vocab.is_file() or merges.is_file() or not (folder / TOKENIZER_JSON_FILE).is_file():
        for path in (vocab, merges):
            if not path.is_file():
                raise ModelError(f"tokenizer file missing: {path}")
        try:
            # Rust reads both files (~0.1 s for CLIP's 49,408 tokens; a Python json.load of the
            # vocabulary alone costs half of that again).
            return BPE.from_file(str(vocab), str(merges), **_bpe_options())
        except Exception as exc:  # tokenizers raises plain Exception; say which file is bad
            raise ModelError(_diagnose_bpe_files(vocab, merges, exc)) from None
    return _bpe_from_tokenizer_json(folder / TOKENIZER_JSON_FILE)


def _bpe_options(unk_token: str = DEFAULT_SPECIAL_TOKENS["unk_token"]) -> dict[str, Any]:
    # unk is only reached by a symbol missing from the vocabulary; CLIP's covers all 256 bytes.
    return {
        "unk_token": unk_token,
        "end_of_word_suffix": END_OF_WORD_SUFFIX,
        "continuing_subword_prefix": "",
        "fuse_unk": False,
        "dropout": None,
    }


def _diagnose_bpe_files(vocab: Path, merges: Path, exc: BaseException) -> str:
    """One-line message naming which of vocab.json / merges.txt made BPE loading fail."""
    try:
        data = json.loads(vocab.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"tokenizer file {vocab} is not valid JSON: {_one_line(err)}"
    if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
        return f"tokenizer file {vocab} must map token strings to integer ids"
    return f"tokenizer file {merges} does not match {vocab.name}: {_one_line(exc)}"


def _bpe_from_tokenizer_json(path: Path) -> BPE:
    """BPE vocabulary and merges out of a tokenizer.json (only its model section is used)."""
    data = _read_json_object(path, required=True)
    model = data.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise ModelError(f"{path} does not hold a BPE model (CLIP's tokenizer is BPE)")
    if model.get("end_of_word_suffix") != END_OF_WORD_SUFFIX:
        raise ModelError(f"{path} is not a CLIP tokenizer: BPE end_of_word_suffix is not '</w>'")
    vocab, merges = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not isinstance(merges, list):
        raise ModelError(f"{path}: model.vocab must be an object and model.merges a list")
    # Merges are "a b" strings in older files and [a, b] pairs in newer ones.
    pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    try:
        return BPE(vocab, pairs, **_bpe_options())
    except Exception as exc:  # tokenizers raises plain Exception
        raise ModelError(f"{path}: invalid BPE model: {_one_line(exc)}") from None


def _build_pipeline(model: BPE) -> Tokenizer:
    """Normaliser and pre-tokeniser of CLIP around the BPE model (see the module docstring)."""
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # invert=True: the regex matches the pieces to keep; everything between (whitespace)
            # is removed.
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            # use_regex=True as transformers sets it. GPT-2's regex rarely splits CLIP's pieces
            # further, but it does split a special token's spelling that reached the BPE (e.g.
            # "<|ENDOFTEXT|>", lower-cased after the added-token match) into "<|", "endoftext",
            # "|>", which changes ids ("|</w>" vs "|"); the parity tests catch it without this.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return tokenizer


def _as_added_token(value: Any, source: str) -> AddedToken:
    """A special token given as a string or as a serialised AddedToken dict (flags honoured)."""
    if isinstance(value, str):
        # transformers adds plain-string special tokens un-normalised: matched in the raw text.
        return AddedToken(value, special=True, normalized=False)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return AddedToken(
            value["content"],
            single_word=bool(value.get("single_word", False)),
            lstrip=bool(value.get("lstrip", False)),
            rstrip=bool(value.get("rstrip", False)),
            normalized=bool(value.get("normalized", False)),
            special=True,
        )
    raise ModelError(f"{source}: a special token must be a string or {{'content': ...}}")


def _special_tokens(config: dict[str, Any], special_map: dict[str, Any]) -> dict[str, AddedToken]:
    """bos/eos/unk/pad: special_tokens_map.json over tokenizer_config.json over CLIP defaults."""
    # That precedence is transformers': an SD 2.x folder whose config says one pad token and
    # whose special_tokens_map.json says `!` pads with `!`.
    tokens = {}
    for key, default in DEFAULT_SPECIAL_TOKENS.items():
        if special_map.get(key) is not None:
            tokens[key] = _as_added_token(special_map[key], SPECIAL_TOKENS_FILE)
        elif config.get(key) is not None:
            tokens[key] = _as_added_token(config[key], CONFIG_FILE)
        else:
            tokens[key] = _as_added_token(default, "defaults")
    return tokens


def _added_tokens_decoder(path: Path, config: dict[str, Any]) -> list[tuple[int, AddedToken]]:
    """The (id, token) pairs a newer tokenizer_config.json lists under `added_tokens_decoder`."""
    entries = config.get("added_tokens_decoder") or {}
    if not isinstance(entries, dict):
        raise ModelError(f"{path}: added_tokens_decoder must be an object")
    out = []
    for key, value in entries.items():
        try:
            token_id = int(key)
        except ValueError:
            raise ModelError(f"{path}: added_tokens_decoder key {key!r} is not an id") from None
        token = _as_added_token(value, CONFIG_FILE)
        if isinstance(value, dict) and value.get("special") is False:
            token = AddedToken(
                token.content,
                single_word=token.single_word,
                lstrip=token.lstrip,
                rstrip=token.rstrip,
                normalized=token.normalized,
                special=False,
            )
        out.append((token_id, token))
    return out


def _register_special_tokens(
    tokenizer: Tokenizer,
    folder: Path,
    specials: dict[str, AddedToken],
    added: list[tuple[int, AddedToken]],
) -> dict[str, int]:
    """Make the Rust tokenizer match special tokens in the text; return each one's id."""
    ids = {}
    for key, token in specials.items():
        token_id = tokenizer.token_to_id(token.content)
        if token_id is None:
            # Adding it would create an id past the text encoder's embedding table.
            raise ModelError(
                f"{folder}: {key} {token.content!r} is not in the vocabulary; expected a CLIP "
                f"tokenizer folder"
            )
        ids[key] = token_id
    for token_id, token in added:
        if tokenizer.token_to_id(token.content) != token_id:
            raise ModelError(
                f"{folder / CONFIG_FILE}: added token {token.content!r} has id {token_id} there "
                f"but {tokenizer.token_to_id(token.content)} in the vocabulary"
            )
    # A named special token that added_tokens_decoder also lists takes that entry's flags (so
    # `"eos_token": "<|endoftext|>"` plus a `normalized: true` entry matches "<|ENDOFTEXT|>"), as
    # transformers resolves it; tests/runtime/test_tokenizer.py checks both layouts against it.
    listed = {token.content for _, token in added}
    named = {t.content: t for t in specials.values() if t.content not in listed}
    tokenizer.add_tokens([token for _, token in added if not token.special])
    tokenizer.add_special_tokens([token for _, token in added if token.special])
    tokenizer.add_special_tokens(list(named.values()))
    return ids


def _max_length(path: Path, config: dict[str, Any]) -> int:
    """`model_max_length` from tokenizer_config.json (77 for every SD text encoder)."""
    value = config.get("model_max_length")
    if value is None or (isinstance(value, int | float) and value > MAX_SANE_LENGTH):
        if value is not None:
            logger.warning(
                "%s: model_max_length %s is a 'no limit' marker; using %d",
                path,
                value,
                DEFAULT_MAX_LENGTH,
            )
        return DEFAULT_MAX_LENGTH
    if isinstance(value, bool) or not isinstance(value, int) or value < 3:
        raise ModelError(f"{path}: model_max_length must be an integer >= 3, got {value!r}")
    return value
