"""Does a VAE keep blur? Renders shapes at 64/f px, upscales them to 64x64 (bicubic, as the data set's 'small' kind)
and prints the sharpness (sdxl.training.shapes.measure) of the input and of its VAE reconstruction, per factor f.

    .venv/bin/python scripts/vae_blur_check.py [VAE_OR_MODEL.safetensors]   (default: the built-in model's VAE)

Size conditioning can only show in pixels if the reconstructions of blurred inputs stay blurrier than sharp ones.
"""

from __future__ import annotations

import random
import sys

import numpy as np
import torch
from PIL import Image

from sdxl import builtin
from sdxl.checkpoints.keymap import CheckpointError
from sdxl.checkpoints.load import load, load_vae_file
from sdxl.training.shapes import all_prompts, measure, render


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else str(builtin.path("builtin"))
    try:
        vae = load_vae_file(path).eval()
    except CheckpointError:  # a whole model file: take its VAE
        vae = load(path).vae.eval()

    def round_trip(image: Image.Image) -> Image.Image:
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        y = vae.decode(vae.encode_moments(x)[0])[0].permute(1, 2, 0).clamp(-1, 1)
        return Image.fromarray(((y + 1) * 127.5).round().byte().numpy())

    print("factor  input sharpness  reconstruction sharpness  (30 images each)")
    with torch.no_grad():
        for f in (1, 2, 3, 4, 6, 8):
            inputs, outputs = [], []
            for i in range(30):
                n = round(64 / f)
                image = render(*all_prompts()[i * 5], n, n, rng=random.Random(i))
                image = image.resize((64, 64), Image.Resampling.BICUBIC)
                inputs.append(measure(image)["sharpness"])
                outputs.append(measure(round_trip(image))["sharpness"])
            print(f"{f:6d}  {np.mean(inputs):15.3f}  {np.mean(outputs):24.3f}")


if __name__ == "__main__":
    main()
