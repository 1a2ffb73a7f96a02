"""Noise schedules: SDXL's training schedule, and the sigmas/timesteps a sampler runs through.

Conventions (the same for every sampler, k-diffusion style):

- The samplers work on VE latents x = x0 + sigma * eps, with sigma = sqrt((1 - a) / a) for the
  training schedule's cumulative alpha a (DDPM's x_t = sqrt(a) x0 + sqrt(1 - a) eps is x / sqrt(1 + sigma^2)).
- A `Plan` lists the sigmas a sampler steps through, descending, its final value last (0, or where
  diffusers ends: sigma(0) for DDIM with `set_alpha_to_one=False`; an intermediate sigma after a
  `denoising_end` hand-off), and for each sigma the model time t that diffusers hands to the U-Net.
  Where a step's update lands off the next sigma (DDIM's t - T // steps, DEIS' and TCD's last step at
  sigma(0), TCD's consistency jump before it re-noises) `Plan.sigmas_to` says where.
- The latents at the boundary of `samplers.sample` (its input, `init_noise_sigma`, `add_noise`, the
  result) are in the scale diffusers' scheduler for that sampler uses, so that a pipeline built on this
  module hands the VAE (or the refiner) exactly what diffusers' pipeline does: VE for the samplers whose
  diffusers twin is an Euler-type "discrete" scheduler (initial latents unit noise * sqrt(sigma_max^2 + 1)
  for "leading" spacing, * sigma_max for "trailing"/"linspace") and for those without a twin (k-diffusion
  and ComfyUI run on VE latents); VP (x / sqrt(1 + sigma^2), initial latents unit noise * 1.0) for the
  multistep, DDIM, LCM and TCD schedulers. `RULES` says which, per sampler; `sample` converts at entry and
  exit. Both scales agree wherever the final sigma is 0.

"default" means the sampler's diffusers twin's `set_timesteps` for the model's scheduler config (its
`timestep_spacing`), "trailing" the same with trailing spacing; "karras" / "exponential" are that twin's
`use_karras_sigmas` / `use_exponential_sigmas`. Samplers without a twin (`RULES[...].twin` is None) run
Euler's timesteps, as k-diffusion and ComfyUI run them on the model's own sigmas. The other schedules are
ComfyUI's (comfy/samplers.py, comfy_extras/nodes_align_your_steps.py) and k-diffusion's, the same for every
sampler; their model times are the log-sigma interpolation `sigma_to_t` (ComfyUI's `timestep`).

Port notes: the timestep rules are diffusers' `set_timesteps` of EulerDiscreteScheduler,
HeunDiscreteScheduler, KDPM2(Ancestral)DiscreteScheduler, LMSDiscreteScheduler, DPMSolverMultistepScheduler,
UniPCMultistepScheduler, DEISMultistepScheduler, DDIMScheduler, LCMScheduler and TCDScheduler (diffusers
0.3x-0.4x, `schedulers/scheduling_*.py`), re-derived here in torch float64 with numpy's linspace/interp/rounding
(round half to even) so the timesteps come out identical; the trimming rules are those of
`StableDiffusionXLImg2ImgPipeline.get_timesteps` and the `denoising_end` block of
`StableDiffusionXLPipeline.__call__`. Karras: Karras et al. 2022 (arXiv:2206.00364) eq. 5;
exponential and polyexponential: k-diffusion `get_sigmas_exponential` / `get_sigmas_polyexponential`;
sgm_uniform, simple, ddim_uniform, normal, beta (Lee et al. 2024, arXiv:2407.12173) and kl_optimal
(AUTOMATIC1111 PR 15608, Sabour et al. 2024): ComfyUI's schedulers of those names; align_your_steps: the
SDXL noise levels of Sabour et al. 2024 (arXiv:2404.14507) as ComfyUI tabulates them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

SAMPLERS: tuple[str, ...] = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "dpm_2", "dpm_2_ancestral",
    "lms", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde",
    "ddim", "lcm", "tcd", "ipndm", "deis", "uni_pc", "uni_pc_bh2", "restart",
)
SCHEDULES: tuple[str, ...] = (
    "default", "trailing", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "normal", "beta",
    "polyexponential", "kl_optimal", "align_your_steps",
)


@dataclass(frozen=True)
class SamplerRule:
    """How a sampler's "default" schedule and boundary latent scale follow its diffusers twin (if it has one)."""

    twin: str | None  # the diffusers scheduler whose timestep rules (and latent scale) it follows
    spacing: str = "euler"  # whose timestep spacing: "euler" (the discrete schedulers), "dpm", "ddim", "lcm"
    vp: bool = False  # the twin keeps VP latents (multistep, DDIM, LCM, TCD schedulers)
    # Karras/exponential sigmas span the default spacing's sigmas (diffusers' Euler-type schedulers) instead
    # of the model's whole range (k-diffusion, ComfyUI, diffusers' multistep schedulers)
    spaced_range: bool = False
    round_karras_t: bool = False  # the twin rounds its Karras timesteps (and keeps the exact sigmas)
    int_timesteps: bool = False  # the twin keeps int64 timesteps: its exponential ones are truncated
    order: int = 1  # diffusers' `order` as its pipelines trim by it (Heun lists every timestep but the first twice)


