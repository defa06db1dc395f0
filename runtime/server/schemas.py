"""Request and response bodies of AUTOMATIC1111's API (`modules/api/models.py`):
`StableDiffusionTxt2ImgProcessingAPI` / `…Img2Img…`, `TextToImageResponse`, `ProgressResponse`,
`SamplerItem`, `SchedulerItem`, `SDModelItem`, `EmbeddingsResponse`, and the Lora extension's
`/sdapi/v1/loras` item; plus sdrt's own health, config and error bodies.

A1111 clients send the whole processing object, so unknown fields are ignored; fields that would
change the picture in ways sdrt does not implement (hires fix, face restoration, scripts, …) are
refused when set to anything but their A1111 default, never silently dropped.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# A prompt runs in 75-token chunks, each one text-encoder call: 8000 characters (~25 chunks)
# cover any real prompt and bound the work one request can ask of the encoder.
MAX_PROMPT_CHARS = 8000
TASK_ID_PATTERN = r"^[\w()\-.:]{1,64}$"  # A1111's ids look like "task(0a1b2c…)"


class Txt2ImgRequest(BaseModel):
    """A1111's txt2img body; omitted size, steps, guidance and sampler take the model's
    defaults (A1111 would use 512×512, 50 steps, CFG 7, Euler)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str | None = Field("", max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field("", max_length=MAX_PROMPT_CHARS)
    seed: int = Field(-1, description="-1 picks a random seed; image i uses seed + i")
    sampler_name: str | None = None
    sampler_index: str | None = Field(None, description="used when sampler_name is empty")
    scheduler: str | None = Field(None, description="A1111's schedule type, a name or label "
                                  "of /sdapi/v1/schedulers (any case); Automatic: the sampler's "
                                  "own")
    batch_size: int = 1
    n_iter: int = 1
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    force_task_id: str | None = Field(None, pattern=TASK_ID_PATTERN,
                                      description="id to follow with /sdapi/v1/progress")
    # A1111 features sdrt does not implement: accepted only at their defaults.
    enable_hr: bool | None = False
    restore_faces: bool | None = None
    tiling: bool | None = None
    subseed_strength: float | None = 0
    styles: list[str] | None = None
    script_name: str | None = None
    alwayson_scripts: dict[str, Any] | None = None
    override_settings: dict[str, Any] | None = None

    def unsupported(self) -> list[str]:
        """The A1111 features this request asks for that sdrt does not implement."""
        return [name for name in ("enable_hr", "restore_faces", "tiling", "subseed_strength",
                                  "styles", "script_name", "alwayson_scripts",
                                  "override_settings") if getattr(self, name)]


class Img2ImgRequest(Txt2ImgRequest):
    """A1111's img2img body: one base64 init image, optionally a mask (white = repaint)."""

    init_images: list[str] = Field(min_length=1, max_length=1)
    denoising_strength: float = 0.75
    mask: str | None = None
    mask_blur: int | None = 4
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    resize_mode: int = Field(0, description="0 (just resize) only")
    include_init_images: bool = False

    def unsupported(self) -> list[str]:
        return super().unsupported() + (["resize_mode"] if self.resize_mode else [])


class ImageResponse(BaseModel):
    """A1111's TextToImageResponse / ImageToImageResponse."""

    images: list[str] = Field(description="PNGs in base64, each with A1111 `parameters` text")
    parameters: dict[str, Any] = Field(description="the request as the server read it")
    info: str = Field(description="JSON text: seeds, sizes, infotexts of the images")


class ProgressState(BaseModel):
    """A1111's `shared.state` snapshot, plus the job's place in sdrt's queue."""

    skipped: bool = False
    interrupted: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    queue_position: int | None = Field(None, description="sdrt: jobs ahead of this one")


class ProgressResponse(BaseModel):
    """A1111's ProgressResponse."""

    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None


class SamplerItem(BaseModel):
    """A1111's SamplerItem; sdrt's `options` lists the schedules the sampler runs on."""

    name: str
    aliases: list[str]
    options: dict[str, Any] = {}


class SchedulerItem(BaseModel):
    """A1111's SchedulerItem (`sd_schedulers.Scheduler`): default_rho -1 where it has none."""

    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float | None = None
    need_inner_model: bool | None = None


class SDModelItem(BaseModel):
    """A1111's SDModelItem; `filename` holds the model's name, never a path."""

    model_config = ConfigDict(protected_namespaces=())

    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None = None


class SDVaeItem(BaseModel):
    """A1111's SDVaeItem; `filename` holds the VAE's name, never a path."""

    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    filename: str


class LoraItem(BaseModel):
    """An item of A1111's `/sdapi/v1/loras` (its Lora extension): the name prompts use in
    `<lora:NAME:W>`, the alias (kohya's `ss_output_name`), the file's safetensors metadata;
    `path` is relative to the server's LoRA folder, never a full path."""

    name: str
    alias: str
    path: str
    metadata: dict[str, Any]


class EmbeddingItem(BaseModel):
    """A1111's EmbeddingItem: training facts when the file records them, and its size."""

    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    shape: int = Field(description="the length of each vector")
    vectors: int = Field(description="how many vectors (tokens) the embedding stands for")


class EmbeddingsResponse(BaseModel):
    """A1111's EmbeddingsResponse: the embeddings the loaded model takes, and those it skipped
    (made for another text encoder width)."""

    loaded: dict[str, EmbeddingItem]
    skipped: dict[str, EmbeddingItem]


class Health(BaseModel):
    status: str
    queued: int
    running: int
    capacity: int


class ServerConfig(BaseModel):
    """What the web page needs to fill its form (sdrt's own endpoint)."""

    model_config = ConfigDict(protected_namespaces=())

    model: str
    default_width: int
    default_height: int
    default_steps: int
    max_pixels: int
    max_steps: int
    max_batch: int
    size_multiple: int


class ErrorBody(BaseModel):
    error: str = Field(description="the error's kind")
    detail: str = Field(description="one line saying what was wrong")
