"""The installed package: pyproject.toml lists every subpackage, and a built wheel and sdist work
outside the clone.

The repository's folders become `sdrt.*` through setuptools' `package-dir`, which
`packages.find` cannot follow, so `[tool.setuptools] packages` is a hand-kept list: a subpackage
left out of it works in the editable install of a clone and is missing from every real one.

The install test builds the sdist (setuptools' PEP 517 `build_sdist`) and a wheel from each of
the source (a copy of the clone's package folders) and the sdist (`pip wheel`), installs those
in turn into one fresh venv with the base dependencies from the package index (no torch), and
runs `sdrt generate` with the default model in a folder outside the clone: the embedded model,
its tokenizer and every other file the runtime reads must come from the installed package. It
skips only when the index cannot be reached.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest itself depends on tomli before Python 3.11
    import tomli as tomllib

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
PROMPT = "a red circle on a blue background"
# What `sdrt generate` must not even try to import (the runtime's contract: no torch at run time).
HEAVY = ("torch", "diffusers", "transformers", "onnx")
# Left out of the copy the packages are built from: caches, build outputs and the generated
# models and exports .gitignore keeps out of a clone.
NOT_SOURCE = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist", "generated",
                                    "out", "*.onnx_data")
TOP_FILES = ("pyproject.toml", "README.md", "MANIFEST.in")

# Runs the `sdrt` console script's entry point with a finder in front of every other that
# records each attempt to import a HEAVY module, then prints what it saw as one JSON line.
GENERATE = """
import importlib.abc, importlib.metadata, json, sys
heavy, tried = set(sys.argv[1].split(",")), []
class Record(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in heavy:
            tried.append(name)
        return None
sys.meta_path.insert(0, Record())
(script,) = importlib.metadata.entry_points(group="console_scripts", name="sdrt")
try:
    script.load()(sys.argv[2:])
except SystemExit as stop:
    if stop.code:
        raise
import sdrt.models
print(json.dumps({"tried": tried, "model": str(sdrt.models.EMBEDDED_MODEL)}))
"""


def _listed_packages() -> set[str]:
    return set(SETUPTOOLS["packages"])


def _package_folders() -> dict[str, Path]:
    """Every folder with an `__init__.py` under the roots package-dir maps, by dotted name."""
    found = {}
    for name, root in SETUPTOOLS["package-dir"].items():
        for init in sorted((ROOT / root).rglob("__init__.py")):
            relative = init.parent.relative_to(ROOT / root)
            found[".".join((name, *relative.parts))] = init.parent
    return found


def test_every_package_folder_is_listed_in_pyproject():
    folders = _package_folders()
    missing = sorted(set(folders) - _listed_packages())
    assert not missing, (f"pyproject.toml [tool.setuptools] packages lacks {missing}: an install "
                         "would leave them out")
    absent = sorted(_listed_packages() - set(folders))
    assert not absent, f"pyproject.toml lists packages with no folder or __init__.py: {absent}"


def test_no_module_folder_lacks_an_init():
    # A folder of modules without `__init__.py` imports (as a namespace package) in the clone but
    # is no package to setuptools. The folders under models/ are data and tools run by path.
    models = ROOT / SETUPTOOLS["package-dir"]["sdrt.models"]
    bare = sorted(str(folder.relative_to(ROOT))
                  for root in SETUPTOOLS["package-dir"].values()
                  for folder in {module.parent for module in (ROOT / root).rglob("*.py")}
                  if "__pycache__" not in folder.parts and not (folder / "__init__.py").exists()
                  and (folder == models or models not in folder.parents))
    assert not bare, f"folders of modules without __init__.py (not installed): {bare}"


def _index_reachable() -> str | None:
    """None when the package index answers, else why not."""
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    try:
        with urllib.request.urlopen(f"{index}/pip/", timeout=15):
            return None
    except OSError as error:
        return f"the package index {index} cannot be reached ({error})"


def _copy_source(dest: Path) -> Path:
    dest.mkdir()
    for name in TOP_FILES:
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, dest / name)
    for root in SETUPTOOLS["package-dir"].values():
        shutil.copytree(ROOT / root, dest / root, ignore=NOT_SOURCE)
    return dest


def _clean_env() -> dict[str, str]:
    """The environment without what would let the clone or this venv leak into the new one."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _run(args: list, cwd: Path) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=_clean_env(), text=True,
                          capture_output=True, timeout=600)
    assert done.returncode == 0, (f"{' '.join(map(str, args))} failed ({done.returncode}):\n"
                                  f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def _assert_png(path: Path, steps: int) -> None:
    assert path.is_file(), f"sdrt generate wrote no {path}"
    with Image.open(path) as image:
        parameters = image.info.get("parameters", "")
    assert parameters.startswith(PROMPT) and f"Steps: {steps}," in parameters, parameters


def test_wheel_and_sdist_generate_outside_the_clone(tmp_path):
    reason = _index_reachable()
    if reason:
        pytest.skip(reason)
    source = _copy_source(tmp_path / "source")
    dist, from_sdist, elsewhere = (tmp_path / name for name in ("dist", "from_sdist", "elsewhere"))
    elsewhere.mkdir()
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], tmp_path)
    python = venv / "bin" / "python"
    pip = [python, "-m", "pip", "--disable-pip-version-check", "-q"]
    # One setuptools (what [build-system] requires) builds all three; it leaves the venv before
    # sdrt goes in, so the runs below see the base dependencies only. `pip wheel` of the sdist is
    # what `pip install sdist.tar.gz` does before installing.
    _run([*pip, "install", "setuptools>=68"], tmp_path)
    _run([python, "-c", "import sys; from setuptools import build_meta as b; "
                        "b.build_sdist(sys.argv[1])", dist], source)
    (sdist,) = dist.glob("sdrt-*.tar.gz")
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w"]
    _run([*build, dist, source], tmp_path)
    _run([*build, from_sdist, sdist], tmp_path)
    (wheel,), (sdist_wheel,) = dist.glob("sdrt-*.whl"), from_sdist.glob("sdrt-*.whl")
    _run([*pip, "uninstall", "-y", "setuptools"], tmp_path)

    names = zipfile.ZipFile(wheel).namelist()
    torch_weights = [n for n in names if n.endswith((".safetensors", ".bin", ".pt", ".ckpt"))]
    assert not torch_weights, f"the wheel carries torch weights: {torch_weights}"

    _run([*pip, "install", wheel], tmp_path)
    steps = 4
    seen = json.loads(_run([python, "-c", GENERATE, ",".join(HEAVY), "generate", PROMPT,
                            "--steps", steps, "-o", "wheel.png"], elsewhere).splitlines()[-1])
    _assert_png(elsewhere / "wheel.png", steps)
    assert not seen["tried"], f"sdrt generate tried to import {seen['tried']}"
    assert Path(seen["model"]).is_relative_to(venv), f"the model came from {seen['model']}"

    _run([*pip, "install", "--force-reinstall", "--no-deps", sdist_wheel], tmp_path)
    _run([venv / "bin" / "sdrt", "generate", PROMPT, "--steps", steps, "-o", "sdist.png"],
         elsewhere)
    _assert_png(elsewhere / "sdist.png", steps)
