"""Images in and out of the pipeline: PIL <-> tensors, inpainting masks, outpainting canvases.

Conventions (the same as diffusers' `VaeImageProcessor`, so that results can be compared):
- The VAE reads and writes images as float tensors (B, 3, H, W) in [-1, 1].
- An input image becomes `np.asarray(rgb) / 255`, then `2 x - 1`; resizing uses PIL's Lanczos.
- An output image is `(x / 2 + 0.5).clamp(0, 1)` ("unit" floats, (B, H, W, 3) like diffusers'
  `output_type="np"`), and `round(255 u)` as uint8 for PIL.
- A mask is white (1) where the image is to be repainted and black (0) where it is kept. It is
  read as grey levels, resized to the image, divided by 255 and binarised at 0.5; an optional
  Gaussian blur then softens its edges (the blur is applied after binarisation, so it does
  produce a soft transition).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# Images.


def _to_pil(image, mode: str) -> Image.Image:
    """PIL image, uint8/float numpy array (H, W[, C]) or tensor ([1,] C, H, W) in [0, 1] -> PIL image in `mode`."""
    if isinstance(image, Image.Image):
        return image if image.mode == mode else image.convert(mode)
    if isinstance(image, Tensor):
        t = image.detach().cpu().float()
        if t.ndim == 4:
            if t.shape[0] != 1:
                raise ValueError(f"expected one image, got a batch of {t.shape[0]}")
            t = t[0]
        if t.ndim == 3:
            t = t.permute(1, 2, 0)  # C, H, W -> H, W, C
        image = t.numpy()
    if isinstance(image, np.ndarray):
        a = image
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
            raise ValueError(f"expected an image array (H, W), (H, W, 3) or (H, W, 4), got shape {a.shape}")
        if a.dtype != np.uint8:
            a = (np.clip(a.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
        return Image.fromarray(a).convert(mode)
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
    unit = to_unit(images).numpy()
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
