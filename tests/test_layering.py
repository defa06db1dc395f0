"""The layers of sdrt as pyproject.toml's [tool.sdrt.layers] states them.

Statically (`ast`, every `import` and `from … import` statement, module level or inside a
function, relative ones resolved): each part imports only itself, the parts it lists and the
shared modules; it never imports the third-party packages it forbids; the rules have no cycle;
no module is over 500 lines. Dynamically (fresh processes): `import sdrt.runtime`, every module
under it and `sdrt generate` load none of the packages the runtime forbids.
"""

from __future__ import annotations

import ast
import graphlib
import importlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest itself depends on tomli before Python 3.11
    import tomli as tomllib

MAX_LINES = 500
LAYERS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["sdrt"]["layers"]
PARTS: dict[str, dict[str, list[str]]] = LAYERS["parts"]
SHARED: set[str] = set(LAYERS["shared"])
RUNTIME_NEVER: tuple[str, ...] = tuple(PARTS["runtime"]["never"])


@dataclass(frozen=True)
class Import:
    """One module an import statement loads, as an absolute dotted name."""

    path: Path
    line: int
    module: str

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}: {self.module}"


def _files(part: str) -> list[Path]:
    """Every .py file of a part, subfolders included (so new subpackages are seen)."""
    return sorted((ROOT / part).rglob("*.py"))


def _module_name(path: Path) -> str:
    """The installed name of a file: models/train_embedded.py -> sdrt.models.train_embedded."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(("sdrt", *(parts[:-1] if parts[-1] == "__init__" else parts)))


def _is_module(name: str) -> bool:
    """Whether a dotted sdrt name is a module or package (not a name defined in one)."""
    parts = name.split(".")
    if len(parts) < 2 or parts[0] != "sdrt" or parts[1] not in PARTS:
        return False
    base = ROOT.joinpath(*parts[1:])
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _imports(path: Path) -> Iterator[Import]:
    """Every module the file's import statements load; `from m import n` loads m, and m.n too
    where that is a module."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(path, node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            target = ".".join(p for p in (base, node.module) if p)
            yield Import(path, node.lineno, target)
            for alias in node.names:
                if _is_module(f"{target}.{alias.name}"):
                    yield Import(path, node.lineno, f"{target}.{alias.name}")


def _breach(part: str, imported: Import) -> str | None:
    """Why `part` may not make this import, or None if it may."""
    top = imported.module.split(".")
    if top[0] != "sdrt":
        return f"{part} never imports {top[0]}" if top[0] in PARTS[part].get("never", ()) else None
    if len(top) == 1 or imported.module in SHARED:
        return None
    if top[1] not in PARTS:
        return f"sdrt.{top[1]} is no part named in [tool.sdrt.layers]"
    if top[1] != part and top[1] not in PARTS[part]["imports"]:
        return f"{part} may not import {top[1]}"
    return None


def test_rules_name_real_parts():
    for part, rule in PARTS.items():
        assert (ROOT / part / "__init__.py").is_file(), f"part {part}: no package {part}/"
        assert set(rule) <= {"imports", "never"}, f"part {part}: unknown keys {sorted(rule)}"
        unknown = set(rule["imports"]) - set(PARTS)
        assert not unknown, f"part {part} imports unknown parts {sorted(unknown)}"
    for shared in SHARED:
        assert _is_module(shared), f"shared module {shared} does not exist"


def test_parts_import_each_other_in_no_cycle():
    graph = {part: rule["imports"] for part, rule in PARTS.items()}
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle


def test_every_import_keeps_to_the_layers():
    breaches = []
    for part in PARTS:
        for path in _files(part):
            shared = _module_name(path) in SHARED
            for imported in _imports(path):
                if shared and imported.module.startswith("sdrt."):
                    breaches.append(f"{imported}  (a shared module imports no part)")
                elif (why := _breach(part, imported)) is not None:
                    breaches.append(f"{imported}  ({why})")
    assert not breaches, "imports that break [tool.sdrt.layers]:\n" + "\n".join(breaches)


