"""Train a small SDXL-style VAE (`AutoencoderKL`) from scratch on a folder of images (the shapes data set).

    python -m sdxl.training.train_vae OUT_DIR --data data/shapes64 --steps 3000

Loss: L1 reconstruction (images in [-1, 1]) + kl_weight x KL(posterior || N(0, 1)) (per latent element),
AdamW with a linear warm-up and cosine decay, seeded. Training batches are random 32x32 crops (--crop; 0: whole
images batched by size), horizontally flipped at random; the VAE is convolutional, so it then works at any size.

After training, `scaling_factor` is set to 1 / RMS of the latent means over (up to) 512 training images, so
that the diffusion model sees latents of about unit variance, as SDXL's 0.13025 does for its VAE.

Outputs in OUT_DIR:
  vae.safetensors           the VAE, official (`encoder.down.*`) names, float32, its VAEConfig in the metadata
                            (`sdxl.configs`); `sdxl.checkpoints.load.load_vae_file` reads it back
  init_base.safetensors     a single-file tiny base (random U-Net and CLIPs seeded as `init = "tiny"` does,
                            + this VAE): `model = ".../init_base.safetensors"` in a training config trains a
                            U-Net on top of the trained VAE
  init_refiner.safetensors  the same for `init = "tiny_refiner"`
  loss.csv                  step, loss, l1, kl, lr

OUT_DIR must be new or empty (an earlier run's files are not silently replaced); with --overwrite they are replaced
when this run writes its own, at the end (each under a temporary name, then renamed). Ctrl-C stops in one line.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..checkpoints.load import load_vae_file
from ..checkpoints.official import METADATA_CONFIGS
from ..models import vae as vae_models
from ..models.vae import AutoencoderKL, VAEConfig

# The built-in model's VAE: vae.tiny at half the width (16 base channels, widths 16/32/64/64), still 8x
# downsampling and 4 latent channels; ~2x faster to train on a CPU than vae.tiny, ample for flat-coloured shapes.
BUILTIN = replace(vae_models.tiny, base_channels=16, channel_mult=(1, 2, 4, 4))


# What a run writes into OUT_DIR.
OUTPUTS = ("vae.safetensors", "init_base.safetensors", "init_refiner.safetensors", "loss.csv", "eval.json")


def prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an OUT_DIR that is not empty, unless `overwrite`."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder")
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if present and not overwrite:
        shown = ", ".join(present[:4]) + (", ..." if len(present) > 4 else "")
        raise ValueError(f"{out} is not empty ({shown}): choose a new folder, or --overwrite to replace an earlier "
                         "run's files")
    out.mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------------------------------------
# Data: all images in memory, grouped by size.


def load_images(folder: str | Path, limit: int | None = None) -> dict[tuple[int, int], Tensor]:
    """(h, w) -> uint8 tensor (N, 3, h, w) of the folder's PNG/JPEG images (sorted by name), read as the U-Net
    trainer reads them (sdxl.training.data.read_image: DataError naming a file that cannot be read)."""
    from .data import read_image

    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if limit is not None:
        files = files[:limit]
    if not files:
        raise ValueError(f"{folder}: no images")
    groups: dict[tuple[int, int], list[np.ndarray]] = {}
    for p in files:
        a = np.asarray(read_image(p))
        h, w = a.shape[:2]
        if h % 8 or w % 8:
            a = a[: h - h % 8, : w - w % 8]
        groups.setdefault(a.shape[:2], []).append(a)
    return {k: torch.from_numpy(np.stack(v)).permute(0, 3, 1, 2).contiguous() for k, v in groups.items()}


def to_model(images: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) -> float [-1, 1]."""
    return images.float() / 127.5 - 1.0


def to_uint8(images: Tensor) -> Tensor:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class SizeBatches:
    """Random batches of same-sized images (or of same-sized random crops); a size is drawn in proportion to how many images it has."""

    def __init__(self, groups: dict[tuple[int, int], Tensor], batch_size: int, seed: int, crop: int | None = None):
        self.groups = list(groups.values())
        self.weights = [len(g) for g in self.groups]
        self.batch_size = batch_size
        self.rng = random.Random(seed)
        self.crop = crop  # random crop x crop windows from images of any size (faster steps)

    def next(self) -> Tensor:
        if self.crop:
            c, out = self.crop, []
            for g in self.rng.choices(self.groups, weights=self.weights, k=self.batch_size):
                im = g[self.rng.randrange(len(g))]
                top, left = self.rng.randint(0, im.shape[1] - c), self.rng.randint(0, im.shape[2] - c)
                im = im[:, top:top + c, left:left + c]
                out.append(im.flip(-1) if self.rng.random() < 0.5 else im)
            return to_model(torch.stack(out))
        g = self.rng.choices(self.groups, weights=self.weights)[0]
        idx = [self.rng.randrange(len(g)) for _ in range(min(self.batch_size, len(g)))]
        x = g[idx]
        flip = torch.tensor([self.rng.random() < 0.5 for _ in idx])
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return to_model(x)


