"""What the samplers share: step noise, ancestral step sizes, the x0-predictor and callback types.

Step noise follows k-diffusion's convention, a `noise_sampler(sigma, sigma_next)` returning unit noise shaped
like x for the step from sigma to sigma_next. The default one draws as diffusers' schedulers do with the
per-image CPU generators: torch.randn(x.shape, generator=generator) in float32 on the generator's device (CPU
when None), then moved to x; the samplers with a diffusers twin call it where that twin draws (same shapes,
same order, also on a last step that adds no noise), so a seed gives the same image on every device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

# x0-predictor: model(x, sigma) -> denoised, or (denoised, uncond_denoised) where the model offers both
Model = Callable[[Tensor, float], Tensor | tuple[Tensor, Tensor]]
StepCallback = Callable[[int, Tensor, Tensor], None]  # callback(i, x, denoised) after step i
NoiseSampler = Callable[[float, float], Tensor]  # noise_sampler(sigma, sigma_next) -> unit noise like x
Generators = torch.Generator | Sequence[torch.Generator] | None


def generator_noise(x: Tensor, generator: Generators) -> Tensor:
    """Unit noise like x, drawn as diffusers' `randn_tensor` does (on the generator's device, float32).

    A list of generators (one per image, as the pipelines use) draws each image's row from its own.
    (CPU randn in float16/bfloat16 gives the float32 draws rounded, so drawing float32 matches
    diffusers' half-precision pipelines too.)
    """
    if isinstance(generator, Sequence):
        return torch.cat([generator_noise(x[i : i + 1], g) for i, g in enumerate(generator)])
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x.device, x.dtype)


def default_noise_sampler(x: Tensor, generator: Generators = None) -> NoiseSampler:
    """A noise sampler that draws each call's noise from the generator(s) (`generator_noise`), whatever the sigmas."""
    return lambda sigma, sigma_next: generator_noise(x, generator)


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up): an ancestral step to sigma_to = a deterministic step to sigma_down + noise sigma_up
    (k-diffusion `get_ancestral_step`)."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def with_uncond(out: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """(denoised, uncond_denoised) from a model output; a single tensor is its own unconditional prediction."""
    return out if isinstance(out, tuple) else (out, out)
