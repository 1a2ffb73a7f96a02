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

Outputs under output_dir: checkpoints/step_NNNNNNN/ (model.safetensors in the official single-file
layout, or lora_kohya.safetensors + lora_peft.safetensors; *_ema versions with ema_decay;
state.safetensors + state.json + rng_rankR.safetensors for resuming), latest.txt (the newest
checkpoint's folder name), loss.csv, loss.png, config.toml.

Determinism: all randomness of a step comes from one generator per process (seed + rank), saved
with each checkpoint with the optimizer, the EMA and the data position, so a resumed run continues
exactly as an uninterrupted one (on the same hardware and settings).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import csv
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .. import dtypes
from ..checkpoints.save import save_single_file
from ..conditioning import PENULTIMATE, encode_prompts, micro_value_count
from ..models import specs
from ..models.specs import Components
from ..models.unet import TimestepSequential, UNet, micro_conditioning
from ..sampling.schedules import TrainingSchedule
from . import lora as lora_lib
from .config import TrainConfig, load_config



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


def default_loader(cfg: TrainConfig, rank: int, world: int):
    from .data import BucketBatchSampler, ImageCaptionDataset, collate

    ds = ImageCaptionDataset(cfg.data, resolution=cfg.resolution, bucket_multiple=cfg.bucket_multiple,
                             random_crop=cfg.random_crop, caption_dropout=cfg.caption_dropout, seed=cfg.seed)
    sampler = BucketBatchSampler(ds, batch_size=cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world, drop_last=True)
    return ds, sampler, collate


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
            raise ValueError("the data gives no batch: fewer images than batch_size x processes (drop_last)")
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


class _PairCache:
    """key -> a pair of CPU tensors named NAMES, kept in memory and saved as one safetensors file."""

    NAMES: tuple[str, str]

    def __init__(self, path: Path):
        self.path, self.items = path, {}
        if path.is_file():
            from safetensors.torch import load_file

            t = load_file(str(path))
            a, b = (f".{n}" for n in self.NAMES)
            self.items = {k[:-len(a)]: (t[k], t[k[:-len(a)] + b]) for k in t if k.endswith(a)}

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha1(text.encode("utf-8")).hexdigest()

    def rows(self, keys: list[str], device: torch.device, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        rows = [self.items[k] for k in keys]
        return (torch.stack([r[0] for r in rows]).to(device, dtype), torch.stack([r[1] for r in rows]).to(device, dtype))

    def save(self) -> None:
        from safetensors.torch import save_file

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"{k}.{n}": v.contiguous() for k, pair in self.items.items() for n, v in zip(self.NAMES, pair)}
        save_file(tensors, str(self.path))


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


def diffusion_loss(model: nn.Module, vae, batch: dict, cfg: TrainConfig, alphas: Tensor, gen: torch.Generator,
                   n_micro: int, autocast, text: tuple[Tensor, Tensor] | None,
                   moments: tuple[Tensor, Tensor] | None = None) -> Tensor:
    device = alphas.device
    with torch.no_grad():  # the VAE is frozen: sample its posterior, scale as the pipeline does
        if moments is not None:  # cached (mean, std)
            mean, std = moments
            x0 = mean + std * torch.randn(mean.shape, generator=gen, device=device)
        else:
            x0 = vae.encode(batch["images"].to(device), sample=True, generator=gen).float()
        x0 = vae.scale_latents(x0)
    b = x0.shape[0]
    t = torch.randint(cfg.timestep_min, cfg.timestep_max + 1, (b,), generator=gen, device=device)
    noise = torch.randn(x0.shape, generator=gen, device=device)
    if cfg.offset_noise > 0:  # a per-image, per-channel constant shift (Guttenberg 2023, "offset noise")
        noise = noise + cfg.offset_noise * torch.randn((b, x0.shape[1], 1, 1), generator=gen, device=device)
    a = alphas[t].view(b, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    target = noise if cfg.objective == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0

    sizes = [batch["original_size"], batch["crop_top_left"]]
    if n_micro == 6:
        sizes.append(batch["target_size"])
    else:
        sizes.append(torch.full((b, 1), cfg.aesthetic_score))
    micro = torch.cat([torch.as_tensor(s, dtype=torch.float32).reshape(b, -1) for s in sizes], dim=1).to(device)

    with autocast():
        pred = model(x_t, t.float(), micro, captions=list(batch["captions"]), text=text)
    per_image = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
    if cfg.min_snr_gamma is not None:  # Hang et al. 2023: weight min(SNR, gamma) / SNR (eps), / (SNR + 1) (v)
        snr = (a / (1 - a)).flatten()
        clipped = snr.clamp(max=cfg.min_snr_gamma)
        per_image = per_image * (clipped / snr if cfg.objective == "epsilon" else clipped / (snr + 1))
    return per_image.mean()


# ---------------------------------------------------------------------------------------------
# Checkpoints and the training state (safetensors + JSON, never pickle).


def _latest(out: Path) -> Path:
    marker = out / "latest.txt"
    if not marker.is_file():
        raise FileNotFoundError(f"resume = 'latest' but {out} has no checkpoint yet ({marker} is missing)")
    return out / "checkpoints" / marker.read_text().strip()


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
    state_rankR.safetensors per process holding its shards."""
    from safetensors.torch import save_file

    sharded = _fsdp(cfg, d)
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
                "scaler": scaler.state_dict() if scaler is not None else None, "config": cfg.to_toml(),
                "world_size": d.world, "parallel": "fsdp" if sharded else "ddp"}
        (folder / "state.json").write_text(json.dumps(meta, indent=1))
    _barrier(d)
    if d.main:
        (folder.parent.parent / "latest.txt").write_text(folder.name + "\n")  # written last: a complete checkpoint


def _fsdp(cfg: TrainConfig, d: Dist) -> bool:
    return cfg.parallel == "fsdp" and d.world > 1


def load_checkpoint(folder: Path, cfg: TrainConfig, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer,
                    scaler, ema: dict[str, Tensor] | None, gen: torch.Generator, d: Dist) -> dict:
    from safetensors.torch import load_file

    meta = json.loads((folder / "state.json").read_text())
    if meta["params"] != list(params):
        raise ValueError(f"{folder}: the checkpoint trained other parameters than this config does "
                         "(different lora / train_text_encoders settings?)")
    if meta.get("world_size", 1) != d.world:
        raise ValueError(f"{folder}: saved with {meta['world_size']} processes; resume with the same number")
    sharded = _fsdp(cfg, d)
    if meta.get("parallel", "ddp") != ("fsdp" if sharded else "ddp"):
        raise ValueError(f"{folder}: saved with parallel = {meta.get('parallel', 'ddp')!r}; resume with the same")
    tensors = load_file(str(folder / (f"state_rank{d.rank}.safetensors" if sharded else "state.safetensors")))
    with torch.no_grad():
        for k, p in params.items():
            _local(p).copy_(tensors[f"param.{k}"])
    if ema is not None:
        if not any(k.startswith("ema.") for k in tensors):
            raise ValueError(f"{folder}: has no EMA weights, but this config sets ema_decay")
        for k in ema:
            _local(ema[k]).copy_(tensors[f"ema.{k}"])
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
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if scaler is not None and meta["scaler"]:
        scaler.load_state_dict(meta["scaler"])
    rng = load_file(str(folder / f"rng_rank{d.rank}.safetensors"))
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
    img.save(path)


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
    step: int = 0

    @property
    def sharded(self) -> bool:
        return _fsdp(self.cfg, self.d)

    def autocast(self) -> torch.autocast:
        mixed = self.cfg.mixed_precision
        return torch.autocast(self.d.device.type, dtype=dtypes.torch_dtype(mixed) if mixed != "no" else torch.float32,
                              enabled=mixed != "no")


def _trainable(cfg: TrainConfig, d: Dist) -> tuple[Components, Trainee, nn.Module]:
    """The models with everything frozen but what trains (or LoRA-wrapped), and the module to call: the
    trainee, DDP around it, or the trainee sharded in place by FSDP."""
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
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(unet)
    trainee = Trainee(parts, cfg.train_text_encoders)
    if _fsdp(cfg, d):
        shard_fsdp(trainee, d)  # (replaces the parameters by sharded ones: `params` are read after this)
        return parts, trainee, trainee
    if d.world > 1:
        return parts, trainee, nn.parallel.DistributedDataParallel(
            trainee, device_ids=[d.device.index] if d.device.type == "cuda" else None,
            find_unused_parameters=cfg.train_text_encoders,  # CLIP-L's last block feeds nothing SDXL uses
        )
    return parts, trainee, trainee


def _start(cfg: TrainConfig, d: Dist, loader: Loader | None) -> _Run:
    """The models, optimizer, EMA, random streams and data of a run, resumed from a checkpoint if asked."""
    out = Path(cfg.output_dir)
    parts, trainee, model = _trainable(cfg, d)
    te2 = parts.text_encoder_2.config
    params = {k: p for k, p in trainee.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    torch.manual_seed(cfg.seed + d.rank)  # before the loader is built: a custom one may draw from it
    run = _Run(
        cfg, d, out, parts, trainee, model, micro_value_count(parts.unet.config, te2.projection_dim or te2.width),
        params, opt, scaler=torch.amp.GradScaler(d.device.type) if cfg.mixed_precision == "fp16" else None,
        ema={k: p.detach().float().clone() for k, p in params.items()} if cfg.ema_decay is not None else None,
        gen=torch.Generator(d.device).manual_seed(cfg.seed + d.rank),
        alphas=TrainingSchedule.from_diffusers(parts.scheduler).alphas_cumprod().float().to(d.device),
        batches=Batches(*(loader or default_loader)(cfg, d.rank, d.world), num_workers=cfg.num_workers),
        text_cache=TextCache(out / "cache" / "text.safetensors") if cfg.cache_text else None,
        latent_cache=LatentCache(out / "cache" / f"latents_rank{d.rank}.safetensors") if cfg.cache_latents else None,
    )
    if cfg.resume:
        folder = _latest(out) if cfg.resume == "latest" else Path(cfg.resume)
        meta = load_checkpoint(folder, cfg, params, opt, run.scaler, run.ema, run.gen, d)
        run.step, run.batches.epoch, run.batches.index = meta["step"], meta["epoch"], meta["index"]
    else:  # a fresh run starts a fresh curve, and caches made by another model must not leak in
        for cache in (run.text_cache, run.latent_cache):
            if cache is not None:
                cache.items = {}
        if d.main and (out / "loss.csv").exists():
            (out / "loss.csv").unlink()
    return run


def _accumulate(run: _Run) -> Tensor:
    """Forward and backward over cfg.grad_accum micro-batches; the summed (scaled) loss, on the device."""
    cfg, d, model = run.cfg, run.d, run.model
    total = torch.zeros((), device=d.device)
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
            loss = diffusion_loss(model, run.parts.vae, batch, cfg, run.alphas, run.gen, run.n_micro, run.autocast,
                                  text, moments) / cfg.grad_accum
            (run.scaler.scale(loss) if run.scaler else loss).backward()
        total += loss.detach()
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
    return checkpoint


class _Log:
    """loss.csv every log_every steps, and the progress bar's loss, images/s and memory."""

    def __init__(self, run: _Run, progress: bool):
        self.run, self.rows, self.t = run, [], time.perf_counter()
        self.bar = None
        if run.d.main and progress:
            from tqdm import tqdm

            self.bar = tqdm(total=run.cfg.steps, initial=run.step, desc="train", unit="step", dynamic_ncols=True)

    def step(self, loss: float, lr: float) -> None:
        run, cfg = self.run, self.run.cfg
        self.rows.append((run.step, loss, lr))
        if run.step % cfg.log_every == 0 or run.step == cfg.steps:
            now = time.perf_counter()
            rate = len(self.rows) / max(now - self.t, 1e-9)
            self.t = now
            if run.d.main:
                _append_csv(run.out / "loss.csv", self.rows)
                if self.bar is not None:
                    images_per_step = cfg.batch_size * cfg.grad_accum * run.d.world
                    self.bar.set_postfix(loss=f"{sum(r[1] for r in self.rows) / len(self.rows):.4f}",
                                         img_s=f"{rate * images_per_step:.1f}",
                                         mem=f"{_peak_memory_gb(run.d.device):.2f}G")
            self.rows = []
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(cfg: TrainConfig, *, loader: Loader | None = None, progress: bool = True) -> TrainResult:
    d = setup_distributed()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if d.main:
        (out / "config.toml").write_text(cfg.to_toml())
    run = _start(cfg, d, loader)
    log = _Log(run, progress)
    losses: list[float] = []
    checkpoint: Path | None = None
    while run.step < cfg.steps:
        lr = cfg.lr * min(1.0, (run.step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
        for group in run.opt.param_groups:
            group["lr"] = lr
        total = _accumulate(run)
        _optimizer_step(run)
        run.step += 1
        if d.world > 1:
            dist.all_reduce(total)
            total /= d.world
        losses.append(total.item())
        log.step(losses[-1], lr)
        if (cfg.save_every and run.step % cfg.save_every == 0) or run.step == cfg.steps:
            checkpoint = _save(run)
    log.close()
    return TrainResult(losses, checkpoint, run.parts, run.step)


def _append_csv(path: Path, rows: list[tuple]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["step", "loss", "lr"])
        w.writerows((s, f"{loss:.6g}", f"{lr:.6g}") for s, loss, lr in rows)


def _plot_csv(out: Path) -> None:
    path = out / "loss.csv"
    if not path.exists():
        return
    with path.open() as f:
        rows = list(csv.DictReader(f))
    plot_losses([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], out / "loss.png")


# ---------------------------------------------------------------------------------------------
# Command line: `sdxl train CONFIG` (or python -m sdxl.training.train CONFIG under torchrun).


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="sdxl train", description="Fine-tune SDXL from a TOML config.")
    parser.add_argument("config", help="the training config (.toml, or .yaml with PyYAML); see configs/ for examples")
    parser.add_argument("--resume", help="override the config's resume: a checkpoint folder or 'latest'")
    parser.add_argument("--steps", type=int, help="override the config's total steps")
    parser.add_argument("--output-dir", help="override the config's output_dir")
    parser.add_argument("--lr", type=float, help="override the config's lr (e.g. a lower one when resuming, to anneal)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in (("resume", args.resume), ("steps", args.steps), ("output_dir", args.output_dir),
                                   ("lr", args.lr)) if v is not None}
    try:
        cfg = load_config(args.config, **overrides)
        result = train(cfg)
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
