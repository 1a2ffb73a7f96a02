"""Train SDXL's VAE (`AutoencoderKL`): the latent-diffusion autoencoder recipe from a TOML config, or a small VAE for
the built-in model from the command line.

1. `sdxl train-vae CONFIG.toml` (or `torchrun ... -m sdxl.training.train_vae CONFIG.toml`: DDP, or FSDP with
   `parallel = "fsdp"`); the keys are sdxl.training.vae_config.VAETrainConfig's, see docs/training-vae.md. One
   optimizer step, as LDM's `LPIPSWithDiscriminator` (ldm/modules/losses/contperceptual.py) with SDXL's EMA:

    for each of grad_accum micro-batches (one aspect-ratio bucket each):
        z ~ posterior(x) (frozen encoder with decoder_only), rec = decode(z)
        nll  = per image sum over pixels of |x - rec| (or squared) + perceptual_weight * LPIPS(x, rec)
        kl   = per image sum over latents of KL(posterior || N(0, 1))
        from disc_start on:  g = -mean D(rec),  w = disc_weight * adaptive weight (discriminator.adaptive_weight)
        loss = mean over the batch of nll + kl_weight * kl + w * disc_factor * g
        D's loss: disc_factor * hinge(D(x), D(rec.detach()))          (D: taming's PatchGAN)
    Adam steps of the autoencoder and of D, EMA update.

   Outputs under output_dir: vae.safetensors (the EMA weights, official SDXL VAE names: `sdxl generate --vae`
   reads it), checkpoints/step_NNNNNNN/ (vae.safetensors, state.safetensors or state_rankR.safetensors, state.json,
   rng_rankR.safetensors: model, EMA, optimizers, discriminator, data position, random streams; a resumed run is
   the uninterrupted one), latest.txt, loss.csv, loss.png, config.toml, log.txt, eval.json (with eval_data).
   A used output_dir needs --resume latest or --overwrite; Ctrl-C / SIGTERM save the finished steps first.

2. `python -m sdxl.training.train_vae OUT_DIR --data data/shapes64 --steps 3000`: the built-in model's small VAE
   from scratch, as before (`train_vae` below):

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
import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import dtypes
from ..checkpoints.load import load_vae_file
from ..checkpoints.official import METADATA_CONFIGS
from ..models import vae as vae_models
from ..models.vae import AutoencoderKL, VAEConfig
from . import discriminator as disc_lib
from .data import DataError, collate
from .train import (
    PARTIAL,
    Batches,
    Dist,
    Interrupted,
    _barrier,
    _local,
    _note,
    _optimizer_state,
    _reading,
    _replace_dir,
    _resume_folder,
    _Signals,
    _write_text,
    plot_losses,
    setup_distributed,
)
from .vae_config import VAETrainConfig, load_vae_config

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
        def dx(a: Tensor) -> Tensor:
            return a[..., :, 1:] - a[..., :, :-1]

        def dy(a: Tensor) -> Tensor:
            return a[..., 1:, :] - a[..., :-1, :]

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


# ---------------------------------------------------------------------------------------------
# The trainer of `sdxl train-vae CONFIG` (sdxl.training.vae_config): LDM's autoencoder recipe with SDXL's EMA.

INIT_CONFIGS = {"builtin": BUILTIN, "tiny": vae_models.tiny}  # vae_config.INITS
# What a run writes into output_dir (--overwrite deletes them); a start that failed leaves only the RECORDS.
RUN_FILES = ("checkpoints", "latest.txt", "loss.csv", "loss.png", "config.toml", "log.txt", "vae.safetensors",
             "eval.json")
RECORDS = ("config.toml", "log.txt")
LOSS_COLUMNS = ("step", "loss", "nll", "rec", "lpips", "kl", "g", "d_weight", "disc", "lr")


class EMA:
    """Exponential moving average of named tensors, as LitEma (ldm/modules/ema.py) keeps SDXL's VAE: after each
    optimizer step, shadow <- shadow - (1 - d) (shadow - p) with d = decay, or with `warmup`
    d = min(decay, (1 + n) / (10 + n)) at the n-th update. Float32 shadows, whatever the weights' dtype."""

    def __init__(self, params: Mapping[str, Tensor], decay: float, warmup: bool = False):
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.shadow = {k: p.detach().float().clone() for k, p in params.items()}

    def current_decay(self) -> float:
        """The decay of the latest update (n = self.updates)."""
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, params: Mapping[str, Tensor]) -> None:
        self.updates += 1
        d = self.current_decay()
        for k, p in params.items():
            self.shadow[k].lerp_(p.detach().float(), 1.0 - d)

    @contextlib.contextmanager
    def applied(self, params: Mapping[str, Tensor]) -> Iterator[None]:
        """The shadows in place of `params` for the block (to save or evaluate), the trained weights after."""
        saved = {k: p.detach().clone() for k, p in params.items()}
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(self.shadow[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(saved[k])


class Autoencode(nn.Module):
    """images -> (reconstruction, posterior mean, logvar), the latent sampled with `gen`: one module for DDP."""

    def __init__(self, vae: AutoencoderKL, frozen_encoder: bool):
        super().__init__()
        self.vae, self.frozen_encoder = vae, frozen_encoder

    def forward(self, x: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        with torch.no_grad() if self.frozen_encoder else contextlib.nullcontext():
            mean, logvar = self.vae.encode_moments(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen, device=gen.device).to(mean)
        return self.vae.decode(z), mean, logvar


class Critic(nn.Module):
    """The discriminator on real and reconstructed images, separately (its BatchNorm sees each alone, as in LDM)."""

    def __init__(self, disc: nn.Module):
        super().__init__()
        self.disc = disc

    def forward(self, real: Tensor, fake: Tensor) -> tuple[Tensor, Tensor]:
        return self.disc(real), self.disc(fake)


def autoencoder_loss(x: Tensor, rec: Tensor, mean: Tensor, logvar: Tensor, cfg, lpips: nn.Module | None
                     ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(nll, kl, parts) as LDM's LPIPSWithDiscriminator: per image, the pixel error summed over (C, H, W) plus
    perceptual_weight x LPIPS at every pixel (its logvar fixed at 0), and the KL summed over the latent; both
    averaged over the batch."""
    b, pixels = x.shape[0], x[0].numel()
    diff = rec - x
    rec_sum = (diff.abs() if cfg.rec_loss == "l1" else diff.pow(2)).sum() / b
    p = lpips(x, rec).mean() if lpips is not None and cfg.perceptual_weight > 0 else x.new_zeros(())
    nll = rec_sum + cfg.perceptual_weight * p * pixels
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum() / b
    return nll, kl, {"rec": rec_sum / pixels, "lpips": p, "kl": kl}


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """No gradients into `module` for the block (the generator's pass through the discriminator)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


@dataclass
class VAETrainResult:
    losses: list[float]  # each optimizer step's loss (mean over processes)
    vae: AutoencoderKL | None  # the saved (EMA) weights as a plain model on the CPU (None but on rank 0)
    checkpoint: Path | None  # the last checkpoint folder written
    step: int


@dataclass
class _VAERun:
    """Everything a VAE training run carries from step to step."""

    cfg: VAETrainConfig
    d: Dist
    out: Path
    vae: AutoencoderKL
    model: nn.Module  # Autoencode, or DDP around it
    units: list[nn.Module]  # FSDP units (gradient sync switched per micro-step); [] otherwise
    params: dict[str, nn.Parameter]
    opt: torch.optim.Optimizer
    ema: EMA | None
    disc: nn.Module | None
    critic: nn.Module | None  # Critic(disc), or DDP around it
    dopt: torch.optim.Optimizer | None
    lpips: nn.Module | None
    gen: torch.Generator
    batches: Batches
    step: int = 0
    saved: tuple[int, Path] | None = None
    checkpoint: Path | None = None
    mark: tuple | None = None  # (generator state, torch RNG state, epoch, index) at the step's start

    def set_mark(self) -> None:
        self.mark = (self.gen.get_state(), torch.get_rng_state(), self.batches.epoch, self.batches.index)

    def rewind(self) -> None:
        """Back to the step's start: an abandoned step's draws and batches come again when the run resumes."""
        gen, rng, epoch, index = self.mark
        self.gen.set_state(gen)
        torch.set_rng_state(rng)
        self.batches.seek(epoch, index)
        for opt in (self.opt, self.dopt):
            if opt is not None:
                opt.zero_grad(set_to_none=True)

    @property
    def sharded(self) -> bool:
        return bool(self.units)

    def autocast(self) -> torch.autocast:
        """The forward passes' autocast (bf16 when mixed_precision asks; otherwise off)."""
        return torch.autocast(self.d.device.type, dtype=torch.bfloat16, enabled=self.cfg.mixed_precision == "bf16")

    def gan_on(self, step: int | None = None) -> bool:
        """Whether the GAN terms count at `step` (default: the step being trained, run.step + 1)."""
        step = self.step + 1 if step is None else step
        return self.disc is not None and disc_lib.disc_factor(self.cfg.disc_factor, step, self.cfg.disc_start) > 0


def build_vae(cfg: VAETrainConfig, device: torch.device) -> AutoencoderKL:
    """The VAE to fine-tune (float32, through the project's loaders) or a seeded random one."""
    if cfg.model is not None:
        from ..checkpoints.load import load_vae
        from ..checkpoints.paths import resolve_path

        return load_vae(resolve_path(cfg.model), dtype=torch.float32, device=device)
    torch.manual_seed(cfg.seed)
    return AutoencoderKL(INIT_CONFIGS[cfg.init]).to(device)


def shard_vae(vae: AutoencoderKL, d: Dist, decoder_only: bool) -> list[nn.Module]:
    """PyTorch FSDP2: each decoder level (and encoder level, when it trains) a unit of its own, then the decoder
    (encoder) and the 1x1 convs; a frozen encoder stays whole in every process. The units, outer ones last."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(d.device.type, (d.world,))
    units = [*vae.decoder.up, vae.decoder.mid, vae.decoder, vae.post_quant_conv]
    if not decoder_only:
        units = [*vae.encoder.down, vae.encoder.mid, vae.encoder, vae.quant_conv] + units
    units = [u for u in units if any(True for _ in u.parameters())]
    for unit in units:
        fully_shard(unit, mesh=mesh)
    return units


def _data(cfg: VAETrainConfig, folder: str, d: Dist, train: bool):
    """(dataset, batch sampler) over `folder`'s aspect-ratio buckets; no captions needed (their warning muted)."""
    from .data import BucketBatchSampler, ImageCaptionDataset

    class _NoCaptionWarning(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "no caption for" not in record.getMessage()

    quiet = _NoCaptionWarning()
    data_log = logging.getLogger("sdxl.training.data")
    data_log.addFilter(quiet)
    try:
        ds = ImageCaptionDataset(folder, resolution=cfg.resolution, bucket_multiple=cfg.bucket_multiple,
                                 random_crop=cfg.random_crop and train, flip=cfg.flip and train, seed=cfg.seed,
                                 allow_missing_captions=True, skip_unreadable=cfg.skip_unreadable_images)
    finally:
        data_log.removeFilter(quiet)
    if not train:
        return ds, None
    sampler = BucketBatchSampler(ds, batch_size=cfg.batch_size, seed=cfg.seed, rank=d.rank, world_size=d.world,
                                 drop_last=True)
    if len(sampler) == 0:
        raise ValueError(f"{folder}: the data gives no batch: {sampler.shortfall()}")
    return ds, sampler


def _load_lpips(cfg: VAETrainConfig, device: torch.device) -> nn.Module | None:
    if cfg.perceptual_weight == 0 and not cfg.eval_data:
        return None
    if cfg.lpips_vgg is None or cfg.lpips_linear is None:
        return None  # (eval without LPIPS; training with it is refused by the config)
    from .lpips import load_lpips

    return load_lpips(cfg.lpips_vgg, cfg.lpips_linear, download=cfg.lpips_download, device=device)


def _models(cfg: VAETrainConfig, d: Dist):
    """(vae, model to call, FSDP units, trained params, disc, critic to call): everything frozen but what trains."""
    vae = build_vae(cfg, d.device).requires_grad_(True).train()
    if cfg.decoder_only:  # the latents, and any U-Net trained on them, stay valid
        for m in (vae.encoder, vae.quant_conv):
            m.requires_grad_(False).eval()
    units = shard_vae(vae, d, cfg.decoder_only) if cfg.parallel == "fsdp" and d.world > 1 else []
    params = {k: p for k, p in vae.named_parameters() if p.requires_grad}
    model: nn.Module = Autoencode(vae, cfg.decoder_only)
    if d.world > 1 and not units:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda"
                                                    else None)
    disc = critic = None
    if cfg.discriminator:
        torch.manual_seed(cfg.seed + 1)  # the same discriminator in every process
        disc = disc_lib.NLayerDiscriminator(disc_lib.DiscriminatorConfig(channels=cfg.disc_channels,
                                                                         layers=cfg.disc_layers)).to(d.device)
        critic = Critic(disc)
        if d.world > 1:
            critic = nn.parallel.DistributedDataParallel(critic, device_ids=[d.device.index]
                                                         if d.device.type == "cuda" else None)
    return vae, model, units, params, disc, critic


def _start(cfg: VAETrainConfig, d: Dist) -> _VAERun:
    """Data, models, optimizers, EMA and random streams, resumed from a checkpoint if asked; the checkpoint folder,
    the data and the LPIPS files are checked before the VAE loads."""
    out = Path(cfg.output_dir)
    folder = _resume_folder(cfg) if cfg.resume else None
    ds, sampler = _data(cfg, cfg.data, d, train=True)
    lpips = _load_lpips(cfg, d.device)
    vae, model, units, params, disc, critic = _models(cfg, d)
    _claim_output(cfg, d)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
    dopt = (torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr or cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
            if disc is not None else None)
    run = _VAERun(cfg, d, out, vae, model, units, params, opt,
                  EMA(params, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay else None, disc, critic,
                  dopt, lpips, torch.Generator(d.device).manual_seed(cfg.seed + d.rank),
                  Batches(ds, sampler, collate, cfg.num_workers))
    torch.manual_seed(cfg.seed + d.rank)
    _note(out, d, f"data: {len(ds)} images, {len(sampler)} batch(es) per epoch per process")
    if folder is not None:
        meta = load_vae_checkpoint(folder, run)
        run.step, run.saved = meta["step"], (meta["step"], folder)
        run.batches.seek(meta["epoch"], meta["index"])
        if d.main:
            _trim_loss_csv(out / "loss.csv", run.step)
        _note(out, d, f"resumed from {folder} at step {run.step}, to step {cfg.steps}")
    else:
        _note(out, d, f"fresh run to step {cfg.steps}")
    run.set_mark()
    return run


# ---------------------------------------------------------------------------------------------
# One optimizer step.


def _micro_step(run: _VAERun, x: Tensor, last: bool) -> dict[str, Tensor]:
    """Forward and backward of one micro-batch (autoencoder, then discriminator); its logged values."""
    cfg, d = run.cfg, run.d
    for unit in run.units:  # only the last micro-batch reduce-scatters (FSDP) / all-reduces (DDP) gradients
        unit.set_requires_gradient_sync(last)
    sync = run.model.no_sync if d.world > 1 and not run.units and not last else contextlib.nullcontext
    gan = run.gan_on()
    factor = disc_lib.disc_factor(cfg.disc_factor, run.step + 1, cfg.disc_start) if gan else 0.0
    with sync():  # (backward inside it: DDP's no_sync covers the backward pass)
        with run.autocast():
            rec, mean, logvar = (t.float() for t in run.model(x, run.gen))  # the losses' sums in float32
            nll, kl, parts = autoencoder_loss(x, rec, mean, logvar, cfg, run.lpips)
            loss = nll + cfg.kl_weight * kl
            g = w = x.new_zeros(())
            if gan:
                with _frozen(run.disc):
                    g = disc_lib.generator_loss(run.disc(rec).float())
                w = disc_lib.adaptive_weight(nll, g, run.vae.decoder.conv_out.weight, cfg.disc_weight)
                loss = loss + w * factor * g
        (loss / cfg.grad_accum).backward()
    d_loss = x.new_zeros(())
    if gan:
        csync = run.critic.no_sync if d.world > 1 and not last else contextlib.nullcontext
        with csync():
            with run.autocast():
                real, fake = (t.float() for t in run.critic(x, rec.detach()))
                d_loss = factor * disc_lib.D_LOSSES[cfg.disc_loss](real, fake)
            (d_loss / cfg.grad_accum).backward()
    return {"loss": loss.detach(), "nll": nll.detach(), **{k: v.detach() for k, v in parts.items()},
            "g": g.detach(), "d_weight": w.detach(), "disc": d_loss.detach()}


def _train_step(run: _VAERun) -> dict[str, float]:
    """grad_accum micro-batches, the optimizer steps, the EMA update; the step's values (mean over micro-batches
    and processes). Until the optimizer steps, the step can be abandoned (run.rewind)."""
    cfg, d = run.cfg, run.d
    totals: dict[str, Tensor] = {}
    for micro in range(cfg.grad_accum):
        x = next(run.batches)["images"].to(d.device)
        for k, v in _micro_step(run, x, micro == cfg.grad_accum - 1).items():
            totals[k] = totals.get(k, 0) + v / cfg.grad_accum
    lr = cfg.lr * min(1.0, (run.step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
    values = torch.stack(list(totals.values()))
    if d.world > 1:
        dist.all_reduce(values)
        values /= d.world
    return {**dict(zip(totals, values.tolist())), "lr": lr}


def _optimizer_step(run: _VAERun, lr: float) -> None:
    cfg = run.cfg
    for opt, rate in ((run.opt, lr), (run.dopt, lr * (cfg.disc_lr or cfg.lr) / cfg.lr)):
        if opt is None:
            continue
        for group in opt.param_groups:
            group["lr"] = rate
    if cfg.max_grad_norm > 0:
        nn.utils.clip_grad_norm_(list(run.params.values()), cfg.max_grad_norm)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    if run.dopt is not None and run.gan_on():  # (before disc_start D has no gradients: it does not step)
        run.dopt.step()
        run.dopt.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(run.params)
    run.step += 1


# ---------------------------------------------------------------------------------------------
# Checkpoints (safetensors + JSON, never pickle).


def _full(t: Tensor) -> Tensor:
    """The whole tensor of an FSDP (DTensor) one, gathered from every process (all must call); plain ones as they
    are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def plain_vae(run: _VAERun) -> AutoencoderKL | None:
    """The weights to save and evaluate (the EMA's when there is one) as a plain float32 VAE on the CPU, on rank 0
    (None on the others; every process must call this)."""
    with run.ema.applied(run.params) if run.ema is not None else contextlib.nullcontext():
        state = {k: _full(v).detach().float().cpu().clone() for k, v in run.vae.state_dict().items()}
    if not run.d.main:
        return None
    with torch.device("meta"):
        vae = AutoencoderKL(run.vae.config)
    vae.load_state_dict(state, assign=True)
    return vae.eval()


def _training_tensors(run: _VAERun) -> dict[str, Tensor]:
    """This process's exact training state: trained weights, EMA, optimizers, discriminator."""
    tensors = {f"param.{k}": p.detach() for k, p in run.params.items()}
    if run.ema is not None:
        tensors.update({f"ema.{k}": v for k, v in run.ema.shadow.items()})
    for prefix, opt in (("opt", run.opt), ("dopt", run.dopt)):
        for i, s in (opt.state_dict()["state"] if opt is not None else {}).items():
            tensors.update({f"{prefix}.{i}.{k}": v for k, v in s.items()})
    if run.disc is not None:
        tensors.update({f"disc.{k}": v for k, v in run.disc.state_dict().items()})
    return {k: _local(v).detach().contiguous().cpu() for k, v in tensors.items()}


def save_vae_checkpoint(run: _VAERun, folder: Path) -> AutoencoderKL | None:
    """vae.safetensors (the EMA weights, official names) and the training state into FOLDER.partial, renamed to
    `folder` once every process is done; then latest.txt names it. The saved VAE (rank 0)."""
    from safetensors.torch import save_file

    cfg, d = run.cfg, run.d
    final, folder = folder, folder.with_name(folder.name + PARTIAL)
    if d.main and folder.exists():
        shutil.rmtree(folder)
    _barrier(d)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"generator": run.gen.get_state().cpu(), "torch": torch.get_rng_state()},
              str(folder / f"rng_rank{d.rank}.safetensors"))
    vae = plain_vae(run)
    if d.main:
        if cfg.init is not None:  # from scratch: latents of about unit variance for a diffusion model
            vae.config = replace(vae.config, scaling_factor=round(1.0 / _latent_rms(vae, run.batches.ds), 5))
        save_vae(vae, folder / "vae.safetensors", dtype=dtypes.torch_dtype(cfg.save_dtype))
    if d.main or run.sharded:
        name = f"state_rank{d.rank}.safetensors" if run.sharded else "state.safetensors"
        save_file(_training_tensors(run), str(folder / name))
    if d.main:
        meta = {"step": run.step, "epoch": run.batches.epoch, "index": run.batches.index, "params": list(run.params),
                "param_groups": run.opt.state_dict()["param_groups"],
                "disc_param_groups": run.dopt.state_dict()["param_groups"] if run.dopt is not None else None,
                "ema_updates": run.ema.updates if run.ema is not None else None, "config": _record(cfg),
                "world_size": d.world, "parallel": "fsdp" if run.sharded else "ddp"}
        (folder / "state.json").write_text(json.dumps(meta, indent=1))
    _barrier(d)
    if d.main:
        _replace_dir(folder, final)
        _write_text(final.parent.parent / "latest.txt", final.name + "\n")
        for stale in final.parent.glob(f"*{PARTIAL}"):
            shutil.rmtree(stale)
    return vae


def _check_state(folder: Path, run: _VAERun) -> dict:
    """state.json, checked against this run: the same trained parameters, discriminator, EMA and processes."""
    with _reading(folder / "state.json"):
        meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        missing = [k for k in ("step", "epoch", "index", "params", "param_groups") if k not in meta]
        if missing:
            raise ValueError(f"lacks {', '.join(missing)}")
    checks = [(meta["params"] == list(run.params), "trained other parameters (a different decoder_only or VAE?)"),
              ((meta.get("disc_param_groups") is not None) == (run.dopt is not None), "differs in `discriminator`"),
              ((meta.get("ema_updates") is not None) == (run.ema is not None), "differs in `ema_decay`"),
              (meta.get("world_size", 1) == run.d.world, f"was saved with {meta.get('world_size')} processes"),
              (meta.get("parallel", "ddp") == ("fsdp" if run.sharded else "ddp"), "used another `parallel`")]
    for ok, why in checks:
        if not ok:
            raise ValueError(f"{folder}: the checkpoint {why} than this run; resume with the config it was saved with")
    return meta


def load_vae_checkpoint(folder: Path, run: _VAERun) -> dict:
    """The training state of `folder` into the run (weights, EMA, optimizers, discriminator, random streams); its
    state.json. A missing, truncated or corrupt file is a ValueError naming it."""
    from safetensors.torch import load_file

    meta = _check_state(folder, run)
    path = folder / (f"state_rank{run.d.rank}.safetensors" if run.sharded else "state.safetensors")
    with _reading(path), torch.no_grad():
        t = load_file(str(path))
        for k, p in run.params.items():
            _local(p).copy_(t[f"param.{k}"])
        if run.ema is not None:
            for k, v in run.ema.shadow.items():
                _local(v).copy_(t[f"ema.{k}"])
            run.ema.updates = meta["ema_updates"]
        run.opt.load_state_dict({"state": _optimizer_state(t, run.params), "param_groups": meta["param_groups"]})
        if run.disc is not None:
            run.disc.load_state_dict({k[5:]: v for k, v in t.items() if k.startswith("disc.")})
            dparams = dict(enumerate(run.disc.parameters()))
            dstate = _optimizer_state({k[1:]: v for k, v in t.items() if k.startswith("dopt.")},
                                      {str(i): p for i, p in dparams.items()})
            run.dopt.load_state_dict({"state": dstate, "param_groups": meta["disc_param_groups"]})
    path = folder / f"rng_rank{run.d.rank}.safetensors"
    with _reading(path):
        rng = load_file(str(path))
        run.gen.set_state(rng["generator"].to(run.gen.get_state().device))
        torch.set_rng_state(rng["torch"])
    return meta


@torch.no_grad()
def _latent_rms(vae: AutoencoderKL, ds, n: int = 64) -> float:
    """RMS of the latent means of (up to) n training images."""
    total, count = 0.0, 0
    for i in range(min(n, len(ds))):
        z = vae.encode(ds[i].image[None])
        total, count = total + float(z.pow(2).sum()), count + z.numel()
    return math.sqrt(total / count)


@torch.no_grad()
def evaluate_reconstruction(vae: AutoencoderKL, ds, lpips: nn.Module | None, limit: int,
                            device: torch.device | None = None) -> dict[str, float]:
    """Mean L1 (in [-1, 1]), PSNR (dB, of [0, 1] images) and LPIPS of the reconstructions (posterior means,
    clamped) of the first `limit` images of `ds`."""
    device = device or torch.device("cpu")
    vae = vae.to(device)
    sums = {"l1": 0.0, "psnr": 0.0, "lpips": 0.0}
    n = min(limit, len(ds))
    for i in range(n):
        x = ds[i].image[None].to(device)
        rec = vae.decode(vae.encode(x)).clamp(-1, 1)
        sums["l1"] += float((rec - x).abs().mean())
        sums["psnr"] += float(10 * torch.log10(4.0 / (rec - x).pow(2).mean().clamp_min(1e-10)))
        sums["lpips"] += float(lpips(x, rec).mean()) if lpips is not None else math.nan
    return {"images": n, **{k: v / max(n, 1) for k, v in sums.items()}}


# ---------------------------------------------------------------------------------------------
# The output folder.


def _record(cfg: VAETrainConfig) -> str:
    """The config as the run records it: overwrite = false, so that running the record again deletes nothing."""
    return dataclasses.replace(cfg, overwrite=False).to_toml()


def check_output_dir(cfg: VAETrainConfig) -> None:
    """Refuse a fresh run into a folder that is not empty (but for a failed start's RECORDS), unless overwrite."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {out} is a file, not a folder")
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    kept = [n for n in present if n not in RECORDS]
    if kept and not cfg.resume and not cfg.overwrite:
        ours = [n for n in kept if n in RUN_FILES]
        if ours:
            hint = "continue it with --resume latest, or " if "latest.txt" in ours else "it has no checkpoint: "
            raise ValueError(f"output_dir {out} holds an earlier run ({', '.join(ours)}): {hint}start over with "
                             "--overwrite (overwrite = true), which deletes it")
        raise ValueError(f"output_dir {out} is not empty ({', '.join(kept[:3])}{', ...' if len(kept) > 3 else ''}): "
                         "choose a new folder (--output-dir), or --overwrite to train beside these files")


def _claim_output(cfg: VAETrainConfig, d: Dist) -> None:
    """Make output_dir this run's (with overwrite: delete an earlier run's files, only now that data and models
    loaded); record the config."""
    out = Path(cfg.output_dir)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        ours = sorted(p.name for p in out.iterdir() if p.name in RUN_FILES)
        if cfg.overwrite and ours:
            for name in ours:
                shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
            _note(out, d, f"overwrite: deleted the earlier run's {', '.join(ours)}")
        _write_text(out / "config.toml", _record(cfg))
    _barrier(d)


def _append_loss_csv(path: Path, rows: list[dict[str, float]]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(LOSS_COLUMNS)
        w.writerows([int(r["step"])] + [f"{r[c]:.6g}" for c in LOSS_COLUMNS[1:]] for r in rows)


def _trim_loss_csv(path: Path, step: int) -> None:
    """Rows of steps up to `step` only: a run resumed from there logs the later ones again."""
    if path.is_file():
        lines = path.read_text(errors="replace").splitlines()
        keep = [ln for ln in lines[1:] if ln.split(",")[0].isdigit() and int(ln.split(",")[0]) <= step
                and len(ln.split(",")) == len(LOSS_COLUMNS)]
        _write_text(path, "\n".join([",".join(LOSS_COLUMNS), *keep]) + "\n")


def _plot(out: Path) -> None:
    rows = [ln.split(",") for ln in (out / "loss.csv").read_text().splitlines()[1:]] if (out / "loss.csv").is_file() else []
    if rows:
        plot_losses([int(r[0]) for r in rows], [float(r[1]) for r in rows], out / "loss.png.tmp")
        os.replace(out / "loss.png.tmp", out / "loss.png")


# ---------------------------------------------------------------------------------------------
# The run.


def _save(run: _VAERun) -> AutoencoderKL | None:
    """A checkpoint of the current step, its evaluation (eval_data) and the loss plot."""
    checkpoint = run.out / "checkpoints" / f"step_{run.step:07d}"
    vae = save_vae_checkpoint(run, checkpoint)
    if run.d.main:
        if run.cfg.eval_data:
            ds, _ = _data(run.cfg, run.cfg.eval_data, run.d, train=False)
            result = evaluate_reconstruction(vae, ds, run.lpips, run.cfg.eval_images, run.d.device)
            _write_text(checkpoint / "eval.json", json.dumps({"step": run.step, **result}, indent=1) + "\n")
            _note(run.out, run.d, f"eval at step {run.step}: {json.dumps(result)}")
        _plot(run.out)
    run.saved, run.checkpoint = (run.step, checkpoint), checkpoint
    _note(run.out, run.d, f"saved {checkpoint}")
    return vae


def _stop(run: _VAERun, rows: list[dict], error: BaseException) -> NoReturn:
    """After a signal or a data error mid-step: rewind to the step's start, save the finished steps (one process,
    not after a forced stop) and raise the one line saying where they are."""
    run.rewind()
    if run.d.main and rows:
        _append_loss_csv(run.out / "loss.csv", rows)
    forced = getattr(error, "forced", False)
    if run.step == (run.saved[0] if run.saved else 0):
        where = "no step finished since the last checkpoint" if run.saved else "no step finished: nothing saved"
    elif forced or run.d.world > 1:
        where = "steps since the last checkpoint are lost" + (" (stopped half-way)" if forced else
                                                              f" (not saved with {run.d.world} processes)")
    else:
        _save(run)
        where = f"saved checkpoint {run.checkpoint}; continue with --resume latest"
    if isinstance(error, DataError):
        _note(run.out, run.d, f"stopped by a data error: {error}; {where}")
        raise DataError(f"{error}; {where}") from None
    signum = getattr(error, "signum", signal.SIGINT)
    message = f"{'interrupted' if signum == signal.SIGINT else 'terminated'} at step {run.step}; {where}"
    _note(run.out, run.d, f"stopped by {signal.Signals(signum).name}: {message}")
    raise Interrupted(signum, message, forced) from None


def train(cfg: VAETrainConfig, *, progress: bool = True) -> VAETrainResult:
    """Train as `cfg` says; output_dir/vae.safetensors gets the final (EMA) weights. A signal or a data error
    mid-run saves the finished steps first and raises Interrupted / DataError with one line."""
    d = setup_distributed()
    check_output_dir(cfg)
    run = _start(cfg, d)
    losses, rows, vae, t0 = [], [], None, time.perf_counter()
    with _Signals() as signals:
        try:
            while run.step < cfg.steps:
                values = _train_step(run)  # may be abandoned half-way: _stop rewinds it
                with signals.deferred():  # one signal never cuts an optimizer step or a save half-way
                    _optimizer_step(run, values["lr"])
                    losses.append(values["loss"])
                    rows.append({"step": run.step, **values})
                    if run.step % cfg.log_every == 0 or run.step == cfg.steps:
                        if d.main:
                            _append_loss_csv(run.out / "loss.csv", rows)
                        if d.main and progress:
                            print(f"step {run.step}/{cfg.steps} " + " ".join(
                                f"{k} {sum(r[k] for r in rows) / len(rows):.4g}" for k in ("loss", "rec", "lpips", "kl")
                            ) + f" ({time.perf_counter() - t0:.0f}s)", flush=True)
                        rows = []
                    if (cfg.save_every and run.step % cfg.save_every == 0) or run.step == cfg.steps:
                        vae = _save(run)
                    run.set_mark()
        except (KeyboardInterrupt, DataError) as e:
            _stop(run, rows, e)
    if run.saved is not None and d.main:  # the final weights beside the checkpoints (a resume at the end too)
        shutil.copyfile(run.saved[1] / "vae.safetensors", run.out / "vae.safetensors.tmp")
        os.replace(run.out / "vae.safetensors.tmp", run.out / "vae.safetensors")
        if (run.saved[1] / "eval.json").is_file():
            shutil.copyfile(run.saved[1] / "eval.json", run.out / "eval.json")
    _note(run.out, d, f"done at step {run.step}")
    return VAETrainResult(losses, vae, run.checkpoint, run.step)


# ---------------------------------------------------------------------------------------------
# Command line: `sdxl train-vae CONFIG` (or `torchrun ... -m sdxl.training.train_vae CONFIG.toml`).


def build_config_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="sdxl train-vae",
                                               description="Train or fine-tune SDXL's VAE from a TOML config.")
    parser.add_argument("config", help="the VAE training config (.toml); see configs/vae_finetune.toml")
    parser.add_argument("--resume", help="override the config's resume: a checkpoint folder or 'latest'")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an output_dir that holds an earlier run: delete its files first")
    parser.add_argument("--steps", type=int, help="override the config's total steps")
    parser.add_argument("--output-dir", help="override the config's output_dir")
    return parser


def main_config(argv: list[str] | None = None, prog: str = "sdxl train-vae") -> int:
    args = build_config_parser(argparse.ArgumentParser(prog=prog, description="Train or fine-tune SDXL's VAE "
                                                       "from a TOML config.")).parse_args(argv)
    overrides = {k: v for k, v in (("resume", args.resume), ("steps", args.steps), ("output_dir", args.output_dir),
                                   ("overwrite", args.overwrite or None)) if v is not None}
    try:
        result = train(load_vae_config(args.config, **overrides))
    except Interrupted as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"{prog}: interrupted before the first step; nothing saved", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if result.checkpoint is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"{prog}: {result.step} steps done; wrote {Path(result.checkpoint).parent.parent / 'vae.safetensors'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0].endswith(".toml"):  # a config: the LDM-recipe trainer (also under torchrun)
        return main_config(argv, prog="python -m sdxl.training.train_vae")
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
