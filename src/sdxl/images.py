"""Images in and out of the pipeline: image files and PIL <-> tensors, inpainting masks, outpainting canvases.

Conventions (the same as diffusers' `VaeImageProcessor`, so that results can be compared):
- The VAE reads and writes images as float tensors (B, 3, H, W) in [-1, 1].
- An input image becomes `np.asarray(rgb) / 255`, then `2 x - 1`; resizing uses PIL's Lanczos.
- An output image is `(x / 2 + 0.5).clamp(0, 1)` ("unit" floats, (B, H, W, 3) like diffusers'
  `output_type="np"`), and `round(255 u)` as uint8 for PIL.
- A mask is white (1) where the image is to be repainted and black (0) where it is kept. It is
  read as grey levels, resized to the image, divided by 255 and binarised at 0.5; an optional
  Gaussian blur then softens its edges (the blur is applied after binarisation, so it does
  produce a soft transition).

Every image, from a file (`load_image`: init images, masks, training data) or from the Python API (PIL images,
arrays, tensors), is read into 8-bit RGB (a mask: 8-bit grey) by one rule set (`normalize`):
- upright: a file's EXIF orientation is applied (as a photo viewer shows it);
- transparency is composited over white, as AUTOMATIC1111 does (its img2img background colour, #ffffff) and
  the trainer does; a mask with real transparency is its alpha channel (opaque = repaint), as AUTOMATIC1111
  reads masks painted on a transparent layer;
- 16-bit and 32-bit integer greys are scaled from 0..65535 and float greys from 0..1 (a 16-bit mid-grey is
  mid-grey, not white); uint16 arrays likewise, and integer tensors / arrays with values 0..255 as 8-bit;
- palettes, CMYK and the other PIL modes are converted by PIL (as diffusers, A1111 and ComfyUI do).
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError
from torch import Tensor

# The largest image file read, in pixels: PIL's own decompression-bomb limit (89,478,485, about 9459 x 9459).
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
_HIGH_BIT_GREYS = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # integer greys read as 0..65535
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
_LIMIT = threading.Lock()  # PIL's limit is a module global: raised for one read at a time

# ---------------------------------------------------------------------------------------------
# Images.


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in _ALPHA_MODES or (im.mode in ("P", "L", "RGB") and "transparency" in im.info)


def _eight_bit_grey(im: Image.Image) -> Image.Image:
    """A 16/32-bit integer grey (0..65535) or a float grey (0..1) -> 8-bit grey ("L")."""
    a = np.asarray(im)
    if im.mode == "F":
        a = np.nan_to_num(a.astype(np.float32), nan=0.0) * 255.0
    else:
        a = a.astype(np.float64) / 257.0  # 65535 -> 255
    return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8), "L")


def normalize(im: Image.Image, *, mask: bool = False) -> Image.Image:
    """Any PIL image -> 8-bit RGB, or 8-bit grey ("L") with mask=True, by the rules in the module's docstring."""
    if im.mode in (*_HIGH_BIT_GREYS, "F"):
        im = _eight_bit_grey(im)
    if mask:
        if _has_alpha(im):
            alpha = im.convert("RGBA").getchannel("A")
            if alpha.getextrema() != (255, 255):  # transparent = keep, opaque = repaint
                return alpha
        return im if im.mode == "L" else im.convert("L")
    if _has_alpha(im):
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def _open(path: Path) -> Image.Image:
    """Image.open (the header only) without PIL's decompression-bomb check: `load_image` checks the size itself,
    against a limit the caller may raise."""
    with warnings.catch_warnings(), _LIMIT:  # PIL's limit is a module global: lifted for one open at a time
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def load_image(path: str | Path | bytes, *, mask: bool = False, what: str = "--init-image",
               max_pixels: int | None = None) -> Image.Image:
    """An image file as the pipeline reads it (`normalize`): 8-bit RGB, or grey with mask=True, upright.

    what: how messages name the file's origin (a flag such as "--mask"; "" for none). ValueError naming the
    file and `what` for a file that is not an image, is truncated or corrupt, or has more than `max_pixels`
    pixels (default MAX_IMAGE_PIXELS, checked from the header, before any pixel is decoded);
    FileNotFoundError for a missing one. `path` may also be the file's bytes (an upload): then `what` names it."""
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if isinstance(path, (bytes, bytearray)):
        source, where = io.BytesIO(path), what or "image"
    else:
        path = source = Path(path).expanduser()
        where = f"{what} {path}" if what else str(path)
        if path.is_dir():
            raise ValueError(f"{where}: a folder, not an image file")
        if not path.is_file():
            raise FileNotFoundError(f"{where}: no such file")
    try:
        opened = _open(source)
    except UnidentifiedImageError:
        raise ValueError(f"{where}: not an image file (or not a format PIL reads)") from None
    with opened:
        w, h = opened.size
        if w * h > limit:
            hint = "; --max-image-pixels N reads larger ones" if what.startswith("--") else ""  # a flag's file
            raise ValueError(f"{where}: {w}x{h} = {w * h:,} pixels, more than the {limit:,} images are read up to "
                             f"(a decompression bomb?){hint}")
        try:
            opened.load()
            return normalize(_exif_transpose(opened), mask=mask)
        except Exception as e:  # noqa: BLE001 (truncated data, broken chunks, zlib errors, modes PIL cannot convert)
            raise ValueError(f"{where}: cannot read this image: truncated or corrupt ({_reason(e)})") from None


