"""sdrt.runtime.tokenizer: CLIP ids id-for-id with transformers.CLIPTokenizer, errors, isolation."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdrt.runtime.errors import InputError, ModelError
from sdrt.runtime.tokenizer import ClipTokenizer

REPO = Path(__file__).resolve().parents[2]
CLIP_DIR = REPO / "models" / "clip_tokenizer"
PROMPTS_FILE = REPO / "tests" / "data" / "prompts.txt"
MAX_LENGTH = 77
Pair = tuple[ClipTokenizer, Any]  # ours, transformers.CLIPTokenizer
BOS, EOS = 49406, 49407

# Whitespace, control and invisible characters are kept out of prompts.txt (one prompt a line,
# and they would be invisible there) and written here as escapes.
SPECIAL_PROMPTS = [
    "",
    " ",
    "   ",
    "\t",
    "\n",
    "\r\n",
    " \t\n\r\x0b\x0c ",
    "\u00a0",
    "\u3000",
    "\u2028\u2029",
    "\u200b\u200c\u200d\ufeff",
    "\x00",
    "a\x00b",
    "a\x07b\x1bc\x7f",
    "a cat\nsitting on a mat",
    "line one\n\nline two\n\n\nline three",
    "tab\tseparated\tvalues",
    "windows\r\nline\r\nendings",
    "  \n  leading and trailing whitespace runs  \t\n ",
    "no\u00a0break\u00a0space",
    "ideographic\u3000space",
    "zero\u200bwidth\u200bspace",
    "e\u0301 decomposed e-acute vs \u00e9 composed",
    "a\u0301\u0302\u0303\u0304 stacked combining marks",
    "\u0301 leading combining mark",
    "\u212b angstrom sign, \u2126 ohm sign, \u1e9b\u0323",
    "\ud55c\uae00 vs \u1112\u1161\u11ab\u1100\u1173\u11af jamo",
    "\U0001f469\u200d\U0001f52c scientist, \U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063"
    "\U000e0074\U000e007f",
    "private use \ue000\uf8ff, noncharacter \ufffe, replacement \ufffd",
    "\U00010348 gothic, \U0001d400 math bold, \U00020000 cjk ext b",
    "rtl \u202eevil\u202c override",
]


def corpus() -> list[str]:
    """prompts.txt lines, the escapes above, and deterministic variants (long, newline, NFD)."""
    lines = PROMPTS_FILE.read_text(encoding="utf-8").split("\n")
    base = lines[:-1] if lines and lines[-1] == "" else lines
    rng = random.Random(1234)
    generated = []
    for _ in range(20):  # long mixes of several lines, mostly past 77 tokens
        generated.append(", ".join(rng.sample(base, 6)))
    for line in rng.sample(base, 15):
        generated.append(line.replace(" ", "\n"))
        generated.append(line.replace(" ", " \t  "))
        generated.append(unicodedata.normalize("NFD", line))
        generated.append(line.upper())
    generated.append("@" * 100)
    generated.append(" ".join(["a"] * 75))  # exactly fills 77 with BOS and EOS
    generated.append(" ".join(["a"] * 76))  # one token over
    return base + SPECIAL_PROMPTS + generated


CORPUS = corpus()


def test_corpus_is_varied_enough() -> None:
    tok = ClipTokenizer.from_dir(CLIP_DIR)
    assert len(CORPUS) >= 200
    assert sum(tok.token_count(p) > MAX_LENGTH for p in CORPUS) >= 10
    assert any(p.strip() == "" for p in CORPUS)


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return ClipTokenizer.from_dir(CLIP_DIR)


def _copy_folder(dst: Path, pad: str | dict | None, *, drop: tuple[str, ...] = ()) -> Path:
    """A copy of the CLIP folder with pad_token replaced in both JSON files."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if name not in drop:
            shutil.copy(CLIP_DIR / name, dst / name)
    if pad is not None:
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if name in drop:
                continue
            data = json.loads((dst / name).read_text(encoding="utf-8"))
            data["pad_token"] = pad
            (dst / name).write_text(json.dumps(data), encoding="utf-8")
    return dst


