"""What a pipeline applies per request on top of its graphs: LoRA files (from the request or the
prompt's `<lora:…>` tags) and the `--embeddings-dir` embeddings, and what it refuses.

Embeddings (Gal et al., 2022) become rows appended to each text encoder's token-embedding table
(the initializer the LoRA map names), with new ids that the prompt chunker puts where a trigger
word stands: every text-encoder session, LoRA sets' included, opens with the longer table.
`Adapters.graphs(req)` gives the denoiser and conditioner a request runs: the pipeline's own for
a request without LoRAs, else the LoRA set's (adapted.py). `infotext(req)` gives A1111's
`Lora hashes` and `TI hashes` for the PNG parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sdrt.runtime.adapters.adapted import (
    AdaptedGraphs,
    LoraFiles,
    LoraRequest,
    LoraUse,
    lora_components,
    resolve_loras,
)
from sdrt.runtime.adapters.embeddings import EmbeddingLibrary, EncoderSpec
from sdrt.runtime.adapters.library import LoraLibrary
from sdrt.runtime.adapters.lora_map import MAP_NAME, read_lora_map
from sdrt.runtime.architectures.base import refusal, require
from sdrt.runtime.conditioning import prompt_chunks
from sdrt.runtime.errors import InputError
from sdrt.runtime.model.onnx_tensors import WeightReader
from sdrt.runtime.prompts import PromptStyle
from sdrt.runtime.prompts.networks import extract_networks
from sdrt.runtime.tokenizer import ClipTokenizer

if TYPE_CHECKING:
    from sdrt.runtime.model.opened import OpenedModel
    from sdrt.runtime.request import GenerationRequest

LORA_KINDS = ("lora", "lyco")  # A1111's tag kinds for LoRA files (lyco: the LyCORIS extension's)
QUANTIZED = ("int8", "int8-hybrid", "int4")
TOKEN_TABLE = "text_model.embeddings.token_embedding"  # the CLIP module the LoRA map names
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
EMBEDDING_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}  # SDXL files' keys
Weights = Mapping[str, Mapping[str, np.ndarray]]


@dataclass
class Adapters:
    """A pipeline's LoRA library and embeddings, and the LoRA sets' graphs (built on use)."""

    loras: LoraLibrary
    refused: str | None  # why this pipeline cannot take a LoRA (None: it can)
    embeddings: EmbeddingLibrary | None = None
    base_weights: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    files: LoraFiles = field(default_factory=LoraFiles)
    adapted: AdaptedGraphs | None = None

    @classmethod
    def prepare(cls, model: OpenedModel, *, lora_dir: str | Path | None = None,
                embeddings_dir: str | Path | None = None, low_memory: bool = False) -> Adapters:
        """The library of `lora_dir`, what stops `model` from taking a LoRA at run time, and
        the embeddings of `embeddings_dir` with the token tables they lengthen."""
        adapters = cls(LoraLibrary(lora_dir), _lora_refusal(model, low_memory))
        if embeddings_dir is not None:
            adapters._load_embeddings(model, Path(embeddings_dir))
        return adapters

    def _load_embeddings(self, model: OpenedModel, folder: Path) -> None:
        require(model.architecture, "embeddings")
        if not folder.is_dir():
            raise InputError(f"--embeddings-dir '{folder}' is not a folder")
        encoders = _text_encoders(model.architecture)
        specs, tables = [], {}
        for component in encoders:
            entry = read_lora_map(model.folder / component).modules.get(TOKEN_TABLE)
            if entry is None:
                raise InputError(f"{component}: its LoRA map names no token-embedding table, "
                                 f"which embeddings extend; re-export the model")
            tables[component] = entry.initializer
            rows, width = entry.shape
            specs.append(EncoderSpec(ClipTokenizer.from_dir(model.folder / TOKENIZERS[component]),
                                     width, rows, EMBEDDING_KEYS[component]))
        self.embeddings = EmbeddingLibrary.load(folder, specs)
        for index, component in enumerate(encoders):
            extra = self.embeddings.extra_rows(index)
            if len(extra):
                graph = model.variant.graph_path(model.folder, component)
                name = tables[component]
                table = WeightReader(graph).read([name])[name]
                self.base_weights[component] = {
                    name: np.concatenate([table, extra.astype(table.dtype)])}  # (V + n, D)

    def with_embeddings(self, conditioner: Any) -> Any:
        """The conditioner finding this pipeline's embeddings' trigger words."""
        if self.embeddings is None:
            return conditioner
        count = len(conditioner.embeddings)
        return replace(conditioner, embeddings=tuple(self.embeddings.index(i)
                                                     for i in range(count)))

    def bind(self, folder: Path, graph_paths: Mapping[str, Path],
             build: Callable[[Weights], Any]) -> None:
        """How the pipeline opens its graphs with other weights (see AdaptedGraphs)."""
        if self.refused is None:
            self.adapted = AdaptedGraphs(folder, graph_paths, build, self.base_weights)

    def requested(self, req: GenerationRequest) -> tuple[LoraRequest, ...]:
        """The request's LoRAs: its `loras`, then its prompt's `<lora:…>` tags (A1111 reads
        them in the prompt only, not in the negative prompt)."""
        tags = []
        if req.prompt_syntax == "a1111":
            tags = [LoraRequest(tag.name, tag.te, tag.unet)
                    for tag in extract_networks(req.prompt)[1] if tag.kind in LORA_KINDS]
        return (*req.loras, *tags)

    def uses(self, req: GenerationRequest) -> tuple[LoraUse, ...]:
        """The request's LoRAs read and checked; InputError when this pipeline refuses them."""
        requested = self.requested(req)
        if not requested:
            return ()
        if self.refused is not None:
            raise InputError(self.refused)
        if req.deepcache is not None:
            raise InputError("LoRA at run time does not combine with DeepCache (its graphs "
                             "carry no LoRA map); drop deepcache, or fuse the LoRA at export "
                             "with `sdrt export --lora`")
        return resolve_loras(requested, self.loras, self.files)

    def graphs(self, req: GenerationRequest, own: Any) -> Any:
        """(denoiser, conditioner) for this request: `own` without LoRAs, else its set's."""
        uses = self.uses(req)
        if not uses or self.adapted is None:
            return own
        return self.adapted.graphs(uses)

    def infotext(self, req: GenerationRequest, tokenizer: ClipTokenizer) -> dict[str, str]:
        """A1111's `Lora hashes: "name: hash, …"` (the short addnet hash of each file) and
        `TI hashes` of the embeddings the prompts use (found through the first encoder)."""
        extra = {}
        uses = self.uses(req)
        if uses:
            extra["Lora hashes"] = ", ".join(f"{use.file.name}: {use.file.short_hash}"
                                             for use in uses)
        if self.embeddings is not None:
            index, style = self.embeddings.index(0), PromptStyle(req.prompt_syntax, req.emphasis)
            ids = [prompt_chunks(text, tokenizer, style, index).ids.ravel()
                   for text in (req.encoded_prompt, req.negative_prompt)]
            used = self.embeddings.used(np.concatenate(ids))
            if used:
                extra["TI hashes"] = self.embeddings.ti_hashes(used)
        return extra