def _exif_transpose(im: Image.Image) -> Image.Image:
    """`im` turned upright by its EXIF orientation: a new image (the file's may be closed after)."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 (a broken EXIF block: the pixels as stored)
        return im.copy()


def _reason(e: Exception) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__


def _array_to_pil(a: np.ndarray) -> Image.Image:
    """An (H, W[, C]) array -> PIL: uint8 as is, uint16 over 0..65535, bool as 0/255, floats over 0..1,
    other integers when their values are 0..255."""
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ValueError(f"expected an image array (H, W), (H, W, 3) or (H, W, 4), got shape {a.shape}")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = (a.astype(np.float64) / 257.0).round().astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ValueError("the image array holds NaN or infinite values")
        a = (np.clip(a.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer) and a.dtype != np.uint8:
        if a.size and (a.min() < 0 or a.max() > 255):
            raise ValueError(f"an integer image array ({a.dtype}) must hold 0..255 (or be uint16), got "
                             f"{a.min()}..{a.max()}; floats are read as 0..1")
        a = a.astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ValueError(f"expected an image array of uint8, uint16, bool or floats, got {a.dtype}")
    return Image.fromarray(np.ascontiguousarray(a))


def _to_pil(image, mode: str) -> Image.Image:
    """PIL image, numpy array (H, W[, C]) or tensor ([1,] C, H, W) -> PIL image in `mode` ("RGB" or "L", by
    `normalize`). Float arrays and tensors are in [0, 1]; see `_array_to_pil` for the others."""
    if isinstance(image, Tensor):
        t = image.detach().cpu()
        if t.ndim == 4:
            if t.shape[0] != 1:
                raise ValueError(f"expected one image, got a batch of {t.shape[0]}")
            t = t[0]
        if t.ndim == 3:
            t = t.permute(1, 2, 0)  # C, H, W -> H, W, C
        image = (t.float() if t.is_floating_point() else t).numpy()
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    if isinstance(image, Image.Image):
        return normalize(image, mask=mode == "L")
    raise TypeError(f"expected a PIL image, a numpy array or a torch tensor, got {type(image).__name__}")


def image_size(image) -> tuple[int, int]:
    """(width, height) of a PIL image, an (H, W[, C]) array or a ([1,] C, H, W) tensor."""
    if isinstance(image, Image.Image):
        return image.size
    if isinstance(image, np.ndarray):
        return image.shape[1], image.shape[0]
    if isinstance(image, Tensor):
        return image.shape[-1], image.shape[-2]
    raise TypeError(f"expected a PIL image, a numpy array or a torch tensor, got {type(image).__name__}")


def resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """Lanczos resize (a no-op copy at the same size), as diffusers' image processor does."""
    return image.resize((width, height), resample=Image.Resampling.LANCZOS)


def to_tensor(image, width: int | None = None, height: int | None = None) -> Tensor:
    """An image -> float32 tensor (1, 3, H, W) in [-1, 1], resized to (width, height) if given."""
    pil = _to_pil(image, "RGB")
    if width is not None and height is not None and pil.size != (width, height):
        pil = resize(pil, width, height)
    a = np.asarray(pil).astype(np.float32) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1)[None] * 2.0 - 1.0


