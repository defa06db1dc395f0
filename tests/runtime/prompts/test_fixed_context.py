"""A UNet graph whose context is fixed at 77 tokens (an older or static export) keeps working:
prompts stay within one chunk, a longer one is cut with a warning quoting what was dropped."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.prompts import chunk_prompt

LONG_PROMPT = ", ".join(f"word{i} thing" for i in range(60))  # well over 75 tokens


@pytest.fixture(scope="module")
def fixed_context_dir(tiny_onnx_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    onnx = pytest.importorskip("onnx")
    folder = tmp_path_factory.mktemp("fixed") / "model"
    shutil.copytree(tiny_onnx_dir, folder)
    model = onnx.load(str(folder / "unet" / "model.onnx"))
    (context,) = [i for i in model.graph.input if i.name == "encoder_hidden_states"]
    context.type.tensor_type.shape.dim[1].dim_value = 77
    onnx.save(model, str(folder / "unet" / "model.onnx"))
    (folder / "manifest.json").unlink()  # its hashes name the original graph
    return folder


def test_long_prompt_is_cut_to_one_chunk(fixed_context_dir, tiny_onnx_dir, caplog):
    fixed = Pipeline.load(fixed_context_dir)
    with caplog.at_level(logging.WARNING):
        cond = fixed.conditioner(LONG_PROMPT, "", guided=True, width=64, height=64)
    assert cond.context.shape[1] == 77
    assert any("dropped" in r.getMessage() or "ignored" in r.getMessage()
               for r in caplog.records)
    free = Pipeline.load(tiny_onnx_dir)
    assert len(chunk_prompt(LONG_PROMPT, free.tokenizer).ids) > 1
    assert free.conditioner(LONG_PROMPT, "", guided=True, width=64, height=64
                            ).context.shape[1] > 77
    # the two lengths differ, so `context` holds the prompt's row only (uncond apart)
    first = free.conditioner(LONG_PROMPT, "", guided=True, width=64, height=64).context
    assert np.allclose(cond.context[1], first[0, :77], atol=1e-5)  # the same first chunk
