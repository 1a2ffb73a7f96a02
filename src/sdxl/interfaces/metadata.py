"""One run's settings: from command-line flags, to GenerationOptions, into PNGs and back, in AUTOMATIC1111's words.

"Settings" are a flat dict: the JSON-able fields of `sdxl.GenerationOptions` (OPTION_KEYS; sizes for
micro-conditioning as (height, width), crops as (top, left), as in the Python API) and the run's model settings
(RUN_KEYS: "model", "refiner", "vae", "variant", "dtype", "device", "fp8", "low_memory", "store_paths").

Each PNG that `sdxl generate` writes carries two text chunks:

* "parameters": AUTOMATIC1111 1.10's infotext, which other SDXL tools, civitai and image browsers read:

      a lighthouse at dusk
      Negative prompt: blurry
      Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.0, Seed: 7, Size: 1024x1024,
      Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Version: sdxl 0.1.0

  (one line of fields; the words are `a1111.py`'s table).
* "sdxl": JSON with every setting needed to make the same image again, in our ids: the settings above ("seed"
  is this image's own seed; "batch" the size of its batch and "batch_index" its place there, since image i of a
  batch equals the single image of seed + i only up to rounding), "size" ([width, height] of the image),
  "model_hash" / "refiner_hash" / "vae_hash" (A1111's short hashes) and "sdxl_version". Models and input images
  are stored by name (a file name, "builtin", a Hub repo id), not by path, unless "store_paths" is set: paths
  would tell everyone an image is shared with where its maker keeps their files.

`read_image` reads those chunks back, and also the "parameters" chunk of PNGs written by AUTOMATIC1111, Forge
and Fooocus (its A1111-style text, or its JSON "fooocus" scheme). Reading never evaluates or unpickles anything,
and checks the type of every stored value (STORED_TYPES): a value of another type (a seed "42", an fp8 "no") is an
error naming the image and the setting, never coerced.

Nothing here imports torch (only `generation_options` does, when called).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import a1111
from .hashes import stem

TEXT_KEY = "parameters"
JSON_KEY = "sdxl"
FOOOCUS_SCHEME_KEY = "fooocus_scheme"  # Fooocus' chunk naming the scheme of its "parameters": "fooocus" or "a1111"
FORMAT_VERSION = 1

OPTION_KEYS = (
    "prompt", "prompt_2", "negative_prompt", "negative_prompt_2", "width", "height", "steps", "cfg",
    "guidance_rescale", "sampler", "schedule", "seed", "batch", "init_image", "strength", "mask", "mask_blur",
    "outpaint", "outpaint_fill", "refiner_switch", "original_size", "crop_top_left", "target_size",
    "negative_original_size", "negative_crop_top_left", "negative_target_size", "aesthetic_score",
    "negative_aesthetic_score", "clip_skip", "vae_tiling", "emphasis", "loras", "inpaint_fill", "hires",
    "resize_latents",
)  # GenerationOptions' fields but `output` (what a call returns, not how an image is made)
MODEL_KEYS = ("model", "refiner", "vae", "variant", "dtype", "device", "fp8", "low_memory")
RUN_KEYS = (*MODEL_KEYS, "store_paths")
SIZE_KEYS = ("original_size", "target_size", "negative_original_size", "negative_target_size")
CROP_KEYS = ("crop_top_left", "negative_crop_top_left")
TUPLE_KEYS = (*SIZE_KEYS, *CROP_KEYS, "outpaint", "outpaint_fill")  # stored as JSON lists, used as tuples
FILE_KEYS = ("init_image", "mask")
HASH_KEYS = {"model": "model_hash", "refiner": "refiner_hash", "vae": "vae_hash"}
# sdxl's inpaint_fill in AUTOMATIC1111's words ("Masked content"; "original" is its default, left out)
INPAINT_FILL_WORDS = {"fill": "fill", "noise": "latent noise", "zeros": "latent nothing"}


# -- command-line formats -> settings


def parse_ints(flag: str, text: str, n: int, sep: str, form: str) -> tuple[int, ...]:
    parts = str(text).lower().replace(" ", "").split(sep)
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != n or any(v < 0 for v in values):
        raise ValueError(f"{flag} must be {form}, got {text!r}")
    return values


def parse_size(flag: str, text: str | None) -> tuple[int, int] | None:
    """'WxH' (as --width/--height and A1111's Size) -> (height, width), the API's order."""
    if text is None:
        return None
    w, h = parse_ints(flag, text, 2, "x", "WIDTHxHEIGHT in pixels, e.g. 1024x768")
    return h, w


def parse_crop(flag: str, text: str | None) -> tuple[int, int] | None:
    return None if text is None else parse_ints(flag, text, 2, ",", "TOP,LEFT in pixels, e.g. 0,0")


def parse_outpaint_fill(text: str) -> str | tuple[int, ...]:
    if text in ("edge", "reflect"):
        return text
    rgb = parse_ints("--outpaint-fill", text, 3, ",", "edge, reflect or an R,G,B colour such as 128,128,128")
    if max(rgb) > 255:
        raise ValueError(f"--outpaint-fill colour values must be 0..255, got {text!r}")
    return rgb


def parse_lora(text: str) -> tuple[str, float, float]:
    """--lora FILE[:WEIGHT[:TE_WEIGHT]] (a file, or a name from the LoRA folders) -> (file, U-Net, text encoder)."""
    parts = str(text).rsplit(":", 2)
    weights: list[float] = []
    while len(parts) > 1:  # trailing numbers are weights; a Windows drive's colon is not
        try:
            weights.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    name = ":".join(parts)
    drive = re.match(r"[A-Za-z]:[\\/]", name) is not None
    if not name or len(weights) > 2 or (":" in name and not drive and not Path(name).expanduser().exists()):
        raise ValueError(f"--lora must be FILE[:WEIGHT[:TEXT_ENCODER_WEIGHT]], got {text!r}")
    unet = weights[0] if weights else 1.0
    return name, unet, weights[1] if len(weights) > 1 else unet


def _our_name(kind: str, name: str | None) -> str | None:
    """Our id for a sampler or schedule given in any of the words we read; unknown names pass through, for
    GenerationOptions to refuse with the list of ours."""
    try:
        return (a1111.sampler_id if kind == "sampler" else a1111.schedule_id)(name) if name else name
    except a1111.UnknownName:
        return name


def settings_from_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    """Settings from flag values in their text formats (`vars()` of the parsed command line, or a form):
    sizes 'WxH', crops 'TOP,LEFT', outpaint 'L,T,R,B', samplers in our ids or A1111's words."""
    s = {key: flags.get(key) for key in (*OPTION_KEYS, *RUN_KEYS)}
    combined = a1111.split_schedule(s["sampler"])[1] if s["sampler"] else None
    if combined is not None:  # "DPM++ 2M Karras": the schedule in the name wins, as in A1111
        s["sampler"], s["schedule"] = a1111.split_schedule(s["sampler"])[0], combined
    s["sampler"], s["schedule"] = _our_name("sampler", s["sampler"]), _our_name("schedule", s["schedule"])
    for key in SIZE_KEYS:
        s[key] = parse_size(_flag(key), s[key])
    for key in CROP_KEYS:
        s[key] = parse_crop(_flag(key), s[key])
    if s["outpaint"]:
        s["outpaint"] = parse_ints("--outpaint", s["outpaint"], 4, ",", "LEFT,TOP,RIGHT,BOTTOM pixels, e.g. 0,0,256,0")
    s["outpaint_fill"] = parse_outpaint_fill(s["outpaint_fill"] or "edge")
    s["clip_skip"] = s["clip_skip"] or None  # 0 and None both mean SDXL's own (penultimate) layer
    s["inpaint_fill"] = s["inpaint_fill"] or "original"
    s["hires"] = _hires_from_flags(flags) if s["hires"] else None
    s["loras"] = [parse_lora(text) for text in s["loras"] or ()]
    s["store_paths"] = bool(s["store_paths"])
    s["resize_latents"] = bool(s["resize_latents"])
    return s


def _hires_from_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    width, height = parse_ints("--hires", flags["hires"], 2, "x", "WIDTHxHEIGHT, e.g. 1536x1536")
    return {"width": width, "height": height, "strength": flags.get("hires_strength", 0.7),
            "steps": flags.get("hires_steps"), "upscaler": flags.get("hires_upscaler") or "Latent"}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def apply_stored(settings: dict[str, Any], stored: Mapping[str, Any], keep: set[str] | frozenset[str]) -> None:
    """Put an image's stored settings into `settings`, except the keys in `keep` (given explicitly); JSON lists
    become the tuples the API takes. Keys that are not settings (size, hashes, ...) are left out."""
    for key, value in stored.items():
        if key in settings and key not in keep:
            settings[key] = tuple(value) if isinstance(value, list) and key in TUPLE_KEYS else value


# -- settings -> GenerationOptions


def open_image(flag: str, path: str | None, mode: str, max_pixels: int | None = None):
    """An input image file as the pipeline reads it (`sdxl.images.load_image`: upright, transparency over white,
    16-bit and float images at their real range), in `mode` ("RGB", or "L" for a mask); None for None.
    One-line errors naming the flag and the file."""
    if path is None:
        return None
    from ..images import load_image  # imports torch

    return load_image(path, mask=mode == "L", what=flag, max_pixels=max_pixels)


def input_images(settings: Mapping[str, Any], max_pixels: int | None = None) -> dict[str, Any]:
    """The run's input images, read once: {"init_image": ..., "mask": ...} (None where not given)."""
    return {"init_image": open_image("--init-image", settings.get("init_image"), "RGB", max_pixels),
            "mask": open_image("--mask", settings.get("mask"), "L", max_pixels)}


def generation_options(settings: Mapping[str, Any], prompt: str | None = None, images: Mapping[str, Any] | None = None):
    """The GenerationOptions of one prompt of a run (validated: `sdxl.options.OptionError`, a ValueError naming
    the field and what is allowed). images: `input_images(settings)`, if already read."""
    from ..options import GenerationOptions  # imports torch

    fields = {key: settings[key] for key in OPTION_KEYS if key in settings}
    if prompt is not None:
        fields["prompt"] = prompt
    fields.update(images if images is not None else input_images(settings))
    if fields.get("crop_top_left") is None:
        fields["crop_top_left"] = (0, 0)
    if isinstance(fields.get("hires"), Mapping):
        from ..options import HiresFix

        fields["hires"] = HiresFix(**fields["hires"])
    fields["inpaint_fill"] = fields.get("inpaint_fill") or "original"
    return GenerationOptions(**fields)


# -- settings -> what a PNG stores


def stored_name(name: str | None, keep_path: bool = False) -> str | None:
    """How an image names a model or an input file: "builtin" or a Hub repo id as given, a local file or folder
    by its name (its absolute path with keep_path)."""
    if not name:
        return name
    path = Path(name).expanduser()
    if not path.exists():  # a built-in model's or a Hub repo's name
        return str(name)
    return str(path.absolute()) if keep_path else path.name


def model_label(name: str | None) -> str | None:
    """A model's name in the infotext: the file's stem, as A1111 writes it ("sd_xl_base_1.0"), or the name."""
    if not name:
        return None
    return stem(Path(name).name if Path(name).is_absolute() else str(name))


def image_settings(settings: Mapping[str, Any], models: Mapping[str, Any], *, prompt: str, seed: int,
                   batch_index: int, size: tuple[int, int]) -> dict[str, Any]:
    """What one PNG stores: the run's settings (input files by stored name), `models` (stored names, hashes,
    dtype, device, version: the same for the whole run), this image's prompt, seed, place and (width, height)."""
    out = {key: value for key, value in settings.items() if key not in MODEL_KEYS}
    for key in FILE_KEYS:
        out[key] = stored_name(settings.get(key), bool(settings.get("store_paths")))
    # LoRAs by name (found again in the LoRA folders), as prompts name them
    out["loras"] = [[name if settings.get("store_paths") else stem(Path(name).name), u, t]
                    for name, u, t in settings.get("loras") or ()]
    out.update(models, prompt=prompt, seed=seed, batch_index=batch_index, size=list(size))
    return out


def infotext(settings: Mapping[str, Any]) -> str:
    """AUTOMATIC1111 1.10's "parameters" text of one image's settings."""
    s, label = settings, a1111.LABELS
    width, height = s.get("size") or (s.get("width"), s.get("height"))
    sampler, schedule = a1111.to_a1111(s.get("sampler") or "euler", s.get("schedule") or "default")
    refiner = model_label(s.get("refiner"))
    if refiner and s.get("refiner_hash"):
        refiner = f"{refiner} [{s['refiner_hash']}]"  # A1111's short title of a checkpoint
    fields = [
        (label["steps"], s.get("steps")),
        (label["sampler"], sampler),
        (label["schedule"], schedule),
        (label["cfg"], s.get("cfg")),
        (label["seed"], s.get("seed")),
        (label["size"], f"{width}x{height}" if width and height else None),
        (label["model_hash"], s.get("model_hash")),
        (label["model"], model_label(s.get("model"))),
        (label["vae_hash"], s.get("vae_hash") if s.get("vae") else None),
        (label["vae"], model_label(s.get("vae"))),
        (label["strength"], s.get("strength") if s.get("init_image") else (s.get("hires") or {}).get("strength")),
        (label["hires_resize"], f"{s['hires']['width']}x{s['hires']['height']}" if s.get("hires") else None),
        (label["hires_steps"], (s.get("hires") or {}).get("steps")),
        (label["hires_upscaler"], (s.get("hires") or {}).get("upscaler")),
        (label["inpaint_fill"], INPAINT_FILL_WORDS.get(s.get("inpaint_fill")) if s.get("mask") else None),
        (label["clip_skip"], a1111.clip_skip_to_a1111(s.get("clip_skip"))),
        (label["guidance_rescale"], s.get("guidance_rescale") or None),
        (label["emphasis"], a1111.EMPHASIS.get(s.get("emphasis"), s.get("emphasis"))
         if s.get("emphasis") not in (None, "original") else None),
        (label["lora_hashes"], ", ".join(f"{n}: {h}" for n, h in s["lora_hashes"].items())
         if s.get("lora_hashes") else None),
        (label["refiner"], refiner),
        (label["refiner_switch"], s.get("refiner_switch") if refiner else None),
        # Not "v0.1.0": A1111 would read that as its own old version and switch on its back-compatibility options
        (label["version"], f"sdxl {s['sdxl_version']}" if s.get("sdxl_version") else None),
    ]
    # LoRAs given apart from the prompt (--lora) go into its text as tags, where A1111 and sites look for them
    tags = "".join(f" <lora:{n}:{t:g}>" if t == u else f" <lora:{n}:{t:g}:{u:g}>" for n, u, t in s.get("loras") or ())
    return a1111.format_infotext((s.get("prompt") or "") + tags, s.get("negative_prompt") or "", fields)


def png_bytes(image, settings: dict[str, Any]) -> bytes:
    """A PIL image encoded as PNG with `settings` in the "parameters" and "sdxl" chunks."""
    import io

    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_KEY, infotext(settings))
    info.add_text(JSON_KEY, json.dumps({"format": FORMAT_VERSION, **settings}, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def write_png(image, path: str | Path, settings: dict[str, Any]) -> Path:
    """Save a PIL image as the new PNG file `path` with `settings` in its chunks: encoded first, then created
    exclusively and complete (`outputs.create_new`; FileExistsError if `path` exists)."""
    from .outputs import create_new_bytes

    return create_new_bytes(path, png_bytes(image, settings))


# -- other tools' settings -> ours


def _number(where: str, value: Any, kind: type) -> Any:
    try:
        return kind(value) if kind is float else kind(str(value).strip())
    except (TypeError, ValueError):
        raise ValueError(f"{where} is not {'an integer' if kind is int else 'a number'}: {value!r}") from None


def _size_from(where: str, value: Any) -> tuple[int, int]:
    """(width, height) from A1111's "1024x768" or Fooocus' "(1024, 768)" (read with a pattern, never evaluated)."""
    match = re.fullmatch(r"\s*\(?\s*(\d+)\s*[x,]\s*(\d+)\s*\)?\s*", str(value))
    if not match:
        raise ValueError(f"{where} is not a WIDTHxHEIGHT size: {value!r}")
    return int(match.group(1)), int(match.group(2))


def _names(sampler: str, schedule: str | None, skip: frozenset[str]) -> dict[str, str]:
    """Our sampler and schedule from another tool's names, but those the command line gives (whose stored
    names need not be ones we know)."""
    ours = {}
    if "sampler" not in skip:
        ours["sampler"] = a1111.sampler_from_a1111(sampler)
    if "schedule" not in skip:
        ours["schedule"] = a1111.schedule_from_a1111(sampler, schedule)
    return ours


def _clip_skip(where: str, value: Any) -> int | None:
    return a1111.clip_skip_from_a1111(_number(where, value, int))


# Fields read without a note: bookkeeping (versions, hashes consumed with their model), or already part of
# what we read (Fooocus applies its styles and prompt expansion to the prompt it writes).
A1111_INFORMATIONAL = ("Version", "User", "Hashes", "Lora hashes", "Refiner hash", "Raw prompt", "Raw negative prompt", "Styles",
                       "Performance", "Metadata Scheme")
FOOOCUS_NO_VAE = ("", "None", "Default (model)")  # Fooocus' words for "the model's own VAE"


def _emphasis(value: str) -> str:
    ours = {label.lower(): key for key, label in a1111.EMPHASIS.items()}.get(str(value).strip().lower())
    if ours is None:
        raise ValueError(f"'Emphasis: {value}' is none of {', '.join(a1111.EMPHASIS.values())}")
    return ours


def settings_from_infotext(text: str, skip: frozenset[str] = frozenset()) -> tuple[dict[str, Any], list[str]]:
    """(settings, labels of the fields ignored) from an A1111 / Forge / Fooocus "parameters" text. Keys in `skip`
    (given explicitly elsewhere) are not read. ValueError with the reason for a malformed value."""
    info = a1111.parse_infotext(text)
    if not info.fields:
        raise ValueError("its 'parameters' text has no settings line (Steps: ..., Sampler: ..., CFG scale: ...)")
    fields, label = dict(info.fields), a1111.LABELS
    s: dict[str, Any] = {"prompt": info.prompt, "negative_prompt": info.negative_prompt}
    for key, kind in (("steps", int), ("cfg", float), ("seed", int), ("strength", float),
                      ("guidance_rescale", float), ("refiner_switch", float)):
        if (value := fields.pop(label[key], None)) is not None:
            s[key] = _number(f"'{label[key]}'", value, kind)
    schedule = fields.pop(label["schedule"], None)
    schedule = fields.pop("Scheduler", None) or schedule  # Fooocus writes "Scheduler: karras"
    if (sampler := fields.pop(label["sampler"], None)) is not None:
        s.update(_names(sampler, schedule, skip))
    if (size := fields.pop(label["size"], None)) is not None:
        s["width"], s["height"] = _size_from("'Size'", size)
    if (clip := fields.pop(label["clip_skip"], None)) is not None:
        s["clip_skip"] = _clip_skip("'Clip skip'", clip)
    if (emphasis := fields.pop(label["emphasis"], None)) is not None:
        s["emphasis"] = _emphasis(emphasis)
    for key in ("model", "vae"):
        s[key] = fields.pop(label[key], None)
        s[HASH_KEYS[key]] = fields.pop(label[HASH_KEYS[key]], None)
    if s["vae"] in FOOOCUS_NO_VAE:
        s["vae"] = None
    _hires_from_infotext(fields, s)
    if (fill := fields.pop(label["inpaint_fill"], None)) is not None:
        s["inpaint_fill"] = {v: k for k, v in INPAINT_FILL_WORDS.items()}.get(str(fill), "original")
    if refiner := fields.pop(label["refiner"], None):
        match = re.fullmatch(r"(.*?)\s*\[([0-9a-fA-F]+)\]", refiner)  # A1111: "name [short hash]"
        s["refiner"], s["refiner_hash"] = (match.group(1), match.group(2)) if match else (refiner, None)
    ignored = [key for key in fields if key not in A1111_INFORMATIONAL]
    return {k: v for k, v in s.items() if k not in skip and v is not None}, ignored


def _hires_from_infotext(fields: dict[str, Any], s: dict[str, Any]) -> None:
    """A1111's "Hires resize: WxH" (or "Hires upscale: X" times the size), "Hires steps", "Hires upscaler"; its
    "Denoising strength" is then the second pass's."""
    label = a1111.LABELS
    resize, scale = fields.pop(label["hires_resize"], None), fields.pop("Hires upscale", None)
    steps, upscaler = fields.pop(label["hires_steps"], None), fields.pop(label["hires_upscaler"], None)
    if resize is None and scale is None:
        return
    if resize is not None:
        width, height = _size_from("'Hires resize'", resize)
    else:
        factor = _number("'Hires upscale'", scale, float)
        width, height = int(s.get("width", 0) * factor) // 8 * 8, int(s.get("height", 0) * factor) // 8 * 8
    s["hires"] = {"width": width, "height": height, "strength": s.pop("strength", 0.7),
                  "steps": _number("'Hires steps'", steps, int) if steps is not None else None,
                  "upscaler": str(upscaler or "Latent")}


FOOOCUS_INFORMATIONAL = ("version", "metadata_scheme", "created_by", "prompt", "negative_prompt", "styles",
                         "prompt_expansion", "performance", "base_model_hash", "refiner_model_hash")


def settings_from_fooocus(data: Mapping[str, Any], skip: frozenset[str] = frozenset()) -> tuple[dict[str, Any], list[str]]:
    """(settings, keys ignored) from Fooocus' JSON metadata scheme (meta_parser.py's FooocusMetadataParser)."""
    d = dict(data)
    s: dict[str, Any] = {}
    for key, full in (("prompt", "full_prompt"), ("negative_prompt", "full_negative_prompt")):
        # the full prompt is what the model was given: the prompt after Fooocus' styles and GPT-2 expansion
        value = d.pop(full, None)
        s[key] = ", ".join(map(str, value)) if isinstance(value, list) else str(value or d.get(key) or "")
    for key, ours, kind in (("steps", "steps", int), ("guidance_scale", "cfg", float), ("seed", "seed", int),
                            ("refiner_switch", "refiner_switch", float), ("denoising_strength", "strength", float)):
        if (value := d.pop(key, None)) is not None:
            s[ours] = _number(f"Fooocus' {key!r}", value, kind)
    if (size := d.pop("resolution", None)) is not None:
        s["width"], s["height"] = _size_from("Fooocus' 'resolution'", size)
    if (sampler := d.pop("sampler", None)) is not None:
        s.update(_names(str(sampler), d.pop("scheduler", None), skip))
    if (clip := d.pop("clip_skip", None)) is not None:
        s["clip_skip"] = _clip_skip("Fooocus' 'clip_skip'", clip)
    s["model"], s["model_hash"] = d.pop("base_model", None), d.get("base_model_hash")
    refiner, vae = d.pop("refiner_model", None), d.pop("vae", None)
    s["refiner"] = None if refiner in FOOOCUS_NO_VAE else refiner
    s["vae"] = None if vae in FOOOCUS_NO_VAE else vae
    ignored = [k for k, v in d.items() if k not in FOOOCUS_INFORMATIONAL and v not in (None, "", "None", [], {})]
    return {k: v for k, v in s.items() if k not in skip and v is not None}, ignored


# -- the types of stored settings: a value of another type is refused, naming the setting, not coerced (a stored
# fp8 "no" must not switch fp8 on; a seed "42" is not a seed)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _ints(n: int) -> Any:
    return lambda v: isinstance(v, list) and len(v) == n and all(_is_int(x) for x in v)


def _optional(check: Any) -> Any:
    return lambda v: v is None or check(v)


def _is_lora(v: Any) -> bool:
    return (isinstance(v, list) and len(v) == 3 and isinstance(v[0], str) and all(_is_number(x) for x in v[1:]))


_TYPES: dict[str, tuple[Any, str]] = {
    "text": (lambda v: isinstance(v, str), "a string"),
    "text?": (_optional(lambda v: isinstance(v, str)), "a string or null"),
    "int": (_is_int, "an integer"),
    "int?": (_optional(_is_int), "an integer or null"),
    "number": (_is_number, "a number"),
    "number?": (_optional(_is_number), "a number or null"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "bool?": (_optional(lambda v: isinstance(v, bool)), "true, false or null"),
    "pair?": (_optional(_ints(2)), "a pair of integers or null"),
    "pair": (_ints(2), "a pair of integers"),
    "ltrb?": (_optional(_ints(4)), "[left, top, right, bottom] or null"),
    "fill": (lambda v: v in ("edge", "reflect") or _ints(3)(v), '"edge", "reflect" or [R, G, B]'),
    "loras": (lambda v: isinstance(v, list) and all(_is_lora(x) for x in v), "a list of [name, weight, weight]"),
    "hires?": (_optional(lambda v: isinstance(v, dict) and set(v) <= {"width", "height", "strength", "steps",
                                                                       "upscaler"}),
               "an object of width, height, strength, steps and upscaler, or null"),
    "hashes": (lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in (*v, *v.values())),
               "an object of names and hashes"),
}
STORED_TYPES = {
    **dict.fromkeys(("prompt", "negative_prompt", "sampler", "schedule", "emphasis", "inpaint_fill"), "text"),
    **dict.fromkeys(("prompt_2", "negative_prompt_2", "init_image", "mask", *MODEL_KEYS[:-2], "sdxl_version",
                     *HASH_KEYS.values()), "text?"),
    **dict.fromkeys(("steps", "seed", "batch", "batch_index"), "int"),
    **dict.fromkeys(("width", "height", "clip_skip"), "int?"),
    **dict.fromkeys(("guidance_rescale", "strength", "mask_blur", "aesthetic_score", "negative_aesthetic_score"),
                    "number"),
    **dict.fromkeys(("cfg", "refiner_switch"), "number?"),
    **dict.fromkeys(("fp8", "vae_tiling", "store_paths"), "bool"),
    "low_memory": "bool?",  # images made before low-memory mode existed do not store it
    "resize_latents": "bool?",  # (nor before resize_latents did)
    **dict.fromkeys((*SIZE_KEYS, "negative_crop_top_left"), "pair?"),
    "crop_top_left": "pair", "size": "pair", "outpaint": "ltrb?", "outpaint_fill": "fill", "loras": "loras",
    "lora_hashes": "hashes", "hires": "hires?",
}


def check_stored(settings: Mapping[str, Any], skip: frozenset[str] = frozenset()) -> None:
    """ValueError naming the first stored setting (not in `skip`) whose value is not of its type."""
    for key, value in settings.items():
        kind = STORED_TYPES.get(key)
        if kind is not None and key not in skip and not _TYPES[kind][0](value):
            raise ValueError(f"its stored setting {key!r} must be {_TYPES[kind][1]}, got {value!r}")


# -- PNGs -> settings


@dataclass
class Stored:
    """Settings read from an image, where they came from, and the fields of theirs that were ignored."""

    settings: dict[str, Any]
    source: str  # "sdxl" (our JSON chunk), "AUTOMATIC1111" (A1111 / Forge / Fooocus text) or "Fooocus" (JSON)
    ignored: list[str] = field(default_factory=list)


def _png_text(path: Path) -> dict[str, str]:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with Image.open(path) as image:
            kind, info = image.format, dict(image.info)
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image; --from-image takes a PNG with generation settings") from None
    if kind != "PNG":
        raise ValueError(f"{path}: a {kind} image, not a PNG written by `sdxl generate` (no settings stored)")
    return {k: v for k, v in info.items() if isinstance(v, str)}


def _from_json_chunk(text: str, skip: frozenset[str]) -> dict[str, Any]:
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"the '{JSON_KEY}' settings chunk is not valid JSON ({e})") from None
    if not isinstance(settings, dict):
        raise ValueError(f"the '{JSON_KEY}' settings chunk is not a JSON object")  # noqa: TRY004
    version = settings.pop("format", None)
    if version != FORMAT_VERSION:
        raise ValueError(f"settings format {version!r} is not one this sdxl reads ({FORMAT_VERSION})")
    check_stored(settings, skip)
    for key, to_id in (("sampler", a1111.sampler_id), ("schedule", a1111.schedule_id)):
        if isinstance(settings.get(key), str) and key not in skip:
            settings[key] = to_id(settings[key])  # ids (older files) or A1111's words
    return settings


def _from_parameters(text: str, scheme: str | None, skip: frozenset[str]) -> Stored:
    if text.lstrip().startswith("{") or scheme == "fooocus":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"its '{TEXT_KEY}' chunk is Fooocus-style JSON but not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"its '{TEXT_KEY}' chunk is JSON but not an object of Fooocus settings")
        settings, ignored = settings_from_fooocus(data, skip)
        return Stored(settings, "Fooocus", ignored)
    settings, ignored = settings_from_infotext(text, skip)
    return Stored(settings, "AUTOMATIC1111", ignored)


def read_image(path: str | Path, *, skip: set[str] | frozenset[str] = frozenset()) -> Stored:
    """The settings stored in a PNG: our "sdxl" JSON chunk (exact), else the "parameters" chunk that
    AUTOMATIC1111, Forge and Fooocus write. Settings in `skip` are not read (the caller gives them).

    FileNotFoundError / ValueError with a one-line reason naming the file (a1111.UnknownName, a ValueError, for a
    sampler or schedule that is none of ours)."""
    path, skip = Path(path), frozenset(skip)
    chunks = _png_text(path)
    try:
        if JSON_KEY in chunks:
            return Stored(_from_json_chunk(chunks[JSON_KEY], skip), "sdxl")
        if TEXT_KEY in chunks:
            return _from_parameters(chunks[TEXT_KEY], chunks.get(FOOOCUS_SCHEME_KEY), skip)
    except ValueError as e:
        e.args = (f"{path}: {e}",)
        raise
    raise ValueError(f"{path}: no sdxl generation settings in this PNG (neither an '{JSON_KEY}' nor a "
                     f"'{TEXT_KEY}' chunk); it was not written by `sdxl generate`, AUTOMATIC1111, Forge or Fooocus")


def read_settings(path: str | Path) -> dict[str, Any]:
    """The settings stored in a PNG (see `read_image`)."""
    return read_image(path).settings
