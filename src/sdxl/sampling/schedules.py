"""Noise schedules: SDXL's training schedule, and the sigmas/timesteps a sampler runs through.

Conventions (the same for every sampler, k-diffusion style):

- The samplers work on VE latents x = x0 + sigma * eps, with sigma = sqrt((1 - a) / a) for the
  training schedule's cumulative alpha a (DDPM's x_t = sqrt(a) x0 + sqrt(1 - a) eps is x / sqrt(1 + sigma^2)).
- A `Plan` lists the sigmas a sampler steps through, descending, its final value last (0, or where
  diffusers ends: sigma(0) for DDIM with `set_alpha_to_one=False`; an intermediate sigma after a
  `denoising_end` hand-off), and for each sigma the model time t that diffusers hands to the U-Net.
- The latents at the boundary of `samplers.sample` (its input, `init_noise_sigma`, `add_noise`, the
  result) are in the scale diffusers' scheduler for that sampler uses, so that a pipeline built on this
  module hands the VAE (or the refiner) exactly what diffusers' pipeline does:
  VE for euler, euler_ancestral, heun, dpmpp_sde (diffusers' Euler/Heun schedulers: initial latents are
  unit noise * sqrt(sigma_max^2 + 1) for "leading" spacing, * sigma_max for "trailing"/"linspace");
  VP (x / sqrt(1 + sigma^2)) for dpmpp_2m, dpmpp_2m_sde, ddim, lcm (DPMSolverMultistep, DDIM and LCM
  schedulers: initial latents are unit noise * 1.0). `Plan.vp` says which; `sample` converts at entry
  and exit. Both scales agree wherever the final sigma is 0.

Port notes: the timestep rules are diffusers' `set_timesteps` of EulerDiscreteScheduler,
HeunDiscreteScheduler, DPMSolverMultistepScheduler, DDIMScheduler and LCMScheduler (diffusers 0.3x,
`schedulers/scheduling_*.py`), re-derived here in torch float64 with numpy's linspace/interp/rounding
(round half to even) so the timesteps come out identical; the trimming rules are those of
`StableDiffusionXLImg2ImgPipeline.get_timesteps` and the `denoising_end` block of
`StableDiffusionXLPipeline.__call__`. Karras: Karras et al. 2022 (arXiv:2206.00364) eq. 5;
exponential and sgm_uniform: k-diffusion `get_sigmas_exponential` and ComfyUI's `sgm_uniform`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

SAMPLERS: tuple[str, ...] = (
    "euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde", "ddim", "lcm",
)
SCHEDULES: tuple[str, ...] = ("default", "trailing", "karras", "exponential", "sgm_uniform")

# Samplers whose diffusers scheduler keeps VP latents (see the module docstring).
VP_SAMPLERS = frozenset({"dpmpp_2m", "dpmpp_2m_sde", "ddim", "lcm"})
# Which diffusers scheduler's timestep rules each sampler follows ("euler" also for the samplers that
# have no diffusers twin: they run on Euler's sigmas, as in k-diffusion/ComfyUI).
FAMILY = {
    "euler": "euler", "euler_ancestral": "euler", "heun": "euler", "dpmpp_sde": "euler",
    "dpmpp_2m": "dpm", "dpmpp_2m_sde": "dpm", "ddim": "ddim", "lcm": "lcm",
}
# diffusers' `order` as the pipelines use it for trimming: Heun lists every timestep but the first twice.
ORDER = {"heun": 2}
LCM_ORIGINAL_STEPS = 50  # LCMScheduler `original_inference_steps` (the distillation schedule)


@dataclass(frozen=True)
class TrainingSchedule:
    """The DDPM schedule a model was trained with (SDXL: 1000 steps, scaled-linear betas)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # also "linear"
    prediction_type: str = "epsilon"  # or "v_prediction"
    timestep_spacing: str = "leading"  # what schedule="default" means: "leading" | "trailing" | "linspace"
    steps_offset: int = 1
    set_alpha_to_one: bool = False  # DDIM's last step: to sigma 0 (True) or to sigma(t=0) (SDXL: False)

    def __post_init__(self) -> None:
        if self.beta_schedule not in ("scaled_linear", "linear"):
            raise ValueError(f"unsupported beta_schedule {self.beta_schedule!r}; use 'scaled_linear' or 'linear'")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}; use 'epsilon' or 'v_prediction'")
        if self.timestep_spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(
                f"unsupported timestep_spacing {self.timestep_spacing!r}; use 'leading', 'trailing' or 'linspace'"
            )

    @classmethod
    def from_diffusers(cls, config: dict) -> TrainingSchedule:
        """From a diffusers scheduler_config.json dict ({} -> SDXL's); keys that do not matter are ignored."""
        if config.get("trained_betas") is not None:
            raise ValueError("scheduler configs with explicit trained_betas are not supported")
        if config.get("rescale_betas_zero_snr"):
            raise ValueError("rescale_betas_zero_snr (zero terminal SNR) schedules are not supported")
        defaults = cls()
        return cls(**{k: config.get(k, getattr(defaults, k)) for k in (
            "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
            "timestep_spacing", "steps_offset", "set_alpha_to_one",
        )})

    def alphas_cumprod(self) -> Tensor:
        """Cumulative alphas, float64 [num_train_timesteps].

        Computed in float32 as diffusers' schedulers do (betas = linspace(sqrt b0, sqrt b1)^2 for
        "scaled_linear"), so sigmas and timesteps match diffusers' exactly; returned as float64.
        """
        n = self.num_train_timesteps
        if self.beta_schedule == "scaled_linear":
            betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=torch.float32) ** 2
        else:
            betas = torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float32)
        return torch.cumprod(1.0 - betas, dim=0).double()

    def sigmas(self) -> Tensor:
        """VE noise levels ((1 - a) / a) ** 0.5, float32 [num_train_timesteps], index = t (ascending)."""
        a = self.alphas_cumprod().float()
        return ((1 - a) / a) ** 0.5


