"""Latents in and out of the VAE, the starting latents of a run, and the VAE's float32 fallback.

Randomness: per image i, a CPU generator seeded with `seed + i` gives (in this order) the VAE
sample of the init image (img2img / inpaint), the initial noise (1, 4, H/8, W/8) in float32, and
the VAE sample of the masked image (inpaint), which is how diffusers' SDXL pipelines consume a
list of CPU generators. So a seed gives the same image on any device, and image i of a batch is the
single image of seed + i.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from . import sampling
from .acceleration import execution_device
from .models.vae import AutoencoderKL, run_tiled

__all__ = ["Inpaint", "PrecisionWarning", "decode_latents", "encode_image", "inpaint_start", "initial_noise"]


class PrecisionWarning(UserWarning):
    """The VAE produced non-finite values in half precision and was re-run in float32."""


def _dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _run_vae(vae: AutoencoderKL, fn: Callable[[Tensor], Tensor], x: Tensor, what: str) -> Tensor:
    """fn(x) in the VAE's dtype; images whose result is not finite are run again in float32 (warning).

    A VAE that overflowed once is marked (`overflowed_in_half`) and runs in float32 from then on:
    the official SDXL VAE overflows float16 on most images, and a doomed half-precision pass per image
    would cost time and a warning each time (diffusers always decodes it in float32: `force_upcast`).
    """
    dtype = _dtype(vae)
    if dtype == torch.float32:
        return fn(x.float()).float()
    if vae.overflowed_in_half:
        with _in_float32(vae):
            return fn(x.float()).float()
    out = fn(x.to(dtype))
    bad = (~torch.isfinite(out).flatten(1).all(dim=1)).nonzero().flatten().tolist()
    out = out.float()
    if bad:
        warnings.warn(
            f"the VAE {what} image(s) {bad} to non-finite values in {dtype}; redoing them in float32, and running "
            "this VAE in float32 from now on (a VAE fixed for half precision avoids it, e.g. "
            "load(..., vae='sdxl-vae-fp16-fix.safetensors'))",
            PrecisionWarning,
            stacklevel=3,
        )
        vae.overflowed_in_half = True
        with _in_float32(vae):
            for i in bad:
                out[i:i + 1] = fn(x[i:i + 1].float()).float()
    return out


@contextmanager
def _in_float32(vae: AutoencoderKL):
    """The VAE's weights in float32 for the block, then back in their dtype (float16/bfloat16 -> float32 ->
    back is exact). Converted for each use rather than kept, so the VAE keeps its dtype and memory between uses."""
    dtype = _dtype(vae)
    vae.float()
    try:
        yield
    finally:
        vae.to(dtype)


def decode_latents(vae: AutoencoderKL, latents: Tensor, *, tiled: bool = False) -> Tensor:
    """Diffusion latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in about [-1, 1], float32."""
    z = vae.unscale_latents(latents.float())
    return _run_vae(vae, vae.decode_tiled if tiled else vae.decode, z, "decoded")


def encode_image(vae: AutoencoderKL, image: Tensor, generators: Sequence[torch.Generator], *, tiled: bool = False) -> Tensor:
    """One image (1, 3, H, W) in [-1, 1] -> scaled latents (len(generators), 4, H/8, W/8), float32.

    Latent i is a sample of the VAE's Gaussian drawn with generator i (float32 on the CPU), so it
    does not depend on the device or on the other images.
    """
    vae_device = execution_device(vae)
    image = image.to(vae_device)

    def moments(x: Tensor) -> Tensor:
        one = lambda t: torch.cat(vae.encode_moments(t), 1)  # noqa: E731
        if not tiled:
            return one(x)
        f = vae.config.downscale_factor
        return run_tiled(one, x, tile=1024 // f, overlap=128 // f, in_scale=f, out_scale=1)

    mean, logvar = _run_vae(vae, moments, image, "encoded").chunk(2, dim=1)
    std = torch.exp(0.5 * logvar)
    out = []
    for g in generators:
        noise = torch.randn(mean.shape, generator=g, dtype=torch.float32).to(mean.device)
        out.append(mean + std * noise)
    return vae.scale_latents(torch.cat(out))


def initial_noise(generators: Sequence[torch.Generator], shape: tuple[int, ...], device: torch.device) -> Tensor:
    """Unit noise (len(generators), *shape[1:]): one float32 CPU draw of `shape` per image's generator."""
    return torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]).to(device)


@dataclass
class Inpaint:
    """What inpainting carries through the denoising loop (latent size h, w; B images)."""

    mask: Tensor  # (B, 1, h, w) latent-size mask, 1 = repaint
    image_latents: Tensor | None  # (B, 4, h, w) scaled latents of the init image (4-channel blend)
    masked_latents: Tensor | None  # (B, 4, h, w) scaled latents of the masked image (9-channel U-Nets)
    noise: Tensor  # (B, 4, h, w) the initial noise, re-used to noise the init latents at each step


def inpaint_start(vae: AutoencoderKL, init: Tensor, mask: Tensor, generators: Sequence[torch.Generator],
                  plan: sampling.Plan, shape: tuple[int, ...], *, nine_channels: bool, full: bool,
                  tiled: bool, device: torch.device, fill: str = "original") -> tuple[Inpaint, Tensor]:
    """(the inpainting state, the starting latents), consuming the generators in diffusers' order.

    full: strength 1 (start from pure noise); nine_channels: an inpainting U-Net (mask and masked
    image as extra input channels) rather than an ordinary one blended after each step. fill: what the
    masked region is noised from below strength 1: the image's latents ("original", and "fill", whose image
    was filled already), fresh unit noise ("noise") or zeros ("zeros"), AUTOMATIC1111's masked content.
    """
    image_latents = None
    if not nine_channels or not full:  # diffusers encodes the image only when it needs it
        image_latents = encode_image(vae, init, generators, tiled=tiled).to(device)
    noise = initial_noise(generators, shape, device)
    if nine_channels:
        masked_latents = encode_image(vae, init * (mask < 0.5), generators, tiled=tiled).to(device)
    else:
        masked_latents = None
        for g in generators:  # diffusers encodes the masked image here even for 4-channel U-Nets
            torch.randn(shape, generator=g, dtype=torch.float32)
    latent_mask = torch.nn.functional.interpolate(mask, size=shape[-2:]).to(device)  # nearest, as diffusers
    latent_mask = latent_mask.expand(len(generators), -1, -1, -1)
    start = image_latents
    if not full and fill in ("noise", "zeros"):
        under = initial_noise(generators, shape, device) if fill == "noise" else torch.zeros_like(image_latents)
        start = torch.lerp(image_latents, under, latent_mask)
    x = noise * plan.init_noise_sigma if full else sampling.add_noise(start, noise, plan)
    return Inpaint(latent_mask, image_latents, masked_latents, noise), x
