"""Textual-inversion embeddings at run time: files, the library's ids and rows, A1111's response,
and parity of the exported text encoders with diffusers' `load_textual_inversion`."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from sdrt.runtime.adapters.embeddings import (
    MAX_FILE_BYTES,
    EmbeddingLibrary,
    EncoderSpec,
    TriggerIndex,
    read_embedding,
)
from sdrt.runtime.errors import InputError
from sdrt.runtime.prompts.chunks import chunk_prompt
from sdrt.runtime.tokenizer import ClipTokenizer
from tests.conftest import ROOT, load_reference

V = 49408  # CLIP's vocabulary: the rows of every SD text encoder's token table
# Max |graph − torch| of the tiny text encoders is ≤ 6e-6 in ONNX Runtime (tests/export); an
# appended table row goes through the same Gather, so the export's bound holds unchanged.
TEXT_ATOL = 2e-5
PROMPT = "a photo of {}"


@pytest.fixture(scope="module")
def clip() -> ClipTokenizer:
    return ClipTokenizer.from_dir(ROOT / "models" / "clip_tokenizer")


def _vectors(seed: int, n: int, width: int) -> np.ndarray:
    # Scaled as CLIP's own token rows (std 0.02 at init) grown by training: a few times larger.
    return np.random.default_rng(seed).normal(0.0, 0.05, (n, width)).astype(np.float32)


# ---------------------------------------------------------------- files


def _bf16_file(path: Path, values: np.ndarray) -> None:
    """A safetensors file holding `values` as BF16, written by the format's spec (NumPy cannot)."""
    data = (values.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
    header = {"emb_params": {"dtype": "BF16", "shape": list(values.shape),
                             "data_offsets": [0, len(data)]}}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.mark.parametrize("key", ["emb_params", "string_to_param.*", "<cat-toy>", "anything"])
def test_single_tensor_layouts(tmp_path: Path, key: str) -> None:
    path = tmp_path / "kirbo.safetensors"
    values = _vectors(0, 2, 8)
    save_file({key: values.astype(np.float16)}, path)
    embedding = read_embedding(path)
    assert embedding.name == "kirbo" and embedding.count == 2 and embedding.shape == 8
    np.testing.assert_array_equal(embedding.vectors[""], values.astype(np.float16))
    assert embedding.vectors[""].dtype == np.float32


def test_one_vector_and_bf16(tmp_path: Path) -> None:
    save_file({"<tok>": np.arange(4, dtype=np.float32)}, tmp_path / "one.safetensors")
    assert read_embedding(tmp_path / "one.safetensors").vectors[""].shape == (1, 4)
    exact = np.array([[1.5, -2.0], [0.25, 3.0]], np.float32)  # representable in bfloat16
    _bf16_file(tmp_path / "half.safetensors", exact)
    np.testing.assert_array_equal(read_embedding(tmp_path / "half.safetensors").vectors[""], exact)


def test_sdxl_layout_and_hash(tmp_path: Path) -> None:
    path = tmp_path / "xl.safetensors"
    save_file({"clip_l": _vectors(0, 3, 8), "clip_g": _vectors(1, 3, 12)}, path)
    embedding = read_embedding(path)
    assert set(embedding.vectors) == {"clip_l", "clip_g"}
    assert (embedding.count, embedding.shape) == (3, 20)  # A1111: the widths summed
    # A1111's hash of an embedding is the whole file's SHA-256; the short hash its first 12.
    assert embedding.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert embedding.short_hash == embedding.sha256[:12]


def _write_bad(path: Path, kind: str) -> None:
    good = _vectors(0, 2, 8)
    tensors = {
        "empty_file": {},
        "several": {"a": good, "b": good},
        "nan": {"emb_params": np.where(good > 0, np.nan, good)},
        "inf": {"emb_params": np.full((2, 8), np.inf, np.float32)},
        "rank3": {"emb_params": good[None]},
        "scalar": {"emb_params": np.array(1.0, np.float32)},
        "no_vectors": {"emb_params": np.zeros((0, 8), np.float32)},
        "ints": {"emb_params": np.ones((2, 8), np.int64)},
        "rows": {"clip_l": good, "clip_g": good[:1]},
        "beside": {"clip_l": good, "clip_g": good, "step": good},
    }
    if kind in tensors:
        save_file(tensors[kind], path)
    elif kind == "truncated":
        save_file({"emb_params": good}, path)
        path.write_bytes(path.read_bytes()[:-7])
    elif kind == "huge":
        with path.open("wb") as f:
            f.truncate(MAX_FILE_BYTES + 1)  # sparse: nothing is written
    else:
        path.write_bytes(b"not a safetensors file")


BAD_FILES = [
    ("x.pt", "pickle", "pickles, which can run code"),
    ("x.bin", "pickle", "pickles, which can run code"),
    ("x.png", "other", "expected a .safetensors file"),
    ("x.safetensors", "empty_file", "holds no tensor"),
    ("x.safetensors", "several", "2 unrelated tensors (a, b"),
    ("x.safetensors", "nan", "NaN or Inf"),
    ("x.safetensors", "inf", "NaN or Inf"),
    ("x.safetensors", "rank3", "shape (1, 2, 8); expected (D,) or (n, D)"),
    ("x.safetensors", "scalar", "shape (); expected"),
    ("x.safetensors", "no_vectors", "is empty"),
    ("x.safetensors", "ints", "is I64; expected float"),
    ("x.safetensors", "rows", "clip_l has 2 vectors, clip_g 1"),
    ("x.safetensors", "beside", "['step'] beside clip_l and clip_g"),
    ("x.safetensors", "truncated", "truncated or corrupt"),
    ("x.safetensors", "garbage", "truncated or corrupt"),
    ("x.safetensors", "huge", "too large for an embedding"),
]


@pytest.mark.parametrize(("name", "kind", "message"), BAD_FILES)
def test_bad_file_one_line(tmp_path: Path, name: str, kind: str, message: str) -> None:
    path = tmp_path / name
    _write_bad(path, kind)
    with pytest.raises(InputError) as info:
        read_embedding(path)
    text = str(info.value)
    assert message in text and text.startswith(f"embedding {name}: ") and "\n" not in text


# ---------------------------------------------------------------- index and library


def test_index_longest_trigger_first() -> None:
    index = TriggerIndex([((5,), (100,)), ((5, 6), (101, 102)), ((7,), (103,))])
    assert index.match([1, 5, 6, 7], 1) == ((101, 102), 2)
    assert index.match([1, 5, 8], 1) == ((100,), 1)
    assert index.match(np.array([7]), 0) == ((103,), 1)
    assert index.match([1, 5], 0) is None
    assert index.match([1, 5], 2) is None


def _sd_specs(clip: ClipTokenizer, width: int = 8) -> list[EncoderSpec]:
    return [EncoderSpec(clip, width, V, "clip_l")]


def _xl_specs(clip: ClipTokenizer) -> list[EncoderSpec]:
    return [EncoderSpec(clip, 8, V, "clip_l"), EncoderSpec(clip, 12, V, "clip_g")]


def test_library_ids_rows_and_skips(tmp_path: Path, clip: ClipTokenizer) -> None:
    save_file({"emb_params": _vectors(0, 2, 8)}, tmp_path / "zandor.safetensors")
    save_file({"<t>": _vectors(1, 1, 8)[0]}, tmp_path / "kirbo.safetensors")
    (tmp_path / "sub").mkdir()
    save_file({"emb_params": _vectors(2, 3, 8)}, tmp_path / "sub" / "kirbo-style.safetensors")
    save_file({"emb_params": _vectors(3, 2, 16)}, tmp_path / "wide.safetensors")
    save_file({"clip_l": _vectors(4, 2, 8), "clip_g": _vectors(5, 2, 12)},
              tmp_path / "xl.safetensors")
    _write_bad(tmp_path / "broken.safetensors", "nan")
    _write_bad(tmp_path / "old.pt", "pickle")
    (tmp_path / "notes.txt").write_text("ignored")

    library = EmbeddingLibrary.load(tmp_path, _sd_specs(clip))
    assert list(library.loaded) == ["kirbo", "kirbo-style", "zandor"]  # sorted names
    assert "16 wide" in library.skipped["wide"][1]
    assert "SDXL embedding" in library.skipped["xl"][1]
    assert set(library.errors) == {"broken.safetensors", "old.pt"}
    rows = library.extra_rows(0)  # ids V (kirbo), V+1..V+3 (kirbo-style), V+4..V+5 (zandor)
    assert rows.shape == (6, 8) and rows.dtype == np.float32
    np.testing.assert_array_equal(rows[4:], _vectors(0, 2, 8))

    index = library.index(0)
    tokens = clip.token_ids("kirbo-style kirbo, zandor")
    found, position = [], 0
    while position < len(tokens):
        match = index.match(tokens, position)
        found.append(match[0] if match else tokens[position])
        position += match[1] if match else 1
    assert found == [(V + 1, V + 2, V + 3), (V,), clip.token_ids(",")[0], (V + 4, V + 5)]
    assert library.used([1, V + 2, V + 5]) == ["kirbo-style", "zandor"]


def test_sdxl_library_takes_only_two_encoder_files(tmp_path: Path,
                                                   clip: ClipTokenizer) -> None:
    save_file({"clip_l": _vectors(0, 2, 8), "clip_g": _vectors(1, 2, 12)},
              tmp_path / "xl.safetensors")
    save_file({"emb_params": _vectors(2, 2, 8)}, tmp_path / "sd15.safetensors")
    save_file({"clip_l": _vectors(3, 1, 8), "clip_g": _vectors(4, 1, 16)},
              tmp_path / "other.safetensors")
    library = EmbeddingLibrary.load(tmp_path, _xl_specs(clip))
    assert list(library.loaded) == ["xl"]
    assert "the file has one tensor" in library.skipped["sd15"][1]  # A1111 skips it too
    assert "clip_g is 16 wide" in library.skipped["other"][1]
    np.testing.assert_array_equal(library.extra_rows(0), _vectors(0, 2, 8))
    np.testing.assert_array_equal(library.extra_rows(1), _vectors(1, 2, 12))
    assert library.index(1).match(clip.token_ids("xl"), 0) == ((V, V + 1), 1)


def test_empty_folder_and_missing_folder(tmp_path: Path, clip: ClipTokenizer) -> None:
    library = EmbeddingLibrary.load(tmp_path, _sd_specs(clip))
    assert library.extra_rows(0).shape == (0, 8) and library.index(0).match([1], 0) is None
    with pytest.raises(InputError, match="embeddings dir not found"):
        EmbeddingLibrary.load(tmp_path / "nope", _sd_specs(clip))


def test_a1111_response_and_ti_hashes(tmp_path: Path, clip: ClipTokenizer) -> None:
    save_file({"emb_params": _vectors(0, 2, 8)}, tmp_path / "neg,bad.safetensors")
    save_file({"emb_params": _vectors(1, 1, 16)}, tmp_path / "wide.safetensors")
    library = EmbeddingLibrary.load(tmp_path, _sd_specs(clip))
    entry = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None}
    assert library.embeddings_response() == {
        "loaded": {"neg,bad": {**entry, "shape": 8, "vectors": 2}},
        "skipped": {"wide": {**entry, "shape": 16, "vectors": 1}},
    }
    json.dumps(library.embeddings_response())  # the server sends it as it is
    digest = hashlib.sha256((tmp_path / "neg,bad.safetensors").read_bytes()).hexdigest()
    # A1111 drops `:` and `,` from the name, so the infotext value parses back.
    assert library.ti_hashes(["neg,bad", "neg,bad"]) == f"negbad: {digest[:12]}"