def _text_encoders(architecture: Any) -> tuple[str, ...]:
    return tuple(name for name in getattr(architecture, "text_encoders", ())
                 if name in TOKENIZERS)


def _lora_refusal(model: OpenedModel, low_memory: bool) -> str | None:
    """Why `model` opened this way cannot take a LoRA at run time (None: it can)."""
    unsupported = refusal(model.architecture, "lora")
    if unsupported:
        return unsupported
    fuse = "fuse it at export with `sdrt export --lora`"
    if low_memory:
        return ("LoRA at run time does not combine with low-memory mode (the patched weights "
                f"would stay in memory beside the mapped ones); {fuse}")
    if model.precision in QUANTIZED:
        return (f"the {model.precision} variant's weights are quantized, so a LoRA cannot be "
                f"added to them at run time; use fp32, fp16 or bf16, or {fuse} and quantize")
    arch = model.architecture
    for component in lora_components(arch.denoiser_graph, getattr(arch, "text_encoders", ())):
        path = model.variant.graph_path(model.folder, component)
        if path.suffix != ".onnx":
            return (f"the {model.precision} variant's {component} is an OpenVINO IR graph, "
                    f"which a LoRA cannot be added to at run time; use fp32, or {fuse}")
        if not (model.folder / component / MAP_NAME).is_file():  # a request's error, no path
            return (f"this model's {component} has no LoRA map (exported before sdrt recorded "
                    f"one); re-export it with `sdrt export`, or {fuse}")
    return None
