"""Samplers: plain functions `sample_x(model, x, sigmas, ...)` over an x0-predictor `model(x, sigma)`.

k-diffusion's `sampling.py` layout: x is VE latents at sigmas[0]; each function steps down the sigmas
and returns x at sigmas[-1]. `sigmas` is a CPU tensor: every sigma is read once as a Python float, so
the loops never read anything back from the accelerator (no host syncs) and shapes never change.

Stochastic samplers draw their step noise as diffusers' schedulers do with a CPU generator:
torch.randn(x.shape, generator=generator) in float32 on the generator's device (CPU when None), then
moved to x; same shapes, same order (one draw per step, also on the last one where diffusers does).

`sample(plan, denoise, x)` runs a `Plan` (see schedules.py for the latent-scale conventions).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .denoiser import Denoiser
from .schedules import Plan

Model = Callable[[Tensor, float], Tensor]  # x0-predictor: model(x, sigma) -> denoised
StepCallback = Callable[[int, Tensor], None]  # callback(i, x) after step i


class Cancelled(Exception):
    """Raised by `sample` when its `cancel()` returns True between two steps."""


Generators = torch.Generator | Sequence[torch.Generator] | None


def _noise(x: Tensor, generator: Generators) -> Tensor:
    """Unit noise like x, drawn as diffusers' `randn_tensor` does (on the generator's device, float32).

    A list of generators (one per image, as the pipelines use) draws each image's row from its own.
    (CPU randn in float16/bfloat16 gives the float32 draws rounded, so drawing float32 matches
    diffusers' half-precision pipelines too.)
    """
    if isinstance(generator, Sequence):
        return torch.cat([_noise(x[i : i + 1], g) for i, g in enumerate(generator)])
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x.device, x.dtype)


def _ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up): an ancestral step to sigma_to = deterministic step to sigma_down + noise sigma_up."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def sample_euler(model: Model, x: Tensor, sigmas: Tensor, *, callback: StepCallback | None = None) -> Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        d = (x - denoised) / s[i]
        x = x + d * (s[i + 1] - s[i])
        if callback is not None:
            callback(i, x)
    return x


def sample_euler_ancestral(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generators = None,
    eta: float = 1.0,
    callback: StepCallback | None = None,
) -> Tensor:
    """Ancestral sampling with Euler steps (k-diffusion `sample_euler_ancestral`; diffusers EulerAncestralDiscrete)."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        sigma_down, sigma_up = _ancestral_step(s[i], s[i + 1], eta)
        x = x + (x - denoised) / s[i] * (sigma_down - s[i])
        noise = _noise(x, generator)  # drawn on the last step too (sigma_up = 0), as diffusers does
        if sigma_up:
            x = x + noise * sigma_up
        if callback is not None:
            callback(i, x)
    return x


def sample_heun(
    model: Model, x: Tensor, sigmas: Tensor, *, last_euler: bool = False, callback: StepCallback | None = None
) -> Tensor:
    """Heun's method (Karras et al. 2022, Algorithm 1 without churn); an Euler step to sigma 0.

    last_euler: the last step is an Euler step whatever its sigma, as diffusers' HeunDiscreteScheduler
    ends a schedule cut by `denoising_end` (its last step is the first half of a Heun step).
    """
    s = sigmas.tolist()
    n = len(s) - 1
    for i in range(n):
        denoised = model(x, s[i])
        d = (x - denoised) / s[i]
        dt = s[i + 1] - s[i]
        if s[i + 1] == 0 or (last_euler and i == n - 1):
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - model(x_2, s[i + 1])) / s[i + 1]
            x = x + (d + d_2) * (dt / 2)
        if callback is not None:
            callback(i, x)
    return x


def sample_dpmpp_2m(model: Model, x: Tensor, sigmas: Tensor, *, callback: StepCallback | None = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Algorithm 2); diffusers DPMSolverMultistepScheduler."""
    s = sigmas.tolist()
    old_denoised, h_last = None, 0.0
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        if s[i + 1] == 0:
            x = denoised  # the first-order step to sigma 0 (h = inf) lands on the prediction
        else:
            h = math.log(s[i] / s[i + 1])  # lambda = -log sigma (VE) = log(alpha / sigma) (VP)
            if old_denoised is None:
                denoised_d = denoised
            else:
                r = h_last / h
                denoised_d = denoised * (1 + 1 / (2 * r)) - old_denoised * (1 / (2 * r))
            x = x * (s[i + 1] / s[i]) - denoised_d * math.expm1(-h)
            h_last = h
        old_denoised = denoised
        if callback is not None:
            callback(i, x)
    return x


def sample_dpmpp_2m_sde(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generators = None,
    eta: float = 1.0,
    callback: StepCallback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) SDE, midpoint (Lu et al. 2022; k-diffusion `sample_dpmpp_2m_sde`; "sde-dpmsolver++")."""
    s = sigmas.tolist()
    old_denoised, h_last = None, 0.0
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        noise = _noise(x, generator)  # one draw every step, the last one included, as diffusers does
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i] / s[i + 1])
            eta_h = eta * h
            decay = -math.expm1(-h - eta_h)
            x = x * (s[i + 1] / s[i] * math.exp(-eta_h)) + denoised * decay
            if old_denoised is not None:
                r = h_last / h
                x = x + (denoised - old_denoised) * (0.5 * decay / r)
            if eta:
                x = x + noise * (s[i + 1] * (-math.expm1(-2 * eta_h)) ** 0.5)
            h_last = h
        old_denoised = denoised
        if callback is not None:
            callback(i, x)
    return x


