"""Samplers: plain functions `sample_x(model, x, sigmas, *, callback=None, ...)` over an x0-predictor `model(x, sigma)`.

k-diffusion's `sampling.py` layout: x is VE latents at sigmas[0]; each function steps down the sigmas
and returns x at sigmas[-1] (or where `sigmas_to` lands). `sigmas` is a CPU tensor: every sigma is read once
as a Python float, so the loops never read anything back from the accelerator (no host syncs) and shapes never
change. After step i, callback(i, x, denoised) gets the new x and the step's prediction (for live previews).

The stochastic samplers take k-diffusion's `noise_sampler(sigma, sigma_next)`, `eta` (the share of each step
re-noised, ancestral samplers and SDEs) and `s_noise` (a scale on the noise); by default their noise comes from
`generator` (`noise.default_noise_sampler`: diffusers' draws with the per-image CPU generators).

`sample(plan, denoise, x)` runs a `Plan` (see schedules.py for the latent-scale conventions). The multistep
samplers are in multistep.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor

from .denoiser import Denoiser
from .multistep import (
    sample_deis,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2m_sde_heun,
    sample_dpmpp_3m_sde,
    sample_ipndm,
    sample_lms,
    sample_uni_pc,
    sample_uni_pc_bh2,
)
from .noise import Generators, Model, NoiseSampler, StepCallback, ancestral_step, default_noise_sampler, with_uncond
from .schedules import Plan, karras_sigmas


class Cancelled(Exception):
    """Raised by `sample` when its `cancel()` returns True between two steps."""


def sample_euler(model: Model, x: Tensor, sigmas: Tensor, *, callback: StepCallback | None = None) -> Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        d = (x - denoised) / s[i]
        x = x + d * (s[i + 1] - s[i])
        if callback is not None:
            callback(i, x, denoised)
    return x


def sample_euler_ancestral(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generators = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    callback: StepCallback | None = None,
) -> Tensor:
    """Ancestral sampling with Euler steps (k-diffusion `sample_euler_ancestral`; diffusers EulerAncestralDiscrete)."""
    draw_last = noise_sampler is None  # the generator's draws follow diffusers': one on the last step too
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta)
        x = x + (x - denoised) / s[i] * (sigma_down - s[i])
        noise = noise_sampler(s[i], s[i + 1]) if s[i + 1] > 0 or draw_last else None
        if sigma_up:
            x = x + noise * (sigma_up * s_noise)
        if callback is not None:
            callback(i, x, denoised)
    return x


def _heun_step(model: Model, x: Tensor, sigma: float, sigma_next: float, euler: bool) -> tuple[Tensor, Tensor]:
    """(x at sigma_next, the prediction at sigma): one Heun step, or an Euler step where `euler` or sigma_next is 0."""
    denoised = model(x, sigma)
    d = (x - denoised) / sigma
    dt = sigma_next - sigma
    if sigma_next == 0 or euler:
        return x + d * dt, denoised
    x_2 = x + d * dt
    d_2 = (x_2 - model(x_2, sigma_next)) / sigma_next
    return x + (d + d_2) * (dt / 2), denoised


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
        x, denoised = _heun_step(model, x, s[i], s[i + 1], last_euler and i == n - 1)
        if callback is not None:
            callback(i, x, denoised)
    return x


def _dpm_2_step(model: Model, x: Tensor, sigma: float, sigma_to: float, sigma_next: float) -> tuple[Tensor, Tensor]:
    """(x at sigma_to, the prediction at sigma): a DPM-Solver-2 step through the log-midpoint; Euler to sigma 0."""
    denoised = model(x, sigma)
    d = (x - denoised) / sigma
    if sigma_to == 0:
        return x + d * (sigma_to - sigma), denoised
    sigma_mid = math.exp(0.5 * (math.log(sigma) + math.log(sigma_to)))
    if sigma_mid == sigma_next:
        # An ancestral step with eta = 1 has its midpoint on the next sigma (sqrt(sigma * sigma_next^2 / sigma));
        # a midpoint's model time is its own interpolated one (diffusers' timesteps_interpol), not the time the
        # plan gives the next step (rounded on Karras sigmas): one ulp off, the Denoiser interpolates it.
        sigma_mid = math.nextafter(sigma_mid, sigma)
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = (x_2 - model(x_2, sigma_mid)) / sigma_mid
    return x + d_2 * (sigma_to - sigma), denoised


def sample_dpm_2(model: Model, x: Tensor, sigmas: Tensor, *, callback: StepCallback | None = None) -> Tensor:
    """DPM-Solver-2 steps in Karras et al.'s Algorithm 2 (k-diffusion `sample_dpm_2`; KDPM2DiscreteScheduler)."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        x, denoised = _dpm_2_step(model, x, s[i], s[i + 1], s[i + 1])
        if callback is not None:
            callback(i, x, denoised)
    return x