@dataclass
class Plan:
    """What a sampler runs: see the module docstring for the conventions."""

    sampler: str
    sigmas: Tensor  # float32, CPU, descending; the final value last
    # float32, CPU, one per sigmas[:-1]: the model time diffusers passes to the U-Net at that sigma
    # (integers for "leading"/"trailing", DPM-Solver's rounded Karras times, fractional otherwise).
    # The Denoiser uses it for exactly these sigmas and log-sigma interpolation for any other.
    timesteps: Tensor
    init_noise_sigma: float  # txt2img initial latents = unit noise * this (in the boundary scale)
    # DDIM only: where each step lands when diffusers' DDIM lands off the next sigma (it steps to
    # t - num_train_timesteps // steps, which for "trailing"/"linspace" need not be the next timestep).
    sigmas_to: Tensor | None = None

    @property
    def vp(self) -> bool:
        """Whether latents at `sample`'s boundary are VP-scaled (x / sqrt(1 + sigma^2)), as diffusers' are."""
        return self.sampler in VP_SAMPLERS

    @property
    def steps(self) -> int:
        """Number of sampler steps (callback's `total`)."""
        return len(self.sigmas) - 1


# ---------------------------------------------------------------------------------------------
# numpy-exact helpers (diffusers computes its timesteps with numpy in float64).


def _linspace(start: float, stop: float, num: int, endpoint: bool = True) -> Tensor:
    """np.linspace in float64: start + i * step, the last value exactly `stop`."""
    div = (num - 1) if endpoint else num
    step = (stop - start) / div if div > 0 else 0.0
    y = torch.arange(num, dtype=torch.float64) * step + start
    if endpoint and num > 1:
        y[-1] = stop
    return y


def _arange(start: float, stop: float, step: float) -> Tensor:
    """np.arange in float64: numpy steps by (start + step) - start, which can differ from step in the last bit."""
    num = max(math.ceil((stop - start) / step), 0)
    delta = (start + step) - start
    return start + torch.arange(num, dtype=torch.float64) * delta