def sample_dpmpp_sde(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generators = None,
    eta: float = 1.0,
    r: float = 0.5,
    callback: StepCallback | None = None,
) -> Tensor:
    """DPM-Solver++ (stochastic, 2 model calls per step) (k-diffusion `sample_dpmpp_sde`), noise from `generator`.

    k-diffusion draws from a Brownian tree; here each of the two noise injections per step is a fresh
    draw from the generator (midpoint first), so a seed gives one result (not diffusers' DPMSolverSDEScheduler's).
    """
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        if s[i + 1] == 0:
            x = denoised  # Euler step to sigma 0
        else:
            t, t_next = -math.log(s[i]), -math.log(s[i + 1])  # t = -log sigma
            h = t_next - t
            sigma_mid = math.exp(-(t + h * r))
            fac = 1 / (2 * r)
            # step 1: to the midpoint
            sigma_down, sigma_up = _ancestral_step(s[i], sigma_mid, eta)
            x_2 = x * (sigma_down / s[i]) - denoised * math.expm1(t + math.log(sigma_down))
            x_2 = x_2 + _noise(x, generator) * sigma_up
            denoised_2 = model(x_2, sigma_mid)
            # step 2: to sigma_next with the averaged prediction
            sigma_down, sigma_up = _ancestral_step(s[i], s[i + 1], eta)
            denoised_d = denoised * (1 - fac) + denoised_2 * fac
            x = x * (sigma_down / s[i]) - denoised_d * math.expm1(t + math.log(sigma_down))
            x = x + _noise(x, generator) * sigma_up
        if callback is not None:
            callback(i, x)
    return x


def sample_ddim(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    sigmas_to: Tensor | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """DDIM with eta = 0 (Song et al. 2021, eq. 12), which in VE sigma is an Euler step; diffusers DDIMScheduler.

    sigmas_to: where step i lands (default sigmas[i + 1]). diffusers' DDIM steps to t - T // steps and
    reads that VP latent at the next timestep: where the two differ, x is rescaled to keep the VP latent.
    """
    s = sigmas.tolist()
    n = len(s) - 1
    to = sigmas_to.tolist() if sigmas_to is not None else s[1:]
    for i in range(n):
        denoised = model(x, s[i])
        eps = (x - denoised) / s[i]
        x = denoised + eps * to[i]
        if i + 1 < n and to[i] != s[i + 1]:
            x = x * ((1 + s[i + 1] ** 2) / (1 + to[i] ** 2)) ** 0.5
        if callback is not None:
            callback(i, x)
    return x


def sample_lcm(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generators = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Latent consistency model multistep sampling (Luo et al. 2023, arXiv:2310.04378, Algorithm 1; LCMScheduler).

    Each step jumps to the prediction and re-noises it to the next sigma (no noise before sigma 0).
    The consistency boundary scalings are the Denoiser's (it knows t).
    """
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        x = model(x, s[i])
        if s[i + 1] > 0:
            x = x + _noise(x, generator) * s[i + 1]
        if callback is not None:
            callback(i, x)
    return x


SAMPLER_FUNCTIONS: dict[str, Callable[..., Tensor]] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_sde": sample_dpmpp_sde,
    "ddim": sample_ddim,
    "lcm": sample_lcm,
}
STOCHASTIC = frozenset({"euler_ancestral", "dpmpp_2m_sde", "dpmpp_sde", "lcm"})


def sample(
    plan: Plan,
    denoise: Denoiser,
    x: Tensor,
    *,
    generator: Generators = None,
    callback: Callable[[int, int, Tensor], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Tensor:
    """Run plan.sampler from x and return the final latents, as diffusers' pipeline hands them to the VAE.

    x: unit noise * plan.init_noise_sigma (txt2img), `add_noise(...)` (img2img), or a base pipeline's
    result (refiner hand-off); VP-scaled when plan.vp (see schedules.py), as are the result and the x
    given to callback(step, total, x) after each step (step = 0 .. total - 1). cancel() is checked
    before the first step and between steps; True raises `Cancelled`.
    """
    s = plan.sigmas.tolist()
    total = plan.steps
    vp_scale = [(1 + v**2) ** 0.5 for v in s] if plan.vp else None
    if cancel is not None and cancel():
        raise Cancelled()

    def step_done(i: int, x: Tensor) -> None:
        if callback is not None:
            callback(i, total, x / vp_scale[i + 1] if vp_scale else x)
        if cancel is not None and i < total - 1 and cancel():
            raise Cancelled()

    kwargs: dict = {}
    if plan.sampler in STOCHASTIC:
        kwargs["generator"] = generator
    if plan.sampler == "heun":
        kwargs["last_euler"] = True
    if plan.sampler == "ddim":
        kwargs["sigmas_to"] = plan.sigmas_to
    if vp_scale:
        x = x * vp_scale[0]
    hook = step_done if callback is not None or cancel is not None else None
    x = SAMPLER_FUNCTIONS[plan.sampler](denoise, x, plan.sigmas, callback=hook, **kwargs)
    return x / vp_scale[-1] if vp_scale else x
