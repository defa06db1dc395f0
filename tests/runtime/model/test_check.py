"""`sdrt check` and the checks every load runs: each corrupt or hostile model folder ends in its
own one-line `error:` and a non-zero exit, never a traceback (issue: reliability and security).

Every broken folder is the tiny export (`tiny_onnx_dir`) copied and damaged in one way; where
the damage changes a file manifest.json lists, the manifest is rewritten to match when the point
is a different check than the sha256 one (a folder a newer or hostile tool wrote consistently).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from sdrt.runtime.errors import ModelError
from sdrt.runtime.model.check import check_model
from sdrt.runtime.model.manifest import Manifest, scan_files
from sdrt.runtime.pipeline import Pipeline
from tests.cli.test_cli import assert_one_line_error, run
from tests.conftest import ROOT

onnx = pytest.importorskip("onnx")

FOREIGN = ROOT / "tests" / "fixtures" / "foreign"
LFS_POINTER = ("version https://git-lfs.github.com/spec/v1\n"
               "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
               "size 3438167536\n")
HTML_PAGE = "<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body></body></html>\n"


def _copy(source: Path, tmp_path: Path, name: str = "model") -> Path:
    folder = tmp_path / name
    shutil.copytree(source, folder, symlinks=True)
    return folder


def _relist(folder: Path) -> None:
    """manifest.json rewritten to list the files as they are now."""
    manifest = Manifest.load(folder)
    replace(manifest, files=scan_files(folder)).save(folder)


def _rewrite_graph(path: Path, edit) -> None:
    """Load an .onnx without its external data, apply `edit(model)`, write it back as bytes
    (onnx.save would touch the external files)."""
    model = onnx.load(str(path), load_external_data=False)
    edit(model)
    path.write_bytes(model.SerializeToString())


def _externalise(folder: Path, component: str = "unet") -> Path:
    """The component's weights moved to model.onnx_data (optimum's layout for big graphs)."""
    graph = folder / component / "model.onnx"
    model = onnx.load(str(graph))
    onnx.save_model(model, str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx_data", size_threshold=0)
    return graph


def _set_location(graph: Path, location: str) -> None:
    def edit(model):
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location

    _rewrite_graph(graph, edit)


def _check(folder: Path, *args):
    return run("check", folder, *args)


def _generate(folder: Path, tmp_path: Path, *args):
    return run("generate", "x", "--model", folder, "--steps", "1", "--seed", "1",
               "-o", tmp_path / "out.png", *args)


# ------------------------------------------------------------------------------ sound folders


def test_check_accepts_the_tiny_export_and_summarises_it(tiny_onnx_dir):
    result = _check(tiny_onnx_dir)
    assert result.exit_code == 0, result.output
    assert "sd1 (sdrt ONNX export)" in result.output
    assert "unet" in result.output and "variants: none" in result.output
    assert "match their sha256" in result.output


def test_check_accepts_the_embedded_model():
    result = _check(ROOT / "models" / "embedded" / "onnx")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("layout", ["optimum_onnx", "diffusers_legacy_onnx", "optimum_openvino"])
def test_check_accepts_foreign_layouts(layout):
    if layout == "optimum_openvino":
        pytest.importorskip("openvino")
    result = _check(FOREIGN / layout)
    assert result.exit_code == 0, result.output


def test_external_data_inside_the_folder_is_accepted_and_loads(tiny_onnx_dir, tmp_path):
    folder = _copy(tiny_onnx_dir, tmp_path)
    _externalise(folder)
    _relist(folder)
    assert _check(folder).exit_code == 0
    assert _generate(folder, tmp_path).exit_code == 0


def _hub_snapshot(folder: Path, repo: Path) -> Path:
    """`folder` as huggingface_hub caches it: a snapshot of symlinks into `blobs/`."""
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            blob = blobs / hashlib.sha256(path.read_bytes()).hexdigest()
            shutil.copyfile(path, blob)
            link = snapshot / path.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def test_a_hub_cache_snapshot_of_symlinks_is_accepted(tiny_onnx_dir, tmp_path):
    source = _copy(tiny_onnx_dir, tmp_path, "source")
    _externalise(source)
    _relist(source)
    snapshot = _hub_snapshot(source, tmp_path / "models--org--tiny")
    result = _check(snapshot)
    assert result.exit_code == 0, result.output
    assert _generate(snapshot, tmp_path).exit_code == 0


# ------------------------------------------------------------- broken folders: `sdrt check`

def _missing_component(folder: Path) -> None:
    shutil.rmtree(folder / "unet")


def _unknown_layout(folder: Path) -> None:
    (folder / "manifest.json").unlink()
    (folder / "unet" / "model.onnx").rename(folder / "unet" / "unet.weights")


def _truncated(folder: Path) -> None:
    path = folder / "unet" / "model.onnx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _truncated_no_manifest(folder: Path) -> None:
    (folder / "manifest.json").unlink()
    _truncated(folder)


def _lfs_pointer(folder: Path) -> None:
    (folder / "unet" / "model.onnx").write_text(LFS_POINTER)


def _html_page(folder: Path) -> None:
    (folder / "text_encoder" / "model.onnx").write_text(HTML_PAGE)


def _html_tokenizer(folder: Path) -> None:
    (folder / "tokenizer" / "vocab.json").write_text(HTML_PAGE)


def _sha256_mismatch(folder: Path) -> None:
    path = folder / "scheduler" / "scheduler_config.json"  # one digit changed: same size
    text = path.read_text()
    at = text.index('"num_train_timesteps": ') + len('"num_train_timesteps": ')
    path.write_text(text[:at] + ("2" if text[at] != "2" else "3") + text[at + 1:])


def _opset_too_new(folder: Path) -> None:
    def edit(model):
        model.opset_import[0].version = 99

    _rewrite_graph(folder / "text_encoder" / "model.onnx", edit)
    _relist(folder)


def _ir_version_too_new(folder: Path) -> None:
    def edit(model):
        model.ir_version = 99

    _rewrite_graph(folder / "vae_decoder" / "model.onnx", edit)
    _relist(folder)


def _external_traversal(folder: Path) -> None:
    graph = _externalise(folder)
    shutil.copyfile(graph.with_name("model.onnx_data"), folder.parent / "model.onnx_data")
    _set_location(graph, "../../model.onnx_data")
    _relist(folder)


def _external_absolute(folder: Path) -> None:
    graph = _externalise(folder)
    _set_location(graph, "/etc/passwd")
    _relist(folder)


def _external_symlink(folder: Path) -> None:
    graph = _externalise(folder)
    data = graph.with_name("model.onnx_data")
    outside = folder.parent / "elsewhere.bin"
    data.rename(outside)
    data.symlink_to(outside)


def _external_truncated(folder: Path) -> None:
    graph = _externalise(folder)
    data = graph.with_name("model.onnx_data")
    data.write_bytes(data.read_bytes()[:1000])
    _relist(folder)


def _config_symlink(folder: Path) -> None:
    vocab = folder / "tokenizer" / "vocab.json"
    outside = folder.parent / "vocab.json"
    vocab.rename(outside)
    vocab.symlink_to(outside)


def _dangling_symlink(folder: Path) -> None:
    merges = folder / "tokenizer" / "merges.txt"
    merges.unlink()
    merges.symlink_to(folder / ".git" / "annex" / "objects" / "merges.txt")


def _edit_index(**changes):
    def damage(folder: Path) -> None:
        path = folder / "model_index.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
        _relist(folder)

    return damage


def _bad_manifest(folder: Path) -> None:
    (folder / "manifest.json").write_text('{"format": "sdrt-manifest", ')


# name → (damage, the fragments of `sdrt check`'s one error line, those of a load's, or None
# where loads do not look: the sha256 of every file is `sdrt check`'s alone, to keep loads fast)
CASES = {
    "missing-component": (_missing_component, ["'unet/' is missing"], ["'unet/' is missing"]),
    "unknown-layout": (_unknown_layout, ["unknown layout: unet/", "unet.weights"],
                       ["unet/model.onnx is missing"]),
    "truncated": (_truncated, ["unet/model.onnx", "the manifest says", "truncated"], ...),
    "truncated-no-manifest": (_truncated_no_manifest,
                              ["unet/model.onnx is truncated or not an ONNX model"], ...),
    "lfs-pointer": (_lfs_pointer, ["unet/model.onnx' is a git-lfs pointer"], ...),
    "html-graph": (_html_page, ["text_encoder/model.onnx' is an HTML page"], ...),
    "html-vocab": (_html_tokenizer, ["tokenizer/vocab.json' is an HTML page"], ...),
    "sha256": (_sha256_mismatch, ["scheduler_config.json", "does not match its sha256"], None),
    "opset": (_opset_too_new, ["text_encoder/model.onnx", "opset 99 for domain ai.onnx",
                               "newer than ONNX Runtime"], ...),
    "ir-version": (_ir_version_too_new, ["vae_decoder/model.onnx", "IR version 99",
                                         "newer than ONNX Runtime"], ...),
    "external-traversal": (_external_traversal, ["'../../model.onnx_data', a path outside"],
                           ...),
    "external-absolute": (_external_absolute, ["'/etc/passwd', a path outside"], ...),
    "external-symlink": (_external_symlink,
                         ["unet/model.onnx_data' is a symlink that resolves outside"], ...),
    "external-truncated": (_external_truncated, ["unet/model.onnx_data is truncated", "needs"],
                           ...),
    "config-symlink": (_config_symlink,
                       ["tokenizer/vocab.json' is a symlink that resolves outside"], ...),
    "dangling-symlink": (_dangling_symlink, ["tokenizer/merges.txt' is a symlink to a missing"],
                         ...),
    "pipeline-class": (_edit_index(_class_name="EvilPipeline"),
                       ["_class_name 'EvilPipeline' is not a supported pipeline"], ...),
    "component-class": (_edit_index(unet=["diffusers", "EvilModel"]),
                        ["model_index.json unet is ['diffusers', 'EvilModel']"], ...),
    "library": (_edit_index(text_encoder=["os", "CLIPTextModel"]),
                ["text_encoder names library 'os'"], ...),
    "unknown-part": (_edit_index(payload=["subprocess", "Popen"]),
                     ["unknown part 'payload'"], ...),
    "manifest-json": (_bad_manifest, ["manifest.json", "is not valid JSON"], ...),
}  # ...: a load names it as `sdrt check` does


@pytest.fixture(params=sorted(CASES))
def broken(request, tiny_onnx_dir, tmp_path):
    damage, fragments, on_load = CASES[request.param]
    folder = _copy(tiny_onnx_dir, tmp_path)
    damage(folder)
    return folder, fragments, fragments if on_load is ... else on_load


def test_check_names_the_problem_in_one_line(broken):
    folder, fragments, _ = broken
    assert_one_line_error(_check(folder), *fragments)


def test_every_load_names_the_problem_in_one_line(broken, tmp_path):
    folder, _, on_load = broken
    result = _generate(folder, tmp_path)
    if on_load is None:  # loads do not hash gigabytes of weights: `sdrt check` does
        assert result.exit_code == 0, result.output
        return
    assert_one_line_error(result, *on_load)
    assert not (tmp_path / "out.png").exists()


def test_check_lists_every_problem_one_line_each(tiny_onnx_dir, tmp_path):
    folder = _copy(tiny_onnx_dir, tmp_path)
    _lfs_pointer(folder)
    _html_tokenizer(folder)
    _edit_index(_class_name="EvilPipeline")(folder)
    result = _check(folder)
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 3, result.output
    assert "Traceback" not in result.output


def test_check_quick_skips_only_the_hashes(tiny_onnx_dir, tmp_path):
    folder = _copy(tiny_onnx_dir, tmp_path)
    _sha256_mismatch(folder)
    assert _check(folder, "--quick").exit_code == 0
    _lfs_pointer(folder)
    assert_one_line_error(_check(folder, "--quick"), "git-lfs pointer")


def test_a_diffusers_folder_is_an_unknown_layout(tiny_sd_dir):
    assert_one_line_error(_check(tiny_sd_dir), "diffusers (PyTorch) folder",
                          "sdrt export")


def test_a_folder_left_by_an_interrupted_export(tiny_onnx_dir, tmp_path):
    folder = _copy(tiny_onnx_dir, tmp_path, ".model.partial-1234-0123abcd")
    assert_one_line_error(_check(folder), "interrupted `sdrt export`")
    with pytest.raises(ModelError, match="interrupted `sdrt export`"):
        Pipeline.load(folder)


def test_not_a_folder(tmp_path):
    assert_one_line_error(_check(tmp_path / "nope"), "does not exist")
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"\0" * 8)
    assert_one_line_error(_check(checkpoint), "single-file checkpoint")


def test_the_python_api_reports_instead_of_raising(tiny_onnx_dir, tmp_path):
    folder = _copy(tiny_onnx_dir, tmp_path)
    _lfs_pointer(folder)
    report = check_model(folder)
    assert not report.ok and len(report.problems) == 1
    with pytest.raises(ModelError, match="git-lfs pointer"):
        Pipeline.load(folder)


# ---------------------------------------------------------------------------- OpenVINO IR

@pytest.fixture
def ir_folder(tmp_path):
    pytest.importorskip("openvino")
    return _copy(FOREIGN / "optimum_openvino", tmp_path)


def test_ir_weights_symlinked_outside(ir_folder):
    weights = ir_folder / "unet" / "openvino_model.bin"
    outside = ir_folder.parent / "weights.bin"
    weights.rename(outside)
    weights.symlink_to(outside)
    assert_one_line_error(_check(ir_folder), "unet/openvino_model.bin' is a symlink that "
                          "resolves outside")
    with pytest.raises(ModelError, match="resolves outside"):
        Pipeline.load(ir_folder, backend="openvino")


def test_ir_weights_truncated(ir_folder, tmp_path):
    weights = ir_folder / "unet" / "openvino_model.bin"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert_one_line_error(_check(ir_folder), "unet/openvino_model.bin is truncated", "needs")
    result = _generate(ir_folder, tmp_path, "--backend", "openvino")
    assert_one_line_error(result, "openvino_model.bin is truncated")


def test_ir_version_too_new(ir_folder):
    xml = ir_folder / "vae_decoder" / "openvino_model.xml"
    xml.write_text(xml.read_text().replace('version="11"', 'version="99"', 1))
    assert_one_line_error(_check(ir_folder), "vae_decoder/openvino_model.xml",
                          "IR version '99'")
    with pytest.raises(ModelError, match="openvino_model.xml: its OpenVINO IR version '99'"):
        Pipeline.load(ir_folder, backend="openvino")


def test_ir_with_a_doctype_is_refused(ir_folder):
    xml = ir_folder / "unet" / "openvino_model.xml"
    text = xml.read_text()
    entity = '<!DOCTYPE net [<!ENTITY lol "lol">]>\n'
    xml.write_text(text.replace("<net ", entity + "<net ", 1))
    assert_one_line_error(_check(ir_folder), "declares a DOCTYPE")


# ------------------------------------------------------------------------------ tiny VAE folders

TINY_VAE = ROOT / "models" / "embedded" / "tiny_vae"


def _tiny_vae_copy(tmp_path: Path) -> Path:
    return _copy(TINY_VAE / "onnx", tmp_path, "tiny_vae")


def test_check_accepts_an_exported_tiny_vae_and_summarises_it():
    result = _check(TINY_VAE / "onnx")
    assert result.exit_code == 0, result.output
    first, *rest = result.output.splitlines()
    assert first.startswith("ok: onnx: tiny VAE 'taesd-shapes' for 4-channel latents, ×4 "
                            "(sdrt tiny-VAE export)"), result.output
    assert "vae_decoder" in rest[0] and "vae_encoder" in rest[0]
    assert "variants" not in result.output  # a tiny VAE has none
    listed = len(json.loads((TINY_VAE / "onnx" / "manifest.json").read_text())["files"])
    assert f"{listed} files match their sha256" in result.output


def _tiny_sha256_mismatch(folder: Path) -> None:
    path = folder / "vae_encoder" / "config.json"
    text = path.read_text()
    assert text.endswith("\n")
    path.write_text(" " + text[:-1])  # a space for the last newline: same size, other bytes


def _tiny_lfs_pointer(folder: Path) -> None:
    (folder / "vae_decoder" / "model.onnx").write_text(LFS_POINTER)


def _tiny_ir_version_too_new(folder: Path) -> None:
    _rewrite_graph(folder / "vae_decoder" / "model.onnx",
                   lambda model: setattr(model, "ir_version", 99))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = {rel: entry.to_json() for rel, entry in scan_files(folder).items()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _tiny_manifest_without_decoder(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["components"]["vae_decoder"]
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _tiny_truncated(folder: Path) -> None:
    path = folder / "vae_encoder" / "model.onnx"
    path.write_bytes(path.read_bytes()[:1000])


TINY_BROKEN = {
    "sha256": (_tiny_sha256_mismatch, ["vae_encoder/config.json", "sha256"]),
    "lfs-pointer": (_tiny_lfs_pointer, ["vae_decoder/model.onnx", "git-lfs pointer"]),
    "ir-version": (_tiny_ir_version_too_new, ["vae_decoder/model.onnx", "IR version 99"]),
    "manifest": (_tiny_manifest_without_decoder, ["component 'vae_decoder' is missing"]),
    "truncated": (_tiny_truncated, ["vae_encoder/model.onnx"]),
}


@pytest.mark.parametrize("damage", list(TINY_BROKEN))
def test_check_names_a_broken_tiny_vae_in_one_line(damage, tmp_path):
    edit, fragments = TINY_BROKEN[damage]
    folder = _tiny_vae_copy(tmp_path)
    assert _check(folder).exit_code == 0
    edit(folder)
    assert_one_line_error(_check(folder), *fragments)


def test_check_quick_on_a_tiny_vae_checks_sizes_not_hashes(tmp_path):
    folder = _tiny_vae_copy(tmp_path)
    _tiny_sha256_mismatch(folder)
    result = _check(folder, "--quick")
    assert result.exit_code == 0, result.output
    assert "4 files match their sizes in manifest.json (sha256 not checked" in result.output
    _tiny_truncated(folder)
    assert_one_line_error(_check(folder, "--quick"), "vae_encoder/model.onnx")


def test_check_quick_says_it_checked_sizes_only(tiny_onnx_dir):
    result = _check(tiny_onnx_dir, "--quick")
    assert result.exit_code == 0, result.output
    listed = len(Manifest.load(tiny_onnx_dir).files)
    assert f"{listed} files match their sizes in manifest.json (sha256 not checked" \
        in result.output


def test_a_diffusers_tiny_vae_folder_says_how_to_export_it():
    assert_one_line_error(_check(TINY_VAE / "taesd-shapes"), "diffusers AutoencoderTiny",
                          "sdrt export taesd-shapes OUT_DIR", "--vae")
