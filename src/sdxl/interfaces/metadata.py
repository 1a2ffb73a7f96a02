"""Generation settings stored in the PNG files `sdxl generate` writes, and read back by `--from-image`.

Two text chunks:

* "parameters": AUTOMATIC1111's plain-text format, which other SDXL tools and image browsers show:

      a lighthouse at dusk
      Negative prompt: blurry
      Steps: 30, Sampler: euler, Schedule type: default, CFG scale: 5.0, Seed: 7, Size: 1024x1024, Model: base.safetensors

* "sdxl": JSON with every setting needed to make the same image again: all JSON-able fields of
  `sdxl.GenerationOptions` ("seed" is this image's own seed; "batch" the size of the batch it came
  from and "batch_index" its place there, since image i of a batch equals the single image of
  seed + i only up to rounding; micro-conditioning sizes as [height, width], crops as [top, left],
  as in the Python API), the init image and mask as file paths, "size" ([width, height] of the
  image), and "model", "refiner", "vae", "variant", "dtype", "device", "fp8" and "sdxl_version".

Nothing here imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TEXT_KEY = "parameters"
JSON_KEY = "sdxl"
FORMAT_VERSION = 1


def a1111_parameters(settings: dict[str, Any]) -> str:
    """The "parameters" text (AUTOMATIC1111's format) of one image's settings."""
    lines = [settings.get("prompt", "")]
    if settings.get("negative_prompt"):
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    width, height = settings.get("size") or (settings.get("width"), settings.get("height"))
    fields = [
        ("Steps", settings.get("steps")),
        ("Sampler", settings.get("sampler")),
        ("Schedule type", settings.get("schedule")),
        ("CFG scale", settings.get("cfg")),
        ("Seed", settings.get("seed")),
        ("Size", f"{width}x{height}" if width and height else None),
        ("Model", Path(str(settings["model"])).name if settings.get("model") else None),
    ]
    if settings.get("guidance_rescale"):
        fields.append(("CFG rescale", settings["guidance_rescale"]))
    if settings.get("clip_skip"):
        fields.append(("Clip skip", settings["clip_skip"] + 1))  # A1111: 1 is SDXL's default (penultimate) layer
    if settings.get("init_image") and settings.get("strength") is not None:
        fields.append(("Denoising strength", settings["strength"]))
    if settings.get("refiner"):
        fields += [("Refiner", Path(str(settings["refiner"])).name), ("Refiner switch at", settings.get("refiner_switch"))]
    lines.append(", ".join(f"{k}: {v}" for k, v in fields if v is not None))
    return "\n".join(lines)


def write_png(image, path: str | Path, settings: dict[str, Any]) -> Path:
    """Save a PIL image as PNG at `path` with `settings` in the "parameters" and "sdxl" chunks."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_KEY, a1111_parameters(settings))
    info.add_text(JSON_KEY, json.dumps({"format": FORMAT_VERSION, **settings}, sort_keys=True))
    path = Path(path)
    image.save(path, format="PNG", pnginfo=info)
    return path


def read_settings(path: str | Path) -> dict[str, Any]:
    """The settings `write_png` stored in a PNG. ValueError / FileNotFoundError with a one-line reason otherwise."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with Image.open(path) as image:
            kind = image.format
            text = image.info.get(JSON_KEY) if kind == "PNG" else None
            has_a1111 = kind == "PNG" and TEXT_KEY in image.info
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image; --from-image takes a PNG written by `sdxl generate`") from None
    if kind != "PNG":
        raise ValueError(f"{path}: a {kind} image, not a PNG written by `sdxl generate` (no settings stored)")
    if text is None:
        extra = " (it has A1111 'parameters' text, but not the 'sdxl' settings needed to re-run it exactly)" if has_a1111 else ""
        raise ValueError(f"{path}: no sdxl generation settings in this PNG{extra}; it was not written by `sdxl generate`")
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the '{JSON_KEY}' settings chunk is not valid JSON ({e})") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: the '{JSON_KEY}' settings chunk is not a JSON object")
    version = settings.pop("format", None)
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: settings format {version!r} is not one this sdxl reads ({FORMAT_VERSION})")
    return settings