# ---------------------------------------------------------------- parity with diffusers

# One file per layout (each 2 vectors but `single`), loaded together: diffusers then gives them
# ids in the order it loads them, here sorted by name, as the library does.
SD_FILES = {
    "kirbo": "emb_params",
    "plimf-style": "string_to_param.*",
    "quoxel": "<quoxel-concept>",  # diffusers' learned_embeds: keyed by its own token
    "wubbity": "some_tensor",
    "zandor": "<single>",  # diffusers' (D,) form: one vector
}


def _text_outputs(graph: Path, extra: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The exported text encoder run on `ids` with `extra` rows appended to its token table."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import numpy_helper

    inits = {t.name: t for t in onnx.load(str(graph)).graph.initializer}
    lora_map = graph.parent / "lora_map.json"
    if lora_map.is_file():
        modules = json.loads(lora_map.read_text())["modules"]
        name = modules["text_model.embeddings.token_embedding"]["initializer"]
    else:  # folders exported before the LoRA map: the only (V, D) initializer
        [name] = [n for n, t in inits.items() if list(t.dims) == [V, extra.shape[1]]]
    table = np.concatenate([numpy_helper.to_array(inits[name]), extra])  # (V + n, D)
    options = ort.SessionOptions()
    value = ort.OrtValue.ortvalue_from_numpy(table)  # referenced until the session is built
    options.add_initializer(name, value)
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"input_ids": ids}), strict=True))


