"""The denoiser: a model that predicts eps or v, wrapped as an x0-predictor over VE sigmas.

k-diffusion's `DiscreteEpsDDPMDenoiser` / `DiscreteVDDPMDenoiser` (Karras et al. 2022, table 1):
    x0 = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x, t(sigma))
    eps: c_in = 1 / sqrt(sigma^2 + 1), c_skip = 1, c_out = -sigma
    v:   c_in = 1 / sqrt(sigma^2 + 1), c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1)
c_in * x is the VP latent diffusers' schedulers hand the U-Net (Euler's `scale_model_input`, or the
DPM/DDIM/LCM latents as they are), so the model sees identical inputs. For LCM the consistency-model
boundary condition of diffusers' LCMScheduler is applied here too (Luo et al. 2023, eq. 9 with
sigma_data = 0.5 and timestep_scaling = 10): x0 <- c_out(t) * x0 + c_skip(t) * (c_in * x).

The unconditional prediction (CFG++ samplers, `CFG_PP_SAMPLERS`): a model function that offers it returns the
pair (guided, unconditional) of eps / v predictions instead of one tensor (`pipeline.guided_unet(...,
uncond=True)`); the Denoiser then returns the pair (denoised, uncond_denoised), each converted as above. The
CFG++ samplers take a single tensor as its own unconditional prediction (no guidance); the other samplers
expect a single tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .schedules import Plan, TrainingSchedule, sigma_to_t

__all__ = ["Denoiser", "sigma_to_t"]

LCM_SIGMA_DATA = 0.5  # diffusers LCMScheduler.get_scalings_for_boundary_condition_discrete
LCM_TIMESTEP_SCALING = 10.0  # LCMScheduler config default (no SDXL LCM config changes it)


class Denoiser:
    """x0-predictor over a model that returns eps or v: k-diffusion's c_in/c_out wrapper for a discrete DDPM schedule.

    `model(x_in, t)` gets x_in = x * c_in(sigma) and t, a 0-dim float32 tensor on x's device (a (B,)
    tensor when called with a (B,) sigma tensor off the CPU). t is the plan's timestep for the plan's
    sigmas (what diffusers passes to the U-Net), and sigma_to_t's log-sigma interpolation for any other
    sigma. Called with a Python float sigma (as the samplers do) nothing is read back from the device.
    """

    def __init__(self, model: Callable[[Tensor, Tensor], Tensor], training: TrainingSchedule, plan: Plan | None):
        self.model, self.training, self.plan = model, training, plan
        self.v_prediction = training.prediction_type == "v_prediction"
        self.lcm = plan is not None and plan.sampler == "lcm"
        # float(sigma) -> t; the samplers pass exactly these floats (from the plan's CPU sigmas)
        self.times = dict(zip(plan.sigmas[:-1].tolist(), plan.timesteps.tolist())) if plan is not None else {}

    def t(self, sigma: float) -> float:
        """The model time for a sigma (a Python float, computed on the CPU)."""
        t = self.times.get(sigma)
        if t is None:
            t = sigma_to_t(torch.tensor(sigma, dtype=torch.float64), self.training).tolist()
        return t

    def __call__(self, x: Tensor, sigma: Tensor | float) -> Tensor | tuple[Tensor, Tensor]:
        """Denoised x0 for VE latents x at noise level sigma (a pair (denoised, uncond_denoised) where the model
        function returns a pair)."""
        if isinstance(sigma, Tensor):
            if sigma.device.type != "cpu" or sigma.numel() != 1:
                return self._batched(x, sigma)
            sigma = float(sigma)  # a CPU number: no device sync
        sigma = float(sigma)
        t = self.t(sigma)
        out = self.model(x * (sigma**2 + 1) ** -0.5, torch.full((), t, dtype=torch.float32, device=x.device))
        if isinstance(out, tuple):
            return tuple(self._x0(x, o, sigma, t) for o in out)
        return self._x0(x, out, sigma, t)

    def _x0(self, x: Tensor, out: Tensor, sigma: float | Tensor, t: float | Tensor) -> Tensor:
        """x0 from the model's eps / v output at sigma (a float, or per-sample tensors shaped for broadcasting)."""
        out = out.to(x.dtype)
        c_in = (sigma**2 + 1) ** -0.5
        denoised = x * c_in**2 - out * (sigma * c_in) if self.v_prediction else x - out * sigma
        if self.lcm:
            c_skip, c_out = _lcm_scalings(t)
            denoised = denoised * c_out + (x * c_in) * c_skip
        return denoised

    def _batched(self, x: Tensor, sigma: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Per-sample sigmas as a device tensor: the same formulas in tensor arithmetic (t interpolated)."""
        sigma = sigma.reshape(-1).to(x.device)
        t = sigma_to_t(sigma, self.training).float().expand(x.shape[0])
        s = sigma.to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        out = self.model(x * (s**2 + 1) ** -0.5, t)
        t_b = t.to(x.dtype).reshape(s.shape)
        if isinstance(out, tuple):
            return tuple(self._x0(x, o, s, t_b) for o in out)
        return self._x0(x, out, s, t_b)


def _lcm_scalings(t):
    """LCMScheduler's boundary-condition scalings (c_skip, c_out) at model time t."""
    scaled = t * LCM_TIMESTEP_SCALING
    c_skip = LCM_SIGMA_DATA**2 / (scaled**2 + LCM_SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + LCM_SIGMA_DATA**2) ** 0.5
    return c_skip, c_out
