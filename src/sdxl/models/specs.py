"""Which model configs belong together: one record per SDXL model family, and one seeded builder.

    spec = SPECS["tiny"]                     # or BASE, REFINER, TINY, TINY_REFINER
    parts = build_components(spec, seed=0)   # random weights, the same for the same seed

A `ModelSpec` bundles the U-Net, VAE and text-encoder configs of one kind of checkpoint (flux's
`ModelSpec` does the same); `Components` holds the built models of one checkpoint, whether loaded
from a file (`sdxl.checkpoints.load`) or built here. Only the model files are imported: no
checkpoints, sampling or pipeline code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import clip, unet, vae
from .clip import CLIPConfig, CLIPTextEncoder
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig

__all__ = ["BASE", "REFINER", "SPECS", "TINY", "TINY_REFINER", "Components", "ModelSpec", "build_components"]

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class ModelSpec:
    """The configs of one kind of SDXL checkpoint. The refiner has no CLIP ViT-L (`text_encoder` None)."""

    kind: str  # "base", "refiner" or "inpaint"
    unet: UNetConfig
    vae: VAEConfig
    text_encoder: CLIPConfig | None  # OpenAI CLIP ViT-L/14
    text_encoder_2: CLIPConfig  # OpenCLIP ViT-bigG/14
    # diffusers' SDXL pipelines zero the negative conditioning for an empty negative prompt when the
    # model says so: the official base does, the official refiner does not.
    force_zeros_for_empty_prompt: bool = True


# The official releases (sd_xl_base_1.0, sd_xl_refiner_1.0; configs from the reference sgm YAML files).
BASE = ModelSpec("base", unet.base, vae.base, clip.clip_l, clip.clip_g)
REFINER = ModelSpec("refiner", unet.refiner, vae.refiner, None, clip.clip_g, force_zeros_for_empty_prompt=False)
# SDXL-shaped models small enough for tests and CPU training from scratch (`init = "tiny"` in training configs).
TINY = ModelSpec("base", unet.tiny, vae.tiny, clip.clip_l_tiny, clip.clip_g_tiny)
TINY_REFINER = ModelSpec("refiner", unet.tiny_refiner, vae.tiny, None, clip.clip_g_tiny,
                         force_zeros_for_empty_prompt=False)

SPECS: dict[str, ModelSpec] = {"base": BASE, "refiner": REFINER, "tiny": TINY, "tiny_refiner": TINY_REFINER}

MODEL_CLASSES = {"unet": UNet, "vae": AutoencoderKL, "text_encoder": CLIPTextEncoder, "text_encoder_2": CLIPTextEncoder}


@dataclass
class Components:
    """The models of one SDXL checkpoint. The refiner has no `text_encoder` (CLIP ViT-L)."""

    kind: str  # "base", "refiner" or "inpaint"
    unet: UNet | None = None
    vae: AutoencoderKL | None = None
    text_encoder: CLIPTextEncoder | None = None  # OpenAI CLIP ViT-L/14
    text_encoder_2: CLIPTextEncoder | None = None  # OpenCLIP ViT-bigG/14
    scheduler: dict = field(default_factory=dict)  # diffusers scheduler config, when the folder has one
    # diffusers' SDXL pipelines zero the negative conditioning for an empty negative prompt when the
    # model says so: the official base does, the official refiner does not.
    force_zeros_for_empty_prompt: bool = True
    source: Path | None = None
    # Generation settings the model's maker recommends (file metadata "sdxl.recommended", e.g. {"cfg": 3.0}); the
    # pipeline uses them where the user sets nothing.
    recommended: dict = field(default_factory=dict)
    # component -> `sdxl.checkpoints.load.Origin`: the files its weights were read from, for models loaded from
    # safetensors files (`sdxl.adapters` restores merged weights from there instead of keeping copies).
    origins: dict = field(default_factory=dict, repr=False)

    def models(self) -> dict[str, torch.nn.Module]:
        """name -> model, for the components present."""
        return {name: getattr(self, name) for name in COMPONENTS if getattr(self, name) is not None}


def build_components(spec: ModelSpec, seed: int = 0, *, device: torch.device | str | None = None) -> Components:
    """`spec`'s models with random weights (PyTorch's default initialisation), in eval mode and frozen.

    Each model's weights depend only on `seed`, its place in COMPONENTS and its config: a U-Net is the
    same whatever VAE is built beside it, so a trained VAE can be swapped in afterwards. The caller's
    global random state is left as it was.
    """
    parts = Components(kind=spec.kind, force_zeros_for_empty_prompt=spec.force_zeros_for_empty_prompt)
    for i, name in enumerate(COMPONENTS):
        config = getattr(spec, name)
        if config is None:
            continue
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * len(COMPONENTS) + i)  # one stream per (seed, component)
            model = MODEL_CLASSES[name](config)
        setattr(parts, name, model.to(device or "cpu").eval().requires_grad_(False))
    return parts
