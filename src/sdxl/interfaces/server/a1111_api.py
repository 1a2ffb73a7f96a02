"""AUTOMATIC1111's `/sdapi/v1` API: request bodies -> jobs, jobs -> its response shapes.

The translation is plain functions (`txt2img_spec`, `img2img_spec`, `info`) over the same settings dicts as
the command line (`interfaces.metadata`); the routes at the bottom only parse, submit, wait and shape.
Fields asking for what sdxl does not do (face restoration, tiling, ESRGAN upscalers, scripts) are refused
with a 400 naming the field, never skipped in silence; unknown fields and nulls are accepted, as clients send
every field every time.
"""

from __future__ import annotations

import base64
import json
import random
import time
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from .. import a1111, metadata
from . import a1111_images as images
from .jobs import Job, Spec
from .work import default_settings, make_calls

DEFAULT_SAMPLER = "Euler"  # A1111's API default (sampler_index)
MAX_N_ITER = 100  # A1111's slider; a request also makes at most 4 x --max-batch images (n_iter x batch_size)


class RequestError(ValueError):
    """A request asks for something that cannot be done: a 400 (404 for a missing name) naming the field."""

    def __init__(self, message: str, status: int = 400, field: str | None = None):
        super().__init__(message)
        self.status, self.field = status, field


class Txt2Img(BaseModel):
    """AUTOMATIC1111's txt2img request (the fields sdxl reads; any other is accepted and ignored)."""

    model_config = ConfigDict(extra="allow")
    prompt: str | None = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int | None = -1
    subseed: int | None = -1
    subseed_strength: float | None = 0.0
    seed_resize_from_h: int | None = -1
    seed_resize_from_w: int | None = -1
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int | None = 1
    n_iter: int | None = 1
    steps: int | None = 50
    cfg_scale: float | None = 7.0
    width: int | None = 512
    height: int | None = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    eta: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    denoising_strength: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool | None = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    enable_hr: bool | None = False
    hr_scale: float | None = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int | None = 0
    hr_resize_x: int | None = 0
    hr_resize_y: int | None = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = ""
    hr_negative_prompt: str | None = ""
    script_name: str | None = None
    script_args: list | None = None
    alwayson_scripts: dict[str, Any] | None = None
    send_images: bool | None = True
    save_images: bool | None = False


class Img2Img(Txt2Img):
    """AUTOMATIC1111's img2img request."""

    init_images: list[str] | None = None
    resize_mode: int | None = 0
    denoising_strength: float | None = 0.75
    mask: str | None = None
    mask_blur: float | None = 4
    inpainting_fill: int | None = 0
    inpaint_full_res: bool | None = True
    inpaint_full_res_padding: int | None = 0
    inpainting_mask_invert: int | None = 0
    initial_noise_multiplier: float | None = None
    include_init_images: bool | None = False


class PngInfo(BaseModel):
    image: str


# -- refusals: what sdxl does not do


UNSUPPORTED = (  # (field, is it asked for?, what to do instead)
    ("restore_faces", lambda v: bool(v), "sdxl has no face restoration"),
    ("tiling", lambda v: bool(v), "sdxl has no tiling (seamless) mode"),
    ("styles", lambda v: bool(v), "sdxl has no saved styles: put the style's words into the prompt"),
    ("script_name", lambda v: bool(v) and str(v).lower() != "none", "sdxl runs no scripts"),
    ("alwayson_scripts", lambda v: bool(v) and any(a.get("args") if isinstance(a, dict) else a
                                                   for a in v.values()), "sdxl runs no extensions' scripts"),
    ("subseed_strength", lambda v: bool(v), "sdxl has no variation seeds"),
    ("seed_resize_from_w", lambda v: v is not None and v > 0, "sdxl has no seed resizing"),
    ("seed_resize_from_h", lambda v: v is not None and v > 0, "sdxl has no seed resizing"),
    ("s_churn", lambda v: bool(v), "sdxl's samplers take no churn"),
    ("s_tmin", lambda v: bool(v), "sdxl's samplers take no churn range"),
    ("s_tmax", lambda v: bool(v), "sdxl's samplers take no churn range"),
    ("s_noise", lambda v: v not in (None, 1, 1.0), "sdxl's ancestral samplers use noise scale 1"),
    ("eta", lambda v: v not in (None, 0, 0.0, 1, 1.0), "sdxl's samplers use eta 1 (ancestral) / 0 (DDIM)"),
    ("initial_noise_multiplier", lambda v: v not in (None, 1, 1.0), "sdxl uses noise multiplier 1"),
)


