"""The PatchGAN discriminator and GAN losses of the latent-diffusion autoencoder recipe.

Ports (behaviour, not code) of taming-transformers `taming/modules/discriminator/model.py` (NLayerDiscriminator,
after pix2pix's PatchGAN) and `taming/modules/losses/vqperceptual.py` (hinge / vanilla losses, adopt_weight), with
the adaptive weight of latent-diffusion `ldm/modules/losses/contperceptual.py` (LPIPSWithDiscriminator).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class DiscriminatorConfig:
    in_channels: int = 3  # RGB images
    channels: int = 64  # width of the first conv (taming `ndf`)
    layers: int = 3  # stride-2 convs after the first (taming `n_layers`; LDM's `disc_num_layers` = 3)


class NLayerDiscriminator(nn.Module):
    """Image (B, 3, H, W) -> patch logits (B, 1, h, w): 4x4 convs, stride 2 then 1, BatchNorm, LeakyReLU(0.2).
    Module indices of `main` are taming's, so its checkpoints' `discriminator.main.N.*` tensors map by prefix."""

    def __init__(self, config: DiscriminatorConfig = DiscriminatorConfig()):
        super().__init__()
        self.config = config
        ch, n = config.channels, config.layers
        seq: list[nn.Module] = [nn.Conv2d(config.in_channels, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for i in range(1, n + 1):  # the last of these keeps the size (stride 1), as taming's
            prev, mult = mult, min(2**i, 8)
            seq += [nn.Conv2d(ch * prev, ch * mult, 4, stride=2 if i < n else 1, padding=1, bias=False),
                    nn.BatchNorm2d(ch * mult), nn.LeakyReLU(0.2, True)]
        seq.append(nn.Conv2d(ch * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*seq)
        self.apply(init_weights)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


def init_weights(m: nn.Module) -> None:
    """taming's weights_init: convs N(0, 0.02); BatchNorm scale N(1, 0.02), shift 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------
# Losses.


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def generator_loss(logits_fake: Tensor) -> Tensor:
    """What the autoencoder minimises against the discriminator (LDM uses -mean(logits) for both losses)."""
    return -logits_fake.mean()


def disc_factor(factor: float, step: int, start: int) -> float:
    """taming's adopt_weight: the GAN terms are off (0) before step `start`."""
    return factor if step >= start else 0.0


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, disc_weight: float) -> Tensor:
    """disc_weight * ||d rec_loss / d last_layer|| / (||d g_loss / d last_layer|| + 1e-4), clamped to [0, 1e4]
    and detached (LDM's calculate_adaptive_weight): balances the GAN gradient against the reconstruction's at the
    decoder's output layer. The graph is kept for the backward pass that follows."""
    rec_grad, = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    g_grad, = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    rec_norm, g_norm = (_full(g).norm() for g in (rec_grad, g_grad))  # (FSDP: the whole gradient's norm)
    return (rec_norm / (g_norm + 1e-4)).clamp(0.0, 1e4).detach() * disc_weight


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t
