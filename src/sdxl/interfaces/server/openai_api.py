"""OpenAI's Images API (`/v1`): what the `openai` Python library sends and parses, over the server's job queue.

    GET  /v1/models, /v1/models/{id}   the catalog's models as OpenAI model objects
    POST /v1/images/generations        JSON: txt2img
    POST /v1/images/edits              multipart form: img2img, or inpainting with a mask
    GET  /v1/files/images/{name}       the saved images that response_format="url" points at

The translation is plain functions (`generation_spec`, `edit_spec`, `images_response`, `stream_events`) over the
same settings dicts as the command line (`interfaces.metadata`), so an image equals `sdxl generate`'s for the same
settings and seed; the routes at the bottom only parse, submit, wait and shape.

Choices where OpenAI's models and sdxl differ:
- model: an id from /v1/models (the catalog's names); none, or one of OpenAI's own image model names
  (OPENAI_MODELS: dall-e-3, gpt-image-1, ..., which apps send unchanged), unless the catalog has a model of
  that name: the server's current model (A1111's sd_model_checkpoint, the command line's model unless POST
  /sdapi/v1/options changed it). Anything else: a 404.
- size "auto" (the default): the model's native size, 64x64 for the built-in models and 1024x1024 for any
  other (SDXL's); for edits the input image's size, rounded down to multiples of 8 (what `sdxl generate
  --init-image` does). Sides must be multiples of 8; width x height x n is bounded by --max-pixels.
- quality -> sampling steps (QUALITY_STEPS); an explicit `steps` wins. The response names the quality run.
- background: sdxl makes opaque images: "transparent" is refused, "auto" reports "opaque".
- output_format png (with the infotext chunks `sdxl generate` writes), jpeg or webp (the infotext in the EXIF
  UserComment, as AUTOMATIC1111 writes it); output_compression is their quality (100, the default: best;
  lossless for webp) and is ignored for png.
- response_format "url" points at the saved PNG under --outputs (a 400 with --no-save); jpeg / webp URLs are
  converted from it when fetched. The default is b64_json.
- edits: one image; a mask (a PNG whose fully transparent pixels, alpha 0, are repainted, as OpenAI reads masks)
  inpaints at strength 1.0 and keeps every other pixel exactly (mask_blur 0 unless given); without a mask the
  whole image is redrawn (img2img) at strength 0.75. Both strengths can be set with `strength`.
- n: one pipeline call of n images (`sdxl generate --batch n`), 1..--max-batch; with a `seed`, image i has
  seed + i, else the seed is random.
- streaming (stream=true): partial_images (0..3) previews of the first image at evenly spaced steps, enlarged
  to the output size, then one `*.completed` event per image (OpenAI's events carry no image index). A job that
  fails after the stream began ends it with an `error` event, which the openai library raises as APIError.
- usage: sdxl counts no tokens; the fields are there (zeros) because clients read them.
- sdxl's own fields (the library's extra_body; form fields for edits): negative_prompt, seed, steps, cfg_scale,
  sampler, schedule (our ids or AUTOMATIC1111's names), loras (["name:weight", {"name": ..., "weight": ...}],
  names from --lora-dir only), and for edits strength and mask_blur. Unknown fields are refused (a 400
  naming them), as OpenAI refuses them, so a misspelt extra field is never ignored in silence.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import a1111, errors, metadata
from . import responses as web
from . import a1111_images as images
from .a1111_api import RequestError, seed_of
from .catalog import Model, UnknownModel
from .jobs import DONE, FAILED, QUEUED, RUNNING, Call, Job, Output, Spec
from .work import default_settings, make_calls

log = logging.getLogger("sdxl.server")

# Sampling steps per OpenAI quality: about what SDXL needs for a draft (15), a good image (25) and the most
# that still helps (40); xhigh and max (the newest GPT image models') go a little further. "auto" and DALL-E's
# "standard" are medium, its "hd" is high.
QUALITY_STEPS = {"low": 15, "medium": 25, "high": 40, "xhigh": 50, "max": 60, "auto": 25, "standard": 25, "hd": 40}
QUALITY_RUN = {"auto": "medium", "standard": "medium", "hd": "high"}  # the quality a response names
Quality = Literal["low", "medium", "high", "xhigh", "max", "auto", "standard", "hd"]
FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"), "webp": ("WEBP", "image/webp")}
# OpenAI's image models: apps and plugins written for OpenAI send these names (many with no way to change them).
OPENAI_MODELS = ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5", "chatgpt-image-latest")
MAX_PARTIAL_IMAGES = 3  # OpenAI's bound
POLL_SECONDS = 0.05  # how often a stream looks at its job (the workers update it from their threads)
DISCONNECT_POLLS = 5  # a stream asks whether its client is still there every 5 polls (0.25 s, as `Server.run`)
EDIT_STRENGTH = 0.75  # img2img without a mask (A1111's default denoising strength)
INPAINT_STRENGTH = 1.0  # with a mask: the masked pixels are drawn anew, as OpenAI's edits are
INPAINT_FILL = "fill"  # A1111's default masked content
SIZE = re.compile(r"(\d+)\s*x\s*(\d+)")
SAVED_NAME = re.compile(r"(\d+)\.(png|jpeg|jpg|webp)")  # the numbered files `outputs.Target` writes
USER_COMMENT = 0x9286  # the EXIF tag A1111 stores its infotext in for JPEG / WebP
EXIF_IFD = 0x8769
MAX_FORM_FILES = 4  # image, mask (and a refused image[] or markup): more is not an edit request
USAGE = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}, "output_tokens": 0,
         "total_tokens": 0}
OPTION_FIELDS = {"width": "size", "height": "size", "batch": "n", "cfg": "cfg_scale",
                 "init_image": "image"}  # GenerationOptions' names that differ from the request's
REFUSED = {  # OpenAI fields asking for what sdxl does not make
    "frame_count": "sdxl makes still images, not GIFs",
    "frame_duration_ms": "sdxl makes still images, not GIFs",
    "svg": "sdxl makes raster images, not SVG",
    "markup": "sdxl reads no markup image: give a mask (transparent where the image is to change)",
}


class ModelNotFound(RequestError):
    """A model that is not listed: OpenAI's 404 (type invalid_request_error, code model_not_found)."""

    kind, code = "invalid_request_error", "model_not_found"

    def __init__(self, message: str):
        super().__init__(message, 404, "model")


