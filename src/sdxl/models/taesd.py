"""The TAESD decoder: a tiny distilled decoder from diffusion latents to images, for cheap live previews.

Architecture of madebyollin/taesd (`taesd.py` `Decoder`; diffusers' `DecoderTiny` computes the same):

    Clamp (tanh(z / 3) * 3) -> conv latent->64, ReLU
    -> 3 x [3 Blocks, 2x nearest upsample, conv without bias] -> Block -> conv 64->3
    Block: conv-ReLU-conv-ReLU-conv, plus a skip (1x1 conv without bias when the width changes), then ReLU

The module is an `nn.Sequential` laid out like the original, so its keys are the original file's
(`1.weight`, `3.conv.0.weight`, ..., `19.bias`) and `taesdxl_decoder.safetensors` / `.pth` load with an
identity map; diffusers' `AutoencoderTiny` names (`decoder.layers.{i - 1}...`, no Clamp module) are mapped
by `sdxl.previews`. The input is the diffusion model's latents (what the U-Net sees: VAE latents times the
VAE's scaling factor), not raw VAE latents: diffusers' `AutoencoderTiny` has scaling_factor 1.0, and its
latent_magnitude / latent_shift only quantise its encoder's output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class TAESDConfig:
    latent_channels: int = 4  # 4 for SD 1.x / SDXL (taesd, taesdxl); 16 for taesd3 / taef1
    width: int = 64  # channels of every hidden layer (64 in all the released 8x decoders)
    blocks: tuple[int, ...] = (3, 3, 3, 1)  # residual Blocks per stage, a 2x upsample between stages (3 -> 8x)
    out_channels: int = 3  # RGB

    @property
    def upscale_factor(self) -> int:
        """Pixels per latent along each side (8)."""
        return 2 ** (len(self.blocks) - 1)


taesd = TAESDConfig()  # taesd_decoder (SD 1.x) and taesdxl_decoder (SDXL): one architecture, other weights
taesd3 = TAESDConfig(latent_channels=16)  # taesd3 / taef1 decoders (16-channel latents)

PRESETS: dict[str, TAESDConfig] = {"taesd": taesd, "taesdxl": taesd, "taesd3": taesd3}


def conv(n_in: int, n_out: int, *, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class Clamp(nn.Module):
    """A soft clamp of the latents to (-3, 3): tanh(x / 3) * 3."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """conv-ReLU-conv-ReLU-conv plus a skip, then ReLU (`conv`, `skip`, `fuse` as in the original)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(conv(n_in, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(), conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


def decoder_layers(config: TAESDConfig) -> list[nn.Module]:
    """The original `Decoder`'s layers in order (their positions are the checkpoint's key prefixes)."""
    w = config.width
    layers: list[nn.Module] = [Clamp(), conv(config.latent_channels, w), nn.ReLU()]
    for i, n in enumerate(config.blocks):
        layers += [Block(w, w) for _ in range(n)]
        if i < len(config.blocks) - 1:
            layers += [nn.Upsample(scale_factor=2), conv(w, w, bias=False)]  # nearest, then a bias-free conv
    layers.append(conv(w, config.out_channels))
    return layers


class TAESDDecoder(nn.Sequential):
    """Diffusion latents (B, C, h, w) -> images (B, 3, 8h, 8w) in about [-1, 1], like `AutoencoderKL.decode`."""

    def __init__(self, config: TAESDConfig = taesd):
        super().__init__(*decoder_layers(config))
        self.config = config

    def forward(self, z: Tensor) -> Tensor:
        # The original decoder's images are in [0, 1]; diffusers' DecoderTiny maps them to [-1, 1], as we do.
        return super().forward(z).mul(2).sub(1)
