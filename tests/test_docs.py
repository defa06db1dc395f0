"""The README and docs/ stay a short front door with pages that resolve, inside the repository.

Checks: README.md is at most README_MAX_LINES lines; every page the README promises exists; every
relative Markdown link in README.md and docs/ names an existing file (and, for a `#fragment`, a
heading of that page, slugged as GitHub does); every repository path and `python -m sdrt.…`
module the docs name in backticks exists; and no file points to notes outside the repository.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200
PAGES = ("models-and-export", "generation-and-samplers", "image-editing", "quantization",
         "memory", "server-api", "batch-and-ray", "benchmarks", "python-api", "architecture",
         "controlnet", "auto")
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
# Backticked paths under a top-level part (e.g. `runtime/vae/tiled.py`, `tests/fixtures/foreign/`);
# placeholders (`<name>`) and globs (`tiny_*`) are not paths.
PARTS = ("cli", "runtime", "export", "quantize", "evaluation", "benchmarks", "models", "tests",
         "docs")
CODE_PATH = re.compile(rf"`((?:{'|'.join(PARTS)})/[\w./-]*)`")
MODULE = re.compile(r"python -m (sdrt(?:\.\w+)+)")

# Notes that live outside the repository (the project's design page and research folder); the
# patterns are split so that this file does not match itself.
OUTSIDE = [re.compile(p) for p in (r"\.\./" + "shared", "DESIGN" + r"\.md", r"\bresearch" + "/",
                                   r"\busers" + r"\.md", r"\bpeers" + r"\.md\s*§")]
SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", "build", "dist",
             "outputs", "node_modules"}
MAX_TEXT_BYTES = 2 * 2**20


def _prose(path: Path) -> list[str]:
    """The lines of a Markdown file outside fenced code blocks."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _prose(path):
        match = HEADING.match(line)
        if match:
            slug = _slug(match.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _module_exists(module: str) -> bool:
    part, *rest = module.split(".")[1:]
    base = ROOT.joinpath(part, *rest)
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


@pytest.mark.parametrize("page", PAGES)
def test_docs_page_exists(page):
    assert (ROOT / "docs" / f"{page}.md").is_file()


def test_architecture_says_where_things_go():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    for question in ("A sampler", "A model family", "A backend"):
        assert f"**{question}" in text, question
    assert "[tool.sdrt.layers]" in text and "tests/test_layering.py" in text


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(doc):
    broken = []
    for line in _prose(doc):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file, _, fragment = target.partition("#")
            dest = (doc.parent / file).resolve() if file else doc
            if not dest.exists():
                broken.append(f"{target}: no such file")
            elif fragment and dest.suffix == ".md" and fragment not in _anchors(dest):
                broken.append(f"{target}: no heading #{fragment} in {dest.name}")
    assert not broken, broken


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_paths_and_modules_exist(doc):
    text = "\n".join(_prose(doc))
    missing = [p for p in CODE_PATH.findall(text)
               if not any(c in p for c in "<*") and not (ROOT / p.rstrip("/")).exists()]
    missing += [m for m in MODULE.findall(text) if not _module_exists(m)]
    assert not missing, missing


def _skipped(folder: str) -> bool:
    return folder in SKIP_DIRS or folder.startswith(".venv") or folder.endswith(".egg-info")


def _repository_text_files():
    """(relative path, text) of every UTF-8 file of the checkout, virtual envs and caches aside."""
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = sorted(d for d in subfolders if not _skipped(d))
        for name in sorted(files):
            path = Path(folder, name)
            if path.is_symlink() or path.stat().st_size > MAX_TEXT_BYTES:
                continue
            try:
                yield path.relative_to(ROOT), path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue


def test_nothing_points_outside_the_repository():
    hits = [f"{rel}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
            for rel, text in _repository_text_files()
            for pattern in OUTSIDE for m in pattern.finditer(text)]
    assert not hits, hits


def test_samplers_page_names_every_registered_sampler_and_schedule():
    """The CLI help and /sdapi/v1/samplers are generated from the registries; the prose page is
    held to them here, so a new sampler or schedule cannot go undocumented."""
    from sdrt.runtime.samplers import SAMPLERS
    from sdrt.runtime.schedules import SCHEDULES

    page = (ROOT / "docs" / "generation-and-samplers.md").read_text("utf-8")
    missing = [name for name in [*SAMPLERS, *SCHEDULES] if f"`{name}`" not in page]
    assert not missing, f"docs/generation-and-samplers.md does not name {missing}"