# ---------------------------------------------------------------------------------------------
# Saving and loading.


def save_vae(vae: AutoencoderKL, path: str | Path, dtype: torch.dtype = torch.float32) -> None:
    """The VAE under official names, its config in the metadata."""
    from ..checkpoints.files import save_tensors
    from ..checkpoints.keymap import invert
    from ..checkpoints.vae_keys import official_vae_keys

    state = invert(vae.state_dict(), official_vae_keys(vae.config))
    state = {k: v.detach().to(dtype).contiguous().cpu() for k, v in state.items()}
    save_tensors(state, path, metadata={METADATA_CONFIGS: json.dumps({"vae": asdict(vae.config)})})


def init_checkpoint(vae: AutoencoderKL, path: str | Path, init: str = "tiny", seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> None:
    """A single-file tiny base ('tiny') or refiner ('tiny_refiner'): the random U-Net and CLIPs that
    `sdxl.training.train` builds for `init = ...` and `seed`, with this (trained) VAE in place of the random one."""
    from ..checkpoints.save import save_single_file
    from ..models import specs

    parts = specs.build_components(specs.SPECS[init], seed)
    parts.vae = vae
    save_single_file(parts, path, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Training.


def vae_loss(vae: AutoencoderKL, x: Tensor, gen: torch.Generator, kl_weight: float,
             edge_weight: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    mean, logvar = vae.encode_moments(x)
    z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen)
    rec = vae.decode(z)
    l1 = (rec - x).abs().mean()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    loss = l1 + kl_weight * kl
    if edge_weight:  # L1 between neighbour differences: pixel L1 alone rounds off corners and tips
        dx = lambda a: a[..., :, 1:] - a[..., :, :-1]  # noqa: E731
        dy = lambda a: a[..., 1:, :] - a[..., :-1, :]  # noqa: E731
        loss = loss + edge_weight * ((dx(rec) - dx(x)).abs().mean() + (dy(rec) - dy(x)).abs().mean())
    return loss, l1, kl


@torch.no_grad()
def latent_rms(vae: AutoencoderKL, groups: dict[tuple[int, int], Tensor], n: int = 512) -> float:
    total, count = 0.0, 0
    for g in groups.values():
        for i in range(0, len(g), 64):
            z = vae.encode(to_model(g[i:i + 64]))
            total += float(z.pow(2).sum())
            count += z.numel()
            if count >= n * 4 * 64:
                break
    return math.sqrt(total / count)


def train_vae(out_dir: str | Path, data: str | Path, *, steps: int = 3000, batch_size: int = 16, lr: float = 1e-3,
              kl_weight: float = 1e-4, warmup: int = 100, seed: int = 0, config: VAEConfig | None = None,
              crop: int | None = 32, log_every: int = 50, limit: int | None = None, progress: bool = True,
              init_checkpoints: bool = True, init_from: str | Path | None = None,
              decoder_only: bool = False, edge_weight: float = 0.0,
              keep_scaling: bool = False, overwrite: bool = False) -> tuple[AutoencoderKL, list[float]]:
    out = Path(out_dir)
    prepare_out_dir(out, overwrite)
    torch.manual_seed(seed)
    # init_from: continue from a VAE written by save_vae (its config wins over `config`).
    vae = (load_vae_file(init_from, dtype=torch.float32) if init_from else AutoencoderKL(config or BUILTIN)).train().requires_grad_(True)
    if decoder_only:  # fine-tune the decoder only: the latents (and a U-Net trained on them) stay valid
        vae.encoder.requires_grad_(False).eval()
        for m in (vae.quant_conv,):
            m.requires_grad_(False)
    groups = load_images(data, limit)
    batches = SizeBatches(groups, batch_size, seed, crop)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([q for q in vae.parameters() if q.requires_grad], lr=lr, weight_decay=1e-2, betas=(0.9, 0.99))
    losses: list[float] = []
    rows = []
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        f = min(1.0, step / warmup) if warmup else 1.0
        f *= 0.5 * (1 + math.cos(math.pi * min(1.0, (step - 1) / max(1, steps))))
        f = max(f, 0.05 * min(1.0, step / max(1, warmup)))
        for g in opt.param_groups:
            g["lr"] = lr * f
        loss, l1, kl = vae_loss(vae, batches.next(), gen, kl_weight, edge_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        rows.append((step, float(loss.detach()), float(l1.detach()), float(kl.detach()), lr * f))
        if progress and (step % log_every == 0 or step == steps):
            recent = rows[-log_every:]
            print(f"step {step}/{steps} loss {sum(r[1] for r in recent) / len(recent):.4f} "
                  f"l1 {sum(r[2] for r in recent) / len(recent):.4f} kl {recent[-1][3]:.3f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    vae.eval()
    rms = latent_rms(vae, groups)
    if not (decoder_only or keep_scaling):  # (decoder_only: same encoder, keep its scaling factor)
        vae.config = replace(vae.config, scaling_factor=round(1.0 / rms, 5))
    for name in OUTPUTS:  # an earlier run's (--overwrite): none of them may be left beside this run's
        (out / name).unlink(missing_ok=True)
    with (out / "loss.csv.tmp").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "loss", "l1", "kl", "lr"])
        w.writerows((s, f"{a:.6g}", f"{b:.6g}", f"{c:.6g}", f"{d:.6g}") for s, a, b, c, d in rows)
    (out / "loss.csv.tmp").replace(out / "loss.csv")
    save_vae(vae, out / "vae.safetensors")
    if init_checkpoints:
        init_checkpoint(vae, out / "init_base.safetensors", "tiny", seed)
        init_checkpoint(vae, out / "init_refiner.safetensors", "tiny_refiner", seed)
    if progress:
        print(f"latent RMS {rms:.4f} -> scaling_factor {vae.config.scaling_factor}; "
              f"{steps} steps in {time.perf_counter() - t0:.0f}s; wrote {out}", flush=True)
    return vae, losses


@torch.no_grad()
def evaluate(vae: AutoencoderKL, data: str | Path, limit: int | None = None) -> dict:
    """measure() of each image vs of its reconstruction: fraction where background, colour, shape all agree."""
    from PIL import Image

    from .shapes import measure

    groups = load_images(data, limit)
    keys = ("background", "colour", "shape")
    agree = {k: 0 for k in keys}
    agree_all, n, l1 = 0, 0, 0.0
    for g in groups.values():
        for i in range(0, len(g), 64):
            x = g[i:i + 64]
            rec = to_uint8(vae.decode(vae.encode(to_model(x))))
            l1 += float((rec.float() - x.float()).abs().mean()) / 127.5 * len(x)
            for a, b in zip(x, rec):
                ma = measure(Image.fromarray(a.permute(1, 2, 0).numpy()))
                mb = measure(Image.fromarray(b.permute(1, 2, 0).numpy()))
                ok = [ma[k] == mb[k] for k in keys]
                for k, o in zip(keys, ok):
                    agree[k] += o
                agree_all += all(ok)
                n += 1
    return {"n": n, "all": agree_all / n, **{k: v / n for k, v in agree.items()}, "l1": l1 / n}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdxl.training.train_vae", description=__doc__.split("\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--data", required=True, help="image folder (e.g. from python -m sdxl.training.shapes)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-4)
    p.add_argument("--edge-weight", type=float, default=0.0,
                   help="weight of an L1 loss on neighbour differences (sharper corners; e.g. 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crop", type=int, default=32, help="train on random crop x crop windows (0: whole images)")
    p.add_argument("--preset", choices=("builtin", "tiny"), default="builtin", help="VAE size (default builtin)")
    p.add_argument("--init-from", help="start from this vae.safetensors (a second stage) instead of random weights")
    p.add_argument("--decoder-only", action="store_true",
                   help="with --init-from: fine-tune only the decoder (latents unchanged, scaling_factor kept)")
    p.add_argument("--keep-scaling", action="store_true",
                   help="with --init-from: keep its scaling_factor (a U-Net trained on its latents fine-tunes onto "
                        "the new ones)")
    p.add_argument("--eval-data", help="a held-out image folder: report how often measure() agrees after reconstruction")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's files in OUT_DIR")
    args = p.parse_args(argv)
    try:
        vae, _ = train_vae(args.out_dir, args.data, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                           kl_weight=args.kl_weight, seed=args.seed, crop=args.crop or None,
                           config=BUILTIN if args.preset == "builtin" else vae_models.tiny, init_from=args.init_from,
                           decoder_only=args.decoder_only, edge_weight=args.edge_weight,
                           keep_scaling=args.keep_scaling, overwrite=args.overwrite,
                           init_checkpoints=not (args.decoder_only or args.keep_scaling))
    except KeyboardInterrupt:
        print(f"{p.prog}: interrupted; nothing saved (the VAE trainer writes its files at the end)", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    if args.eval_data:
        result = evaluate(vae, args.eval_data)
        print(json.dumps(result))
        (Path(args.out_dir) / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