def refuse_unsupported(body: Txt2Img) -> None:
    for name, asked, why in UNSUPPORTED:
        if asked(getattr(body, name, None)):
            raise RequestError(f"{name}: {why}", field=name)


# -- request -> settings (our ids, as the command line makes them)


def _int(name: str, value: Any, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise RequestError(f"{name} must be an integer in {low}..{high}, got {value!r}", field=name)
    return value


def sampler_names(body: Txt2Img) -> tuple[str, str]:
    """(sampler, schedule) in our ids from sampler_name (or the old sampler_index) and scheduler."""
    name = body.sampler_name or body.sampler_index or DEFAULT_SAMPLER
    try:
        return a1111.from_a1111(name, body.scheduler)
    except a1111.UnknownName as e:
        raise RequestError(f"{'scheduler' if e.kind == 'schedule' else 'sampler_name'}: {e}; GET /sdapi/v1/"
                           f"{'schedulers' if e.kind == 'schedule' else 'samplers'} lists them",
                           field="sampler_name") from None


def seed_of(value: int | None) -> int:
    from ...options import SEEDS

    if value is None or value == -1:
        return random.SystemRandom().randrange(SEEDS // 2)  # room for seed + i across the request
    return _int("seed", value, 0, SEEDS - 1)


def base_settings(body: Txt2Img, server) -> dict[str, Any]:
    """The settings of a txt2img / img2img body, before the images."""
    c = server.config
    s = default_settings()
    sampler, schedule = sampler_names(body)
    s.update(prompt=body.prompt or "", negative_prompt=body.negative_prompt or "", sampler=sampler,
             schedule=schedule, cfg=float(body.cfg_scale if body.cfg_scale is not None else 7.0),
             steps=_int("steps", body.steps if body.steps is not None else 50, 1, c.max_steps),
             batch=_int("batch_size", body.batch_size or 1, 1, c.max_batch),
             width=_int("width", body.width or 512, 8, 16384), height=_int("height", body.height or 512, 8, 16384),
             seed=seed_of(body.seed), refiner_switch=None)
    for name in ("width", "height"):
        if s[name] % 8:
            raise RequestError(f"{name} must be a multiple of 8 (pixels), got {s[name]}", field=name)
    overrides = body.override_settings or {}
    if overrides.get("CLIP_stop_at_last_layers") is not None:
        s["clip_skip"] = a1111.clip_skip_from_a1111(_int("override_settings.CLIP_stop_at_last_layers",
                                                         overrides["CLIP_stop_at_last_layers"], 1, 12))
    return s


def models_of(body: Txt2Img, server) -> dict[str, Any]:
    """The request's model, refiner and VAE from the catalog (by listed name only)."""
    overrides = body.override_settings or {}
    name = overrides.get("sd_model_checkpoint") or server.options["sd_model_checkpoint"]
    found = {"model": server.find_model(name, "override_settings.sd_model_checkpoint"), "refiner": None, "vae": None}
    if body.refiner_checkpoint is None:
        found["refiner"] = server.default_refiner  # sdxl serve --refiner's, if any
    elif str(body.refiner_checkpoint).lower() not in ("none", ""):
        found["refiner"] = server.find_model(body.refiner_checkpoint, "refiner_checkpoint")
    vae = overrides.get("sd_vae") or server.options.get("sd_vae") or "Automatic"
    if vae not in ("Automatic", "None"):
        found["vae"] = server.find_model(vae, "override_settings.sd_vae")
    return found


def _hires(body: Txt2Img, s: dict[str, Any], server):
    from ...options import LATENT_UPSCALERS, HiresFix

    upscaler = body.hr_upscaler or "Latent"
    if upscaler not in LATENT_UPSCALERS:
        raise RequestError(f"hr_upscaler: {upscaler!r} is not one of sdxl's upscalers ({', '.join(LATENT_UPSCALERS)}"
                           "); sdxl has no ESRGAN-type upscalers", field="hr_upscaler")
    for name in ("hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt"):
        value = getattr(body, name)
        if value and value not in ("Use same checkpoint", "Use same sampler", "Use same scheduler"):
            raise RequestError(f"{name}: the hires pass uses the first pass's model, sampler and prompts in sdxl",
                               field=name)
    scale = body.hr_scale if body.hr_scale is not None else 2.0
    if not (isinstance(scale, (int, float)) and 1.0 <= scale <= 8.0):
        raise RequestError(f"hr_scale must be a number in 1..8, got {scale!r}", field="hr_scale")
    if body.hr_second_pass_steps:
        _int("hr_second_pass_steps", body.hr_second_pass_steps, 0, server.config.max_steps)
    width = body.hr_resize_x or int(s["width"] * scale) // 8 * 8
    height = body.hr_resize_y or int(s["height"] * scale) // 8 * 8
    if body.hr_resize_x and not body.hr_resize_y:
        height = int(s["height"] * width / s["width"]) // 8 * 8
    elif body.hr_resize_y and not body.hr_resize_x:
        width = int(s["width"] * height / s["height"]) // 8 * 8
    try:
        return HiresFix(width, height, strength=body.denoising_strength if body.denoising_strength else 0.7,
                        steps=body.hr_second_pass_steps or None, upscaler=upscaler)
    except ValueError as e:
        raise RequestError(str(e), field="enable_hr") from None


def n_iter_of(body: Txt2Img, s: dict[str, Any], server) -> int:
    """n_iter, bounded so that one request makes at most 4 x --max-batch images."""
    most = max(1, min(MAX_N_ITER, 4 * server.config.max_batch // s["batch"]))
    return _int("n_iter", body.n_iter or 1, 1, most)


def txt2img_spec(body: Txt2Img, server) -> Spec:
    refuse_unsupported(body)
    s = base_settings(body, server)
    found = models_of(body, server)
    if found["refiner"] is not None:
        s["refiner_switch"] = body.refiner_switch_at if body.refiner_switch_at else 0.8
    n_iter = n_iter_of(body, s, server)
    if body.enable_hr:
        from dataclasses import asdict

        s["hires"] = asdict(_hires(body, s, server))
    return Spec("txt2img", found["model"], make_calls(s, n_iter, server), found["refiner"], found["vae"])


def img2img_spec(body: Img2Img, server) -> Spec:
    refuse_unsupported(body)
    if not body.init_images:
        raise RequestError("init_images: give one image (base64 or a data URL)", field="init_images")
    if len(body.init_images) > 1:
        raise RequestError("init_images: sdxl takes one init image per request", field="init_images")
    s = base_settings(body, server)
    found = models_of(body, server)
    limit = server.config.max_pixels
    init = images.decode_image("init_images[0]", body.init_images[0], max_pixels=limit)
    mode = body.resize_mode or 0
    if mode not in images.RESIZE_MODES:
        raise RequestError(f"resize_mode must be one of {sorted(images.RESIZE_MODES)} "
                           f"({', '.join(images.RESIZE_MODES.values())}), got {mode!r}", field="resize_mode")
    strength = body.denoising_strength if body.denoising_strength is not None else 0.75
    s.update(strength=strength, init_image="init_images[0]")
    n_iter = n_iter_of(body, s, server)
    if body.mask:
        if mode == images.LATENT_RESIZE:
            raise RequestError("resize_mode 3 (just resize (latent upscale)) is for img2img without a mask; give "
                               "0-2 for inpainting", field="resize_mode")
        return _inpaint_spec(body, server, s, init, found, n_iter)
    if mode == images.LATENT_RESIZE:
        s["resize_latents"], resized = True, init
    else:
        resized = images.resize_mode(init, mode, s["width"], s["height"])
    if found["refiner"] is not None:
        s["refiner_switch"] = body.refiner_switch_at if body.refiner_switch_at else 0.8
    calls = make_calls(s, n_iter, server, {"init_image": resized, "mask": None})
    return Spec("img2img", found["model"], calls, found["refiner"], found["vae"])


def _inpaint_spec(body: Img2Img, server, s: dict[str, Any], init, found, n_iter: int) -> Spec:
    mask = images.decode_image("mask", body.mask, mask=True, max_pixels=server.config.max_pixels)
    if mask.size != init.size:
        mask = mask.resize(init.size)
    if body.inpainting_mask_invert:
        mask = images.invert(mask)
    fill = {0: "fill", 1: "original", 2: "noise", 3: "zeros"}.get(body.inpainting_fill or 0)
    if fill is None:
        raise RequestError(f"inpainting_fill must be 0-3 (fill, original, latent noise, latent nothing), got "
                           f"{body.inpainting_fill!r}", field="inpainting_fill")
    blur = float(body.mask_blur or 0)
    s.update(mask="mask", mask_blur=blur, inpaint_fill=fill)
    region = images.crop_region(mask, body.inpaint_full_res_padding or 0, s["width"], s["height"]) \
        if body.inpaint_full_res else None
    if region is not None:
        work_init = images.resize_mode(init.crop(region.box), 0, s["width"], s["height"])
        work_mask = mask.crop(region.box).resize((s["width"], s["height"]))
    else:
        mode = body.resize_mode or 0
        work_init = images.resize_mode(init, mode, s["width"], s["height"])
        work_mask = images.resize_mode(mask.convert("RGB"), mode, s["width"], s["height"]).convert("L")
        init, mask = work_init, work_mask

    def finish(results: list) -> list:
        pasted = [images.paste_back(r, init, region) if region is not None else r for r in results]
        return [images.overlay(p, init, mask, blur) for p in pasted]

    calls = make_calls(s, n_iter, server, {"init_image": work_init, "mask": work_mask})
    for call in calls:
        call.finish = finish
    return Spec("img2img", found["model"], calls, None, found["vae"])


# -- job -> response


def info(job: Job, body: Txt2Img) -> dict[str, Any]:
    """A1111's `info` (a Processed's js()): the request's images, seeds and settings."""
    outs = job.outputs
    first = outs[0].settings if outs else (job.spec.calls[0].settings if job.spec.calls else {})
    sampler, _ = a1111.to_a1111(first.get("sampler", "euler"), first.get("schedule", "default"))
    seeds = [o.settings["seed"] for o in outs] or [first.get("seed", 0)]
    model = job.spec.model
    return {
        "prompt": first.get("prompt", ""), "all_prompts": [o.settings.get("prompt", "") for o in outs],
        "negative_prompt": first.get("negative_prompt", ""),
        "all_negative_prompts": [o.settings.get("negative_prompt", "") for o in outs],
        "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0, "width": first.get("width"), "height": first.get("height"),
        "sampler_name": sampler, "cfg_scale": first.get("cfg"), "steps": first.get("steps"),
        "batch_size": first.get("batch"), "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": model.name, "sd_model_hash": model.short_hash(),
        "sd_vae_name": job.spec.vae.name if job.spec.vae else None,
        "sd_vae_hash": job.spec.vae.short_hash() if job.spec.vae else None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": first.get("strength") if job.spec.kind == "img2img" else body.denoising_strength,
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": [o.infotext for o in outs],
        "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
        "clip_skip": a1111.clip_skip_to_a1111(first.get("clip_skip")) or 1,
        "is_using_inpainting_conditioning": False, "version": f"sdxl {_version()}",
        "interrupted": job.interrupted,
    }


def _version() -> str:
    import sdxl

    return sdxl.__version__


def response(job: Job, body: Txt2Img) -> dict[str, Any]:
    send = body.send_images is not False
    images_out = [base64.b64encode(o.png).decode("ascii") for o in job.outputs] if send else []
    return {"images": images_out, "parameters": body.model_dump(), "info": json.dumps(info(job, body))}


def png_info(body: PngInfo) -> dict[str, Any]:
    """A1111's png-info: the infotext (`info`), its fields (`parameters`) and the text chunks (`items`)."""
    import io

    from PIL import Image

    text = images.DATA_URL.sub("", body.image.strip(), count=1)
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4))
        with Image.open(io.BytesIO(data)) as im:
            chunks = {k: v for k, v in getattr(im, "text", {}).items() if isinstance(v, str)}
    except Exception:  # noqa: BLE001 (any undecodable upload is the client's mistake)
        raise RequestError("image: not a base64-encoded image", field="image") from None
    parameters_text = chunks.get(metadata.TEXT_KEY, "")
    items = {k: v for k, v in chunks.items() if k != metadata.TEXT_KEY}
    parameters: dict[str, Any] = {}
    if parameters_text:
        parsed = a1111.parse_infotext(parameters_text)
        parameters = {"Prompt": parsed.prompt, "Negative prompt": parsed.negative_prompt, **parsed.fields}
    return {"info": parameters_text, "items": items, "parameters": parameters}


# -- routes: parse, submit, wait, shape


def _listing(server) -> dict[str, Any]:
    """The lists A1111 clients read, in its shapes."""
    from ... import sampling
    from .. import a1111 as words

    return {
        "samplers": [{"name": n.label, "aliases": [sid, *n.aliases], "options": {}} for sid, n in
                     words.SAMPLERS.items() if sid in sampling.SAMPLERS],
        "schedulers": [{"name": "automatic", "label": words.AUTOMATIC, "aliases": [], "default_rho": -1,
                        "need_inner_model": False}] + [{"name": sid, "label": n.label, "aliases": list(n.aliases), "default_rho": -1,
                        "need_inner_model": False} for sid, n in words.SCHEDULES.items()],
    }


def router(server) -> APIRouter:
    from ...options import LATENT_UPSCALERS
    from .jobs import DONE, FAILED

    api = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111"])

    async def finished(job: Job, body: Txt2Img) -> dict[str, Any]:
        if job.state == FAILED:
            raise job.error
        if job.state != DONE and not job.outputs:
            raise RequestError("the job was cancelled (the server is stopping, or the client went away)", 503)
        return response(job, body)

    def keep_overrides(body: Txt2Img) -> None:
        """override_settings_restore_afterwards=false: the overrides become the server's options, as in A1111."""
        if body.override_settings and body.override_settings_restore_afterwards is False:
            set_server_options(server, dict(body.override_settings))

    @api.post("/txt2img")
    async def txt2img(body: Txt2Img, request: Request) -> dict[str, Any]:
        job = await server.run(txt2img_spec(body, server), request.is_disconnected)
        keep_overrides(body)
        return await finished(job, body)

    @api.post("/img2img")
    async def img2img(body: Img2Img, request: Request) -> dict[str, Any]:
        job = await server.run(img2img_spec(body, server), request.is_disconnected)
        keep_overrides(body)
        result = await finished(job, body)
        if body.include_init_images:
            result["images"] += list(body.init_images or [])
        return result

    @api.get("/progress")
    async def progress(skip_current_image: bool = False) -> dict[str, Any]:
        return await progress_of(server, skip_current_image)

    @api.post("/interrupt")
    async def interrupt() -> dict[str, Any]:
        for job in server.queue.running():
            job.interrupt_flag.set()
        return {}

    @api.post("/skip")
    async def skip() -> dict[str, Any]:
        for job in server.queue.running():
            job.skip_flag.set()
        return {}

    @api.get("/options")
    async def get_options() -> dict[str, Any]:
        return dict(server.options)

    @api.post("/options")
    async def set_options(changes: dict[str, Any]) -> dict[str, Any]:
        set_server_options(server, changes)
        return {}

    @api.get("/sd-models")
    async def sd_models() -> list[dict[str, Any]]:
        # native_size (not A1111's; its clients ignore it): the side the model makes best, for the web UI's presets
        return [{"title": m.title(), "model_name": m.name, "hash": m.short_hash(), "sha256": m.sha256(),
                 "filename": m.filename, "config": None, "native_size": m.native_size()}
                for m in server.catalog.models()]

    @api.get("/sd-vae")
    async def sd_vae() -> list[dict[str, Any]]:
        return []  # VAEs are chosen among the listed models (--models-dir) by name

    @api.get("/samplers")
    async def samplers() -> list[dict[str, Any]]:
        return _listing(server)["samplers"]

    @api.get("/schedulers")
    async def schedulers() -> list[dict[str, Any]]:
        return _listing(server)["schedulers"]

    @api.get("/loras")
    async def loras() -> list[dict[str, Any]]:
        return lora_listing(server)

    @api.get("/embeddings")
    async def embeddings() -> dict[str, Any]:
        return embedding_listing(server)

    @api.get("/upscalers")
    async def upscalers() -> list[dict[str, Any]]:
        return [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 1}]

    @api.get("/latent-upscale-modes")
    async def latent_upscale_modes() -> list[dict[str, Any]]:
        return [{"name": name} for name in LATENT_UPSCALERS]

    @api.get("/memory")
    async def memory() -> dict[str, Any]:
        return memory_report()

    @api.get("/cmd-flags")
    async def cmd_flags() -> dict[str, Any]:
        c = server.config
        return {"listen": c.host != "127.0.0.1", "port": c.port, "api": True, "api_auth": bool(c.users),
                "ckpt_dir": None, "lora_dir": None, "device_id": None, "nowebui": False,
                "sdxl_devices": c.devices, "sdxl_max_queue": c.max_queue}

    @api.get("/scripts")
    async def scripts() -> dict[str, Any]:
        return {"txt2img": [], "img2img": []}

    for name in ("face-restorers", "realesrgan-models", "prompt-styles", "hypernetworks", "script-info"):
        api.add_api_route(f"/{name}", _empty, methods=["GET"])

    @api.post("/png-info")
    async def png_info_route(body: PngInfo) -> dict[str, Any]:
        return png_info(body)

    @api.post("/refresh-checkpoints")
    async def refresh_checkpoints() -> dict[str, Any]:
        server.catalog.refresh()
        return {}

    @api.post("/refresh-loras")
    async def refresh_loras() -> dict[str, Any]:
        for w in server.workers:
            if w.pipe is not None:
                w.pipe.lora_library.refresh()
        return {}

    return api


async def _empty() -> list:
    return []


def set_server_options(server, changes: dict[str, Any]) -> None:
    """POST /options: the model by its listed title or name; CLIP skip; other keys kept as given."""
    if "sd_model_checkpoint" in changes:
        model = server.find_model(str(changes["sd_model_checkpoint"]), "sd_model_checkpoint")
        changes = dict(changes, sd_model_checkpoint=model.title(), sd_checkpoint_hash=model.sha256())
    if "CLIP_stop_at_last_layers" in changes:
        _int("CLIP_stop_at_last_layers", changes["CLIP_stop_at_last_layers"], 1, 12)
    if changes.get("sd_vae") not in (None, "Automatic", "None"):
        server.find_model(str(changes["sd_vae"]), "sd_vae")
    server.options.update(changes)


async def progress_of(server, skip_current_image: bool = False) -> dict[str, Any]:
    """A1111's /progress for the oldest running job (idle: progress 0, job_count 0)."""
    import asyncio

    running, queued = server.queue.running(), server.queue.queued()
    job = running[0] if running else None
    state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
             "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    if job is None:
        state["job_count"] = sum(len(j.spec.calls) for j in queued)
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None,
                "current_task": None}
    state.update(job=job.spec.kind, job_count=len(job.spec.calls), job_no=job.call_no, sampling_step=job.step,
                 sampling_steps=job.steps, interrupted=job.interrupt_flag.is_set(), skipped=job.skip_flag.is_set(),
                 job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)))
    image = None
    if not skip_current_image:
        png = await asyncio.to_thread(server.preview_png, job)
        image = base64.b64encode(png).decode("ascii") if png else None
    return {"progress": round(job.progress(), 4), "eta_relative": round(job.eta(), 2), "state": state,
            "current_image": image, "textinfo": f"step {job.step}/{job.steps}" if job.steps else None,
            "current_task": job.id}


