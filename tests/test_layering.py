"""The layer rule: the runtime and `sdrt generate` never import torch, diffusers or transformers."""

import subprocess
import sys

FORBIDDEN = ("torch", "diffusers", "transformers")


def _imported_after(code: str) -> set[str]:
    probe = code + "\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                         text=True).stdout
    return {name.split(".")[0] for name in out.split()}


def test_import_runtime_is_torch_free():
    modules = _imported_after(
        "import sdrt.runtime, sdrt.runtime.pipeline, sdrt.cli.main, sdrt.runtime.samplers"
    )
    assert not modules & set(FORBIDDEN)


def test_generate_command_is_torch_free(tiny_onnx_dir, tmp_path):
    code = (
        "import sys\n"
        "from sdrt.cli.main import main\n"
        f"sys.argv = ['sdrt', 'generate', 'a red circle', '--model', r'{tiny_onnx_dir}',"
        f" '--steps', '2', '--seed', '1', '-o', r'{tmp_path / 'x.png'}']\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert exc.code in (0, None), exc.code\n"
    )
    modules = _imported_after(code)
    assert (tmp_path / "x.png").is_file()
    assert not modules & set(FORBIDDEN)
