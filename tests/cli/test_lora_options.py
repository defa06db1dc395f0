"""The prompt and LoRA options (cli/prompt_options.py): `--lora FILE[:W]` read as documented
(a Windows drive letter is no weight), bad values refused in one line before a model loads, and
--lora-dir / --embeddings-dir / --prompt-syntax / --emphasis reaching the run."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from sdrt.cli.prompt_options import parse_lora
from sdrt.runtime.errors import InputError
from sdrt.runtime.metadata import parse_parameters
from tests.cli.test_cli import assert_one_line_error, run

GENERATING = ("generate", "img2img", "inpaint", "outpaint", "serve", "batch")
PROMPT_OPTIONS = ("--lora", "--lora-dir", "--embeddings-dir", "--prompt-syntax", "--emphasis")


def lora_file(path, *, seed: int = 0, metadata: dict[str, str] | None = None):
    """A small kohya-format LoRA (one attention projection of a UNet) at `path`."""
    rng = np.random.default_rng(seed)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{key}.lora_down.weight": rng.standard_normal((2, 8), dtype=np.float32),
               f"{key}.lora_up.weight": rng.standard_normal((8, 2), dtype=np.float32),
               f"{key}.alpha": np.array(2.0, dtype=np.float32)}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(("spec", "expected"), [
    ("style.safetensors", ("style.safetensors", 1.0)),
    ("style.safetensors:0.8", ("style.safetensors", 0.8)),
    ("style:-0.5", ("style", -0.5)),
    ("style:1e-1", ("style", 0.1)),
    (r"C:\loras\style.safetensors", (r"C:\loras\style.safetensors", 1.0)),
    (r"C:\loras\style.safetensors:0.3", (r"C:\loras\style.safetensors", 0.3)),
    ("/mnt/a:b/style.safetensors", ("/mnt/a:b/style.safetensors", 1.0)),
])
def test_lora_specs_split_on_the_last_colon_only_before_a_number(spec, expected):
    assert parse_lora(spec) == expected


def test_an_existing_file_with_a_colon_in_its_name_is_taken_whole(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lora_file(tmp_path / "v2:final")
    assert parse_lora("v2:final") == ("v2:final", 1.0)


@pytest.mark.parametrize(("spec", "fragment"), [
    ("style:abc", "must be a number, got 'abc'"),
    ("style.safetensors:", "must be a number, got ''"),
    (":0.8", "give a LoRA file or name"),
    ("style:nan", "finite"),
    ("style:inf", "finite"),
    ("style:1e400", "finite"),
])
def test_bad_lora_specs_are_one_line_errors(spec, fragment):
    with pytest.raises(InputError, match=fragment.replace("(", r"\(")):
        parse_lora(spec)


@pytest.mark.parametrize("command", GENERATING)
def test_every_generating_command_takes_the_prompt_options(command):
    result = run(command, "--help")
    assert result.exit_code == 0, result.output
    for option in PROMPT_OPTIONS:
        assert option in result.output, option


@pytest.mark.parametrize(("args", "fragment"), [
    (["--lora", "style:abc"], "the weight after the last ':' must be a number"),
    (["--lora", "missing.safetensors"], "LoRA file 'missing.safetensors' does not exist"),
    (["--lora", "style"], "unknown LoRA 'style': give a file path, or a --lora-dir"),
    (["--lora", "nope", "--lora-dir", "{loras}"], "unknown LoRA 'nope'; --lora-dir"),
    (["--lora-dir", "{loras}/a.safetensors"], "is not a folder"),
    (["--prompt-syntax", "markdown"], "unknown prompt syntax 'markdown'"),
    (["--emphasis", "loud"], "unknown emphasis 'loud'"),
])
def test_bad_prompt_options_fail_in_one_line_before_a_model_loads(args, fragment, tmp_path):
    loras = tmp_path / "loras"
    loras.mkdir()
    lora_file(loras / "a.safetensors")
    args = [arg.format(loras=loras) for arg in args]
    result = run("generate", "x", "-o", tmp_path / "x.png", "--steps", 1, *args)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(("args", "fragment"), [
    (["--lora", "style:abc"], "must be a number"),
    (["--emphasis", "loud"], "--emphasis 'loud' is not one of"),
    (["--lora", "nope", "--lora-dir", "{loras}"], "unknown LoRA 'nope'"),
])
def test_serve_refuses_bad_prompt_options_before_listening(args, fragment, tmp_path):
    loras = tmp_path / "loras"
    loras.mkdir()
    args = [arg.format(loras=loras) for arg in args]
    assert_one_line_error(run("serve", "--port", 0, *args), fragment)


def test_generate_takes_a_lora_dir_an_embeddings_dir_and_the_prompt_settings(tiny_onnx_dir,
                                                                            tmp_path):
    from tests.runtime.server.test_networks import token_table

    (tmp_path / "loras").mkdir()
    (tmp_path / "embeddings").mkdir()
    width = token_table(tiny_onnx_dir)["shape"][1]
    vectors = np.random.default_rng(0).standard_normal((2, width), dtype=np.float32)
    save_file({"emb_params": vectors}, str(tmp_path / "embeddings" / "zandor.safetensors"))
    out = tmp_path / "x.png"
    prompt = "a (red:1.2) circle, zandor BREAK blue"
    result = run("generate", prompt, "--model", tiny_onnx_dir, "-o", out, "--steps", 1,
                 "--seed", 3, "--lora-dir", tmp_path / "loras", "--embeddings-dir",
                 tmp_path / "embeddings", "--prompt-syntax", "a1111", "--emphasis", "no-norm")
    assert result.exit_code == 0, result.output
    fields = parse_parameters(Image.open(out).info["parameters"])
    assert fields["prompt"] == prompt  # the user's text, as given
    assert fields["TI hashes"].startswith("zandor: ")


def test_lora_option_and_prompt_tag_give_the_pipelines_image(tiny_onnx_dir, tmp_path):
    from sdrt.runtime.pipeline import Pipeline
    from tests.runtime.server.test_networks import fitting_lora

    folder = tmp_path / "loras"
    folder.mkdir()
    path = fitting_lora(tiny_onnx_dir, folder / "style.safetensors")
    common = ["--model", tiny_onnx_dir, "--steps", 2, "--seed", 5]
    by_option = run("generate", "a red circle", *common, "--lora", f"{path}:0.8",
                    "-o", tmp_path / "option.png")
    by_tag = run("generate", "a red circle <lora:style:0.8>", *common, "--lora-dir", folder,
                 "-o", tmp_path / "tag.png")
    assert by_option.exit_code == 0 and by_tag.exit_code == 0, by_option.output + by_tag.output
    [want] = Pipeline.load(tiny_onnx_dir).generate("a red circle", steps=2, seed=5,
                                                   loras=[(str(path), 0.8)])
    for name, prompt in (("option", "a red circle"), ("tag", "a red circle <lora:style:0.8>")):
        made = Image.open(tmp_path / f"{name}.png")
        assert np.array_equal(np.asarray(made), np.asarray(want)), name
        fields = parse_parameters(made.info["parameters"])
        assert fields["prompt"] == prompt and fields["Lora hashes"].startswith("style: ")