def to_unit(images: Tensor) -> Tensor:
    """VAE output (B, 3, H, W) in about [-1, 1] -> float32 (B, H, W, 3) in [0, 1] (diffusers' "np" output)."""
    return (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu()


def to_pil(images: Tensor) -> list[Image.Image]:
    """VAE output (B, 3, H, W) in about [-1, 1] -> PIL RGB images."""
    return unit_to_pil(to_unit(images).numpy())


def unit_to_pil(unit: np.ndarray) -> list[Image.Image]:
    """Float images (B, H, W, 3) in [0, 1] (`to_unit`, the pipeline's output="np") -> PIL RGB images."""
    return [Image.fromarray((u * 255).round().astype(np.uint8)) for u in unit]


# ---------------------------------------------------------------------------------------------
# Masks.


def prepare_mask(mask, width: int, height: int, blur: float = 0.0) -> Tensor:
    """A mask (white = repaint) -> float32 tensor (1, 1, H, W) in [0, 1].

    Grey levels, resized to (width, height), binarised at 0.5, then blurred with a Gaussian of
    radius `blur` pixels when `blur > 0` (soft edges for the latent blend).
    """
    if blur < 0:
        raise ValueError(f"mask blur must be >= 0 pixels, got {blur}")
    pil = _to_pil(mask, "L")
    if pil.size != (width, height):
        pil = resize(pil, width, height)
    m = (np.asarray(pil).astype(np.float32) / 255.0 >= 0.5).astype(np.float32)
    if blur > 0:
        soft = Image.fromarray((m * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(blur))
        m = np.asarray(soft).astype(np.float32) / 255.0
    return torch.from_numpy(m)[None, None]


def fill_masked(image, mask) -> Image.Image:
    """The image (RGB) with its masked (white) region painted in the colours around it: averages over coarse
    blocks far from the kept pixels, finer ones near them (AUTOMATIC1111's masked content "fill")."""
    pil = _to_pil(image, "RGB")
    size = pil.size
    m = _to_pil(mask, "L")
    keep = (np.asarray(m if m.size == size else resize(m, *size), np.float32) < 127.5).astype(np.float32)
    if keep.all() or not keep.any():
        return pil
    rgb = np.asarray(pil, np.float32) / 255.0
    out, hole = rgb.copy(), keep == 0
    for factor in (256, 64, 16, 4, 2):  # coarse to fine: each finer estimate overwrites where it has support
        small = (max(1, size[0] // factor), max(1, size[1] // factor))
        weight = _box_blur(keep, small, size)
        sums = np.stack([_box_blur(rgb[..., c] * keep, small, size) for c in range(3)], axis=-1)
        known = hole & (weight > 1e-3)
        out[known] = sums[known] / weight[known][:, None]
    return Image.fromarray((out.clip(0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))


def _box_blur(a: np.ndarray, small: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    f = Image.fromarray(np.ascontiguousarray(a, np.float32), mode="F")
    return np.asarray(f.resize(small, Image.Resampling.BOX).resize(size, Image.Resampling.BILINEAR), np.float32)


# ---------------------------------------------------------------------------------------------
# Outpainting.


def outpaint_canvas(
    image,
    padding: Sequence[int],
    *,
    fill: str | tuple[int, int, int] = "edge",
    overlap: int = 0,
    multiple: int = 8,
) -> tuple[Image.Image, Image.Image]:
    """Pad `image` by (left, top, right, bottom) pixels -> (canvas, mask) for inpainting.

    The mask is white over the new border and, with `overlap` > 0, over that many pixels of the
    original along each padded side (so the seam is repainted too). `fill` paints the border:
    "edge" repeats the outermost pixels, "reflect" mirrors the image, or an RGB colour. The right
    and bottom paddings are enlarged so that the canvas is a multiple of `multiple` pixels.
    """
    if len(padding) != 4 or any(int(p) != p or p < 0 for p in padding):
        raise ValueError(f"outpaint padding must be 4 non-negative integers (left, top, right, bottom), got {padding}")
    if overlap < 0:
        raise ValueError(f"outpaint overlap must be >= 0 pixels, got {overlap}")
    left, top, right, bottom = (int(p) for p in padding)
    pil = _to_pil(image, "RGB")
    w, h = pil.size
    right += -(w + left + right) % multiple
    bottom += -(h + top + bottom) % multiple
    a = np.asarray(pil)
    pads = ((top, bottom), (left, right), (0, 0))
    if fill in ("edge", "reflect"):
        if fill == "reflect" and (max(top, bottom) >= h or max(left, right) >= w):
            fill = "edge"  # numpy's reflect needs the padding smaller than the image
        canvas = np.pad(a, pads, mode=fill)
    else:
        if isinstance(fill, str) or len(fill) != 3:
            raise ValueError(f"outpaint fill must be 'edge', 'reflect' or an (R, G, B) colour, got {fill!r}")
        canvas = np.empty((h + top + bottom, w + left + right, 3), dtype=np.uint8)
        canvas[:] = np.asarray(fill, dtype=np.uint8)
        canvas[top:top + h, left:left + w] = a
    mask = np.full(canvas.shape[:2], 255, dtype=np.uint8)
    keep_top, keep_left = top + (overlap if top else 0), left + (overlap if left else 0)
    keep_bottom, keep_right = top + h - (overlap if bottom else 0), left + w - (overlap if right else 0)
    if keep_bottom > keep_top and keep_right > keep_left:
        mask[keep_top:keep_bottom, keep_left:keep_right] = 0
    return Image.fromarray(canvas), Image.fromarray(mask)
