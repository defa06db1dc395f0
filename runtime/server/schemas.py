"""Request and response bodies of AUTOMATIC1111's API (`modules/api/models.py`):
`StableDiffusionTxt2ImgProcessingAPI` / `…Img2Img…`, `TextToImageResponse`, `ProgressResponse`,
`SamplerItem`, `SchedulerItem`, `SDModelItem`, `EmbeddingsResponse`, and the Lora extension's
`/sdapi/v1/loras` item; plus sdrt's own health, config and error bodies.

A1111 clients send the whole processing object, so unknown fields are ignored; fields that would
change the picture in ways sdrt does not implement (face restoration, tiling, scripts, …) are
refused when set to anything but their A1111 default, never silently dropped.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

# A prompt runs in 75-token chunks, each one text-encoder call: 8000 characters (~25 chunks)
# cover any real prompt and bound the work one request can ask of the encoder.
MAX_PROMPT_CHARS = 8000
TASK_ID_PATTERN = r"^[\w()\-.:]{1,64}$"  # A1111's ids look like "task(0a1b2c…)"
MAX_INIT_IMAGES = 16  # a batch is capped by --max-batch; this bounds the decoding before that
MAX_MASK_BLUR = 64  # A1111's slider range
MAX_PADDING = 256  # A1111's "Only masked padding" slider range
MAX_NOISE_MULTIPLIER = 1.5  # A1111's "Noise multiplier for img2img" setting range


class Txt2ImgRequest(BaseModel):
    """A1111's txt2img body; omitted size, steps, guidance and sampler take the model's
    defaults (A1111 would use 512×512, 50 steps, CFG 7, Euler). Numbers are strict: a boolean
    or a string where a number belongs is refused, not read as 1."""

    model_config = ConfigDict(extra="ignore")

    prompt: str | None = Field("", max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field("", max_length=MAX_PROMPT_CHARS)
    styles: list[str] | None = Field(None, description="names of /sdapi/v1/prompt-styles, "
                                     "applied in order")
    seed: StrictInt = Field(-1, description="-1 picks a random seed; image i uses seed + i")
    subseed: StrictInt = Field(-1, description="variation seed; -1 picks one")
    subseed_strength: StrictFloat = Field(0.0, ge=0, le=1)
    seed_resize_from_w: StrictInt = Field(-1, description="> 0 with _h: the seed's noise as at "
                                          "that size")
    seed_resize_from_h: StrictInt = -1
    sampler_name: str | None = None
    sampler_index: str | None = Field(None, description="used when sampler_name is empty")
    scheduler: str | None = Field(None, description="A1111's schedule type, a name or label "
                                  "of /sdapi/v1/schedulers (any case); Automatic: the sampler's "
                                  "own")
    batch_size: StrictInt = 1
    n_iter: StrictInt = 1
    steps: StrictInt | None = None
    cfg_scale: StrictFloat | None = None
    width: StrictInt | None = None
    height: StrictInt | None = None
    denoising_strength: StrictFloat = Field(0.75, ge=0, le=1)
    # A1111's hires fix (txt2img): a second pass at hr_scale × the size
    enable_hr: StrictBool = False
    hr_scale: StrictFloat = 2.0  # HiresFix.checked says what it takes
    hr_resize_x: StrictInt = Field(0, ge=0)
    hr_resize_y: StrictInt = Field(0, ge=0)
    hr_upscaler: str | None = None
    hr_second_pass_steps: StrictInt = Field(0, ge=0)
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = Field("", max_length=MAX_PROMPT_CHARS)
    hr_negative_prompt: str | None = Field("", max_length=MAX_PROMPT_CHARS)
    hr_cfg: StrictFloat | None = None
    force_task_id: str | None = Field(None, pattern=TASK_ID_PATTERN,
                                      description="id to follow with /sdapi/v1/progress")
    # A1111 features sdrt does not implement: accepted only at their defaults.
    restore_faces: bool | None = None
    tiling: bool | None = None
    script_name: str | None = None
    alwayson_scripts: dict[str, Any] | None = None
    override_settings: dict[str, Any] | None = Field(None, description="checked as POST "
                                                     "/sdapi/v1/options checks them")

    def unsupported(self) -> list[str]:
        """The A1111 features this request asks for that sdrt does not implement (of the
        always-on scripts, ControlNet is: runtime/server/controlnet.py)."""
        scripts = [title for title in self.alwayson_scripts or {}
                   if title.lower() != "controlnet"]
        return [name for name in ("restore_faces", "tiling", "script_name") if getattr(self, name)
                ] + (["alwayson_scripts"] if scripts else [])


class Img2ImgRequest(Txt2ImgRequest):
    """A1111's img2img body: base64 init images (several: a batch, image i from init i mod n),
    optionally a mask (white = repaint; resized to the image)."""

    init_images: list[str] = Field(min_length=1, max_length=MAX_INIT_IMAGES)
    mask: str | None = None
    mask_blur: StrictInt | None = Field(4, ge=0, le=MAX_MASK_BLUR)
    inpainting_mask_invert: StrictInt = Field(0, ge=0, le=1)
    inpaint_full_res: StrictBool | StrictInt = Field(False, description="'Only masked': "
                                                     "inpaint a crop around the mask")
    inpaint_full_res_padding: StrictInt = Field(32, ge=0, le=MAX_PADDING)
    inpainting_fill: StrictInt = Field(1, ge=0, le=3, description="0 fill, 1 original, "
                                       "2 latent noise, 3 latent nothing")
    initial_noise_multiplier: StrictFloat = Field(1.0, ge=0, le=MAX_NOISE_MULTIPLIER)
    resize_mode: StrictInt = Field(0, ge=0, le=3, description="0 just resize, 1 crop and "
                                   "resize, 2 resize and fill, 3 just resize (latent upscale)")
    include_init_images: bool = False


class InterruptResponse(BaseModel):
    """A1111 answers /interrupt and /skip with an empty object."""


class ImageResponse(BaseModel):
    """A1111's TextToImageResponse / ImageToImageResponse."""

    images: list[str] = Field(description="PNGs in base64, each with A1111 `parameters` text")
    parameters: dict[str, Any] = Field(description="the request as the server read it")
    info: str = Field(description="JSON text: seeds, sizes, infotexts of the images")


class ProgressState(BaseModel):
    """A1111's `shared.state` snapshot, plus the job's place in sdrt's queue."""

    skipped: bool = False
    interrupted: bool = False
    queued: bool = Field(False, description="waiting for a worker (A1111's internal progress)")
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
    example_prompt: str | None = Field(None, description="a prompt the model knows (its "
                                       "manifest's example_prompt), for the page's placeholder")
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
