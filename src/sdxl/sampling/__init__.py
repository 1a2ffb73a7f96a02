"""Sampling: SDXL's training schedule, sampling schedules, the eps/v denoiser wrapper and the samplers.

    training = TrainingSchedule.from_diffusers(components.scheduler)
    plan = make_plan(training, "euler", "default", 30)
    x = sample(plan, Denoiser(model, training, plan), noise * plan.init_noise_sigma, generator=generator)
"""

from .denoiser import Denoiser, sigma_to_t
from .samplers import (
    SAMPLER_FUNCTIONS,
    Cancelled,
    sample,
    sample_ddim,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lcm,
)
from .schedules import (
    SAMPLERS,
    SCHEDULES,
    Plan,
    TrainingSchedule,
    add_noise,
    exponential_sigmas,
    karras_sigmas,
    make_plan,
    sgm_uniform_sigmas,
    t_to_sigma,
)

__all__ = [
    "SAMPLERS", "SCHEDULES", "SAMPLER_FUNCTIONS", "Cancelled", "Denoiser", "Plan", "TrainingSchedule",
    "add_noise", "exponential_sigmas", "karras_sigmas", "make_plan", "sample", "sample_ddim",
    "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_dpmpp_sde", "sample_euler", "sample_euler_ancestral",
    "sample_heun", "sample_lcm", "sgm_uniform_sigmas", "sigma_to_t", "t_to_sigma",
]
