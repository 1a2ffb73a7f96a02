"""A procedural data set for the built-in model: coloured shapes on coloured backgrounds, with captions.

Captions come from a tiny grammar, "a [small |big ]{colour} {shape} on a {colour} background", that
`parse_caption` reads back. Images are rendered anti-aliased (drawn 4x larger, then Lanczos-downsampled) at the
scaled SDXL bucket shapes (`data.buckets(resolution, 8)`), so that the micro-conditioning of the SDXL paper
(sec. 2.2) has something to learn:
- some images are rendered small and upscaled: their original_size is the small size and they are blurry;
- some are cropped from a larger canvas: original_size is the canvas, crop_top_left where the window was, and
  the shape may be cut by the border.
`write_dataset` records these in metadata.jsonl ("original_size": [h, w], "crop_top_left": [top, left]), which
`ImageCaptionDataset` honours; a sidecar .txt caption is written too.

`measure` inverts the renderer (background colour, shape colour, shape class, sharpness, cut) to judge the
images a trained model makes.

CLI: python -m sdxl.training.shapes OUT_DIR --n 2000 --resolution 64 --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .data import buckets

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (35, 70, 220),
    "yellow": (245, 220, 35),
    "orange": (245, 135, 20),
    "purple": (135, 45, 175),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "big")  # optional adjective in captions

_SUPERSAMPLE = 4
# Fill ratio of the shape in its bounding box: circle pi/4 ~ 0.785, square 1, triangle 0.5 (upright isosceles).
_FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}


def caption(shape: str, colour: str, background: str, size: str | None = None) -> str:
    """The caption of a `colour` `shape` on a `background` background, e.g. 'a red circle on a blue background'."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    for c in (colour, background):
        if c not in COLOURS:
            raise ValueError(f"unknown colour {c!r}; expected one of {tuple(COLOURS)}")
    if size is not None and size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")
    words = ["a"] + ([size] if size else []) + [colour, shape, "on", "a", background, "background"]
    return " ".join(words)


def parse_caption(text: str) -> tuple[str, str, str] | None:
    """(shape, colour, background) of a caption written by `caption`, or None if it is not one."""
    words = text.strip().lower().rstrip(".").split()
    if words[1:2] and words[1] in SIZES:
        words = words[:1] + words[2:]
    if len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background":
        return None
    colour, shape, background = words[1], words[2], words[5]
    if shape not in SHAPES or colour not in COLOURS or background not in COLOURS:
        return None
    return shape, colour, background


