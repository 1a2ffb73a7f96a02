"""Fit the built-in models' latent -> RGB preview maps by least squares; writes src/sdxl/data/builtin_previews.json.

    python scripts/fit_preview_map.py              # 2000 training images, 500 held out, seed 0
    python scripts/fit_preview_map.py --n 4000 --check   # print the fit, leave the JSON as it is

For each built-in model ("builtin", "builtin-refiner"): render procedural shapes pictures
(`sdxl.training.shapes.make_example`: native, small-and-upscaled and cropped kinds, at the scaled SDXL
buckets of --resolution), encode them with the model's VAE (the posterior mean, times the scaling factor:
the latents the U-Net sees; the tiny VAE's posterior std is ~0.1 against ~1.9 for the means), average-pool
each picture 8x to the latent grid, and solve [latents, 1] @ W = pixels for the 4x3 matrix and the bias
(float64 least squares). Pixels are in [-1, 1], as SDXL's published factors, so `sdxl.previews` treats both
alike. Models whose VAEs are identical (by `sdxl.previews.vae_fingerprint`) share one fit.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sdxl import builtin
from sdxl.checkpoints.load import load
from sdxl.images import to_tensor
from sdxl.models.vae import AutoencoderKL
from sdxl.previews import BUILTIN_MAPS, SDXL_BIAS, SDXL_FACTORS, vae_fingerprint
from sdxl.training.data import buckets
from sdxl.training.shapes import make_example

KINDS = ("native", "native", "native", "small", "crop")  # mostly native, as the training data (60/20/20)


@torch.no_grad()
def samples(vae: AutoencoderKL, n: int, seed: int, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents (N, 4), pooled pixels (N, 3)): one row per latent pixel of n rendered pictures."""
    rng = random.Random(seed)
    sizes = buckets(resolution, 8)
    by_size: dict[tuple[int, int], list[torch.Tensor]] = {}
    for _ in range(n):
        width, height = rng.choice(sizes)
        image, _ = make_example(rng, width, height, rng.choice(KINDS))
        by_size.setdefault((width, height), []).append(to_tensor(image))  # (1, 3, H, W) in [-1, 1]
    z_rows, rgb_rows = [], []
    for images in by_size.values():
        for x in torch.cat(images).split(64):  # pictures of one size encode as a batch
            z = vae.scale_latents(vae.encode_moments(x)[0])  # (b, 4, H/8, W/8)
            pooled = F.avg_pool2d(x, vae.config.downscale_factor)  # (b, 3, H/8, W/8)
            z_rows.append(z.movedim(1, -1).reshape(-1, z.shape[1]))
            rgb_rows.append(pooled.movedim(1, -1).reshape(-1, 3))
    return torch.cat(z_rows).double(), torch.cat(rgb_rows).double()


def solve(z: torch.Tensor, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares (matrix (C, 3), bias (3,)) of rgb ~ z @ matrix + bias."""
    design = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], 1)
    w = torch.linalg.lstsq(design, rgb).solution  # (C + 1, 3)
    return w[:-1], w[-1]


def rms(z: torch.Tensor, rgb: torch.Tensor, matrix: torch.Tensor, bias: torch.Tensor) -> float:
    """Root mean square of the error in [-1, 1] units (halve it for [0, 1] units)."""
    return (z @ matrix + bias - rgb).pow(2).mean().sqrt().item()


def fit(vae: AutoencoderKL, args: argparse.Namespace) -> dict:
    z, rgb = samples(vae, args.n, args.seed, args.resolution)
    z_test, rgb_test = samples(vae, args.held_out, args.seed + 1, args.resolution)
    matrix, bias = solve(z, rgb)
    sdxl = torch.tensor(SDXL_FACTORS, dtype=torch.float64), torch.tensor(SDXL_BIAS, dtype=torch.float64)
    return {
        "matrix": [[round(v, 5) for v in row] for row in matrix.tolist()],
        "bias": [round(v, 5) for v in bias.tolist()],
        "residual_rms": round(rms(z, rgb, matrix, bias), 5),
        "held_out_rms": round(rms(z_test, rgb_test, matrix, bias), 5),
        "sdxl_factors_held_out_rms": round(rms(z_test, rgb_test, *sdxl), 5),
        "latent_pixels": len(z),
        "vae_sha256": vae_fingerprint(vae),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000, help="training pictures (default 2000)")
    p.add_argument("--held-out", type=int, default=500, help="pictures to measure the fit on (default 500)")
    p.add_argument("--seed", type=int, default=0, help="training pictures use seed, held-out ones seed + 1")
    p.add_argument("--resolution", type=int, default=64, help="bucket area ~ resolution^2 (default 64)")
    p.add_argument("--out", type=Path, default=BUILTIN_MAPS)
    p.add_argument("--check", action="store_true", help="print the fit only")
    args = p.parse_args(argv)
    maps: dict[str, dict] = {}
    by_vae: dict[str, dict] = {}
    for name, path in builtin.FILES.items():
        vae = load(path).vae
        key = vae_fingerprint(vae)
        if key not in by_vae:
            by_vae[key] = fit(vae, args)
        maps[name] = by_vae[key]
        print(f"{name}: {json.dumps(maps[name])}")
    out = {
        "about": "Latent -> RGB preview maps of the built-in models, used by sdxl.previews: rgb = latents^T @ "
                 "matrix + bias per latent pixel (latents scaled as the U-Net sees them), in [-1, 1], shown as "
                 "(rgb + 1) / 2. Fitted by least squares to shapes pictures average-pooled 8x; RMS errors in "
                 "[-1, 1] units. vae_sha256: sdxl.previews.vae_fingerprint of the VAE fitted (refit when it changes).",
        "made_by": f"python scripts/fit_preview_map.py --n {args.n} --held-out {args.held_out} --seed {args.seed} "
                   f"--resolution {args.resolution}",
        "maps": maps,
    }
    if not args.check:
        text = re.sub(r"\[\s+([-\d.,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]",
                      json.dumps(out, indent=2))  # lists of numbers on one line each
        args.out.write_text(text + "\n", encoding="utf-8")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