def sample_dpm_2_ancestral(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generators = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    callback: StepCallback | None = None,
) -> Tensor:
    """Ancestral sampling with DPM-Solver-2 steps (k-diffusion `sample_dpm_2_ancestral`; KDPM2AncestralDiscrete)."""
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta)
        x, denoised = _dpm_2_step(model, x, s[i], sigma_down, s[i + 1])
        if sigma_down != 0:  # diffusers draws on its second-order calls: every step but a last one to 0
            x = x + noise_sampler(s[i], s[i + 1]) * (sigma_up * s_noise)
        if callback is not None:
            callback(i, x, denoised)
    return x


def sample_dpmpp_2s_ancestral(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generators = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    callback: StepCallback | None = None,
) -> Tensor:
    """Ancestral sampling with DPM-Solver++(2S) steps (Lu et al. 2022; k-diffusion `sample_dpmpp_2s_ancestral`)."""
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta)
        if sigma_down == 0:
            x = x + (x - denoised) / s[i] * (sigma_down - s[i])  # Euler step to sigma 0
        else:
            sigma_mid = (s[i] * sigma_down) ** 0.5  # t = -log sigma halfway
            h = math.log(s[i] / sigma_down)
            x_2 = x * (sigma_mid / s[i]) - denoised * math.expm1(-0.5 * h)
            denoised_2 = model(x_2, sigma_mid)
            x = x * (sigma_down / s[i]) - denoised_2 * math.expm1(-h)
        if s[i + 1] > 0:
            x = x + noise_sampler(s[i], s[i + 1]) * (sigma_up * s_noise)
        if callback is not None:
            callback(i, x, denoised)
    return x


def sample_dpmpp_sde(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generators = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
    callback: StepCallback | None = None,
) -> Tensor:
    """DPM-Solver++ (stochastic, 2 model calls per step) (k-diffusion `sample_dpmpp_sde`).

    k-diffusion's default noise is a Brownian tree; here, by default, each of the two noise injections per step
    is a fresh draw from the generator (midpoint first), so a seed gives one result (not diffusers'
    DPMSolverSDEScheduler's). Pass k-diffusion's BrownianTreeNoiseSampler as noise_sampler for its noise.
    """
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
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
            sigma_down, sigma_up = ancestral_step(s[i], sigma_mid, eta)
            x_2 = x * (sigma_down / s[i]) - denoised * math.expm1(t + math.log(sigma_down))
            x_2 = x_2 + noise_sampler(s[i], sigma_mid) * (sigma_up * s_noise)
            denoised_2 = model(x_2, sigma_mid)
            # step 2: to sigma_next with the averaged prediction
            sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta)
            denoised_d = denoised * (1 - fac) + denoised_2 * fac
            x = x * (sigma_down / s[i]) - denoised_d * math.expm1(t + math.log(sigma_down))
            x = x + noise_sampler(s[i], s[i + 1]) * (sigma_up * s_noise)
        if callback is not None:
            callback(i, x, denoised)
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
            callback(i, x, denoised)
    return x


def sample_lcm(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generators = None,
    noise_sampler: NoiseSampler | None = None,
    s_noise: float = 1.0,
    callback: StepCallback | None = None,
) -> Tensor:
    """Latent consistency model multistep sampling (Luo et al. 2023, arXiv:2310.04378, Algorithm 1; LCMScheduler).

    Each step jumps to the prediction and re-noises it to the next sigma (no noise before sigma 0; LCM has no
    eta: every step re-noises fully). The consistency boundary scalings are the Denoiser's (it knows t).
    """
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        x = denoised = model(x, s[i])
        if s[i + 1] > 0:
            x = x + noise_sampler(s[i], s[i + 1]) * (s[i + 1] * s_noise)
        if callback is not None:
            callback(i, x, denoised)
    return x