def _interp(t: Tensor, values: Tensor) -> Tensor:
    """np.interp(t, arange(len(values)), values) in float64 (values[j] + slope * (t - j))."""
    values = values.double()
    t = t.double().clamp(0, len(values) - 1)
    j = t.floor().long().clamp(max=len(values) - 2)
    slope = values[j + 1] - values[j]
    out = slope * (t - j) + values[j]
    return torch.where(t == j, values[j], torch.where(t == len(values) - 1, values[-1], out))


@functools.lru_cache(maxsize=8)
def _log_sigmas(training: TrainingSchedule) -> Tensor:
    # diffusers takes np.log of the float32 sigmas (a float32 result), then works in float64
    return training.sigmas().log().double()


def sigma_to_t(sigma: Tensor, training: TrainingSchedule) -> Tensor:
    """Model time for a VE sigma: linear interpolation of t in log-sigma (diffusers' `_sigma_to_t`).

    Clamped to [0, num_train_timesteps - 1]; float64, on sigma's device (no host sync).
    """
    log_sigmas = _log_sigmas(training).to(sigma.device)
    log_sigma = sigma.double().clamp(min=1e-10).log()
    n = len(log_sigmas)
    low = ((log_sigma[..., None] >= log_sigmas).sum(-1) - 1).clamp(0, n - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
    return (1 - w) * low + w * (low + 1)


def t_to_sigma(t: Tensor, training: TrainingSchedule) -> Tensor:
    """VE sigma at a (fractional) model time: interpolation in log-sigma (k-diffusion/ComfyUI `t_to_sigma`)."""
    log_sigmas = _log_sigmas(training).to(t.device)
    t = t.double().clamp(0, len(log_sigmas) - 1)
    low = t.floor().long()
    high = t.ceil().long()
    w = t - low
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


# ---------------------------------------------------------------------------------------------
# Schedules: functions returning sigmas with a trailing zero (float64).


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022 eq. 5: n sigmas uniform in sigma^(1/rho) from sigma_max to sigma_min, then 0."""
    ramp = _linspace(0.0, 1.0, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """n sigmas uniform in log sigma from sigma_max to sigma_min, then 0 (k-diffusion `get_sigmas_exponential`)."""
    sigmas = _linspace(math.log(sigma_max), math.log(sigma_min), n).exp()
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def sgm_uniform_sigmas(n: int, training: TrainingSchedule) -> Tensor:
    """n sigmas at t uniform from t_max down to (not including) 0, then 0 (ComfyUI `sgm_uniform`)."""
    return torch.cat([t_to_sigma(_sgm_uniform_t(n, training), training), torch.zeros(1, dtype=torch.float64)])


def _sgm_uniform_t(n: int, training: TrainingSchedule) -> Tensor:
    return _linspace(training.num_train_timesteps - 1, 0.0, n + 1)[:-1]


def spaced_timesteps(family: str, spacing: str, steps: int, training: TrainingSchedule) -> Tensor:
    """The timesteps diffusers' `set_timesteps(steps)` picks (float64, descending) for a scheduler family.

    "euler" (Euler, Euler ancestral, Heun), "dpm" (DPMSolverMultistep: leading/linspace divide the
    range into steps + 1 and drop the last), "ddim" (linspace rounded), "lcm" (LCMScheduler: every
    k-th step of its 50-step distillation schedule).
    """
    n_train = training.num_train_timesteps
    if family == "lcm":
        k = n_train // LCM_ORIGINAL_STEPS
        origin = torch.arange(LCM_ORIGINAL_STEPS, 0, -1, dtype=torch.float64) * k - 1  # 999, 979, ..., 19
        if steps > LCM_ORIGINAL_STEPS:
            raise ValueError(f"lcm supports at most {LCM_ORIGINAL_STEPS} steps, got {steps}")
        return origin[_linspace(0.0, LCM_ORIGINAL_STEPS, steps, endpoint=False).floor().long()]
    if spacing == "trailing":  # the same for every family
        return _arange(n_train, 0, -n_train / steps).round() - 1
    m = steps + 1 if family == "dpm" else steps
    if spacing == "leading":
        t = (torch.arange(m, dtype=torch.float64) * (n_train // m)).round().flip(0) + training.steps_offset
    elif spacing == "linspace":
        t = _linspace(0.0, n_train - 1, m).flip(0)
        # Euler/Heun keep numpy's float32 values; DPM and DDIM round to integers
        t = t.float().double() if family == "euler" else t.round()
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}")
    return t[:steps]  # DPM: drop the extra (lowest) one


# ---------------------------------------------------------------------------------------------


def _check(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")


def make_plan(
    training: TrainingSchedule,
    sampler: str,
    schedule: str,
    steps: int,
    *,
    strength: float = 1.0,
    denoising_start: float | None = None,
    denoising_end: float | None = None,
) -> Plan:
    """Sigmas for `steps` steps, trimmed as diffusers' SDXL pipelines do.

    img2img `strength`: skip the first steps - min(int(steps * strength), steps) steps.
    `denoising_end` (base hands off): keep the steps whose timestep is >= cutoff, cutoff =
    round(T - denoising_end * T). `denoising_start` (refiner takes over; `strength` is then ignored):
    keep the steps whose timestep is < cutoff; for heun one step more, as diffusers' rule for
    second-order schedulers starts it there. ValueError for unknown names, steps < 1, strength outside
    (0, 1], denoising values outside (0, 1), or a trim that leaves no step.
    """
    _check_plan_arguments(sampler, schedule, steps, strength, denoising_start, denoising_end)
    spacing = "trailing" if schedule == "trailing" else training.timestep_spacing
    t, sigmas = _schedule(training, sampler, schedule, spacing, steps)
    landing = _landing_sigmas(training, sampler, schedule, steps, t, sigmas)
    init_noise_sigma = _init_noise_sigma(sampler, schedule, spacing, sigmas)

    begin, count = _trim(t, sampler, steps, strength, denoising_start, denoising_end, training)
    keep = slice(begin, begin + count)
    t, sigmas, landing = t[keep], sigmas[keep], landing[keep]
    sigmas_to = None
    if sampler == "ddim" and not torch.equal(landing[:-1], sigmas[1:]):
        sigmas_to = landing.float()
    return Plan(
        sampler=sampler,
        sigmas=torch.cat([sigmas, landing[-1:]]).float(),
        timesteps=t.float(),
        init_noise_sigma=init_noise_sigma,
        sigmas_to=sigmas_to,
    )


def _check_plan_arguments(
    sampler: str,
    schedule: str,
    steps: int,
    strength: float,
    denoising_start: float | None,
    denoising_end: float | None,
) -> None:
    """The ValueErrors `make_plan` documents, before any work is done."""
    _check("sampler", sampler, SAMPLERS)
    _check("schedule", schedule, SCHEDULES)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    for name, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
        if value is not None and not 0 < value < 1:
            raise ValueError(f"{name} must be in (0, 1) or None, got {value!r}")
    if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
        raise ValueError(f"denoising_start ({denoising_start}) must be below denoising_end ({denoising_end})")


def _schedule(
    training: TrainingSchedule, sampler: str, schedule: str, spacing: str, steps: int
) -> tuple[Tensor, Tensor]:
    """(timesteps, sigmas) of the untrimmed schedule, float64, one per step (no final sigma)."""
    family = FAMILY[sampler]
    train_sigmas = training.sigmas().double()  # float32 values
    if schedule in ("default", "trailing"):
        # LCM's own timesteps are its "default"; its "trailing" is the common rule
        t = spaced_timesteps("euler" if family == "lcm" and schedule != "default" else family, spacing, steps, training)
        return t, _interp(t, train_sigmas)
    if schedule in ("karras", "exponential"):
        if sampler in ("euler", "heun"):
            # diffusers' Euler/Heun span the default spacing's sigmas (with "leading": sigma(1)..sigma(T - ratio + 1))
            spaced = _interp(spaced_timesteps("euler", spacing, steps, training), train_sigmas)
            sigma_min, sigma_max = spaced[-1].item(), spaced[0].item()
        else:  # k-diffusion, diffusers' DPMSolverMultistep: the model's whole range
            sigma_min, sigma_max = train_sigmas[0].item(), train_sigmas[-1].item()
        make = karras_sigmas if schedule == "karras" else exponential_sigmas
        sigmas = make(steps, sigma_min, sigma_max)[:-1]
        t = sigma_to_t(sigmas, training)
        if schedule == "karras" and family == "dpm":
            t = t.round()  # DPMSolverMultistep rounds its Karras timesteps (and keeps the exact sigmas)
        return t, sigmas
    t = _sgm_uniform_t(steps, training)  # sgm_uniform
    return t, t_to_sigma(t, training)


def _landing_sigmas(
    training: TrainingSchedule, sampler: str, schedule: str, steps: int, t: Tensor, sigmas: Tensor
) -> Tensor:
    """Where each step lands: the next sigma, and 0 after the last (diffusers' final_sigmas_type="zero")."""
    if sampler == "ddim" and schedule in ("default", "trailing"):
        # DDIMScheduler.step goes to t - T // steps, and past t = 0 to its final alpha
        train_sigmas = training.sigmas().double()
        prev = t.long() - training.num_train_timesteps // steps
        last = 0.0 if training.set_alpha_to_one else train_sigmas[0].item()
        return torch.where(prev >= 0, train_sigmas[prev.clamp(min=0)], torch.full_like(sigmas, last))
    return torch.cat([sigmas[1:], torch.zeros(1, dtype=torch.float64)])


def _init_noise_sigma(sampler: str, schedule: str, spacing: str, sigmas: Tensor) -> float:
    """Initial noise scale: 1 for the VP schedulers; diffusers' Euler/Heun rule otherwise."""
    sigma_max = sigmas.float()[0].item()
    if sampler in VP_SAMPLERS:
        return 1.0
    if schedule != "sgm_uniform" and spacing in ("trailing", "linspace"):
        return sigma_max
    return (sigma_max**2 + 1) ** 0.5


def _trim(
    t: Tensor,
    sampler: str,
    steps: int,
    strength: float,
    denoising_start: float | None,
    denoising_end: float | None,
    training: TrainingSchedule,
) -> tuple[int, int]:
    """(first step, number of steps) kept by diffusers' SDXL pipelines; see `make_plan`."""
    n_train = training.num_train_timesteps
    n = len(t)
    if denoising_start is None:  # StableDiffusionXLImg2ImgPipeline.get_timesteps
        init_timestep = min(int(steps * strength), steps)
        begin = max(steps - init_timestep, 0)
    else:
        cutoff = int(round(n_train - denoising_start * n_train))
        below = int((t < cutoff).sum())
        begin = n - below
        if ORDER.get(sampler, 1) == 2 and begin > 0:
            # diffusers counts Heun's doubled timesteps: an even count (whole pairs) gets one more,
            # which starts the refiner one step earlier (at the second copy of the previous timestep)
            begin -= 1
    count = n - begin
    if denoising_end is not None:  # the denoising_end block of StableDiffusionXL(Img2Img)Pipeline.__call__
        cutoff = int(round(n_train - denoising_end * n_train))
        count = int((t[begin:] >= cutoff).sum())
    if count < 1:
        raise ValueError(
            f"no step left to run: {steps} steps with strength={strength}, denoising_start={denoising_start}, "
            f"denoising_end={denoising_end}"
        )
    return begin, count


def add_noise(latents: Tensor, noise: Tensor, plan: Plan) -> Tensor:
    """img2img start: clean latents noised to the plan's first sigma, in the boundary scale (= diffusers' add_noise)."""
    sigma = float(plan.sigmas[0])
    if plan.vp:
        alpha = 1 / (1 + sigma**2) ** 0.5
        return alpha * latents + (sigma * alpha) * noise
    return latents + sigma * noise