_MULTISTEP = {"spacing": "dpm", "vp": True, "round_karras_t": True, "int_timesteps": True}
RULES: dict[str, SamplerRule] = {
    "euler": SamplerRule("EulerDiscreteScheduler", spaced_range=True),
    "euler_ancestral": SamplerRule("EulerAncestralDiscreteScheduler"),
    "heun": SamplerRule("HeunDiscreteScheduler", spaced_range=True, order=2),
    # KDPM2's timesteps interleave each step's log-midpoint; diffusers' pipelines then trim them in half-steps.
    # Here trims keep whole steps (the first-order rule), so a denoising_end / denoising_start cut that diffusers
    # places between a step's two halves differs; full runs and img2img strength trims are diffusers'.
    "dpm_2": SamplerRule("KDPM2DiscreteScheduler", spaced_range=True, round_karras_t=True),
    "dpm_2_ancestral": SamplerRule("KDPM2AncestralDiscreteScheduler", spaced_range=True, round_karras_t=True),
    "lms": SamplerRule("LMSDiscreteScheduler", spaced_range=True),
    # the multistep schedulers (DPM-Solver++, UniPC, DEIS; VP latents, steps + 1 spacing); UniPC and DEIS run
    # order 3 as ComfyUI's (diffusers' default solver_order is 2), DEIS ends at sigma(0) (`Plan.sigmas_to`)
    "dpmpp_2m": SamplerRule("DPMSolverMultistepScheduler", **_MULTISTEP),
    "dpmpp_2m_sde": SamplerRule("DPMSolverMultistepScheduler", **_MULTISTEP),  # algorithm_type="sde-dpmsolver++"
    "dpmpp_2m_sde_heun": SamplerRule("DPMSolverMultistepScheduler", **_MULTISTEP),  # and solver_type="heun"
    "uni_pc": SamplerRule("UniPCMultistepScheduler", **_MULTISTEP),  # solver_type="bh1"
    "uni_pc_bh2": SamplerRule("UniPCMultistepScheduler", **_MULTISTEP),  # solver_type="bh2"
    "deis": SamplerRule("DEISMultistepScheduler", **_MULTISTEP),
    "ddim": SamplerRule("DDIMScheduler", "ddim", vp=True),
    "lcm": SamplerRule("LCMScheduler", "lcm", vp=True),
    "tcd": SamplerRule("TCDScheduler", "lcm", vp=True),  # LCM's timesteps; no LCM boundary condition
    # no diffusers twin: Euler's timesteps, VE latents, Karras/exponential over the model's range (k-diffusion)
    "dpmpp_sde": SamplerRule(None),
    "dpmpp_2s_ancestral": SamplerRule(None),
    "dpmpp_3m_sde": SamplerRule(None),
    "ipndm": SamplerRule(None),
    "restart": SamplerRule(None),
    "euler_cfg_pp": SamplerRule(None),
    "euler_ancestral_cfg_pp": SamplerRule(None),
}
VP_SAMPLERS = frozenset(name for name, rule in RULES.items() if rule.vp)
# Samplers that need the unconditional prediction besides the guided one (CFG++): see `Denoiser`.
CFG_PP_SAMPLERS = frozenset({"euler_cfg_pp", "euler_ancestral_cfg_pp"})
LCM_ORIGINAL_STEPS = 50  # LCMScheduler / TCDScheduler `original_inference_steps` (the distillation schedule)
TCD_GAMMA = 0.3  # TCDScheduler.step's `eta` (the paper's gamma) default: the share of each jump re-noised
# ComfyUI's beta schedule parameters (comfy/samplers.py `beta_scheduler`, from Lee et al. 2024)
BETA_ALPHA, BETA_BETA = 0.6, 0.6
# Align Your Steps' 10-step SDXL noise levels (Sabour et al. 2024; ComfyUI's NOISE_LEVELS["SDXL"]);
# other step counts interpolate them log-linearly, as ComfyUI's AlignYourStepsScheduler does.
AYS_SDXL = (14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
            0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582)
