"""The VAE trainer's configuration: one flat TOML file, every key a `VAETrainConfig` field (`sdxl train-vae CONFIG`).

    cfg = load_vae_config("configs/vae_finetune.toml")   # ValueError naming the file and the key on any mistake

Defaults are the latent-diffusion autoencoder recipe SDXL's VAE follows (LDM `configs/autoencoder/*kl*.yaml`,
`ldm/modules/losses/contperceptual.py`): L1 + LPIPS, KL weight 1e-6, a hinge PatchGAN from step 50001 at weight 0.5
with the adaptive weight, Adam betas (0.5, 0.9); plus the EMA of the weights that SDXL adds (paper sec. 2.4).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import _toml_value, at_least_value, check_types, choose_value, config_from_dict, read_config_values

INITS = ("builtin", "tiny")  # VAE sizes to train from scratch (sdxl.training.train_vae.INIT_CONFIGS)
REC_LOSSES = ("l1", "l2")
DISC_LOSSES = ("hinge", "vanilla")
SAVE_DTYPES = ("fp32", "fp16", "bf16")
PARALLEL = ("ddp", "fsdp")
PRECISIONS = ("no", "bf16")  # no fp16: SDXL's VAE overflows float16 inside its decoder (use `sdxl fix-vae-fp16`)


@dataclass
class VAETrainConfig:
    # -- model: exactly one of `model` / `init`
    # A VAE to fine-tune: a standalone file in the official SDXL layout (sdxl_vae.safetensors), one this trainer
    # or `python -m sdxl.training.train_vae` wrote, a diffusers-named VAE file or a diffusers (pipeline) folder.
    model: str | None = None
    init: str | None = None  # or random weights: "builtin" (the built-in model's VAE) or "tiny" (tests)
    # Train only the decoder (and post_quant_conv): the encoder and quant_conv stay frozen, so the latents, and a
    # U-Net trained on them, stay valid (how SD's ft-EMA / ft-MSE VAEs were made). Needs `model`.
    decoder_only: bool = False

    # -- data (sdxl.training.data.ImageCaptionDataset's buckets; captions are not needed)
    data: str = ""  # the image folder
    resolution: int = 256  # buckets of about resolution^2 pixels (LDM trained its autoencoders on 256x256 crops)
    bucket_multiple: int = 64  # bucket sides are multiples of this (>= 8: the VAE downscales by 8)
    random_crop: bool = True  # random instead of centre crops of the resized images
    flip: bool = True  # random horizontal flips
    num_workers: int = 0  # DataLoader worker processes
    skip_unreadable_images: bool = False  # leave unreadable images out (with a warning) instead of stopping

    # -- optimisation
    batch_size: int = 4  # images per process per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step: effective batch = batch_size * grad_accum * processes
    steps: int = 10000  # optimizer steps in total (a resumed run continues up to this number)
    lr: float = 4.5e-6  # LDM's base_lr (it multiplies it by the effective batch; here it is the rate used)
    adam_beta1: float = 0.5  # LDM's autoencoder and discriminator Adam
    adam_beta2: float = 0.9
    weight_decay: float = 0.0  # AdamW decoupled decay (0: LDM's plain Adam)
    warmup: int = 0  # steps of linear warm-up to lr; constant afterwards
    max_grad_norm: float = 0.0  # gradient clipping (0: off, as LDM)
    seed: int = 0  # random init, posterior samples, crops, flips, data order
    # "bf16": torch.autocast for the forward passes (weights, optimizer state, EMA and the losses' sums stay float32)
    mixed_precision: str = "no"

    # -- losses (per image: summed over pixels, as LDM's nll_loss / kl_loss; averaged over the batch)
    rec_loss: str = "l1"  # pixel regression: "l1" (LDM) or "l2"
    perceptual_weight: float = 1.0  # LPIPS weight (0: no LPIPS, no weight files needed)
    kl_weight: float = 1e-6  # KL(posterior || N(0, 1)); LDM's kl-f8 value
    # LPIPS weight files (sdxl.training.lpips): torchvision's vgg16-397923af.pth and the lpips package's v0.1 vgg.pth.
    lpips_vgg: str | None = None
    lpips_linear: str | None = None
    lpips_download: bool = False  # download a missing one into that path (needs the network)

    # -- the discriminator (taming's PatchGAN; off unless `discriminator = true`)
    discriminator: bool = False
    disc_start: int = 50001  # the GAN terms are 0 before this optimizer step (LDM kl-f8)
    disc_weight: float = 0.5  # times the adaptive weight
    disc_factor: float = 1.0  # scales both GAN losses once they are on
    disc_loss: str = "hinge"  # "hinge" or "vanilla"
    disc_layers: int = 3
    disc_channels: int = 64
    disc_lr: float | None = None  # None: lr

    # -- EMA (SDXL sec. 2.4: "track the weights with an exponential moving average"): saved and evaluated
    ema_decay: float | None = 0.9999  # 0 (or None): no EMA, the trained weights are saved
    # LitEma's warm-up: decay = min(ema_decay, (1 + n) / (10 + n)) at the n-th update (early averages follow fast)
    ema_warmup: bool = True

    # -- several processes (torchrun): "ddp" copies the models, "fsdp" shards them (PyTorch FSDP2)
    parallel: str = "ddp"

    # -- outputs
    output_dir: str = "runs/train_vae"  # vae.safetensors, checkpoints/, loss.csv, config.toml, log.txt
    save_every: int = 0  # a checkpoint every N steps (0: only at the end)
    save_dtype: str = "fp32"  # dtype of vae.safetensors (fp32: SDXL's VAE overflows in fp16)
    resume: str | None = None  # a checkpoint folder, or "latest"
    overwrite: bool = False  # delete an earlier run's files in output_dir first
    log_every: int = 10  # steps between loss.csv rows / progress updates
    eval_data: str | None = None  # a held-out image folder: L1, PSNR, LPIPS of the EMA weights' reconstructions
    eval_images: int = 64  # at most this many of them

    def __post_init__(self) -> None:
        _validate(self)

    def to_toml(self) -> str:
        """The config as TOML text (None fields left out: None is their default)."""
        fields = (f for f in dataclasses.fields(self) if getattr(self, f.name) is not None)
        return "".join(f"{f.name} = {_toml_value(getattr(self, f.name))}\n" for f in fields)


def _validate(c: VAETrainConfig) -> None:
    check_types(c)
    choose, at_least = functools.partial(choose_value, c), functools.partial(at_least_value, c)

    if (c.model is None) == (c.init is None):
        raise ValueError("give exactly one of `model` (a VAE file to fine-tune) or `init` ('builtin' or 'tiny' "
                         "from scratch)")
    if c.init is not None:
        choose("init", INITS)
    if c.decoder_only and c.model is None:
        raise ValueError("decoder_only fine-tunes an existing VAE's decoder: it needs `model`, not `init`")
    if not c.data:
        raise ValueError("data must name the image folder to train on")
    if c.mixed_precision == "fp16":
        raise ValueError("mixed_precision = \"fp16\" is not offered for the VAE: SDXL's VAE overflows float16 "
                         "inside its decoder; use \"bf16\" (or \"no\")")
    for name, allowed in (("rec_loss", REC_LOSSES), ("disc_loss", DISC_LOSSES), ("save_dtype", SAVE_DTYPES),
                          ("parallel", PARALLEL), ("mixed_precision", PRECISIONS)):
        choose(name, allowed)
    for name in ("resolution", "batch_size", "grad_accum", "steps", "log_every", "disc_layers", "disc_channels",
                 "eval_images"):
        at_least(name, 1)
    for name in ("num_workers", "warmup", "save_every", "seed", "weight_decay", "max_grad_norm", "perceptual_weight",
                 "kl_weight", "disc_start", "disc_weight", "disc_factor"):
        at_least(name, 0)
    if c.bucket_multiple < 8 or c.bucket_multiple % 8:
        raise ValueError(f"bucket_multiple must be a multiple of 8 (the VAE's downscaling), got {c.bucket_multiple}")
    if c.resolution % 8:
        raise ValueError(f"resolution must be a multiple of 8 pixels, got {c.resolution}")
    for name in ("lr", "disc_lr"):
        if getattr(c, name) is not None and not getattr(c, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(c, name)}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(c, name) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {getattr(c, name)}")
    if c.ema_decay is not None and not 0.0 <= c.ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1) (e.g. 0.9999; 0: no EMA), got {c.ema_decay}")
    if c.perceptual_weight > 0 and (c.lpips_vgg is None or c.lpips_linear is None):
        raise ValueError("perceptual_weight > 0 needs both LPIPS weight files: lpips_vgg = \"PATH/vgg16-397923af.pth\" "
                         "and lpips_linear = \"PATH/vgg.pth\" (see docs/training-vae.md), or perceptual_weight = 0")
    if c.overwrite and c.resume:
        raise ValueError("resume continues the run in output_dir and overwrite deletes it: give one of them")


def vae_config_from_dict(values: dict[str, Any], where: str = "config") -> VAETrainConfig:
    """A VAETrainConfig from a dict (parsed TOML); ValueError naming `where` and the bad key."""
    return config_from_dict(values, where, cls=VAETrainConfig)


def load_vae_config(path: str | Path, **overrides: Any) -> VAETrainConfig:
    """Read a VAE training config (flat TOML or YAML, UTF-8); `overrides` replace keys (e.g. from the command line)."""
    values = read_config_values(Path(path))
    values.update(overrides)
    return vae_config_from_dict(values, where=str(path))
