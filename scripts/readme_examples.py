"""Make the README's example grid (docs/images/examples.png) with the built-in model: real outputs, fixed seeds.

    .venv/bin/python scripts/readme_examples.py [--out docs/images/examples.png]

Row 1: 64x64 at the native size; row 2: 80x48 and 48x80; each picture upscaled 2x (nearest) for viewing.
"""

from __future__ import annotations

import argparse

from PIL import Image

import sdxl
from sdxl.training.shapes import caption

NATIVE = [caption(*p) for p in [("circle", "red", "blue"), ("triangle", "yellow", "purple"),
                                ("square", "white", "black"), ("circle", "green", "orange"),
                                ("triangle", "blue", "white"), ("square", "orange", "green")]]
WIDE = [(caption("circle", "purple", "yellow"), 80, 48), (caption("triangle", "black", "red"), 48, 80),
        (caption("square", "green", "white"), 80, 48), (caption("triangle", "red", "green"), 48, 80)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/images/examples.png")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    pipe = sdxl.load("builtin")
    pad, scale = 8, 2
    tiles = [pipe.generate(text, seed=args.seed)[0] for text in NATIVE]
    wide = [pipe.generate(text, seed=args.seed, width=w, height=h)[0] for text, w, h in WIDE]
    width = len(NATIVE) * (64 * scale + pad) + pad
    height = pad + 64 * scale + pad + 80 * scale + pad
    grid = Image.new("RGB", (width, height), (160, 160, 160))
    x = pad
    for im in tiles:
        grid.paste(im.resize((64 * scale, 64 * scale), Image.Resampling.NEAREST), (x, pad))
        x += 64 * scale + pad
    x, y = pad, pad + 64 * scale + pad
    for im in wide:
        w, h = im.size
        grid.paste(im.resize((w * scale, h * scale), Image.Resampling.NEAREST), (x, y + (80 - h) * scale // 2))
        x += w * scale + pad
    grid.save(args.out)
    print(f"wrote {args.out}: {', '.join(NATIVE + [t for t, _, _ in WIDE])}")


if __name__ == "__main__":
    main()
