"""AUTOMATIC1111's img2img image handling: decoding uploads, its resize modes, "only masked" inpainting (crop
around the mask, inpaint at full size, paste back) and the overlay that keeps the init image's own pixels
outside the mask. Plain functions on PIL images; the pipeline does the rest."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from ...images import load_image, prepare_mask, resize

DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)
RESIZE_MODES = {0: "just resize", 1: "crop and resize", 2: "resize and fill", 3: "just resize (latent upscale)"}
LATENT_RESIZE = 3  # the image encoded at its own size, its latents resized (GenerationOptions.resize_latents)


def decode_image(field: str, value: object, *, mask: bool = False, max_pixels: int | None = None) -> Image.Image:
    """A data URL or bare base64 image -> an RGB (grey for a mask) PIL image; ValueError naming `field`."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{field}: expected a base64-encoded image (or a data URL), got {type(value).__name__}")
    text = DATA_URL.sub("", value.strip(), count=1)
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), validate=False)
    except (binascii.Error, ValueError):
        raise ValueError(f"{field}: not valid base64") from None
    return load_image(data, mask=mask, what=field, max_pixels=max_pixels)


def resize_mode(image: Image.Image, mode: int, width: int, height: int) -> Image.Image:
    """A1111's resize modes: 0 stretch to width x height; 1 scale to cover it and crop the middle; 2 scale to fit
    inside it and fill the bands with the stretched edge pixels."""
    if mode == 0 or image.size == (width, height):
        return resize(image, width, height)
    w, h = image.size
    if mode == 1:
        scale = max(width / w, height / h)
        big = resize(image, max(width, round(w * scale)), max(height, round(h * scale)))
        left, top = (big.width - width) // 2, (big.height - height) // 2
        return big.crop((left, top, left + width, top + height))
    scale = min(width / w, height / h)
    small = resize(image, max(1, round(w * scale)), max(1, round(h * scale)))
    out = resize(small, width, height)  # the bands: the edges stretched, as A1111 fills them
    out.paste(small, ((width - small.width) // 2, (height - small.height) // 2))
    return out


@dataclass
class Region:
    """Where "only masked" inpainting works: a box of the original image, with the aspect of the output size."""

    box: tuple[int, int, int, int]  # left, top, right, bottom


def crop_region(mask: Image.Image, padding: int, width: int, height: int) -> Region | None:
    """The mask's bounding box grown by `padding`, then to the aspect of width x height, within the image; None
    for an empty mask."""
    a = np.asarray(mask.convert("L")) >= 128
    if not a.any():
        return None
    ys, xs = np.nonzero(a)
    W, H = mask.size
    l, t = max(int(xs.min()) - padding, 0), max(int(ys.min()) - padding, 0)
    r, b = min(int(xs.max()) + 1 + padding, W), min(int(ys.max()) + 1 + padding, H)
    target = width / height  # grow the shorter side around its centre, shifting back inside the image
    if (r - l) / (b - t) < target:
        l, r = _grow(l, r, round((b - t) * target), W)
    else:
        t, b = _grow(t, b, round((r - l) / target), H)
    return Region((l, t, r, b))


def _grow(lo: int, hi: int, size: int, limit: int) -> tuple[int, int]:
    size = min(size, limit)
    lo = max(0, min(lo - (size - (hi - lo)) // 2, limit - size))
    return lo, lo + size


def overlay(result: Image.Image, original: Image.Image, mask: Image.Image, blur: float) -> Image.Image:
    """The result inside the (blurred) mask, the original's own pixels outside it, as A1111 overlays them."""
    soft = prepare_mask(mask, *original.size, blur=blur)[0, 0].numpy()
    alpha = np.clip(soft * 2.0, 0.0, 1.0)[..., None]  # A1111 doubles the blurred mask: the inside stays opaque
    a = np.asarray(result.convert("RGB").resize(original.size), np.float32)
    o = np.asarray(original.convert("RGB"), np.float32)
    return Image.fromarray((a * alpha + o * (1.0 - alpha) + 0.5).clip(0, 255).astype(np.uint8))


def paste_back(result: Image.Image, original: Image.Image, region: Region) -> Image.Image:
    """An inpainted crop resized to its box and pasted into the original."""
    l, t, r, b = region.box
    out = original.convert("RGB").copy()
    out.paste(result.resize((r - l, b - t), Image.Resampling.LANCZOS), (l, t))
    return out


def invert(mask: Image.Image) -> Image.Image:
    return ImageOps.invert(mask.convert("L"))
