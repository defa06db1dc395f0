"""`sdrt export` from an SD 3 hub id: model_index.json says which folders come (the MMDiT
`transformer/`, T5's `text_encoder_3/` and `tokenizer_3/` where it names them) and which weights
must be there."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.cli.test_cli import assert_one_line_error, run
from tests.export.test_sources import (
    COMMIT,
    REPO,
    _fake_hub_cache,
    _files,
    _serve,
    offline_cache,  # noqa: F401 (a fixture)
)

# SD 3 on the Hub (StableDiffusion3Pipeline): T5 sharded as transformers saves it, the
# SentencePiece model beside T5's tokenizer.json, fp16 copies and single-file checkpoints.
SD3_WEIGHTS = ("transformer/diffusion_pytorch_model.safetensors",
               "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
               "text_encoder_2/model.safetensors")
T5_FILES = ("text_encoder_3/model-00001-of-00002.safetensors",
            "text_encoder_3/model-00002-of-00002.safetensors",
            "text_encoder_3/model.safetensors.index.json", "tokenizer_3/tokenizer.json",
            "tokenizer_3/tokenizer_config.json", "tokenizer_3/special_tokens_map.json")
SD3_UNREAD = ("sd3_medium.safetensors", "text_encoders/t5xxl_fp16.safetensors",
              "transformer/diffusion_pytorch_model.fp16.safetensors",
              "text_encoder_3/model.fp16-00001-of-00002.safetensors",
              "text_encoder_3/model.safetensors.index.fp16.json", "tokenizer_3/spiece.model",
              "text_encoder_2/pytorch_model.bin", "README.md")


def _sd3_repo(root: Path, arch: str) -> set[str]:
    """An SD 3 repository: the shipped configs of `arch`, CLIP and T5 tokenizer files, weights
    that are names only (fetching reads none), and files export never reads; T5's files are
    there even where model_index.json names it null. The files export reads come back."""
    from sdrt.models import CLIP_TOKENIZER, SHIPPED_CONFIGS

    shutil.copytree(SHIPPED_CONFIGS / arch, root)
    for tokenizer in ("tokenizer", "tokenizer_2"):
        (root / tokenizer).mkdir(exist_ok=True)
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            shutil.copy(CLIP_TOKENIZER / name, root / tokenizer / name)
    for rel in (*SD3_WEIGHTS, *T5_FILES, *SD3_UNREAD):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if not (root / rel).exists():
            (root / rel).write_text("{}")
    t5 = arch == "tiny_sd3_t5"
    return _files(root) - set(SD3_UNREAD) - (set() if t5 else {*T5_FILES,
                                                                "text_encoder_3/config.json"})


@pytest.mark.parametrize("arch", ["tiny_sd3", "tiny_sd3_t5"])
def test_sd3_hub_download_fetches_the_transformer_and_t5(arch, tmp_path, monkeypatch) -> None:
    """model_index.json says what comes: the MMDiT for a UNet, T5 and its tokenizer only where
    the index names them, no fp16 copies, no SentencePiece model."""
    from sdrt.export.source import read_source
    from sdrt.export.sources import resolve_source

    reads = _sd3_repo(tmp_path / "repo", arch)
    with _serve(tmp_path / "repo", monkeypatch), resolve_source(
            REPO, cache_dir=tmp_path / "cache") as (folder, origin):
        fetched = _files(folder)
        source = read_source(folder)
    assert fetched == reads
    assert ("text_encoder_3/model.safetensors.index.json" in fetched) == (arch == "tiny_sd3_t5")
    assert origin == {"hub_id": REPO, "revision": COMMIT}
    assert source.family == "sd3"
    assert (source.text_encoder_3 is not None) == (arch == "tiny_sd3_t5")


@pytest.mark.parametrize("missing, component", [
    ("transformer/diffusion_pytorch_model.safetensors", "transformer"),
    ("text_encoder_3/model-0000?-of-00002.safetensors", "text_encoder_3")])
def test_sd3_hub_snapshot_needs_its_weights(missing, component, offline_cache,  # noqa: F811
                                            tmp_path) -> None:
    src = tmp_path / "repo"
    _sd3_repo(src, "tiny_sd3_t5")
    for path in src.glob(missing):
        path.unlink()
    _fake_hub_cache(offline_cache, src, "tiny-org/tiny-sd3")
    result = run("export", "tiny-org/tiny-sd3", tmp_path / "out")
    assert_one_line_error(result, f"'tiny-org/tiny-sd3' at {COMMIT} has no weights for "
                                  f"{component}; if it has .bin (pickle) weights")