# -- request bodies


class Lora(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    weight: float = 1.0


class ImageRequest(BaseModel):
    """The fields generations and edits share: OpenAI's, then sdxl's own (the client's extra_body)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str
    model: str | None = None
    n: int | None = 1
    size: str | None = "auto"
    quality: Quality | None = "auto"
    response_format: Literal["url", "b64_json"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = "png"
    output_compression: int | None = Field(None, ge=0, le=100)
    background: Literal["auto", "opaque", "transparent"] | None = None
    stream: bool | None = False
    partial_images: int | None = Field(None, ge=0, le=MAX_PARTIAL_IMAGES)
    user: str | None = None  # accepted and ignored: safety identifiers and moderation are OpenAI's business
    safety_identifier: str | None = None
    moderation: Literal["low", "auto"] | None = None
    complexity: Literal["low", "medium", "high"] | None = None
    frame_count: Any = None  # REFUSED
    frame_duration_ms: Any = None
    svg: Any = None
    # sdxl's own
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    sampler: str | None = None
    schedule: str | None = None
    loras: list[str | Lora] | None = None

    @field_validator("loras", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        """One form field "a:0.5,b" (a form has no lists but repeated fields) -> ["a:0.5", "b"]."""
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value


class Generate(ImageRequest):
    """POST /v1/images/generations."""

    style: Literal["vivid", "natural"] | None = None  # DALL-E 3's; ignored


class Edit(ImageRequest):
    """POST /v1/images/edits, less its files (image, mask)."""

    input_fidelity: Literal["high", "low"] | None = None  # ignored: the mask and strength decide what changes
    strength: float | None = None  # sdxl's: EDIT_STRENGTH without a mask, INPAINT_STRENGTH with one
    mask_blur: float | None = None


# -- request -> settings (the command line's)


def _bounded(name: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise RequestError(f"{name} must be in {low}..{high}, got {value}", field=name)
    return value


def parse_size(text: str | None) -> tuple[int, int] | None:
    """"WIDTHxHEIGHT" -> (width, height); "auto" or None -> None (the caller's native size)."""
    if text is None or text.strip().lower() == "auto":
        return None
    match = SIZE.fullmatch(text.strip().lower())
    if match is None:
        raise RequestError(f"size must be 'auto' or WIDTHxHEIGHT in pixels (e.g. 1024x1024), got {text!r}",
                           field="size")
    width, height = int(match[1]), int(match[2])
    if width < 8 or height < 8 or width % 8 or height % 8:
        raise RequestError(f"size {text!r}: width and height must be positive multiples of 8 pixels", field="size")
    return width, height


def find_model(name: str | None, server) -> Model:
    """The request's model among the listed ones; none, or an OpenAI model name the catalog does not list: the
    server's current model."""
    current = server.options["sd_model_checkpoint"]
    wanted = name or current
    try:
        return server.catalog.find(wanted)
    except UnknownModel:
        if wanted.strip().lower() in OPENAI_MODELS:
            return server.catalog.find(current)
        names = ", ".join(repr(m.name) for m in server.catalog.models())
        raise ModelNotFound(f"the model {wanted!r} does not exist on this server; GET /v1/models lists them "
                            f"({names})") from None


def lora_entries(loras: list[str | Lora | dict] | None) -> list[tuple[str, float, float]]:
    """["name:weight" or {"name", "weight"}] -> settings["loras"] entries (name, U-Net weight, text-encoder
    weight), as `sdxl generate --lora name:weight` makes them; names only (the server reads its LoRA folders)."""
    entries = []
    for given in loras or ():
        try:
            if isinstance(given, str):
                name, sep, weight = given.rpartition(":")
                entry = Lora(name=name, weight=float(weight)) if sep else Lora(name=given)
            else:
                entry = given if isinstance(given, Lora) else Lora.model_validate(given)
        except ValueError:  # a weight that is no number (pydantic's ValidationError is a ValueError too)
            raise RequestError(f"loras: expected NAME, NAME:WEIGHT or {{name, weight}}, got {given!r}",
                               field="loras") from None
        if not entry.name.strip() or any(c in entry.name for c in "/\\") or entry.name.startswith("."):
            raise RequestError(f"loras: {entry.name!r} is not a LoRA name (GET /sdapi/v1/loras lists them; "
                               "paths are not accepted)", field="loras")
        entries.append((entry.name.strip(), entry.weight, entry.weight))
    return entries


def _sampler(body: ImageRequest, s: dict[str, Any]) -> tuple[str, str]:
    """(sampler, schedule) in our ids from our ids or A1111's names; the command line's defaults otherwise."""
    if body.sampler is None and body.schedule is None:
        return s["sampler"], s["schedule"]
    try:
        sampler, schedule = a1111.from_a1111(body.sampler or s["sampler"], body.schedule)
    except a1111.UnknownName as e:
        raise RequestError(f"{e.kind}: {e}", field=e.kind) from None
    return sampler, schedule


def refuse(body: ImageRequest) -> None:
    for name, why in REFUSED.items():
        if getattr(body, name, None) not in (None, "", [], {}):
            raise RequestError(f"{name}: {why}", field=name)
    if body.background == "transparent":
        raise RequestError("background 'transparent': sdxl makes opaque images (use 'opaque' or 'auto')",
                           field="background")


def settings_of(body: ImageRequest, server, size: tuple[int, int]) -> dict[str, Any]:
    """The settings of a request (`interfaces.metadata`) before any image, from `default_settings`."""
    refuse(body)
    c = server.config
    if body.response_format == "url" and c.outputs is None:
        raise RequestError("response_format 'url': this server saves no images (--no-save); ask for b64_json",
                           field="response_format")
    s = default_settings()
    sampler, schedule = _sampler(body, s)
    steps = body.steps if body.steps is not None else QUALITY_STEPS[body.quality or "auto"]
    s.update(prompt=body.prompt, negative_prompt=body.negative_prompt or "", width=size[0], height=size[1],
             steps=_bounded("steps", steps, 1, c.max_steps), batch=_bounded("n", body.n or 1, 1, c.max_batch),
             seed=seed_of(body.seed), sampler=sampler, schedule=schedule, refiner_switch=None,
             loras=lora_entries(body.loras))
    if body.cfg_scale is not None:
        s["cfg"] = float(body.cfg_scale)
    return s


def calls_of(s: dict[str, Any], server, pictures: dict | None = None, **extra) -> list[Call]:
    """`make_calls` for one call of n images, its OptionErrors naming the request's fields."""
    from ...options import OptionError

    try:
        return make_calls(s, 1, server, pictures, **extra)
    except OptionError as e:
        raise RequestError(str(e), field=OPTION_FIELDS.get(e.field, e.field)) from None


def generation_spec(body: Generate, server) -> Spec:
    model = find_model(body.model, server)
    s = settings_of(body, server, parse_size(body.size) or (model.native_size(),) * 2)
    return Spec("generations", model, calls_of(s, server))


def read_image(data: bytes, field: str, max_pixels: int) -> Any:
    """An upload as the pipeline reads images (RGB, upright); a 400 naming `field` if it is none or too big."""
    from ...images import load_image

    try:
        return load_image(data, what=field, max_pixels=max_pixels)
    except ValueError as e:
        raise RequestError(str(e), field=field) from None


def read_mask(data: bytes, size: tuple[int, int], max_pixels: int) -> Any:
    """OpenAI's mask (a PNG, alpha 0 where the image is to change) -> sdxl's (grey, white = repaint)."""
    import numpy as np
    from PIL import Image

    read_image(data, "mask", max_pixels)  # a readable image within the bounds
    with Image.open(io.BytesIO(data)) as im:
        if im.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and "transparency" not in im.info:
            raise RequestError("mask: the mask has no alpha channel; give a PNG whose fully transparent pixels "
                               "(alpha 0) mark where the image is to change", field="mask")
        if im.size != size:
            raise RequestError(f"mask: {im.width}x{im.height}, not the image's size {size[0]}x{size[1]}",
                               field="mask")
        alpha = np.asarray(im.convert("RGBA").getchannel("A"))
    if not (alpha == 0).any():
        raise RequestError("mask: no pixel is fully transparent (alpha 0), so nothing would change", field="mask")
    return Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8), "L")


