"""A1111's routes for what a prompt can call on: `GET /sdapi/v1/loras` and `POST
/sdapi/v1/refresh-loras` (its built-in Lora extension), `GET /sdapi/v1/embeddings`.

The LoRAs are the files of `sdrt serve --lora-dir` (runtime/adapters/library.py), which a
prompt's `<lora:NAME:W>` tags name; the pipeline reads those tags itself, so txt2img and img2img
need nothing more here. A listed item's `path` is relative to the folder: a response never names
a filesystem path.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from sdrt.runtime.adapters.library import LoraEntry
from sdrt.runtime.server.models import ModelHost
from sdrt.runtime.server.schemas import EmbeddingsResponse, LoraItem


def add_network_routes(api: APIRouter, host: ModelHost) -> None:
    # each route reads the loaded model's adapters: a model switch replaces them

    @api.get("/sdapi/v1/loras", response_model=list[LoraItem])
    async def loras() -> list[LoraItem]:
        """The LoRA files of --lora-dir, by the names prompts use (none without one)."""
        adapters = host.pipe.adapters
        if adapters is None:
            return []
        library = adapters.loras
        return [_item(entry, library.folder) for entry in library.entries()]

    @api.post("/sdapi/v1/refresh-loras")
    async def refresh_loras() -> None:
        """Scan --lora-dir again for files added or removed since (A1111 answers null)."""
        adapters = host.pipe.adapters
        if adapters is not None:
            await run_in_threadpool(adapters.loras.refresh)

    @api.get("/sdapi/v1/embeddings", response_model=EmbeddingsResponse)
    async def embeddings() -> EmbeddingsResponse:
        """The textual-inversion embeddings of --embeddings-dir this model takes, and those
        it skipped (both empty without one)."""
        adapters = host.pipe.adapters
        if adapters is None or adapters.embeddings is None:
            return EmbeddingsResponse(loaded={}, skipped={})
        return EmbeddingsResponse.model_validate(adapters.embeddings.embeddings_response())


def _item(entry: LoraEntry, folder: Path | None) -> LoraItem:
    item = entry.to_json()
    path = Path(item["path"])
    item["path"] = (path.relative_to(folder) if folder and path.is_relative_to(folder)
                    else Path(path.name)).as_posix()
    return LoraItem.model_validate(item)