def sample_tcd(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    sigmas_to: Tensor | None = None,
    generator: Generators = None,
    noise_sampler: NoiseSampler | None = None,
    s_noise: float = 1.0,
    callback: StepCallback | None = None,
) -> Tensor:
    """Trajectory consistency distillation's strategic stochastic sampling (Zheng et al. 2024, arXiv:2402.19159,
    Algorithm 4; diffusers TCDScheduler): a DDIM jump to sigmas_to[i], then re-noising to the next sigma.

    sigmas_to: where each jump lands, sigma(floor((1 - gamma) t_next)) (`Plan.sigmas_to`; TCD's gamma is its
    eta, `schedules.TCD_GAMMA`); default the next sigma (gamma = 0: deterministic, DDIM). Noise is drawn for
    each re-noising, as diffusers draws it (not on the last step of a schedule).
    """
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    s = sigmas.tolist()
    to = sigmas_to.tolist() if sigmas_to is not None else s[1:]
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        x = denoised + (x - denoised) * (to[i] / s[i])
        if s[i + 1] > to[i]:
            x = x + noise_sampler(to[i], s[i + 1]) * ((s[i + 1] ** 2 - to[i] ** 2) ** 0.5 * s_noise)
        if callback is not None:
            callback(i, x, denoised)
    return x


def sample_euler_ancestral_cfg_pp(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generators = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    callback: StepCallback | None = None,
) -> Tensor:
    """Ancestral Euler steps with CFG++ (Chung et al. 2024, arXiv:2406.08070; ComfyUI `sample_euler_ancestral_cfg_pp`):
    each step lands on the guided prediction and re-noises along the unconditional one.

    model returns (denoised, uncond_denoised); a single tensor counts as both (then this is ancestral Euler).
    """
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised, uncond = with_uncond(model(x, s[i]))
        if s[i + 1] == 0:
            x = denoised
        else:
            sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta)
            x = denoised + (x - uncond) * (sigma_down / s[i])
            if eta > 0 and s_noise > 0:
                x = x + noise_sampler(s[i], s[i + 1]) * (sigma_up * s_noise)
        if callback is not None:
            callback(i, x, denoised)
    return x


def sample_euler_cfg_pp(model: Model, x: Tensor, sigmas: Tensor, *, callback: StepCallback | None = None) -> Tensor:
    """Euler steps with CFG++ (Chung et al. 2024; ComfyUI `sample_euler_cfg_pp`): x' = denoised + sigma' eps_uncond."""
    return sample_euler_ancestral_cfg_pp(model, x, sigmas, eta=0.0, s_noise=0.0, callback=callback)


def sample_restart(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generators = None,
    noise_sampler: NoiseSampler | None = None,
    s_noise: float = 1.0,
    restart: tuple[int, int] | None = None,
    restart_sigmas: tuple[float, float] = (0.1, 2.0),
    callback: StepCallback | None = None,
) -> Tensor:
    """Restart sampling (Xu et al. 2023, arXiv:2306.14878) as AUTOMATIC1111's `restart_sampler` runs it: Heun steps
    down the sigmas; after the step that reaches the sigma nearest restart_sigmas[0], `times` times: re-noise to
    the sigma nearest restart_sigmas[1] and come down again in `steps` Heun steps on Karras sigmas.

    restart: (steps, times); default AUTOMATIC1111's rule for n = len(sigmas) - 1: none below 20 steps (plain
    Heun), (9, 1) from 20, (n // 4, 2) from 36. AUTOMATIC1111 replaces the sigmas by Karras ones of n - steps *
    times steps; here they are the plan's, and the restarts come on top. callback: once per step of `sigmas`.
    """
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    s = sigmas.tolist()
    n = len(s) - 1
    segments = _restart_segments(s, restart, restart_sigmas)
    for i in range(n):
        x, denoised = _heun_step(model, x, s[i], s[i + 1], False)
        for _ in range(segments.get(i, (None, 0))[1]):
            down = segments[i][0]
            x = x + noise_sampler(down[-1], down[0]) * ((down[0] ** 2 - down[-1] ** 2) ** 0.5 * s_noise)
            for j in range(len(down) - 1):
                x, denoised = _heun_step(model, x, down[j], down[j + 1], False)
        if callback is not None:
            callback(i, x, denoised)
    return x