def lora_listing(server) -> list[dict[str, Any]]:
    """A1111's /loras: name, alias, path (the file name only: a listing does not tell where files are kept)."""
    from ...adapters.library import LORA_SUFFIXES, Library

    library = Library(server.config.lora_dirs, LORA_SUFFIXES, kind="LoRA", aliases=True)
    library.confined = True
    return [{"name": name, "alias": name, "path": path.name, "metadata": {}} for name, path in
            sorted(library.names().items())]


def embedding_listing(server) -> dict[str, Any]:
    from ...adapters.library import EMBEDDING_SUFFIXES, Library

    library = Library(server.config.embedding_dirs, EMBEDDING_SUFFIXES, kind="embedding")
    library.confined = True
    loaded = {name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                     "vectors": None} for name in sorted(library.names())}
    return {"loaded": loaded, "skipped": {}}


def memory_report() -> dict[str, Any]:
    import resource

    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ram = {"peak_rss": rss}
    try:
        import os

        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        avail = os.sysconf("SC_AVPHYS_PAGES") * size
        ram.update(total=pages * size, free=avail, used=pages * size - avail)
    except (ValueError, OSError, AttributeError):
        pass
    cuda: dict[str, Any] = {"error": "no CUDA device"}
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        cuda = {"system": {"free": free, "used": total - free, "total": total},
                "active": {"peak": torch.cuda.max_memory_allocated()}}
    return {"ram": ram, "cuda": cuda}