# Schedules that are ComfyUI's own (their initial latents follow ComfyUI's `max_denoise` rule for VE samplers)
COMFY_SCHEDULES = frozenset({"sgm_uniform", "simple", "ddim_uniform", "normal", "beta", "polyexponential",
                             "kl_optimal", "align_your_steps"})


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
    # Where step i's update lands when that is not sigmas[i + 1] (else None): DDIM steps to
    # t - num_train_timesteps // steps, which for "trailing"/"linspace" need not be the next timestep (it then
    # rescales x to the next sigma); DEIS' last step lands at sigma(0) (its Karras/exponential last step on its
    # own sigma, a step of size 0); TCD jumps to sigma(floor((1 - gamma) t_next)) and re-noises to the next sigma.
    sigmas_to: Tensor | None = None
    # (steps cut before, steps cut after) the plan's steps in its untrimmed schedule: the multistep samplers'
    # lower-order rules count steps to the schedule's end (UniPC, DEIS) and its length (DEIS), as diffusers does.
    trimmed: tuple[int, int] = (0, 0)

    @property
    def vp(self) -> bool:
        """Whether latents at `sample`'s boundary are VP-scaled (x / sqrt(1 + sigma^2)), as diffusers' are."""
        return RULES[self.sampler].vp

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


def _with_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def polyexponential_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> Tensor:
    """n sigmas polynomial (ramp^rho, ramp 1 -> 0) in log sigma, then 0 (k-diffusion `get_sigmas_polyexponential`)."""
    ramp = _linspace(1.0, 0.0, n) ** rho
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    return _with_zero((ramp * (hi - lo) + lo).exp())


def kl_optimal_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """n sigmas uniform in atan(sigma) from sigma_max to sigma_min, then 0 (ComfyUI `kl_optimal_scheduler`).

    One step: sigma_max (ComfyUI divides by n - 1 = 0 there).
    """
    w = torch.arange(n, dtype=torch.float64) / max(n - 1, 1)
    return _with_zero((w * math.atan(sigma_min) + (1 - w) * math.atan(sigma_max)).tan())


def align_your_steps_sigmas(n: int) -> Tensor:
    """Align Your Steps' SDXL sigmas for n steps: the 10-step table, log-linearly interpolated to n + 1 levels
    for other n, its last level (sigma_min) replaced by 0 (ComfyUI `AlignYourStepsScheduler`)."""
    levels = torch.tensor(AYS_SDXL, dtype=torch.float64)
    if n + 1 != len(levels):
        xs = _linspace(0.0, 1.0, len(levels))
        levels = _interp_xy(_linspace(0.0, 1.0, n + 1), xs, levels.flip(0).log()).exp().flip(0)
    levels[-1] = 0.0
    return levels


