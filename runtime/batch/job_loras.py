"""A batch job's LoRAs: its `loras` field read, each file found (in the `--lora-dir` the workers
load with) and read in the driver, so a bad or unknown one fails its line before anything runs;
and the A1111 `Lora hashes` its PNG must carry to verify.

The field is a list of LoRAs, each a name or path, `[name, weight]` or `[name, te, unet]`
(A1111's `<lora:NAME:te=W1:unet=W2>`). A path is made absolute, as a job's model folder is,
so a worker anywhere reads the same file; a name stays a name, looked up in the folder.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdrt.runtime.adapters.adapted import LoraFiles, LoraRequest
from sdrt.runtime.adapters.library import LoraLibrary
from sdrt.runtime.adapters.pipeline_adapters import Adapters
from sdrt.runtime.errors import InputError
from sdrt.runtime.request import GenerationRequest, lora_request


class JobLoras:
    """The LoRA folder of a batch (`load`'s `lora_dir`, if any) and the files its jobs read."""

    def __init__(self, load: Mapping[str, Any] | None) -> None:
        self.library = LoraLibrary((load or {}).get("lora_dir"))
        self._files = LoraFiles()
        self._named = {entry.path for entry in self.library.entries()}

    def parse(self, value: object) -> tuple[LoraRequest, ...]:
        """A job's `loras` field as requests, each file found (paths made absolute)."""
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise InputError(f"loras must be a list, e.g. [[\"name\", 0.8]], got "
                             f"{type(value).__name__}")
        requests = []
        for item in value:
            lora = lora_request(tuple(item) if isinstance(item, list) else item)
            path = self.library.resolve(lora.name)
            if path not in self._named:  # given as a path, not as a name in the folder
                lora = LoraRequest(str(Path(path).absolute()), lora.te, lora.unet)
            requests.append(lora)
        return tuple(requests)

    def expected(self, request: GenerationRequest) -> dict[str, Any]:
        """The `Lora hashes` a PNG of `request` carries (None without LoRAs): each file read
        and checked here, from the job's `loras` and its prompt's `<lora:…>` tags."""
        adapters = Adapters(self.library, None, files=self._files)  # LoRAs only, no embeddings,
        # so no prompt is tokenized for `TI hashes`
        return {"Lora hashes": adapters.infotext(request, tokenizer=None).get("Lora hashes")}