def render(
    shape: str,
    colour: str,
    background: str,
    width: int,
    height: int,
    *,
    rng: random.Random,
    scale: float | None = None,
    center: tuple[float, float] | None = None,
) -> Image.Image:
    """An RGB image of the shape (size `scale` x the shorter side) at `center` (fractions of width, height).

    Defaults draw scale from [0.35, 0.7] and a centre that keeps the whole shape inside the image (1.5 px margin).
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    if scale is None:
        scale = rng.uniform(0.35, 0.7)
    d = scale * min(width, height)  # the shape's bounding box is d x d
    if center is None:
        r = d / 2 + 1.5  # a margin, so that uncut shapes do not touch the border
        cx = rng.uniform(r, width - r) if width > 2 * r else width / 2
        cy = rng.uniform(r, height - r) if height > 2 * r else height / 2
    else:
        cx, cy = center[0] * width, center[1] * height
    k = _SUPERSAMPLE  # draw large, then downsample: anti-aliased edges
    big = Image.new("RGB", (width * k, height * k), COLOURS[background])
    draw = ImageDraw.Draw(big)
    x0, y0, x1, y1 = (cx - d / 2) * k, (cy - d / 2) * k, (cx + d / 2) * k, (cy + d / 2) * k
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:  # upright isosceles triangle filling half its bounding box
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return big.resize((width, height), resample=Image.Resampling.LANCZOS)


# ---------------------------------------------------------------------------------------------
# Measuring images (for judging a trained model's samples).

_PALETTE_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _PALETTE_NAMES], dtype=np.float32)


def _nearest(pixels: np.ndarray) -> np.ndarray:
    """Palette index of each (..., 3) pixel, by Euclidean RGB distance."""
    d = ((pixels[..., None, :] - _PALETTE) ** 2).sum(-1)
    return d.argmin(-1)


def _sharpness(a: np.ndarray, contrast: float) -> float:
    """RGB gradient magnitude (forward differences) of (H, W, 3) pixels, energy-weighted mean over the contrast."""
    gx = np.diff(a, axis=1)[:-1]
    gy = np.diff(a, axis=0)[:, :-1]
    g = np.sqrt((gx**2 + gy**2).sum(-1))
    return float((g**2).sum() / max(g.sum(), 1e-6) / contrast)


def measure(image: Image.Image) -> dict:
    """Background / shape colour names, shape class (bounding-box fill ratio), sharpness and cut of an image.

    Keys: background, colour, shape (None where no foreground is found), fill_ratio, sharpness (mean of
    |grad|^2 / mean |grad| over the contrast: ~1 / the edge width in pixels, so ~1 for crisp edges and lower for
    blurred ones, independent of the edge's length and colours), cut (the shape touches the border),
    foreground_fraction, bbox (top, left, bottom, right; inclusive).
    """
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w, _ = a.shape
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    # The border's majority palette colour is the background even when the shape touches the border.
    bg_idx = Counter(_nearest(border).tolist()).most_common(1)[0][0]
    bg = _PALETTE[bg_idx]
    out = {
        "background": _PALETTE_NAMES[bg_idx],
        "colour": None,
        "shape": None,
        "fill_ratio": 0.0,
        "sharpness": 0.0,
        "cut": False,
        "foreground_fraction": 0.0,
        "bbox": None,
    }
    labels = _nearest(a)
    fg_labels = labels[labels != bg_idx]
    if fg_labels.size < 4:
        return out
    # Anti-aliased edges blend into other palette colours; the majority of non-background pixels is the shape.
    fg_idx = Counter(fg_labels.tolist()).most_common(1)[0][0]
    fg = _PALETTE[fg_idx]
    # Soft coverage: each pixel's position on the background -> shape colour line, in [0, 1].
    v = fg - bg
    cov = np.clip(((a - bg) @ v) / float(v @ v), 0.0, 1.0)
    mask = cov > 0.5
    if mask.sum() < 2:
        return out
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    top, bottom, left, right = rows[0], rows[-1], cols[0], cols[-1]
    fill = float(cov.sum()) / float((bottom - top + 1) * (right - left + 1))
    shape = min(_FILL, key=lambda s: abs(_FILL[s] - fill))

    out.update(
        colour=_PALETTE_NAMES[fg_idx],
        shape=shape,
        fill_ratio=fill,
        sharpness=_sharpness(a, contrast=float(np.linalg.norm(v))),
        cut=bool(top == 0 or left == 0 or bottom == h - 1 or right == w - 1),
        foreground_fraction=float(mask.mean()),
        bbox=(int(top), int(left), int(bottom), int(right)),
    )
    return out


def all_prompts() -> list[tuple[str, str, str]]:
    """Every (shape, colour, background) with background != colour: 8 x 7 x 3 = 168 prompts to judge a model by."""
    return [(s, c, b) for c in _PALETTE_NAMES for b in _PALETTE_NAMES if b != c for s in SHAPES]


def judge(image: Image.Image, shape: str, colour: str, background: str) -> dict[str, bool]:
    """Whether `measure(image)` finds the prompt's background, shape colour and shape; 'all' when all three."""
    m = measure(image)
    ok = {"background": m["background"] == background, "colour": m["colour"] == colour, "shape": m["shape"] == shape}
    return {**ok, "all": all(ok.values())}


# ---------------------------------------------------------------------------------------------
# Writing the data set.


def _random_triple(rng: random.Random) -> tuple[str, str, str]:
    shape = rng.choice(SHAPES)
    colour = rng.choice(_PALETTE_NAMES)
    background = rng.choice([c for c in _PALETTE_NAMES if c != colour])
    return shape, colour, background


def make_example(
    rng: random.Random, width: int, height: int, kind: str = "native", small_factor: tuple[float, float] = (2.0, 4.0)
) -> tuple[Image.Image, dict]:
    """One image of size (width, height) and its record: kind 'native', 'small' (upscaled) or 'crop' (SDXL sec. 2.2).

    The record holds shape, colour, background, text, kind, original_size (h, w) and crop_top_left (top, left).
    """
    shape, colour, background = _random_triple(rng)
    if kind == "small":
        # Rendered at 1/2 .. 1/4 (small_factor) of the size and upscaled: blurry, and original_size says how small.
        f = rng.uniform(*small_factor)
        sw, sh = max(4, round(width / f)), max(4, round(height / f))
        image = render(shape, colour, background, sw, sh, rng=rng).resize(
            (width, height), resample=Image.Resampling.BICUBIC
        )
        original, crop = (sh, sw), (0, 0)
    elif kind == "crop":
        # A window of a canvas 1.25 .. 2x larger, chosen so that it contains the shape's centre (the caption
        # stays true) but may cut the shape.
        f = rng.uniform(1.25, 2.0)
        cw, ch = round(width * f), round(height * f)
        scale = rng.uniform(0.35, 0.7) * min(width, height) / min(cw, ch)  # same size in the window as native
        d = scale * min(cw, ch)
        cx, cy = rng.uniform(d / 2, cw - d / 2), rng.uniform(d / 2, ch - d / 2)
        canvas = render(shape, colour, background, cw, ch, rng=rng, scale=scale, center=(cx / cw, cy / ch))
        m = 2  # keep the centre this many pixels inside the window
        lo, hi = max(0, math.ceil(cx + m - width)), min(cw - width, math.floor(cx - m))
        left = rng.randint(min(lo, hi), hi)
        lo, hi = max(0, math.ceil(cy + m - height)), min(ch - height, math.floor(cy - m))
        top = rng.randint(min(lo, hi), hi)
        image = canvas.crop((left, top, left + width, top + height))
        original, crop = (ch, cw), (top, left)
    elif kind == "native":
        image = render(shape, colour, background, width, height, rng=rng)
        original, crop = (height, width), (0, 0)
    else:
        raise ValueError(f"unknown kind {kind!r}; expected 'native', 'small' or 'crop'")
    record = {
        "text": caption(shape, colour, background),
        "shape": shape,
        "colour": colour,
        "background": background,
        "kind": kind,
        "original_size": list(original),
        "crop_top_left": list(crop),
    }
    return image, record


def write_dataset(
    folder: str | Path,
    n: int,
    *,
    resolution: int = 64,
    seed: int = 0,
    small_fraction: float = 0.2,
    crop_fraction: float = 0.2,
    small_factor: tuple[float, float] = (2.0, 4.0),
) -> None:
    """Write n shape images (PNG, at the scaled bucket shapes), sidecar .txt captions and metadata.jsonl.

    metadata.jsonl lines: file_name, text, original_size [h, w], crop_top_left [top, left] (honoured by
    ImageCaptionDataset), plus shape, colour, background and kind for evaluation.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if small_fraction < 0 or crop_fraction < 0 or small_fraction + crop_fraction > 1:
        raise ValueError(
            f"need small_fraction, crop_fraction >= 0 with sum <= 1, got {small_fraction}, {crop_fraction}"
        )
    if not 1.0 <= small_factor[0] <= small_factor[1]:
        raise ValueError(f"small_factor must be (lo, hi) with 1 <= lo <= hi, got {small_factor}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    shapes_list = buckets(resolution, 8)  # multiples of 8: the VAE's downsampling factor
    digits = max(6, len(str(n - 1)))
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as meta:
        for i in range(n):
            width, height = rng.choice(shapes_list)
            u = rng.random()
            kind = "small" if u < small_fraction else "crop" if u < small_fraction + crop_fraction else "native"
            image, record = make_example(rng, width, height, kind, small_factor)
            name = f"{i:0{digits}d}.png"
            image.save(folder / name)
            (folder / name).with_suffix(".txt").write_text(record["text"] + "\n", encoding="utf-8")
            meta.write(json.dumps({"file_name": name, **record}) + "\n")


def main(argv: list[str] | None = None) -> None:
    """CLI: write the shapes data set to a folder."""
    p = argparse.ArgumentParser(prog="python -m sdxl.training.shapes", description=__doc__.split("\n")[0])
    p.add_argument("out_dir", help="folder to write images, captions and metadata.jsonl into")
    p.add_argument("--n", type=int, default=2000, help="number of images (default 2000)")
    p.add_argument("--resolution", type=int, default=64, help="bucket area ~ resolution^2 (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--small-fraction", type=float, default=0.2, help="fraction rendered small and upscaled")
    p.add_argument("--crop-fraction", type=float, default=0.2, help="fraction cropped from a larger canvas")
    p.add_argument("--small-factor", default="2,4", metavar="LO,HI",
                   help="small images are rendered at 1/f of their size, f uniform in [LO, HI] (default 2,4)")
    args = p.parse_args(argv)
    try:
        lo, hi = (float(v) for v in args.small_factor.split(","))
    except ValueError:
        p.error(f"--small-factor must be two numbers LO,HI, got {args.small_factor!r}")
    write_dataset(
        args.out_dir,
        args.n,
        resolution=args.resolution,
        seed=args.seed,
        small_fraction=args.small_fraction,
        crop_fraction=args.crop_fraction,
        small_factor=(lo, hi),
    )
    print(f"wrote {args.n} images to {args.out_dir}")


if __name__ == "__main__":
    main()