def _interp_xy(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """np.interp(x, xp, fp) for ascending xp, in float64."""
    j = (torch.searchsorted(xp, x, right=True) - 1).clamp(0, len(xp) - 2)
    slope = (fp[j + 1] - fp[j]) / (xp[j + 1] - xp[j])
    return torch.where(x >= xp[-1], fp[-1], slope * (x - xp[j]) + fp[j])


# ComfyUI's schedules defined by model times t (float64, descending; the sigmas are sigma(t))


def _simple_t(n: int, training: TrainingSchedule) -> Tensor:
    """ComfyUI `simple_scheduler`: every (T / n)-th training sigma from the top, t = T - 1 - floor(i T / n)."""
    T = training.num_train_timesteps
    return torch.tensor([T - 1 - int(i * (T / n)) for i in range(n)], dtype=torch.float64)


def _ddim_uniform_t(n: int, training: TrainingSchedule) -> Tensor:
    """ComfyUI `ddim_scheduler`: t = 1, 1 + T // n, 1 + 2 (T // n), ... < T, descending.

    Where T // n does not divide T - 1 ComfyUI keeps one or more extra (highest-noise) entries and runs more
    steps than asked; a plan has `steps` steps, so here the n lowest-noise entries (which is diffusers'
    "leading" spacing with steps_offset 1).
    """
    T = training.num_train_timesteps
    if n >= T:
        raise ValueError(f"ddim_uniform supports at most {T - 1} steps, got {n}")
    return torch.arange(n - 1, -1, -1, dtype=torch.float64) * (T // n) + 1


def _normal_t(n: int, training: TrainingSchedule) -> Tensor:
    """ComfyUI `normal_scheduler`: n model times uniform from t_max to 0 (its float32 linspace)."""
    return torch.linspace(training.num_train_timesteps - 1, 0, n, dtype=torch.float32).double()


def _beta_t(n: int, training: TrainingSchedule) -> Tensor:
    """ComfyUI `beta_scheduler` (Lee et al. 2024, alpha = beta = 0.6): t = rint(ppf(1 - i / n) * (T - 1)).

    Repeated t (many steps: the ppf is steep near 0 and 1) are dropped, as ComfyUI does, so a plan can
    have fewer steps than asked (from about 150 steps on for SDXL).
    """
    return torch.tensor(_beta_timesteps(n, training.num_train_timesteps), dtype=torch.float64)


@functools.lru_cache(maxsize=32)
def _beta_timesteps(n: int, num_train_timesteps: int) -> tuple[float, ...]:
    out: list[float] = []
    for q in (1 - _linspace(0.0, 1.0, n, endpoint=False)).tolist():
        t = float(round(_beta_ppf(q, BETA_ALPHA, BETA_BETA) * (num_train_timesteps - 1)))  # rint: half to even
        if not out or t != out[-1]:
            out.append(t)
    return tuple(out)


def _beta_ppf(q: float, a: float, b: float) -> float:
    """Inverse of the regularized incomplete beta function in x (scipy.stats.beta.ppf), by bisection."""
    lo, hi = 0.0, 1.0
    if q <= 0 or q >= 1:
        return lo if q <= 0 else hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if _betainc(a, b, mid) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b): its continued fraction (modified Lentz), by symmetry where it is slow."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    if x > (a + 1) / (a + b + 2):
        return 1 - _betainc(b, a, 1 - x)
    front = math.exp(a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))) / a
    tiny, f, c, d = 1e-300, 1.0, 1.0, 0.0
    for i in range(1000):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1 + num * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1 - c * d) < 1e-16:
            break
    return front * (f - 1)