def _reference_outputs(text_encoder, ids: np.ndarray) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        out = text_encoder(torch.from_numpy(ids), output_hidden_states=True)
    ref = {key: out[key].numpy() for key in ("last_hidden_state", "pooler_output", "text_embeds")
           if key in out}
    ref.update({f"hidden_states.{i}": h.numpy() for i, h in enumerate(out.hidden_states)})
    return ref


def _check_encoder(graph: Path, library: EmbeddingLibrary, encoder: int, tokenizer,
                   text_encoder, prompt: str, reference_prompt: str) -> None:
    """Our ids equal diffusers' and the graph with our rows equals diffusers' encoder."""
    spec = library.encoders[encoder]
    ids = chunk_prompt(prompt, spec.tokenizer, embeddings=library.index(encoder)).ids  # (1, 77)
    ref_ids = tokenizer(reference_prompt, padding="max_length", max_length=77,
                        truncation=True, return_tensors="np").input_ids
    np.testing.assert_array_equal(ids, ref_ids)
    assert ids.max() >= V  # the trigger word became the embedding's ids
    ours = _text_outputs(graph, library.extra_rows(encoder), ids)
    ref = _reference_outputs(text_encoder, ref_ids)
    for name, value in ours.items():
        np.testing.assert_allclose(value, ref[name], rtol=0, atol=TEXT_ATOL, err_msg=name)


