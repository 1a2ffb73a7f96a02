"""Fine-tune SDXL (or train a tiny one from scratch): `sdxl train CONFIG.toml`, or `torchrun ... -m
sdxl.training.train CONFIG.toml` on several GPUs (DDP, or FSDP with `parallel = "fsdp"`; gloo on CPU).

One optimizer step:
    for each of grad_accum micro-batches:
        x0      = VAE posterior sample of the images, scaled            (frozen VAE)
        t, eps  = uniform in [timestep_min, timestep_max], N(0, 1) (+ offset noise)
        x_t     = sqrt(a_t) x0 + sqrt(1 - a_t) eps
        context = cat(CLIP-L, bigG penultimate hidden states)            (refiner: bigG only)
        y       = cat(pooled bigG, emb(original_size, crop_top_left, target_size))  (refiner: ..., aesthetic)
        loss    = w(t) * |U-Net(x_t, t, context, y) - target|^2,  target = eps or v, w = min-SNR or 1
    AdamW step (clipped gradients, linear warm-up), EMA update.
objective = "dpo" (Diffusion-DPO, docs/dpo.md) trains on preference pairs (sdxl.training.pairs) instead: both
images of a pair share t and eps, and the loss compares the U-Net's errors on them with the frozen reference's
(the base: LoRA with its adapters off, or a frozen copy of the U-Net for a full fine-tune); see `preference_loss`.

Outputs under output_dir: checkpoints/step_NNNNNNN/ (model.safetensors in the official single-file
layout, or lora_kohya.safetensors + lora_peft.safetensors; *_ema versions with ema_decay;
state.safetensors + state.json + rng_rankR.safetensors for resuming), latest.txt (the newest
checkpoint's folder name), loss.csv (one row per step, also after a resume; with dpo a reward_accuracy column),
loss.png, config.toml,
log.txt (what happened: start, resume, data set scan with any unreadable images skipped, checkpoints, stops).

Nothing lost, nothing silent:
- A fresh run refuses an output_dir that is not empty (an earlier run's checkpoints would be overwritten):
  `--resume latest` continues that run, `--overwrite` (overwrite = true) deletes it first.
- A checkpoint is written under step_NNNNNNN.partial and renamed when every file of every process is there;
  latest.txt is written last. An interrupted save leaves only the .partial folder, which resuming refuses.
- Ctrl-C (SIGINT) or SIGTERM during a step abandons that step (its random streams and data position are
  rewound), saves the finished steps and exits with one line (status 130 / 143); inside an optimizer step or a
  save the first signal waits for its end, and a second one stops at once. An image that cannot be read mid-run
  saves the same way first. With several processes nothing more is saved (that would need every process in
  step): the line says where the last checkpoint is.

Determinism: all randomness of a step comes from one generator per process (seed + rank), saved
with each checkpoint with the optimizer, the EMA and the data position, so a resumed run continues
exactly as an uninterrupted one (on the same hardware and settings).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .. import dtypes
from ..checkpoints.files import save_tensors
from ..checkpoints.save import save_single_file
from ..conditioning import PENULTIMATE, encode_prompts, micro_value_count
from ..models import specs
from ..models.specs import Components
from ..models.unet import TimestepSequential, UNet, micro_conditioning
from ..sampling.schedules import TrainingSchedule
from . import lora as lora_lib
from . import pairs
from .config import TrainConfig, load_config
from .data import DataError

log = logging.getLogger(__name__)

# What a run writes into output_dir: --overwrite deletes them. A fresh run refuses a folder holding any of them but
# the records, which are all that a start that failed before its first step leaves (it is then simply tried again).
RUN_FILES = ("checkpoints", "cache", "latest.txt", "loss.csv", "loss.png", "config.toml", "log.txt")
RECORDS = ("config.toml", "log.txt")
PARTIAL = ".partial"  # suffix of a checkpoint folder being written


# ---------------------------------------------------------------------------------------------
# Distributed setup: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Dist(rank, dist.get_world_size() if dist.is_initialized() else 1, local, device)


def _barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# Models.


def build_components(cfg: TrainConfig, device: torch.device) -> Components:
    """The checkpoint to fine-tune (float32), or tiny models with random weights (seeded)."""
    if cfg.model is not None:
        from ..checkpoints.load import load
        from ..checkpoints.paths import resolve_path

        return load(resolve_path(cfg.model), dtype=torch.float32, device=device)
    return specs.build_components(specs.SPECS[cfg.init], cfg.seed, device=device)


def enable_gradient_checkpointing(unet: UNet) -> None:
    """Recompute each U-Net block (input, middle, output) in the backward pass instead of storing it."""
    from torch.utils.checkpoint import checkpoint

    for block in unet.modules():
        if isinstance(block, TimestepSequential):
            forward = block.forward  # the bound method; the instance attribute shadows the class's
            block.forward = lambda *args, f=forward: (
                checkpoint(f, *args, use_reentrant=False) if torch.is_grad_enabled() else f(*args)
            )


def shard_fsdp(trainee: nn.Module, d: Dist) -> None:
    """PyTorch FSDP2: each U-Net block, CLIP layer and text encoder becomes a unit whose weights, gradients and
    optimizer state are split across the processes; a unit's weights are gathered only while it runs."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(d.device.type, (d.world,))
    unet = trainee.unet
    units = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
    for encoder in (trainee.text_encoder, trainee.text_encoder_2):
        if encoder is not None:  # a unit of its own too: cached text encodes outside the trainee's forward
            units += [*encoder.transformer.resblocks, encoder]
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(trainee, mesh=mesh)


def _local(t: Tensor) -> Tensor:
    """This process's shard of an FSDP (DTensor) tensor; plain tensors as they are."""
    return t.to_local() if hasattr(t, "to_local") else t