TIMESTEP_SCHEDULES = {
    "sgm_uniform": _sgm_uniform_t, "simple": _simple_t, "ddim_uniform": _ddim_uniform_t, "normal": _normal_t,
    "beta": _beta_t,
}
# schedules defined by sigmas over a range (n, sigma_min, sigma_max) -> sigmas with a trailing zero
SIGMA_SCHEDULES = {
    "karras": karras_sigmas, "exponential": exponential_sigmas, "polyexponential": polyexponential_sigmas,
    "kl_optimal": kl_optimal_sigmas, "align_your_steps": lambda n, sigma_min, sigma_max: align_your_steps_sigmas(n),
}


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
    (0, 1], denoising values outside (0, 1), or a trim that leaves no step. Every sampler runs on every
    schedule (none of the pairings is meaningless: each is a sampler on a list of sigmas).
    """
    _check_plan_arguments(sampler, schedule, steps, strength, denoising_start, denoising_end)
    rule = RULES[sampler]
    spacing = "trailing" if schedule == "trailing" else training.timestep_spacing
    t, sigmas = _schedule(training, rule, schedule, spacing, steps)
    landing = _landing_sigmas(training, sampler, schedule, steps, t, sigmas)
    init_noise_sigma = _init_noise_sigma(rule, schedule, spacing, sigmas, training)

    begin, count = _trim(t, rule.order, strength, denoising_start, denoising_end, training)
    keep = slice(begin, begin + count)
    # the plan's final value: where DDIM lands (its final alpha); the next sigma of the schedule otherwise
    ends = landing if sampler == "ddim" else torch.cat([sigmas[1:], sigmas.new_zeros(1)])
    plan_sigmas = torch.cat([sigmas[keep], ends[keep][-1:]])
    _check_distinct(sampler, schedule, steps, plan_sigmas.float())
    landing = landing[keep]
    return Plan(
        sampler=sampler,
        sigmas=plan_sigmas.float(),
        timesteps=t[keep].float(),
        init_noise_sigma=init_noise_sigma,
        sigmas_to=None if torch.equal(landing, plan_sigmas[1:]) else landing.float(),
        trimmed=(begin, len(t) - begin - count),
    )


# Samplers whose steps divide by the step's log-sigma difference: two equal noise levels in a row (too many steps
# for a schedule's rounding, e.g. 1000 "default" steps of SDXL's 1000 timesteps) would divide by zero.
LOG_STEP_SAMPLERS = frozenset({"lms", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "deis",
                               "uni_pc", "uni_pc_bh2"})


def _check_distinct(sampler: str, schedule: str, steps: int, sigmas: Tensor) -> None:
    s = sigmas[:-1]
    if sampler in LOG_STEP_SAMPLERS and bool((s[1:] == s[:-1]).any()):
        repeats = int((s[1:] == s[:-1]).sum())
        raise ValueError(f"{steps} steps of the {schedule!r} schedule repeat {repeats} noise level(s), and {sampler} "
                         "cannot take a step of zero length; use fewer steps or another schedule")


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
    training: TrainingSchedule, rule: SamplerRule, schedule: str, spacing: str, steps: int
) -> tuple[Tensor, Tensor]:
    """(timesteps, sigmas) of the untrimmed schedule, float64, one per step (no final sigma)."""
    train_sigmas = training.sigmas().double()  # float32 values
    if schedule in ("default", "trailing"):
        # LCM's / TCD's own timesteps are their "default"; their "trailing" is the common rule
        family = "euler" if rule.spacing == "lcm" and schedule != "default" else rule.spacing
        t = spaced_timesteps(family, spacing, steps, training)
        return t, _interp(t, train_sigmas)
    if schedule in TIMESTEP_SCHEDULES:  # at integer t the training sigma itself (ComfyUI indexes its table)
        t = TIMESTEP_SCHEDULES[schedule](steps, training)
        whole = t == t.round()
        return t, torch.where(whole, train_sigmas[t.round().long()], t_to_sigma(t, training))
    sigma_min, sigma_max = train_sigmas[0].item(), train_sigmas[-1].item()  # k-diffusion, multistep: the model's range
    if schedule in ("karras", "exponential") and rule.spaced_range:
        # diffusers' Euler-type schedulers span the default spacing's sigmas (with "leading": sigma(1)..sigma(T - ratio + 1))
        spaced = _interp(spaced_timesteps("euler", spacing, steps, training), train_sigmas)
        sigma_min, sigma_max = spaced[-1].item(), spaced[0].item()
    sigmas = SIGMA_SCHEDULES[schedule](steps, sigma_min, sigma_max)[:-1]
    t = sigma_to_t(sigmas, training)
    if schedule == "karras" and rule.round_karras_t:
        t = t.round()  # DPM-Solver, UniPC, DEIS and KDPM2 round their Karras timesteps (and keep the exact sigmas)
    elif schedule == "exponential" and rule.int_timesteps:
        t = t.trunc()  # DPM-Solver, UniPC and DEIS store their (exact-sigma) exponential timesteps as int64
    return t, sigmas


def _landing_sigmas(
    training: TrainingSchedule, sampler: str, schedule: str, steps: int, t: Tensor, sigmas: Tensor
) -> Tensor:
    """Where each step's update lands: the next sigma, and 0 after the last (diffusers' final_sigmas_type="zero"),
    except for DDIM, DEIS and TCD (see `Plan.sigmas_to`)."""
    nexts = torch.cat([sigmas[1:], sigmas.new_zeros(1)])
    train_sigmas = training.sigmas().double()
    if sampler == "ddim" and schedule in ("default", "trailing"):
        # DDIMScheduler.step goes to t - T // steps, and past t = 0 to its final alpha
        prev = t.long() - training.num_train_timesteps // steps
        last = 0.0 if training.set_alpha_to_one else train_sigmas[0].item()
        return torch.where(prev >= 0, train_sigmas[prev.clamp(min=0)], torch.full_like(sigmas, last))
    if sampler == "deis" and schedule in ("default", "trailing", "karras", "exponential"):
        # DEISMultistepScheduler ends at sigma(0) on its own timesteps and repeats its last sigma on Karras /
        # exponential ones; on ComfyUI's schedules it lands on 0 like every other sampler
        last = train_sigmas[:1] if schedule in ("default", "trailing") else sigmas[-1:]
        return torch.cat([sigmas[1:], last])
    if sampler == "tcd":
        # TCDScheduler.step: the consistency jump to s = floor((1 - gamma) * t_next) (t_next = 0 after the last
        # step; computed in float32 as diffusers does), then re-noising to t_next
        t_next = torch.cat([t[1:], t.new_zeros(1)]).float()
        return train_sigmas[(t_next * (1 - TCD_GAMMA)).floor().long()]
    return nexts


def _init_noise_sigma(rule: SamplerRule, schedule: str, spacing: str, sigmas: Tensor,
                      training: TrainingSchedule) -> float:
    """Initial noise scale: 1 for the VP schedulers; diffusers' Euler rule otherwise, ComfyUI's on its schedules."""
    sigma_max = sigmas.float()[0].item()
    if rule.vp:
        return 1.0
    if schedule in COMFY_SCHEDULES:  # ComfyUI's KSampler: sqrt(1 + sigma^2) when starting from sigma_max
        model_max = training.sigmas()[-1].item()
        full = math.isclose(sigma_max, model_max, rel_tol=1e-5) or sigma_max > model_max
        return (sigma_max**2 + 1) ** 0.5 if full else sigma_max
    if spacing in ("trailing", "linspace"):
        return sigma_max
    return (sigma_max**2 + 1) ** 0.5


def _trim(
    t: Tensor,
    order: int,
    strength: float,
    denoising_start: float | None,
    denoising_end: float | None,
    training: TrainingSchedule,
) -> tuple[int, int]:
    """(first step, number of steps) kept by diffusers' SDXL pipelines; see `make_plan`."""
    n_train = training.num_train_timesteps
    n = len(t)  # = steps, but for the beta schedule's dropped repeats
    if denoising_start is None:  # StableDiffusionXLImg2ImgPipeline.get_timesteps
        init_timestep = min(int(n * strength), n)
        begin = max(n - init_timestep, 0)
    else:
        cutoff = round(n_train - denoising_start * n_train)
        below = int((t < cutoff).sum())
        begin = n - below
        if order == 2 and begin > 0:
            # diffusers counts Heun's doubled timesteps: an even count (whole pairs) gets one more,
            # which starts the refiner one step earlier (at the second copy of the previous timestep)
            begin -= 1
    count = n - begin
    if denoising_end is not None:  # the denoising_end block of StableDiffusionXL(Img2Img)Pipeline.__call__
        cutoff = round(n_train - denoising_end * n_train)
        count = int((t[begin:] >= cutoff).sum())
    if count < 1:
        raise ValueError(
            f"no step left to run: {n} steps with strength={strength}, denoising_start={denoising_start}, "
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
