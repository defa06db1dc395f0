"""Safety rules of the runtime, read from its source (pickle files can run code when loaded):
nothing is ever unpickled, and no code is imported or looked up by a name a file could supply.

An AST scan of every module under runtime/, in the style of test_layering: no pickle-family
module, no importlib, no `__import__`/`eval`/`exec`/`compile`, no `np.load` that allows pickle,
no `getattr` on a module with a computed name, no `sys.modules[...]` lookup by a computed key.
Each rule is first shown to catch an offending line, so the scan cannot pass vacuously.
"""

from __future__ import annotations

import ast

import pytest

from tests.conftest import ROOT

RUNTIME = ROOT / "runtime"
# Modules that deserialise objects (code) or import by name; none has a place in the runtime.
FORBIDDEN_MODULES = frozenset({"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib",
                               "marshal", "shelve", "copyreg", "importlib", "pydoc", "runpy"})
# importlib.metadata reads installed packages' metadata (the server's version string), no code.
ALLOWED_MODULES = ("importlib.metadata",)
FORBIDDEN_CALLS = frozenset({"__import__", "eval", "exec", "compile"})
NUMPY_LOADERS = frozenset({"load", "read_array"})  # np.load, np.lib.format.read_array


def violations(source: str, name: str = "<source>") -> list[str]:
    """Every breach of the rules (module docstring) in one module's source."""
    tree = ast.parse(source, name)
    modules = _module_names(tree)
    found = []
    for node in ast.walk(tree):
        line = f"{name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            for imported in _imported(node):
                if imported.split(".")[0] in FORBIDDEN_MODULES \
                        and not imported.startswith(ALLOWED_MODULES):
                    found.append(f"{line}: imports {imported}")
        elif isinstance(node, ast.Call):
            found += [f"{line}: {why}" for why in _bad_call(node, modules)]
        elif isinstance(node, ast.Subscript) and _dotted(node.value) == "sys.modules" \
                and not isinstance(node.slice, ast.Constant):
            found.append(f"{line}: sys.modules looked up by a computed key")
    return found


def _imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def _module_names(tree: ast.Module) -> set[str]:
    """Local names bound to modules by `import x` / `import x as y`."""
    return {(alias.asname or alias.name).split(".")[0] for node in ast.walk(tree)
            if isinstance(node, ast.Import) for alias in node.names}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _bad_call(call: ast.Call, modules: set[str]) -> list[str]:
    func = call.func
    if isinstance(func, ast.Name) and func.id in FORBIDDEN_CALLS:
        return [f"calls {func.id}()"]
    if isinstance(func, ast.Name) and func.id == "getattr" and len(call.args) >= 2 \
            and _dotted(call.args[0]).split(".")[0] in modules \
            and not isinstance(call.args[1], ast.Constant):
        return [f"getattr({_dotted(call.args[0])}, <computed name>)"]
    if isinstance(func, ast.Attribute) and func.attr in NUMPY_LOADERS \
            and _dotted(func.value).split(".")[0] in {"np", "numpy"}:
        for keyword in call.keywords:
            if keyword.arg == "allow_pickle" and not (
                    isinstance(keyword.value, ast.Constant) and keyword.value.value is False):
                return [f"{_dotted(func)}(allow_pickle=...) may unpickle"]
    return []


OFFENDERS = {
    "import pickle": "imports pickle",
    "from pickle import loads": "imports pickle",
    "import importlib\nimportlib.import_module(name)": "imports importlib",
    "from importlib import import_module": "imports importlib",
    "cls = __import__(config['library'])": "calls __import__()",
    "eval(text)": "calls eval()",
    "import numpy as np\nnp.load(path, allow_pickle=True)": "allow_pickle",
    "import numpy as np\nnp.load(path, allow_pickle=flag)": "allow_pickle",
    "import numpy\nnumpy.lib.format.read_array(f, allow_pickle=True)": "allow_pickle",
    "import diffusers\ncls = getattr(diffusers, index['unet'][1])": "getattr(diffusers",
    "import sys\nmodule = sys.modules[config['library']]": "sys.modules",
    "import joblib": "imports joblib",
}


@pytest.mark.parametrize("source", sorted(OFFENDERS))
def test_each_rule_catches_its_offence(source):
    found = violations(source)
    assert any(OFFENDERS[source] in item for item in found), found


def test_harmless_lookalikes_pass():
    source = ("import re\nimport numpy as np\npattern = re.compile('x')\n"
              "a = np.load(path)\nb = np.load(path, allow_pickle=False)\n"
              "value = getattr(self, name)\nmode = getattr(os_flags, 'O_BINARY', 0)\n"
              "import sys\nm = sys.modules['sdrt']\n")
    assert violations(source) == []


def test_runtime_never_unpickles_nor_imports_by_name():
    modules = sorted(RUNTIME.rglob("*.py"))
    assert len(modules) > 10  # the scan sees the runtime
    found = [item for path in modules
             for item in violations(path.read_text("utf-8"), path.relative_to(ROOT).as_posix())]
    assert found == []