def edit_spec(body: Edit, image: bytes, mask: bytes | None, server) -> Spec:
    """img2img of `image`, or inpainting where `mask` is transparent (the rest of the image kept as it was)."""
    model = find_model(body.model, server)
    limit = server.config.max_pixels
    init = read_image(image, "image", limit)
    size = parse_size(body.size) or (init.width // 8 * 8, init.height // 8 * 8)
    if min(size) < 8:
        raise RequestError(f"image: {init.width}x{init.height} is smaller than 8x8 pixels", field="image")
    s = settings_of(body, server, size)
    repaint = read_mask(mask, init.size, limit) if mask is not None else None
    init = images.resize_mode(init, 0, *size)
    if repaint is None:
        s.update(strength=body.strength if body.strength is not None else EDIT_STRENGTH, init_image="image")
        return Spec("edits", model, calls_of(s, server, {"init_image": init, "mask": None}))
    repaint = images.resize_mode(repaint.convert("RGB"), 0, *size).convert("L")
    blur = float(body.mask_blur or 0.0)
    s.update(strength=body.strength if body.strength is not None else INPAINT_STRENGTH, init_image="image",
             mask="mask", mask_blur=blur)

    def keep_the_rest(results: list) -> list:
        return [images.overlay(r, init, repaint, blur) for r in results]

    calls = calls_of(s, server, {"init_image": init, "mask": repaint}, inpaint_fill=INPAINT_FILL)
    for call in calls:
        call.finish = keep_the_rest
    return Spec("edits", model, calls)


# -- the edit form (multipart, as the openai library writes it)


def form_fields(items: list[tuple[str, str]]) -> dict[str, Any]:
    """A form's text fields -> a dict for `Edit`: repeated "key[]" -> a list, "key[][sub]" -> a list of dicts
    (the library's encoding of lists in extra_body), anything else as given."""
    fields: dict[str, Any] = {}
    columns: dict[str, dict[str, list[str]]] = {}
    for key, value in items:
        nested = re.fullmatch(r"(\w+)\[\]\[(\w+)\]", key)
        if nested:
            columns.setdefault(nested[1], {}).setdefault(nested[2], []).append(value)
        elif key.endswith("[]"):
            fields.setdefault(key[:-2], []).append(value)
        else:
            fields[key] = value
    for key, table in columns.items():
        rows = max(len(values) for values in table.values())
        fields[key] = [{sub: values[i] for sub, values in table.items() if i < len(values)} for i in range(rows)]
    return fields


def parse_edit(fields: dict[str, Any]) -> Edit:
    """Form fields -> Edit; a RequestValidationError (a 400 naming the field) as for a JSON body."""
    try:
        return Edit.model_validate(fields)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None


def edit_files(files: dict[str, list[bytes]]) -> tuple[bytes, bytes | None]:
    """(image, mask) from the uploads: exactly one image (`image` or `image[]`), at most one mask."""
    given = files.get("image", []) + files.get("image[]", [])
    if not given:
        raise RequestError("image: upload the image to edit (a multipart file field 'image')", field="image")
    if len(given) > 1:
        raise RequestError(f"image: sdxl edits one image per request, got {len(given)}", field="image")
    masks = files.get("mask", [])
    if len(masks) > 1:
        raise RequestError("mask: give one mask", field="mask")
    if files.get("markup"):
        raise RequestError(f"markup: {REFUSED['markup']}", field="markup")
    unknown = sorted(set(files) - {"image", "image[]", "mask", "markup"})
    if unknown:
        raise RequestError(f"{unknown[0]}: an unexpected file (edits take 'image' and 'mask')", field=unknown[0])
    return given[0], masks[0] if masks else None


async def read_form(request: Request) -> tuple[dict[str, Any], dict[str, list[bytes]]]:
    """(text fields for `parse_edit`, uploaded files by field name) of a multipart request."""
    if not request.headers.get("content-type", "").startswith(("multipart/form-data",
                                                               "application/x-www-form-urlencoded")):
        raise RequestError("edits take a multipart/form-data body (image and mask as files), as the openai "
                           "library sends it")
    items, files = [], {}
    async with request.form(max_files=MAX_FORM_FILES) as form:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.setdefault(key, []).append(await value.read())
            elif key.removesuffix("[]") in ("image", "mask", "markup"):
                raise RequestError(f"{key}: expected an uploaded file, got a text field", field=key)
            else:
                items.append((key, value))
    return form_fields(items), files


# -- job -> response


def encode(image: Any, png: bytes, infotext: str, fmt: str, compression: int | None) -> bytes:
    """An output in the requested format: the stored PNG as it is, else JPEG / WebP with the infotext in the
    EXIF UserComment (as A1111 writes it) at quality `compression` (100: the best; lossless WebP)."""
    if fmt == "png":
        return png
    from PIL import Image

    quality = 100 if compression is None else compression
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = b"UNICODE\0" + infotext.encode("utf-16-be")
    buffer = io.BytesIO()
    extra = {"lossless": True} if fmt == "webp" and quality == 100 else {}
    image.convert("RGB").save(buffer, format=FORMATS[fmt][0], quality=quality, exif=exif, **extra)
    return buffer.getvalue()


def _format(body: ImageRequest) -> str:
    return body.output_format or "png"


def described(job: Job, body: ImageRequest) -> dict[str, Any]:
    """What every response and event says about the images."""
    first = job.spec.calls[0].settings
    return {"background": "opaque", "output_format": _format(body),
            "quality": QUALITY_RUN.get(body.quality or "auto", body.quality or "auto"),
            "size": f"{first['width']}x{first['height']}"}


def image_url(base_url: str, output: Output, body: ImageRequest) -> str:
    fmt = _format(body)
    stem = output.path.rsplit(".", 1)[0]
    query = f"?compression={body.output_compression}" if fmt != "png" and body.output_compression is not None else ""
    return f"{base_url.rstrip('/')}/v1/files/images/{stem}.{fmt}{query}"


def images_response(job: Job, body: ImageRequest, base_url: str) -> dict[str, Any]:
    """OpenAI's ImagesResponse for a finished job."""
    data = []
    for output in job.outputs:
        if body.response_format == "url" and output.path:
            data.append({"url": image_url(base_url, output, body), "revised_prompt": None})
        else:
            raw = encode(output.image, output.png, output.infotext, _format(body), body.output_compression)
            data.append({"b64_json": base64.b64encode(raw).decode("ascii"), "revised_prompt": None})
    return {"created": int(job.created), "data": data, **described(job, body), "usage": USAGE}


def finished(job: Job) -> None:
    """Raise what a job that made no images ended with (its error, or a 503 when it was cancelled)."""
    if job.state == FAILED:
        raise job.error
    if job.state != DONE and not job.outputs:
        raise RequestError("the job was cancelled (the server is stopping, or the client went away)", 503)


def saved_image(folder: Path | None, name: str, compression: int | None) -> tuple[bytes, str]:
    """(bytes, media type) of a saved image by its URL name ("00012.png", "00012.jpeg"): only the numbered PNGs
    the server writes into --outputs itself, converted on the fly for jpeg / webp."""
    if folder is None:
        raise RequestError("this server saves no images (--no-save): there are no image URLs")
    match = SAVED_NAME.fullmatch(name)
    path = folder / f"{match[1]}.png" if match else None
    if path is None or path.is_symlink() or not path.is_file():
        raise RequestError(f"no image {name!r} (image URLs name the images this server saved)", 404)
    png = path.read_bytes()
    fmt = "jpeg" if match[2] == "jpg" else match[2]
    if fmt == "png":
        return png, FORMATS["png"][1]
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        im.load()
        return encode(im, png, im.info.get(metadata.TEXT_KEY, ""), fmt, compression), FORMATS[fmt][1]


# -- streaming


def partial_steps(count: int, total: int) -> list[int]:
    """The steps after which partial images are sent: `count` evenly spaced ones before the last step (whose
    image is the final one), fewer when there are too few steps."""
    if total < 2:
        return []
    return sorted({min(total - 1, max(1, round(total * (k + 1) / (count + 1)))) for k in range(count)})


def sse(kind: str, payload: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"


def _partial_b64(png: bytes, size: str, body: ImageRequest) -> str:
    """A preview (at latent size, for the linear previews) enlarged to the output size, in the output format."""
    from PIL import Image

    width, height = (int(v) for v in size.split("x"))
    with Image.open(io.BytesIO(png)) as im:
        big = im.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    big.save(buffer, format="PNG")
    raw = encode(big, buffer.getvalue(), "", _format(body), body.output_compression)
    return base64.b64encode(raw).decode("ascii")


async def _partials(server, job: Job, body: ImageRequest, prefix: str, gone: Callable[[], Awaitable[bool]]):
    """The partial-image events while the job runs (previews of its first image); cancels it if the client goes."""
    about, wanted, sent, polls = described(job, body), body.partial_images or 0, 0, 0
    while job.state in (QUEUED, RUNNING):
        targets = partial_steps(wanted, job.steps) if job.steps and job.call_no == 0 else []
        if sent < len(targets) and job.step >= targets[sent] and job.denoised is not None:
            png = await asyncio.to_thread(server.preview_png, job)
            if png and job.state == RUNNING:
                b64 = await asyncio.to_thread(_partial_b64, png, about["size"], body)
                yield sse(f"{prefix}.partial_image", {"type": f"{prefix}.partial_image", "b64_json": b64,
                                                      "created_at": int(time.time()), "partial_image_index": sent,
                                                      **about})
                sent += 1
                continue
        polls += 1
        if polls % DISCONNECT_POLLS == 0 and await gone():
            server.queue.cancel(job)
            return
        await asyncio.sleep(POLL_SECONDS)


def error_event(e: BaseException) -> str:
    """OpenAI's `error` event (its error shape, app.py's statuses): the openai library raises it as APIError."""
    status, message = web._status(e)
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return sse("error", {"type": "error", "error": {"message": errors.one_line(message), "type": kind,
                                                    "param": getattr(e, "field", None), "code": None}})


async def stream_events(server, job: Job, body: ImageRequest, prefix: str,
                        gone: Callable[[], Awaitable[bool]]) -> AsyncIterator[str]:
    """Server-sent events as OpenAI streams images: `{prefix}.partial_image` events, then one
    `{prefix}.completed` per image (prefix: image_generation or image_edit); an `error` event if the job fails."""
    try:
        async for event in _partials(server, job, body, prefix, gone):
            yield event
        if job.cancel_flag.is_set() and job.state in (QUEUED, RUNNING):
            return  # the client went away: nobody reads on
        await job.wait_async()
        server.metrics.observe(time.time() - job.created)
        try:
            finished(job)
        except Exception as e:  # noqa: BLE001 (the status line went out already: the error goes in the stream)
            yield error_event(e)
            return
        about = described(job, body)
        for output in job.outputs:
            raw = await asyncio.to_thread(encode, output.image, output.png, output.infotext, _format(body),
                                          body.output_compression)
            yield sse(f"{prefix}.completed", {"type": f"{prefix}.completed", "b64_json": base64.b64encode(raw).decode(),
                                              "created_at": int(time.time()), "usage": USAGE, **about})
    finally:
        if job.state in (QUEUED, RUNNING):  # the client went away mid-stream
            server.queue.cancel(job)


# -- routes: parse, submit, wait, shape


class OpenAIRoute(APIRoute):
    """Errors a route raises become OpenAI's error shape here, with app.py's statuses (`web._status`), rather
    than in app.py's catch-all handler: Starlette runs that one after re-raising, which closes the client's
    keep-alive connection (its next request then fails). A missing model gets OpenAI's own type and code.
    Request validation and HTTP errors go on to app.py's handlers, which answer without closing anything."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except (RequestValidationError, StarletteHTTPException):
                raise
            except ModelNotFound as e:
                return JSONResponse({"error": {"message": str(e), "type": e.kind, "param": e.field, "code": e.code}},
                                    status_code=e.status, headers={"x-should-retry": "false"})
            except Exception as e:  # noqa: BLE001 (every failure answers in OpenAI's shape; bugs are logged)
                return error_response(request, e)

        return route


def error_response(request: Request, e: Exception) -> JSONResponse:
    status, message = web._status(e)
    if status == 500:
        log.error("request %s failed", request.url.path, exc_info=e)
    return web.error_response(request, status, errors.one_line(message), getattr(e, "field", None))


def model_object(model: Model) -> dict[str, Any]:
    try:
        created = int(model.path.stat().st_mtime)
    except OSError:
        created = 0
    return {"id": model.name, "object": "model", "created": created, "owned_by": "sdxl"}


async def answer(server, request: Request, spec: Spec, body: ImageRequest, prefix: str) -> Response:
    """The job's images as one JSON response, or (stream=true) as server-sent events while it runs."""
    if body.stream:
        job = server.submit(spec)  # a full queue is a 429 before the stream begins
        return StreamingResponse(stream_events(server, job, body, prefix, request.is_disconnected),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    job = await server.run(spec, request.is_disconnected)
    finished(job)
    return JSONResponse(await asyncio.to_thread(images_response, job, body, str(request.base_url)))


def router(server) -> APIRouter:
    api = APIRouter(prefix="/v1", tags=["OpenAI"], route_class=OpenAIRoute)

    @api.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_object(m) for m in server.catalog.models()]}

    @api.get("/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        return model_object(find_model(model_id, server))

    @api.post("/images/generations")
    async def generations(body: Generate, request: Request) -> Response:
        return await answer(server, request, generation_spec(body, server), body, "image_generation")

    @api.post("/images/edits")
    async def edits(request: Request) -> Response:
        fields, files = await read_form(request)
        body = parse_edit(fields)
        image, mask = edit_files(files)
        return await answer(server, request, edit_spec(body, image, mask, server), body, "image_edit")

    @api.get("/files/images/{name}")
    async def image_file(name: str, compression: int | None = Query(None, ge=0, le=100)) -> Response:
        data, media = await asyncio.to_thread(saved_image, server.config.outputs, name, compression)
        return Response(data, media_type=media)

    return api