def test_no_module_over_500_lines():
    long = [f"{path.relative_to(ROOT)}: {n} lines" for part in PARTS for path in _files(part)
            if (n := len(path.read_text().splitlines())) > MAX_LINES]
    assert not long, f"modules over {MAX_LINES} lines:\n" + "\n".join(long)


def test_the_checker_reads_every_kind_of_import(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    folder = tmp_path / "runtime" / "vae"
    folder.mkdir(parents=True)
    (tmp_path / "runtime" / "__init__.py").write_text("")
    (folder / "__init__.py").write_text("")
    (folder / "tiled.py").write_text("")
    probe = folder / "probe.py"
    probe.write_text("from . import tiled\nfrom .. import errors\n"
                     "def f():\n    import torch.nn\n    from sdrt.export import onnx_export\n")
    found = [(i.line, i.module) for i in _imports(probe)]
    assert found == [(1, "sdrt.runtime.vae"), (1, "sdrt.runtime.vae.tiled"), (2, "sdrt.runtime"),
                     (4, "torch.nn"), (5, "sdrt.export")]
    assert _breach("runtime", Import(probe, 4, "torch.nn")) == "runtime never imports torch"
    assert _breach("runtime", Import(probe, 5, "sdrt.export")) == "runtime may not import export"
    assert _breach("runtime", Import(probe, 1, "sdrt.models")) is None
    assert _breach("runtime", Import(probe, 1, "onnxruntime")) is None


# --- in fresh processes -------------------------------------------------------------------------


def _loaded_after(code: str) -> set[str]:
    """Top-level names of every module loaded once `code` has run in a fresh interpreter."""
    probe = code + "\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                         text=True).stdout
    return {name.split(".")[0] for name in out.split()}


def test_runtime_and_every_module_under_it_load_no_forbidden_package():
    modules = sorted(_module_name(p) for p in _files("runtime"))
    # A module whose optional extra (server, ray, openvino) is not installed is passed over;
    # one that fails on a package the runtime never imports is the very failure sought.
    code = (
        "import importlib\n"
        f"for name in {modules!r} + ['sdrt.cli.main']:\n"
        "    try:\n        importlib.import_module(name)\n"
        "    except ModuleNotFoundError as exc:\n"
        f"        if (exc.name or '').split('.')[0] in {RUNTIME_NEVER + ('sdrt',)!r}:\n"
        "            raise\n"
    )
    assert not _loaded_after(code) & set(RUNTIME_NEVER)


def test_generate_command_is_torch_free(tiny_onnx_dir, tmp_path):
    code = (
        "import sys\n"
        "from sdrt.cli.main import main\n"
        f"sys.argv = ['sdrt', 'generate', 'a red circle', '--model', r'{tiny_onnx_dir}',"
        f" '--steps', '2', '--seed', '1', '-o', r'{tmp_path / 'x.png'}']\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert exc.code in (0, None), exc.code\n"
    )
    modules = _loaded_after(code)
    assert (tmp_path / "x.png").is_file()
    assert not modules & set(RUNTIME_NEVER)


def test_model_scripts_import_as_modules_and_run_as_scripts():
    for name in ("torch", "diffusers", "transformers", "safetensors"):
        pytest.importorskip(name, reason=f"{name} is not installed (pip install 'sdrt[export]')")
    files = sorted(p for p in (ROOT / "models").glob("*.py") if p.name != "__init__.py")
    for path in files:
        importlib.import_module(_module_name(path))
    for script in (p for p in files if 'if __name__ == "__main__":' in p.read_text()):
        # As documented: `python models/NAME.py …`, from the repository root.
        run = subprocess.run([sys.executable, str(script.relative_to(ROOT)), "--help"],
                             capture_output=True, text=True, cwd=ROOT)
        assert run.returncode == 0 and "usage:" in run.stdout, (script.name, run.stderr[-2000:])