def _restart_segments(s: list[float], restart: tuple[int, int] | None,
                      restart_sigmas: tuple[float, float]) -> dict[int, tuple[list[float], int]]:
    """{step i: (the restart's Karras sigmas from high to low, times)}: where `sample_restart` restarts."""
    n = len(s) - 1
    if restart is None:
        restart = (n // 4, 2) if n >= 36 else (9, 1) if n >= 20 else (0, 0)
    steps, times = restart
    low = min(range(len(s)), key=lambda k: abs(s[k] - restart_sigmas[0]))
    high = min(range(len(s)), key=lambda k: abs(s[k] - restart_sigmas[1]))
    if steps < 1 or times < 1 or not high < low or low < 1:
        return {}
    return {low - 1: (karras_sigmas(steps + 1, s[low], s[high])[:-1].tolist(), times)}


SAMPLER_FUNCTIONS: dict[str, Callable[..., Tensor]] = {
    "euler": sample_euler,
    "euler_cfg_pp": sample_euler_cfg_pp,
    "euler_ancestral": sample_euler_ancestral,
    "euler_ancestral_cfg_pp": sample_euler_ancestral_cfg_pp,
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_heun": sample_dpmpp_2m_sde_heun,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "ddim": sample_ddim,
    "lcm": sample_lcm,
    "tcd": sample_tcd,
    "ipndm": sample_ipndm,
    "deis": sample_deis,
    "uni_pc": sample_uni_pc,
    "uni_pc_bh2": sample_uni_pc_bh2,
    "restart": sample_restart,
}
STOCHASTIC = frozenset({
    "euler_ancestral", "euler_ancestral_cfg_pp", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde",
    "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "lcm", "tcd", "restart",
})

def plan_options(plan: Plan, generator: Generators, noise_sampler: NoiseSampler | None) -> dict:
    """The keyword arguments `sample` passes plan.sampler besides (model, x, sigmas, callback)."""
    options: dict = {}
    if plan.sampler in STOCHASTIC:
        options.update(generator=generator, noise_sampler=noise_sampler)
    if plan.sampler == "heun":
        options["last_euler"] = True  # diffusers' Heun ends a denoising_end cut on the first half of a step
    if plan.sampler in ("ddim", "deis", "tcd"):
        options["sigmas_to"] = plan.sigmas_to
    if plan.sampler in ("uni_pc", "uni_pc_bh2"):
        options["steps_after"] = plan.trimmed[1]
    if plan.sampler == "deis":  # diffusers' DEIS lowers its last orders for schedules under 15 steps
        options["lower_order_final"] = plan.trimmed[1] == 0 and plan.trimmed[0] + plan.steps < 15
    return options


def sample(
    plan: Plan,
    denoise: Denoiser | Callable,
    x: Tensor,
    *,
    generator: Generators = None,
    noise_sampler: NoiseSampler | None = None,
    callback: Callable[[int, int, Tensor, Tensor], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Tensor:
    """Run plan.sampler from x and return the final latents, as diffusers' pipeline hands them to the VAE.

    x: unit noise * plan.init_noise_sigma (txt2img), `add_noise(...)` (img2img), or a base pipeline's
    result (refiner hand-off); VP-scaled when plan.vp (see schedules.py), as are the result and the x
    given to callback(step, total, x, denoised) after each step (step = 0 .. total - 1; denoised: the step's
    x0 prediction, the same in both scales). cancel() is checked before the first step and between steps;
    True raises `Cancelled`. noise_sampler: the stochastic samplers' step noise (default: from `generator`).
    """
    s = plan.sigmas.tolist()
    total = plan.steps
    # where x is after each step: the next sigma; after the last, where it lands if that is above the final sigma
    # (DEIS' and TCD's sigma(0)), the final sigma if the sampler re-noises up to it (TCD cut by denoising_end)
    ends = [*s[1:-1], max(s[-1], plan.sigmas_to.tolist()[-1]) if plan.sigmas_to is not None else s[-1]]
    vp_scale = [(1 + v**2) ** 0.5 for v in ends] if plan.vp else None
    if cancel is not None and cancel():
        raise Cancelled()

    def step_done(i: int, x: Tensor, denoised: Tensor) -> None:
        if callback is not None:
            callback(i, total, x / vp_scale[i] if vp_scale else x, denoised)
        if cancel is not None and i < total - 1 and cancel():
            raise Cancelled()

    if vp_scale:
        x = x * (1 + s[0] ** 2) ** 0.5
    hook = step_done if callback is not None or cancel is not None else None
    x = SAMPLER_FUNCTIONS[plan.sampler](denoise, x, plan.sigmas, callback=hook,
                                        **plan_options(plan, generator, noise_sampler))
    return x / vp_scale[-1] if vp_scale else x
