"""A control dir: every exported ControlNet folder directly under it is a model named by its
folder name and titled "name [hash]" as the A1111 ControlNet extension titles its models (hash:
runtime/control/manifest.py's `control_hash`). `sdrt serve --controlnet-dir` lists these, and a
ControlUnit's `model` may name one by its name or title. The folder is scanned on each look-up,
so a ControlNet exported into it while a server runs is seen at once.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from sdrt.runtime.control.manifest import ControlManifest, is_control_export
from sdrt.runtime.errors import InputError, ModelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControlEntry:
    """One control folder of a control dir."""

    name: str  # the folder's name
    folder: Path
    hash: str  # the extension's model hash
    architecture: str  # sd1 | sd2 | sdxl

    @property
    def title(self) -> str:
        """The extension's model title: "name [hash]"."""
        return f"{self.name} [{self.hash}]"


@dataclass(frozen=True)
class ControlLibrary:
    """The control folders under `folder` (module docstring)."""

    folder: Path

    @classmethod
    def open(cls, folder: str | os.PathLike[str]) -> ControlLibrary:
        """A control dir that must exist (InputError naming it otherwise)."""
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise InputError(f"ControlNet dir '{folder}' is not a folder")
        return cls(path.resolve())

    def entries(self) -> list[ControlEntry]:
        """The control folders, by name; a folder whose manifest cannot be read is skipped
        with a warning."""
        found = []
        for child in sorted(self.folder.iterdir()):
            if not child.is_dir() or not is_control_export(child):
                continue
            try:
                manifest = ControlManifest.load(child, check_files=False)
            except ModelError as exc:
                log.warning("skipping ControlNet folder %s: %s", child.name, exc)
                continue
            found.append(ControlEntry(child.name, child, manifest.hash, manifest.architecture))
        return found

    def find(self, model: str) -> ControlEntry:
        """The entry a name or title ("name [hash]") stands for; InputError listing the known
        ones when none does."""
        entries = self.entries()
        for entry in entries:
            if model in (entry.name, entry.title):
                return entry
        known = ", ".join(entry.title for entry in entries) or "none"
        raise InputError(f"unknown ControlNet model {model!r}; the ControlNet dir has: {known}")