def gathered_components(parts: Components, trainee: nn.Module) -> Components | None:
    """FSDP: the whole trained weights, gathered from every process into plain CPU models on rank 0 (None on the
    others; every process must call this). The models are built on the meta device and take the gathered tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(trainee, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not full:
        return None
    plain = {}
    for name in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(parts, name)
        if model is not None:
            with torch.device("meta"):
                model = type(model)(model.config)
            model.load_state_dict({k[len(name) + 1:]: v for k, v in full.items() if k.startswith(name + ".")},
                                  assign=True)
        plain[name] = model
    return dataclasses.replace(parts, **plain)


class Trainee(nn.Module):
    """Text conditioning + U-Net in one module, so DDP syncs the text encoders too when they train."""

    def __init__(self, parts: Components, train_text: bool):
        super().__init__()
        self.unet, self.text_encoder, self.text_encoder_2 = parts.unet, parts.text_encoder, parts.text_encoder_2
        self.train_text = train_text
        self.zero_empty = parts.force_zeros_for_empty_prompt  # as generation does for empty negative prompts

    def encode_text(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """captions -> (context (B, 77, C), pooled (B, P)); empty captions give zeros where the model says so."""
        device = next(self.unet.parameters()).device
        with contextlib.nullcontext() if self.train_text and torch.is_grad_enabled() else torch.no_grad():
            # The same conditioning as generation (the refiner has no CLIP ViT-L: text_encoder None).
            context, pooled = encode_prompts(self.text_encoder, self.text_encoder_2, captions, captions,
                                             hidden_layer=PENULTIMATE, device=device)
        if self.zero_empty:
            keep = torch.tensor([bool(c) for c in captions], device=device, dtype=context.dtype)
            context, pooled = context * keep[:, None, None], pooled * keep[:, None]
        return context, pooled

    def forward(self, x_t: Tensor, t: Tensor, micro: Tensor, captions: list[str] | None = None,
                text: tuple[Tensor, Tensor] | None = None) -> Tensor:
        context, pooled = text if text is not None else self.encode_text(captions)
        y = micro_conditioning(pooled, micro, dim=self.unet.config.addition_time_embed_dim)
        return self.unet(x_t, t, context, y)


# ---------------------------------------------------------------------------------------------
# Data: batches from sdxl.training.data, resumable at any batch.

# loader(cfg, rank, world) -> (dataset, batch sampler with set_epoch, collate)
Loader = Callable[[TrainConfig, int, int], tuple[Any, Any, Callable]]
# reference(x_t, t, micro, (context, pooled)) -> the frozen reference's prediction (objective = "dpo")
Reference = Callable[[Tensor, Tensor, Tensor, tuple[Tensor, Tensor]], Tensor]


def default_loader(cfg: TrainConfig, rank: int, world: int):
    from .data import BucketBatchSampler, ImageCaptionDataset, collate

    ds = ImageCaptionDataset(cfg.data, resolution=cfg.resolution, bucket_multiple=cfg.bucket_multiple,
                             random_crop=cfg.random_crop, caption_dropout=cfg.caption_dropout, seed=cfg.seed,
                             allow_missing_captions=cfg.allow_missing_captions,
                             skip_unreadable=cfg.skip_unreadable_images)
    sampler = BucketBatchSampler(ds, batch_size=cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world, drop_last=True)
    if len(sampler) == 0:
        raise ValueError(f"{cfg.data}: the data gives no batch: {sampler.shortfall()}")
    return ds, sampler, collate


def _describe_data(ds, sampler) -> list[str]:
    """log.txt lines on the data set: images, unreadable ones skipped, images no batch ever holds."""
    batches = f", {len(sampler)} batch(es) per epoch per process" if hasattr(sampler, "__len__") else ""
    lines = [f"data: {getattr(ds, 'counted', f'{len(ds)} images')}{batches}"]
    skipped = getattr(ds, "skipped", [])
    if skipped:
        lines.append(f"data: {len(skipped)} unreadable image(s) skipped (skip_unreadable_images = true):")
        lines += [f"  {rel} ({why})" for rel, why in skipped]
    small = sampler.small_buckets() if hasattr(sampler, "small_buckets") else {}
    if small:
        counts = ", ".join(f"{w}x{h}: {n}" for (w, h), n in small.items())
        lines.append(f"data: {sum(small.values())} image(s) in buckets with fewer than batch_size images are never "
                     f"trained ({counts})")
        log.warning("%s", lines[-1])
    return lines


class Batches:
    """Endless batches over epochs; (epoch, index) is the position of the next batch, saved for resuming."""

    def __init__(self, ds, sampler, collate, num_workers: int):
        self.ds, self.sampler, self.collate, self.num_workers = ds, sampler, collate, num_workers
        self.epoch, self.index = 0, 0
        self._it: Iterator | None = None

    def _epoch_iter(self) -> Iterator:
        for obj in (self.sampler, self.ds):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(self.epoch)
        batches = list(self.sampler)
        if not batches:
            raise ValueError("the data gives no batch: fewer images than batch_size x processes, or no aspect-ratio "
                             "bucket with batch_size images")
        loader = torch.utils.data.DataLoader(self.ds, batch_sampler=batches[self.index:], collate_fn=self.collate,
                                             num_workers=self.num_workers)
        return iter(loader)

    def __next__(self) -> dict:
        while True:
            if self._it is None:
                self._it = self._epoch_iter()
            try:
                batch = next(self._it)
                self.index += 1
                return batch
            except StopIteration:
                self._it, self.epoch, self.index = None, self.epoch + 1, 0

    def seek(self, epoch: int, index: int) -> None:
        """Continue from batch `index` of `epoch` (a resume, or a step abandoned half-way)."""
        self._it, self.epoch, self.index = None, epoch, index


class _PairCache:
    """key -> a pair of CPU tensors named NAMES, kept in memory and saved as one safetensors file."""

    NAMES: tuple[str, str]

    def __init__(self, path: Path):
        self.path, self.items = path, {}
        if path.is_file():
            from safetensors.torch import load_file

            try:
                t = load_file(str(path))
                a, b = (f".{n}" for n in self.NAMES)
                self.items = {k[:-len(a)]: (t[k], t[k[:-len(a)] + b]) for k in t if k.endswith(a)}
            except Exception as e:  # only a cache: it fills again as the steps need it
                log.warning("%s: unreadable cache (%s); it is rebuilt", path, _first_line(e))

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha1(text.encode("utf-8")).hexdigest()

    def rows(self, keys: list[str], device: torch.device, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        rows = [self.items[k] for k in keys]
        return (torch.stack([r[0] for r in rows]).to(device, dtype), torch.stack([r[1] for r in rows]).to(device, dtype))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"{k}.{n}": v for k, pair in self.items.items() for n, v in zip(self.NAMES, pair)}
        save_tensors(tensors, self.path)  # (under a temporary name, then renamed)


class TextCache(_PairCache):
    """caption -> (context, pooled) of frozen text encoders."""

    NAMES = ("context", "pooled")

    def get(self, trainee: Trainee, captions: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
        missing = sorted({c for c in captions if self.key(c) not in self.items})
        if missing:
            context, pooled = trainee.encode_text(missing)
            for c, ctx, pool in zip(missing, context.cpu(), pooled.cpu()):
                self.items[self.key(c)] = (ctx, pool)
        return self.rows([self.key(c) for c in captions], device)


class LatentCache(_PairCache):
    """view (file, crop, flip) -> the frozen VAE's posterior (mean, std), stored in float16."""

    NAMES = ("mean", "std")

    @torch.no_grad()
    def get(self, vae, images: Tensor, views: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
        keys = [self.key(v) for v in views]
        missing = [i for i, k in enumerate(keys) if k not in self.items]
        if missing:
            mean, logvar = vae.encode_moments(images[missing].to(device, next(vae.parameters()).dtype))
            std = torch.exp(0.5 * logvar.float())
            for i, m, s in zip(missing, mean.half().cpu(), std.half().cpu()):
                self.items[keys[i]] = (m, s)
        return self.rows(keys, device, torch.float32)


# ---------------------------------------------------------------------------------------------
# The loss.


def _clean_latents(vae, batch: dict, gen: torch.Generator, device: torch.device,
                   moments: tuple[Tensor, Tensor] | None) -> Tensor:
    """x0: a sample of the frozen VAE's posterior of the batch's images, scaled as the pipeline does."""
    with torch.no_grad():
        if moments is not None:  # cached (mean, std)
            mean, std = moments
            x0 = mean + std * torch.randn(mean.shape, generator=gen, device=device)
        else:
            x0 = vae.encode(batch["images"].to(device), sample=True, generator=gen).float()
        return vae.scale_latents(x0)


def _timesteps_and_noise(cfg: TrainConfig, shape: torch.Size, gen: torch.Generator,
                         device: torch.device) -> tuple[Tensor, Tensor]:
    """t uniform in [timestep_min, timestep_max] and eps ~ N(0, 1) (+ offset noise) for latents of `shape`."""
    b = shape[0]
    t = torch.randint(cfg.timestep_min, cfg.timestep_max + 1, (b,), generator=gen, device=device)
    noise = torch.randn(shape, generator=gen, device=device)
    if cfg.offset_noise > 0:  # a per-image, per-channel constant shift (Guttenberg 2023, "offset noise")
        noise = noise + cfg.offset_noise * torch.randn((b, shape[1], 1, 1), generator=gen, device=device)
    return t, noise


def _micro(batch: dict, cfg: TrainConfig, n_micro: int, device: torch.device) -> Tensor:
    """(B, 6) original size, crop, target size (base), or (B, 5) with the aesthetic score (refiner)."""
    b = len(batch["original_size"])
    sizes = [batch["original_size"], batch["crop_top_left"]]
    if n_micro == 6:
        sizes.append(batch["target_size"])
    else:
        sizes.append(torch.full((b, 1), cfg.aesthetic_score))
    return torch.cat([torch.as_tensor(s, dtype=torch.float32).reshape(b, -1) for s in sizes], dim=1).to(device)


def diffusion_loss(model: nn.Module, vae, batch: dict, cfg: TrainConfig, alphas: Tensor, gen: torch.Generator,
                   n_micro: int, autocast, text: tuple[Tensor, Tensor] | None,
                   moments: tuple[Tensor, Tensor] | None = None) -> Tensor:
    device = alphas.device
    x0 = _clean_latents(vae, batch, gen, device, moments)
    b = x0.shape[0]
    t, noise = _timesteps_and_noise(cfg, x0.shape, gen, device)
    a = alphas[t].view(b, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    target = noise if cfg.objective == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
    micro = _micro(batch, cfg, n_micro, device)

    with autocast():
        pred = model(x_t, t.float(), micro, captions=list(batch["captions"]), text=text)
    per_image = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
    if cfg.min_snr_gamma is not None:  # Hang et al. 2023: weight min(SNR, gamma) / SNR (eps), / (SNR + 1) (v)
        snr = (a / (1 - a)).flatten()
        clipped = snr.clamp(max=cfg.min_snr_gamma)
        per_image = per_image * (clipped / snr if cfg.objective == "epsilon" else clipped / (snr + 1))
    return per_image.mean()


def dpo_loss(model_w: Tensor, model_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """Diffusion-DPO's loss from per-pair denoising errors |eps - eps_theta(x_t, t)|^2 (means per sample) of the
    preferred (w) and rejected (l) images under the model and the reference (Wallace et al. 2023, eq. 14, scaled
    as SalesforceAIResearch/DiffusionDPO train.py does: -0.5 * beta, no timestep weighting):
        loss = -log sigmoid(-beta / 2 * ((model_w - model_l) - (ref_w - ref_l)))   (mean over pairs)
    and the implicit reward accuracy: the fraction of pairs whose margin (the sigmoid's argument) is > 0, as that
    code counts it (so a model equal to its reference scores 0 and a loss of log 2)."""
    inside = -0.5 * beta * ((model_w - model_l) - (ref_w - ref_l))
    return -F.logsigmoid(inside).mean(), (inside > 0).float().mean()


def preference_loss(model: nn.Module, reference: Reference, vae, batch: dict, cfg: TrainConfig, alphas: Tensor,
                    gen: torch.Generator, n_micro: int, autocast, text: tuple[Tensor, Tensor],
                    moments: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """(Diffusion-DPO loss, implicit reward accuracy) of a batch of B pairs (pairs.collate_pairs: the B preferred
    images, then the B rejected; B captions, whose `text` conditions both images of a pair)."""
    device = alphas.device
    x0 = _clean_latents(vae, batch, gen, device, moments)  # (2B, C, h, w)
    b = x0.shape[0] // 2
    t, noise = _timesteps_and_noise(cfg, x0[:b].shape, gen, device)
    t, noise = t.repeat(2), noise.repeat(2, 1, 1, 1)  # the same t and eps for both images of a pair
    a = alphas[t].view(2 * b, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    micro = _micro(batch, cfg, n_micro, device)  # each image's own size and crop
    text = (text[0].repeat(2, 1, 1), text[1].repeat(2, 1))

    with autocast():
        pred = model(x_t, t.float(), micro, text=text)
    with torch.no_grad(), autocast():
        ref = reference(x_t, t.float(), micro, text)
    err = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
    ref_err = F.mse_loss(ref.float(), noise, reduction="none").mean(dim=(1, 2, 3))
    return dpo_loss(err[:b], err[b:], ref_err[:b], ref_err[b:], cfg.dpo_beta)


# ---------------------------------------------------------------------------------------------
# Checkpoints and the training state (safetensors + JSON, never pickle).


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0][:300] if text else "") or type(e).__name__


def _write_text(path: Path, text: str) -> None:
    """Write a small file under a temporary name, then rename it: a reader sees the old text or the new."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _latest(out: Path) -> Path:
    """The checkpoint folder latest.txt names (it is written once a checkpoint is complete)."""
    marker = out / "latest.txt"
    if not marker.is_file():
        raise ValueError(f"resume = 'latest' but {out} has no checkpoint yet ({marker} is missing)")
    name = marker.read_text(errors="replace").strip()
    folder = out / "checkpoints" / name
    if not name or Path(name).name != name or not folder.is_dir():
        raise ValueError(f"{marker} names {name!r}, which is not a checkpoint folder in {out / 'checkpoints'}")
    return folder


def _resume_folder(cfg: TrainConfig) -> Path:
    """The checkpoint folder to resume from: refused when half-written (or not a checkpoint), with the hint."""
    folder = _latest(Path(cfg.output_dir)) if cfg.resume == "latest" else Path(cfg.resume)
    if folder.name.endswith(PARTIAL):
        try:
            hint = f" (now {_latest(folder.parent.parent).name})"
        except ValueError:
            hint = ""
        raise ValueError(f"{folder}: a half-written checkpoint (its save was interrupted); resume from the last "
                         f"complete one with --resume latest{hint}")
    if not (folder / "state.json").is_file():
        what = "no such folder" if not folder.exists() else "not a checkpoint folder (no state.json)"
        raise ValueError(f"resume: {folder}: {what}; give a checkpoints/step_NNNNNNN folder or 'latest'")
    return folder


@contextlib.contextmanager
def _reading(path: Path):
    """Any failure to read or apply `path` (missing, truncated, corrupt, other shapes) as one ValueError naming it."""
    from safetensors import SafetensorError

    try:
        yield
    except FileNotFoundError:
        raise ValueError(f"{path}: missing; the checkpoint is incomplete: resume from another one") from None
    except (OSError, ValueError, KeyError, IndexError, RuntimeError, TypeError, SafetensorError) as e:
        what = f"no entry {e}" if isinstance(e, KeyError) else _first_line(e)
        raise ValueError(f"{path}: damaged ({what}); resume from another checkpoint") from None


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename folder `src` to `dst`; an existing `dst` (a run resumed from before it) is moved aside first."""
    old = dst.with_name(dst.name + ".old")
    if dst.exists():
        if old.exists():
            shutil.rmtree(old)
        dst.rename(old)
    src.rename(dst)
    if old.exists():
        shutil.rmtree(old)


@contextlib.contextmanager
def _swapped(params: dict[str, nn.Parameter], values: dict[str, Tensor] | None):
    """Temporarily put `values` (the EMA) into the parameters."""
    if values is None:
        yield
        return
    saved = {k: p.detach().clone() for k, p in params.items()}
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(values[k])
    try:
        yield
    finally:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(saved[k])


def save_checkpoint(folder: Path, cfg: TrainConfig, parts: Components, trainee: nn.Module,
                    params: dict[str, nn.Parameter], opt: torch.optim.Optimizer, scaler, ema: dict[str, Tensor] | None,
                    gen: torch.Generator, state: dict, d: Dist) -> None:
    """Model / LoRA files (rank 0) and the exact training state: state.safetensors, or under FSDP one
    state_rankR.safetensors per process holding its shards. Written into FOLDER.partial, renamed to `folder` once
    every process is done, then latest.txt names it: an interrupted save never looks like a checkpoint."""
    from safetensors.torch import save_file

    sharded = _fsdp(cfg, d)
    final, folder = folder, folder.with_name(folder.name + PARTIAL)
    if d.main and folder.exists():  # left by an interrupted save
        shutil.rmtree(folder)
    _barrier(d)
    folder.mkdir(parents=True, exist_ok=True)
    # Every process keeps its own random streams.
    save_file({"generator": gen.get_state().cpu(), "torch": torch.get_rng_state()}, str(folder / f"rng_rank{d.rank}.safetensors"))
    dtype = dtypes.torch_dtype(cfg.save_dtype)
    for suffix, values in [("", None)] + ([("_ema", ema)] if ema is not None else []):
        with _swapped(params, values):
            if cfg.lora and d.main:
                # ss_output_name: the run's folder name (what <lora:NAME> prompts call it), not "lora_kohya"
                name = Path(cfg.output_dir).resolve().name + suffix
                lora_lib.save_lora_kohya(parts.unet, folder / f"lora_kohya{suffix}.safetensors", dtype, name=name)
                lora_lib.save_lora_peft(parts.unet, folder / f"lora_peft{suffix}.safetensors", dtype, name=name)
            elif not cfg.lora:
                whole = gathered_components(parts, trainee) if sharded else parts
                if d.main:
                    save_single_file(whole, folder / f"model{suffix}.safetensors", dtype=dtype)
    if d.main or sharded:
        tensors = {f"param.{k}": p.detach() for k, p in params.items()}
        if ema is not None:
            tensors.update({f"ema.{k}": v for k, v in ema.items()})
        opt_state = opt.state_dict()
        for i, s in opt_state["state"].items():
            tensors.update({f"opt.{i}.{k}": v for k, v in s.items()})
        name = f"state_rank{d.rank}.safetensors" if sharded else "state.safetensors"
        save_file({k: _local(v).contiguous().cpu() for k, v in tensors.items()}, str(folder / name))
    if d.main:
        meta = {**state, "params": list(params), "param_groups": opt_state["param_groups"],
                "scaler": scaler.state_dict() if scaler is not None else None, "config": _record(cfg),
                "world_size": d.world, "parallel": "fsdp" if sharded else "ddp"}
        (folder / "state.json").write_text(json.dumps(meta, indent=1))
    _barrier(d)
    if d.main:
        _replace_dir(folder, final)
        _write_text(final.parent.parent / "latest.txt", final.name + "\n")  # written last: a complete checkpoint
        for stale in final.parent.glob(f"*{PARTIAL}"):  # of saves interrupted earlier: never resumable
            shutil.rmtree(stale)


def _fsdp(cfg: TrainConfig, d: Dist) -> bool:
    return cfg.parallel == "fsdp" and d.world > 1


def _read_meta(folder: Path, params: dict[str, nn.Parameter], cfg: TrainConfig, d: Dist) -> dict:
    """state.json, checked against this run: the same trained parameters, processes and parallelism."""
    with _reading(folder / "state.json"):
        meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        missing = [k for k in ("step", "epoch", "index", "params", "param_groups") if k not in meta]
        if missing:
            raise ValueError(f"lacks {', '.join(missing)}")
    if meta["params"] != list(params):
        raise ValueError(f"{folder}: the checkpoint trained other parameters than this config does "
                         "(different lora_rank / lora_targets / train_text_encoders?)")
    if meta.get("world_size", 1) != d.world:
        raise ValueError(f"{folder}: saved with {meta['world_size']} processes; resume with the same number")
    if meta.get("parallel", "ddp") != ("fsdp" if _fsdp(cfg, d) else "ddp"):
        raise ValueError(f"{folder}: saved with parallel = {meta.get('parallel', 'ddp')!r}; resume with the same")
    return meta


def _optimizer_state(tensors: dict[str, Tensor], params: dict[str, nn.Parameter]) -> dict[int, dict]:
    """The optimizer's per-parameter state from `opt.I.NAME` tensors (FSDP shards back into DTensors)."""
    state: dict[int, dict] = {}
    by_index = list(params.values())
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            p = by_index[int(i)]
            if hasattr(p, "to_local") and v.dim() > 0:  # a shard of a sharded moment: back into a DTensor
                from torch.distributed.tensor import DTensor

                v = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            state.setdefault(int(i), {})[name] = v
    return state


def load_checkpoint(folder: Path, cfg: TrainConfig, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer,
                    scaler, ema: dict[str, Tensor] | None, gen: torch.Generator, d: Dist) -> dict:
    """The training state of `folder` into the parameters, optimizer, EMA and random streams; its state.json.
    A missing, truncated or corrupt file is a ValueError naming it."""
    from safetensors.torch import load_file

    meta = _read_meta(folder, params, cfg, d)
    path = folder / (f"state_rank{d.rank}.safetensors" if _fsdp(cfg, d) else "state.safetensors")
    with _reading(path):
        tensors = load_file(str(path))
        wrong = [k for k, p in params.items() if tensors[f"param.{k}"].shape != _local(p).shape]
    if wrong:
        k = wrong[0]
        raise ValueError(f"{path}: {k} has shape {tuple(tensors[f'param.{k}'].shape)}, this run's "
                         f"{tuple(_local(params[k]).shape)}: the checkpoint is of another model (model / init)")
    if ema is not None and not any(k.startswith("ema.") for k in tensors):
        raise ValueError(f"{folder}: has no EMA weights, but this config sets ema_decay")
    with _reading(path), torch.no_grad():
        for k, p in params.items():
            _local(p).copy_(tensors[f"param.{k}"])
        for k in ema or {}:
            _local(ema[k]).copy_(tensors[f"ema.{k}"])
        opt.load_state_dict({"state": _optimizer_state(tensors, params), "param_groups": meta["param_groups"]})
    with _reading(folder / "state.json"):
        if scaler is not None and meta.get("scaler"):
            scaler.load_state_dict(meta["scaler"])
    path = folder / f"rng_rank{d.rank}.safetensors"
    with _reading(path):
        rng = load_file(str(path))
        gen.set_state(rng["generator"].to(gen.get_state().device))
        torch.set_rng_state(rng["torch"])
    return meta


# ---------------------------------------------------------------------------------------------
# Logging.


def plot_losses(steps: list[int], losses: list[float], path: Path, size: tuple[int, int] = (640, 360)) -> None:
    """A loss curve as PNG, drawn with PIL: raw values (light) and a running mean (dark)."""
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 60, w - 15, 15, h - 30
    draw.rectangle([left, top, right, bottom], outline="black")
    if len(steps) >= 1:
        lo, hi = min(losses), max(losses)
        hi = hi if hi > lo else lo + 1e-8
        s0, s1 = steps[0], max(steps[-1], steps[0] + 1)
        xy = lambda s, v: (left + (s - s0) / (s1 - s0) * (right - left), bottom - (v - lo) / (hi - lo) * (bottom - top))  # noqa: E731
        k = max(1, len(losses) // 20)
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
        if len(steps) > 1:
            draw.line([xy(s, v) for s, v in zip(steps, losses)], fill=(170, 190, 230), width=1)
            draw.line([xy(s, v) for s, v in zip(steps, smooth)], fill=(20, 60, 160), width=2)
        for v in (lo, hi):
            draw.text((4, xy(s0, v)[1] - 6), f"{v:.4g}", fill="black")
        draw.text((left, bottom + 8), f"step {s0}", fill="black")
        draw.text((right - 80, bottom + 8), f"step {s1}", fill="black")
    draw.text((left + 5, top + 3), "training loss", fill="black")
    img.save(path, format="PNG")


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


# ---------------------------------------------------------------------------------------------
# Training.


@dataclass
class TrainResult:
    losses: list[float]  # the loss of each optimizer step this run did (mean over processes)
    checkpoint: Path | None  # the last checkpoint folder written
    components: Components  # the trained models (LoRA layers still wrapped)
    step: int
    accuracies: list[float] = field(default_factory=list)  # objective = "dpo": each step's implicit reward accuracy


@dataclass
class _Mark:
    """Where a step starts: the random streams and the data position, rewound to when the step is abandoned."""

    gen: Tensor
    torch_rng: Tensor
    epoch: int
    index: int


@dataclass
class _Run:
    """Everything one training run carries from step to step."""

    cfg: TrainConfig
    d: Dist
    out: Path
    parts: Components
    trainee: Trainee
    model: nn.Module  # the trainee, or its DDP wrapper
    n_micro: int  # micro-conditioning values: 6 (base) or 5 (refiner)
    params: dict[str, nn.Parameter]  # what trains
    opt: torch.optim.Optimizer
    scaler: Any  # torch.amp.GradScaler for fp16, else None
    ema: dict[str, Tensor] | None
    gen: torch.Generator
    alphas: Tensor
    batches: Batches
    text_cache: TextCache | None
    latent_cache: LatentCache | None
    reference: Reference | None = None  # objective = "dpo": the frozen base the preferences are measured against
    step: int = 0
    saved: tuple[int, Path] | None = None  # (step, folder) of the newest complete checkpoint, or the one resumed from
    checkpoint: Path | None = None  # the last checkpoint this run wrote
    mark: _Mark | None = None  # the start of the step in progress

    @property
    def sharded(self) -> bool:
        return _fsdp(self.cfg, self.d)

    def set_mark(self) -> None:
        self.mark = _Mark(self.gen.get_state(), torch.get_rng_state(), self.batches.epoch, self.batches.index)

    def rewind(self) -> None:
        """Back to the mark: an abandoned step's random draws and batches are drawn again when the run resumes."""
        self.gen.set_state(self.mark.gen)
        torch.set_rng_state(self.mark.torch_rng)
        self.batches.seek(self.mark.epoch, self.mark.index)
        self.opt.zero_grad(set_to_none=True)

    def autocast(self) -> torch.autocast:
        mixed = self.cfg.mixed_precision
        return torch.autocast(self.d.device.type, dtype=dtypes.torch_dtype(mixed) if mixed != "no" else torch.float32,
                              enabled=mixed != "no")


def _reference(cfg: TrainConfig, parts: Components, trainee: Trainee) -> Reference | None:
    """objective = "dpo": the model before training. LoRA: the trained U-Net itself with its adapters switched off
    (no second copy); a full fine-tune: a frozen copy of the U-Net as loaded (the memory of a second U-Net), taken
    before any checkpoint is resumed and before gradient checkpointing wraps the blocks."""
    if not cfg.dpo:
        return None
    if cfg.lora:
        def base(x_t: Tensor, t: Tensor, micro: Tensor, text: tuple[Tensor, Tensor]) -> Tensor:
            with lora_lib.adapters_off(trainee.unet):
                return trainee(x_t, t, micro, text=text)
        return base
    frozen = Trainee(dataclasses.replace(parts, unet=copy.deepcopy(parts.unet).requires_grad_(False).eval()), False)
    return lambda x_t, t, micro, text: frozen(x_t, t, micro, text=text)


def _trainable(cfg: TrainConfig, d: Dist) -> tuple[Components, Trainee, nn.Module, Reference | None]:
    """The models with everything frozen but what trains (or LoRA-wrapped), the module to call: the trainee, DDP
    around it, or the trainee sharded in place by FSDP; and the DPO reference (else None)."""
    parts = build_components(cfg, d.device)
    unet = parts.unet
    if not cfg.lora:  # record the training resolution: the pipeline's default size for this model
        unet.config = dataclasses.replace(unet.config, sample_size=cfg.resolution // 8)
    if cfg.lora:
        torch.manual_seed(cfg.seed)  # LoRA's down-projections are drawn from the global generator: seeded runs
        lora_lib.add_lora(unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        for p in lora_lib.lora_parameters(unet):
            p.requires_grad_(True)
    else:
        unet.requires_grad_(True)
    unet.train()
    if cfg.train_text_encoders:
        for te in (parts.text_encoder, parts.text_encoder_2):
            if te is not None:
                te.requires_grad_(True).train()
    trainee = Trainee(parts, cfg.train_text_encoders)
    reference = _reference(cfg, parts, trainee)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(unet)
    if _fsdp(cfg, d):
        shard_fsdp(trainee, d)  # (replaces the parameters by sharded ones: `params` are read after this)
        return parts, trainee, trainee, reference
    if d.world > 1:
        return parts, trainee, nn.parallel.DistributedDataParallel(
            trainee, device_ids=[d.device.index] if d.device.type == "cuda" else None,
            find_unused_parameters=cfg.train_text_encoders,  # CLIP-L's last block feeds nothing SDXL uses
        ), reference
    return parts, trainee, trainee, reference


def _start(cfg: TrainConfig, d: Dist, loader: Loader | None) -> _Run:
    """The data, models, optimizer, EMA and random streams of a run, resumed from a checkpoint if asked. The
    checkpoint folder and the data are checked first: their errors come before the slow model loading."""
    out = Path(cfg.output_dir)
    folder = _resume_folder(cfg) if cfg.resume else None
    torch.manual_seed(cfg.seed + d.rank)  # before the loader is built: a custom one may draw from it
    data = (loader or (pairs.pair_loader if cfg.dpo else default_loader))(cfg, d.rank, d.world)
    after_data = torch.get_rng_state()
    parts, trainee, model, reference = _trainable(cfg, d)
    torch.manual_seed(cfg.seed + d.rank)  # the random streams as they were when the models were built first
    torch.set_rng_state(after_data)
    _claim_output(cfg, d)
    te2 = parts.text_encoder_2.config
    params = {k: p for k, p in trainee.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    run = _Run(
        cfg, d, out, parts, trainee, model, micro_value_count(parts.unet.config, te2.projection_dim or te2.width),
        params, opt, scaler=torch.amp.GradScaler(d.device.type) if cfg.mixed_precision == "fp16" else None,
        ema={k: p.detach().float().clone() for k, p in params.items()} if cfg.ema_decay is not None else None,
        gen=torch.Generator(d.device).manual_seed(cfg.seed + d.rank),
        alphas=TrainingSchedule.from_diffusers(parts.scheduler).alphas_cumprod().float().to(d.device),
        batches=Batches(*data, num_workers=cfg.num_workers),
        text_cache=TextCache(out / "cache" / "text.safetensors") if cfg.cache_text else None,
        latent_cache=LatentCache(out / "cache" / f"latents_rank{d.rank}.safetensors") if cfg.cache_latents else None,
        reference=reference,
    )
    _note(out, d, *_describe_data(data[0], data[1]))
    if folder is not None:
        meta = load_checkpoint(folder, cfg, params, opt, run.scaler, run.ema, run.gen, d)
        run.step, run.saved = meta["step"], (meta["step"], folder)
        run.batches.seek(meta["epoch"], meta["index"])
        if d.main:
            _trim_csv(out / "loss.csv", run.step)
        _note(out, d, f"resumed from {folder} at step {run.step}, to step {cfg.steps}")
    else:
        _note(out, d, f"fresh run to step {cfg.steps}")
    run.set_mark()
    return run


def _accumulate(run: _Run) -> Tensor:
    """Forward and backward over cfg.grad_accum micro-batches; the summed (scaled) loss, on the device: a tensor
    (1,), or (2,) with the mean reward accuracy (objective = "dpo")."""
    cfg, d, model = run.cfg, run.d, run.model
    total = torch.zeros(2 if cfg.dpo else 1, device=d.device)
    for micro in range(cfg.grad_accum):
        batch = next(run.batches)
        last = micro == cfg.grad_accum - 1
        # Only the last micro-batch all-reduces (FSDP: reduce-scatters) gradients.
        if run.sharded:
            model.set_requires_gradient_sync(last)
        sync = contextlib.nullcontext() if last or d.world == 1 or run.sharded else model.no_sync()
        with sync:
            text = run.text_cache.get(run.trainee, list(batch["captions"]), d.device) if run.text_cache else None
            moments = (run.latent_cache.get(run.parts.vae, batch["images"], batch["views"], d.device)
                       if run.latent_cache else None)
            if cfg.dpo:  # (frozen text encoders: the captions are encoded once for the model and the reference)
                text = text if text is not None else run.trainee.encode_text(list(batch["captions"]))
                loss, accuracy = preference_loss(model, run.reference, run.parts.vae, batch, cfg, run.alphas, run.gen,
                                                 run.n_micro, run.autocast, text, moments)
                total[1] += accuracy / cfg.grad_accum
            else:
                loss = diffusion_loss(model, run.parts.vae, batch, cfg, run.alphas, run.gen, run.n_micro,
                                      run.autocast, text, moments)
            loss = loss / cfg.grad_accum
            (run.scaler.scale(loss) if run.scaler else loss).backward()
        total[0] += loss.detach()
    return total


def _optimizer_step(run: _Run) -> None:
    """Clip, step (through the fp16 scaler when there is one), zero the gradients, update the EMA."""
    cfg, opt, scaler = run.cfg, run.opt, run.scaler
    if scaler:
        scaler.unscale_(opt)
    if cfg.max_grad_norm > 0:
        nn.utils.clip_grad_norm_(list(run.params.values()), cfg.max_grad_norm)
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    if run.ema is not None:
        with torch.no_grad():
            for k, p in run.params.items():
                run.ema[k].lerp_(p.detach().float(), 1.0 - cfg.ema_decay)


def _commit(run: _Run, total: Tensor, log: _Log) -> list[float]:
    """The optimizer step on the accumulated gradients (at this step's learning rate), the step's loss (and reward
    accuracy) logged and returned (means over the processes), and the next step's mark."""
    cfg = run.cfg
    lr = cfg.lr * min(1.0, (run.step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
    for group in run.opt.param_groups:
        group["lr"] = lr
    _optimizer_step(run)
    run.step += 1
    if run.d.world > 1:
        dist.all_reduce(total)
        total /= run.d.world
    values = total.tolist()
    log.step(lr, *values)
    run.set_mark()
    return values


def _save(run: _Run) -> Path:
    """A checkpoint of the current step (and the caches, and the loss plot)."""
    checkpoint = run.out / "checkpoints" / f"step_{run.step:07d}"
    save_checkpoint(checkpoint, run.cfg, run.parts, run.trainee, run.params, run.opt, run.scaler, run.ema, run.gen,
                    {"step": run.step, "epoch": run.batches.epoch, "index": run.batches.index}, run.d)
    if run.text_cache is not None and run.d.main:
        run.text_cache.save()
    if run.latent_cache is not None:  # each process caches the views it sees
        run.latent_cache.save()
    if run.d.main:
        _plot_csv(run.out)
    run.saved, run.checkpoint = (run.step, checkpoint), checkpoint
    _note(run.out, run.d, f"saved {checkpoint}")
    return checkpoint


class _Log:
    """loss.csv every log_every steps, and the progress bar's loss, images/s and memory."""

    def __init__(self, run: _Run, progress: bool):
        self.run, self.rows, self.t = run, [], time.perf_counter()
        self.bar = None
        if run.d.main and progress:
            from tqdm import tqdm

            self.bar = tqdm(total=run.cfg.steps, initial=run.step, desc="train", unit="step", dynamic_ncols=True)

    def step(self, lr: float, loss: float, *accuracy: float) -> None:
        run, cfg = self.run, self.run.cfg
        self.rows.append((run.step, loss, lr, *accuracy))
        if run.step % cfg.log_every == 0 or run.step == cfg.steps:
            self.flush()
        if self.bar is not None:
            self.bar.update(1)

    def flush(self) -> None:
        """The rows so far into loss.csv, their mean loss and speed onto the progress bar."""
        run, cfg = self.run, self.run.cfg
        if not self.rows:
            return
        now = time.perf_counter()
        rate = len(self.rows) / max(now - self.t, 1e-9)
        self.t = now
        if run.d.main:
            _append_csv(run.out / "loss.csv", self.rows)
            if self.bar is not None:
                images_per_step = cfg.batch_size * cfg.grad_accum * run.d.world * (2 if cfg.dpo else 1)
                accuracy = {"acc": f"{sum(r[3] for r in self.rows) / len(self.rows):.3f}"} if cfg.dpo else {}
                self.bar.set_postfix(loss=f"{sum(r[1] for r in self.rows) / len(self.rows):.4f}", **accuracy,
                                     img_s=f"{rate * images_per_step:.1f}", mem=f"{_peak_memory_gb(run.d.device):.2f}G")
        self.rows = []

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT (Ctrl-C) or SIGTERM; the message says what was saved and where.
    `forced`: a second signal inside an optimizer step or a save, which then stopped half-way."""

    def __init__(self, signum: int = signal.SIGINT, message: str = "", forced: bool = False):
        super().__init__(message or f"stopped by {signal.Signals(signum).name}")
        self.signum, self.forced = signum, forced


class _Signals:
    """SIGINT and SIGTERM raise Interrupted (a KeyboardInterrupt), except inside `deferred()` blocks (an optimizer
    step, a save), where the first one waits for the block's end and a second one raises at once. Installed from
    the main thread only; a signal the parent process ignores (a background job's SIGINT) stays ignored."""

    def __init__(self):
        self.depth, self.pending, self.previous = 0, None, {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.depth and self.pending is None:
            self.pending = signum
            return
        raise Interrupted(signum, forced=self.depth > 0)

    @contextlib.contextmanager
    def deferred(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if self.pending is not None and not self.depth:
            signum, self.pending = self.pending, None
            raise Interrupted(signum)


def _last_checkpoint(run: _Run) -> str:
    """Where the newest complete checkpoint is, in words (and a half-written one of this step, if any)."""
    partial = run.out / "checkpoints" / f"step_{run.step:07d}{PARTIAL}"
    half = f"{partial} is half-written and ignored; " if partial.exists() else ""
    if run.saved is None:
        return half + "no checkpoint was saved"
    return half + f"the last checkpoint is {run.saved[1]} (step {run.saved[0]}); continue with --resume latest"


def _rescue(run: _Run, save: bool) -> str:
    """Save the finished steps when no checkpoint holds them yet (and `save`: not after a forced stop, and one
    process only: several would need all of them in step); what there is now, in words."""
    if run.step == (run.saved[0] if run.saved else 0):
        return "no step finished since the start: nothing to save" if run.saved is None else _last_checkpoint(run)
    if not save or run.d.world > 1:
        why = "stopped half-way" if not save else f"not saved with {run.d.world} processes"
        return f"steps since the last checkpoint are lost ({why}); {_last_checkpoint(run)}"
    try:
        return f"saved checkpoint {_save(run)}; continue with --resume latest"
    except KeyboardInterrupt as e:  # a second signal: what is written so far stays under the .partial name
        raise Interrupted(getattr(e, "signum", signal.SIGINT),
                          f"interrupted again while saving step {run.step}; {_last_checkpoint(run)}") from None


def _stop(run: _Run, log: _Log, error: BaseException) -> NoReturn:
    """After a signal or a data error in a step: rewind to the step's start, save what the finished steps trained,
    note it in log.txt and raise the one line that says what happened and what is saved."""
    run.rewind()
    log.flush()
    forced = getattr(error, "forced", False)
    where = _rescue(run, save=not forced)
    if isinstance(error, DataError):
        message = f"{error}; {where}"
        _note(run.out, run.d, f"stopped by a data error: {message}")
        raise DataError(message) from None
    signum = getattr(error, "signum", signal.SIGINT)
    message = f"{'interrupted' if signum == signal.SIGINT else 'terminated'} at step {run.step}; {where}"
    _note(run.out, run.d, f"stopped by {signal.Signals(signum).name}: {message}")
    raise Interrupted(signum, message, forced) from None


def train(cfg: TrainConfig, *, loader: Loader | None = None, progress: bool = True) -> TrainResult:
    """Train as `cfg` says. A signal or a data error mid-run saves the finished steps first and raises
    Interrupted (a KeyboardInterrupt) or DataError (a ValueError) with one line saying where they are."""
    d = setup_distributed()
    _check_output(cfg)
    run = _start(cfg, d, loader)
    log = _Log(run, progress)
    losses: list[float] = []
    accuracies: list[float] = []
    with _Signals() as signals:
        try:
            while run.step < cfg.steps:
                total = _accumulate(run)  # may be abandoned half-way: _stop rewinds to the step's mark
                with signals.deferred():  # one signal never cuts an optimizer step or a save half-way
                    loss, *accuracy = _commit(run, total, log)
                    losses.append(loss)
                    accuracies += accuracy
                    if (cfg.save_every and run.step % cfg.save_every == 0) or run.step == cfg.steps:
                        _save(run)
        except (KeyboardInterrupt, DataError) as e:
            _stop(run, log, e)
        finally:
            log.close()
    _note(run.out, d, f"done at step {run.step}")
    return TrainResult(losses, run.checkpoint, run.parts, run.step, accuracies)


# ---------------------------------------------------------------------------------------------
# The output folder and its files.


def _record(cfg: TrainConfig) -> str:
    """The config as the run records it (config.toml, state.json): with overwrite = false, so that running the
    record again never deletes the run."""
    return dataclasses.replace(cfg, overwrite=False).to_toml()


def _note(out: Path, d: Dist, *lines: str) -> None:
    """Timestamped lines at the end of output_dir/log.txt (main process)."""
    if d.main and lines:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with (out / "log.txt").open("a", encoding="utf-8") as f:
            f.writelines(f"{stamp} {line}\n" for line in lines)


def _check_output(cfg: TrainConfig) -> None:
    """Refuse a fresh run into a folder that is not empty (but for the RECORDS of a failed start), unless
    cfg.overwrite. (Nothing is written before every process has looked but RECORDS, which this ignores.)"""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {out} is a file, not a folder")
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    ours = [n for n in present if n.removesuffix(".tmp") in RUN_FILES]
    kept = [n for n in present if n not in ours or n.removesuffix(".tmp") not in RECORDS]
    if kept and not cfg.resume and not cfg.overwrite:
        if set(kept) & set(ours):
            resume = ("continue it with --resume latest (resume = \"latest\"), or " if "latest.txt" in ours
                      else "it has no complete checkpoint to resume: ")
            raise ValueError(f"output_dir {out} holds an earlier run ({', '.join(ours)}): {resume}start over with "
                             "--overwrite (overwrite = true), which deletes it")
        shown = ", ".join(kept[:3]) + (", ..." if len(kept) > 3 else "")
        raise ValueError(f"output_dir {out} is not empty ({shown}): choose a new folder (--output-dir, "
                         "output_dir), or --overwrite (overwrite = true) to train beside these files")


def _claim_output(cfg: TrainConfig, d: Dist) -> None:
    """Make output_dir this run's: with cfg.overwrite, delete an earlier run's files (only now that the data and
    the models have loaded, so that a run that cannot start deletes nothing); record the config."""
    out = Path(cfg.output_dir)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        ours = sorted(p.name for p in out.iterdir() if p.name.removesuffix(".tmp") in RUN_FILES)
        if cfg.overwrite and ours:
            for name in ours:
                shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
            _note(out, d, f"overwrite: deleted the earlier run's {', '.join(ours)}")
        _write_text(out / "config.toml", _record(cfg))
    _barrier(d)  # (before any process reads its cache there)


CSV_COLUMNS = ["step", "loss", "lr"]  # objective = "dpo" adds reward_accuracy


def _append_csv(path: Path, rows: list[tuple]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(CSV_COLUMNS + (["reward_accuracy"] if rows and len(rows[0]) == 4 else []))
        w.writerows((s, *(f"{v:.6g}" for v in values)) for s, *values in rows)


def _loss_rows(path: Path) -> tuple[str, dict[int, str]]:
    """loss.csv's header and rows by step (a step logged twice keeps its last row); a row cut short by a kill (fewer
    fields than the header names) is left out."""
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    header = lines[0] if lines else ",".join(CSV_COLUMNS)
    rows: dict[int, str] = {}
    for line in lines[1:]:
        fields = line.split(",")
        try:
            step, _ = int(fields[0]), [float(v) for v in fields[1:]]
        except ValueError:
            continue
        if len(fields) == len(header.split(",")):
            rows[step] = line
    return header, rows


def _trim_csv(path: Path, step: int) -> None:
    """Keep loss.csv's rows of steps up to `step`, once each: a run resumed from there logs the later ones again."""
    if path.is_file():
        header, rows = _loss_rows(path)
        _write_text(path, header + "\n" + "".join(rows[s] + "\n" for s in sorted(rows) if s <= step))


def _plot_csv(out: Path) -> None:
    path = out / "loss.csv"
    if not path.exists():
        return
    _, rows = _loss_rows(path)
    steps = sorted(rows)
    plot_losses(steps, [float(rows[s].split(",")[1]) for s in steps], out / "loss.png.tmp")
    os.replace(out / "loss.png.tmp", out / "loss.png")


# ---------------------------------------------------------------------------------------------
# Command line: `sdxl train CONFIG` (or python -m sdxl.training.train CONFIG under torchrun).


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="sdxl train", description="Fine-tune SDXL from a TOML config.")
    parser.add_argument("config", help="the training config (.toml, or .yaml with PyYAML); see configs/ for examples")
    parser.add_argument("--resume", help="override the config's resume: a checkpoint folder or 'latest'")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an output_dir that holds an earlier run: delete its checkpoints and "
                             "log first")
    parser.add_argument("--steps", type=int, help="override the config's total steps")
    parser.add_argument("--output-dir", help="override the config's output_dir")
    parser.add_argument("--lr", type=float, help="override the config's lr (e.g. a lower one when resuming, to anneal)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in (("resume", args.resume), ("steps", args.steps), ("output_dir", args.output_dir),
                                   ("lr", args.lr), ("overwrite", args.overwrite or None)) if v is not None}
    try:
        cfg = load_config(args.config, **overrides)
        result = train(cfg)
    except Interrupted as e:
        print(f"sdxl train: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("sdxl train: interrupted before the first step; nothing saved", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        print(f"sdxl train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if result.checkpoint is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"sdxl train: {result.step} steps done; last checkpoint {result.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