def _sd21_style_folder(dst: Path) -> Path:
    """Layout of stabilityai/stable-diffusion-2-1's tokenizer: AddedToken dicts, pad `!`."""
    _copy_folder(dst, "!")

    def added(content: str) -> dict:
        return {
            "content": content,
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
            "single_word": False,
        }

    specials = {
        "bos_token": added("<|startoftext|>"),
        "eos_token": added("<|endoftext|>"),
        "unk_token": added("<|endoftext|>"),
        "pad_token": "!",
    }
    config = json.loads((dst / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.update(
        {
            k: ({"__type": "AddedToken", **v} if isinstance(v, dict) else v)
            for k, v in specials.items()
        }
    )
    (dst / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (dst / "special_tokens_map.json").write_text(json.dumps(specials), encoding="utf-8")
    return dst


# --- behaviour that needs no reference ------------------------------------------------------


def test_shape_dtype_and_padding(tok: ClipTokenizer) -> None:
    ids = tok(["a cat", ""])
    assert ids.shape == (2, MAX_LENGTH) and ids.dtype == np.int64
    assert tok.max_length == MAX_LENGTH
    assert ids[0, :4].tolist() == [BOS, 320, 2368, EOS]
    assert (ids[0, 3:] == EOS).all()  # SD 1.x pads with <|endoftext|>
    assert ids[1, :2].tolist() == [BOS, EOS] and (ids[1, 2:] == EOS).all()


def test_single_string_is_a_batch_of_one(tok: ClipTokenizer) -> None:
    np.testing.assert_array_equal(tok("a cat"), tok(["a cat"]))
    assert tok([]).shape == (0, MAX_LENGTH)


def test_truncation_keeps_bos_first_and_eos_last(tok: ClipTokenizer) -> None:
    prompt = " ".join(["a"] * 100)
    ids = tok([prompt])[0]
    assert ids[0] == BOS and ids[-1] == EOS and (ids[1:-1] == 320).all()
    assert tok.token_count(prompt) == 100
    assert tok.truncated(prompt) == " ".join(["a"] * 25)


def test_truncated_is_empty_when_prompt_fits(tok: ClipTokenizer) -> None:
    assert tok.truncated("") == ""
    assert tok.truncated(" ".join(["a"] * 75)) == ""
    assert tok.truncated(" ".join(["a"] * 76)) == "a"


def test_truncated_returns_the_users_own_text(tok: ClipTokenizer) -> None:
    # Offsets map back to the original string: case, accents and CJK come back unchanged.
    head = " ".join(["a"] * 75)
    assert tok.truncated(head + " Crème BRÛLÉE 日本") == "Crème BRÛLÉE 日本"


def test_pad_token_comes_from_the_folder(tmp_path: Path) -> None:
    tok2 = ClipTokenizer.from_dir(_copy_folder(tmp_path / "sd2", "!"))
    assert tok2.pad_id == 0 and tok2.pad_token == "!"
    ids = tok2(["a cat"])[0]
    assert ids[:4].tolist() == [BOS, 320, 2368, EOS] and (ids[4:] == 0).all()


def test_model_max_length_from_config(tmp_path: Path) -> None:
    folder = _copy_folder(tmp_path / "short", None)
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["model_max_length"] = 16
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok16 = ClipTokenizer.from_dir(folder)
    ids = tok16([" ".join(["a"] * 30)])
    assert ids.shape == (1, 16) and ids[0, -1] == EOS


def test_does_not_import_transformers_or_torch() -> None:
    code = (
        "import sys\n"
        "from sdrt.runtime.tokenizer import ClipTokenizer\n"
        f"tok = ClipTokenizer.from_dir({str(CLIP_DIR)!r})\n"
        "tok(['a cat', 'x' * 500]); tok.truncated('a ' * 100)\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["vocab.json", "merges.txt"])
def test_missing_file_is_a_model_error_naming_it(tmp_path: Path, missing: str) -> None:
    folder = _copy_folder(tmp_path / "f", None, drop=(missing,))
    with pytest.raises(ModelError, match=missing.replace(".", r"\.")):
        ClipTokenizer.from_dir(folder)


def test_missing_folder_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        ClipTokenizer.from_dir(tmp_path / "nope")


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("vocab.json", "{not json"),
        ("vocab.json", '["a", "b"]'),
        ("merges.txt", "#version: 0.2\nzz qq\n"),
        ("tokenizer_config.json", "{"),
        ("special_tokens_map.json", "[1, 2]"),
    ],
)
def test_corrupt_file_is_a_model_error_naming_it(tmp_path: Path, name: str, content: str) -> None:
    folder = _copy_folder(tmp_path / "f", None)
    (folder / name).write_text(content, encoding="utf-8")
    with pytest.raises(ModelError, match=name.replace(".", r"\.")) as info:
        ClipTokenizer.from_dir(folder)
    assert "\n" not in str(info.value)


def test_truncated_vocab_file_is_a_model_error(tmp_path: Path) -> None:
    folder = _copy_folder(tmp_path / "f", None)
    data = (folder / "vocab.json").read_bytes()
    (folder / "vocab.json").write_bytes(data[: len(data) // 2])  # an interrupted download
    with pytest.raises(ModelError, match=r"vocab\.json"):
        ClipTokenizer.from_dir(folder)


def test_pad_token_outside_vocab_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="pad_token"):
        ClipTokenizer.from_dir(_copy_folder(tmp_path / "f", "<pad>"))


def test_other_tokenizer_class_is_a_model_error(tmp_path: Path) -> None:
    folder = _copy_folder(tmp_path / "f", None)
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["tokenizer_class"] = "T5Tokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ModelError, match="T5Tokenizer"):
        ClipTokenizer.from_dir(folder)


@pytest.mark.parametrize("bad", [None, 3, b"bytes", ["ok", 5], "\ud800 lone surrogate"])
def test_bad_prompt_is_an_input_error(tok: ClipTokenizer, bad: object) -> None:
    with pytest.raises(InputError):
        tok(bad)  # type: ignore[arg-type]


# --- parity with transformers.CLIPTokenizer --------------------------------------------------


@pytest.fixture(scope="module")
def transformers_clip() -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer


def _reference_ids(ref: Any, prompts: list[str]) -> np.ndarray:
    # The call diffusers' pipelines make.
    out = ref(prompts, padding="max_length", max_length=ref.model_max_length, truncation=True)
    return np.asarray(out.input_ids, dtype=np.int64)


@pytest.fixture(scope="module")
def pair_sd1(transformers_clip: Any, tok: ClipTokenizer) -> tuple[ClipTokenizer, Any]:
    return tok, transformers_clip.from_pretrained(str(CLIP_DIR))


@pytest.fixture(scope="module")
def pair_sd2(
    transformers_clip: Any, tmp_path_factory: pytest.TempPathFactory
) -> tuple[ClipTokenizer, Any]:
    folder = _copy_folder(tmp_path_factory.mktemp("sd2") / "tokenizer", "!")
    return ClipTokenizer.from_dir(folder), transformers_clip.from_pretrained(str(folder))


def _assert_parity(ours: ClipTokenizer, ref: Any, prompts: list[str]) -> None:
    got, want = ours(prompts), _reference_ids(ref, prompts)
    assert got.shape == want.shape == (len(prompts), MAX_LENGTH)
    bad = [i for i in range(len(prompts)) if not np.array_equal(got[i], want[i])]
    assert not bad, "\n".join(
        f"{prompts[i]!r}:\n  ours {got[i].tolist()}\n  want {want[i].tolist()}" for i in bad[:5]
    )


@pytest.mark.parity
def test_corpus_parity_sd1_pad(pair_sd1: Pair) -> None:
    assert pair_sd1[1].pad_token_id == 49407
    _assert_parity(*pair_sd1, CORPUS)


@pytest.mark.parity
def test_corpus_parity_sd2_pad(pair_sd2: Pair) -> None:
    assert pair_sd2[1].pad_token_id == 0
    _assert_parity(*pair_sd2, CORPUS)


@pytest.mark.parity
def test_corpus_parity_one_at_a_time(pair_sd1: Pair) -> None:
    # Batching must not change a row (no padding-to-longest or cross-row effects).
    ours, ref = pair_sd1
    batch = ours(CORPUS[:50])
    for i, prompt in enumerate(CORPUS[:50]):
        np.testing.assert_array_equal(batch[i], _reference_ids(ref, [prompt])[0])


@pytest.mark.parity
def test_parity_sd21_style_added_token_dicts(transformers_clip: Any, tmp_path: Path) -> None:
    folder = _sd21_style_folder(tmp_path / "sd21")
    extra = ["<|ENDOFTEXT|> normalized specials match upper case", "A<|EndOfText|>b"]
    _assert_parity(
        ClipTokenizer.from_dir(folder),
        transformers_clip.from_pretrained(str(folder)),
        CORPUS + extra,
    )


@pytest.mark.parity
def test_parity_folder_saved_by_transformers(transformers_clip: Any, tmp_path: Path) -> None:
    # transformers 5 saves tokenizer.json + tokenizer_config.json only; older ones add the
    # vocab.json / merges.txt pair. Either layout must load the same tokenizer.
    ref = transformers_clip.from_pretrained(str(_copy_folder(tmp_path / "src", "!")))
    ref.save_pretrained(str(tmp_path / "saved"))
    ours = ClipTokenizer.from_dir(tmp_path / "saved")
    assert ours.pad_id == 0
    _assert_parity(ours, transformers_clip.from_pretrained(str(tmp_path / "saved")), CORPUS)


@pytest.mark.parity
def test_parity_without_special_tokens_map(transformers_clip: Any, tmp_path: Path) -> None:
    folder = _copy_folder(tmp_path / "f", "!", drop=("special_tokens_map.json",))
    _assert_parity(
        ClipTokenizer.from_dir(folder), transformers_clip.from_pretrained(str(folder)), CORPUS[:60]
    )


@pytest.mark.parity
def test_truncated_text_holds_the_dropped_tokens(pair_sd1: Pair) -> None:
    # diffusers warns with decode(untruncated_ids[max_length - 1 : -1]); ours is the user's own
    # text from the first dropped token on, so it must be a suffix of the prompt that is empty
    # exactly when nothing was dropped.
    ours, ref = pair_sd1
    for prompt in CORPUS:
        untruncated = ref(prompt).input_ids
        cut = ours.truncated(prompt)
        assert prompt.endswith(cut)
        assert (cut == "") == (len(untruncated) <= MAX_LENGTH), prompt
        assert ours.token_count(prompt) == len(untruncated) - 2


# Characters CLIP's rules treat specially, so random strings hit the edges more often than
# uniform unicode would: contractions, specials, `!` (SD 2.x pad), whitespace, marks, emoji.
EDGY_ALPHABET = list("aAsStTdDmM!'’ ,.()[]:<|>/_-0123456789\t\n\r ") + [
    "<|endoftext|>",
    "<|startoftext|>",
    "</w>",
    "é",
    "e\u0301",
    "İ",
    "ß",
    "日本",
    "😀",
    "👩‍💻",
    "\u00a0",
    "\u200b",
    "\u3000",
    "ﬁ",
    "Ⅻ",
    "&amp;",
]
PROMPTS = st.one_of(
    st.text(max_size=120),
    st.lists(st.sampled_from(EDGY_ALPHABET), max_size=80).map("".join),
)


@pytest.mark.parity
@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(prompts=st.lists(PROMPTS, min_size=1, max_size=4))
def test_random_unicode_parity(pair_sd1: Pair, pair_sd2: Pair, prompts: list[str]) -> None:
    _assert_parity(*pair_sd1, prompts)
    _assert_parity(*pair_sd2, prompts)


def _with_added_tokens_decoder(dst: Path, entries: dict[str, dict], *, sd21: bool = False) -> Path:
    """A CLIP folder plus the `added_tokens_decoder` block newer transformers versions save."""
    if sd21:
        _sd21_style_folder(dst)
    else:
        _copy_folder(dst, None)
    config = json.loads((dst / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = entries
    (dst / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return dst


def _decoder_entry(content: str, *, normalized: bool = True) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": normalized,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


@pytest.mark.parity
@pytest.mark.parametrize("sd21", [False, True], ids=["string-specials", "dict-specials"])
@pytest.mark.parametrize("normalized", [True, False])
def test_parity_added_tokens_decoder(
    transformers_clip: Any, tmp_path: Path, sd21: bool, normalized: bool
) -> None:
    # Where the decoder's flags and the named tokens' flags disagree, the decoder's win.
    specials = {"49406": "<|startoftext|>", "49407": "<|endoftext|>"} | ({"0": "!"} if sd21 else {})
    entries = {k: _decoder_entry(v, normalized=normalized) for k, v in specials.items()}
    folder = _with_added_tokens_decoder(tmp_path / "f", entries, sd21=sd21)
    _assert_parity(
        ClipTokenizer.from_dir(folder),
        transformers_clip.from_pretrained(str(folder)),
        CORPUS + ["<|ENDOFTEXT|> x", "a<|EndOfText|>"],
    )


def test_added_token_with_wrong_id_is_a_model_error(tmp_path: Path) -> None:
    folder = _with_added_tokens_decoder(tmp_path / "f", {"5": _decoder_entry("<|endoftext|>")})
    with pytest.raises(ModelError, match="added token"):
        ClipTokenizer.from_dir(folder)
