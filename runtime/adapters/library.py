"""`--lora-dir`: the LoRA files that `<lora:NAME>` tags and request names refer to.

As in A1111, every `.safetensors` file under the folder (subfolders too) is a LoRA named by its
stem; its alias is the `ss_output_name` its kohya training metadata records, else the name. A
name a request gives is looked up by name, then by alias; a path to a file is taken as it is.
`GET /sdapi/v1/loras` lists the entries in A1111's shape, `POST /sdapi/v1/refresh-loras` scans
the folder again.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdrt.runtime.errors import InputError

log = logging.getLogger(__name__)

LORA_SUFFIX = ".safetensors"  # pickled LoRAs (.pt, .ckpt) can run code when read: never listed
LISTED_NAMES = 12  # how many names an "unknown LoRA" message lists before "and N more"


@dataclass(frozen=True)
class LoraEntry:
    """One LoRA file of the folder."""

    name: str
    path: Path
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def alias(self) -> str:
        return self.metadata.get("ss_output_name") or self.name

    def to_json(self) -> dict[str, Any]:
        """A1111's `/sdapi/v1/loras` item."""
        return {"name": self.name, "alias": self.alias, "path": str(self.path),
                "metadata": self.metadata}


class LoraLibrary:
    """The LoRA files under a folder (None: no folder, only paths resolve), rescanned on
    `refresh`; safe to share between threads."""

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = None if folder is None else Path(folder)
        if self.folder is not None and not self.folder.is_dir():
            raise InputError(f"--lora-dir '{self.folder}' is not a folder")
        self._lock = threading.Lock()
        self._entries: dict[str, LoraEntry] = {}
        self.refresh()

    def refresh(self) -> None:
        """Scan the folder again (files added or removed since)."""
        entries: dict[str, LoraEntry] = {}
        if self.folder is not None:
            for path in sorted(self.folder.rglob(f"*{LORA_SUFFIX}")):
                if path.stem in entries:
                    log.warning("LoRA %s ignored: %s has the same name", path,
                                entries[path.stem].path)
                    continue
                entries[path.stem] = LoraEntry(path.stem, path, _metadata(path))
        with self._lock:
            self._entries = entries

    def entries(self) -> list[LoraEntry]:
        with self._lock:
            return list(self._entries.values())

    def resolve(self, name: str) -> Path:
        """The file a request's LoRA name stands for: a path to a file, or a name (or alias)
        in the folder; InputError listing what the folder holds otherwise."""
        path = Path(name).expanduser()
        if path.suffix or "/" in name or "\\" in name:  # written as a path, not as a name
            if path.is_dir():
                raise _folder_given(name)
            if not path.is_file():
                raise InputError(f"LoRA file '{name}' does not exist")
            return path
        with self._lock:
            entries = dict(self._entries)
        found = entries.get(name) or next((e for e in entries.values() if e.alias == name), None)
        if found is not None:
            return found.path
        if path.is_dir():
            raise _folder_given(name)
        if self.folder is None:
            raise InputError(f"unknown LoRA '{name}': give a file path, or a --lora-dir that "
                             f"holds {name}{LORA_SUFFIX}")
        names = sorted(entries)
        held = ", ".join(names[:LISTED_NAMES]) or "no .safetensors files"
        more = f" and {len(names) - LISTED_NAMES} more" if len(names) > LISTED_NAMES else ""
        # no folder path in the line: a server sends it to its client
        raise InputError(f"unknown LoRA '{name}'; --lora-dir holds: {held}{more}")


def _folder_given(name: str) -> InputError:
    return InputError(f"LoRA '{name}' is a folder; give a .safetensors file, or the folder as "
                      "--lora-dir and a name")


def _metadata(path: Path) -> dict[str, str]:
    """The file's safetensors `__metadata__` (kohya writes its training settings there); empty
    for a file whose header cannot be read (it is refused when a request uses it)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        log.warning("LoRA %s: header unreadable (%s)", path, str(exc).splitlines()[0][:200])
        return {}