@pytest.fixture(scope="module")
def sd_embeddings(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("embeddings")
    for i, (stem, key) in enumerate(sorted(SD_FILES.items())):
        values = _vectors(i, 2, 32)
        save_file({key: values[0] if key == "<single>" else values}, folder / f"{stem}.safetensors")
    pipe = load_reference(tiny_sd_dir)
    for stem in sorted(SD_FILES):
        pipe.load_textual_inversion(str(folder / f"{stem}.safetensors"), token=stem)
    return folder, pipe


@pytest.mark.parity
@pytest.mark.parametrize("stem", sorted(SD_FILES))
def test_sd_equals_diffusers(stem: str, sd_embeddings, tiny_onnx_dir: Path) -> None:
    folder, pipe = sd_embeddings
    tokenizer = ClipTokenizer.from_dir(tiny_onnx_dir / "tokenizer")
    library = EmbeddingLibrary.load(folder, [EncoderSpec(tokenizer, 32, V, "clip_l")])
    assert sorted(library.loaded) == sorted(SD_FILES) and not library.skipped
    prompt = PROMPT.format(stem)
    _check_encoder(tiny_onnx_dir / "text_encoder" / "model.onnx", library, 0, pipe.tokenizer,
                   pipe.text_encoder, prompt, pipe.maybe_convert_prompt(prompt, pipe.tokenizer))


@pytest.mark.parity
def test_sdxl_equals_diffusers(tiny_sdxl_dir: Path, tiny_sdxl_onnx_dir: Path,
                               tmp_path: Path) -> None:
    from safetensors.torch import load_file

    stem = "zandor"
    path = tmp_path / f"{stem}.safetensors"
    save_file({"clip_l": _vectors(0, 2, 32), "clip_g": _vectors(1, 2, 32)}, path)
    save_file({"emb_params": _vectors(2, 2, 32)}, tmp_path / "kirbo.safetensors")  # skipped
    pipe = load_reference(tiny_sdxl_dir)
    state = load_file(path)
    pipe.load_textual_inversion(state["clip_l"], token=stem, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token=stem, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    specs = [EncoderSpec(ClipTokenizer.from_dir(tiny_sdxl_onnx_dir / folder), 32, V, key)
             for folder, key in (("tokenizer", "clip_l"), ("tokenizer_2", "clip_g"))]
    library = EmbeddingLibrary.load(tmp_path, specs)
    assert list(library.loaded) == [stem] and list(library.skipped) == ["kirbo"]
    prompt = PROMPT.format(stem)
    for encoder, (tokenizer, text_encoder, graph) in enumerate([
        (pipe.tokenizer, pipe.text_encoder, "text_encoder"),
        (pipe.tokenizer_2, pipe.text_encoder_2, "text_encoder_2"),
    ]):
        _check_encoder(tiny_sdxl_onnx_dir / graph / "model.onnx", library, encoder, tokenizer,
                       text_encoder, prompt, pipe.maybe_convert_prompt(prompt, tokenizer))
