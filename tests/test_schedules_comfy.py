"""The schedules from ComfyUI, k-diffusion and Align Your Steps, value by value against their sources' formulas.

ComfyUI's definitions (comfy/samplers.py `simple_scheduler`, `ddim_scheduler`, `normal_scheduler`,
`beta_scheduler`, `kl_optimal_scheduler`; comfy_extras/nodes_align_your_steps.py) are restated here in numpy /
torch as ComfyUI computes them, on SDXL's model sigmas (ComfyUI's `ModelSamplingDiscrete` for the scaled-linear
betas: the same float32 table as `TrainingSchedule.sigmas()`); k-diffusion's `get_sigmas_*` are called directly
(the package is test-only, loaded as in tests/test_samplers_kdiffusion.py).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_samplers_kdiffusion import load_k_diffusion

from sdxl.sampling import SAMPLERS, TrainingSchedule, make_plan, sigma_to_t
from sdxl.sampling.schedules import _beta_ppf

scipy_stats = pytest.importorskip("scipy.stats")

TRAINING = TrainingSchedule()
TABLE = TRAINING.sigmas()  # float32, index = t
STEPS = [1, 2, 3, 4, 7, 10, 11, 20, 25, 30, 40, 50, 77]
VE_SAMPLER, VP_SAMPLER = "euler_ancestral", "dpmpp_2m"  # schedules are the same for every sampler
# Align Your Steps' 10-step SDXL noise levels (Sabour et al. 2024; ComfyUI's NOISE_LEVELS["SDXL"])
AYS_SDXL = (14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
            0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582)


def comfy_sigma(t: torch.Tensor) -> torch.Tensor:
    """ComfyUI ModelSamplingDiscrete.sigma(t): log-sigma interpolation, in float32."""
    log_sigmas = TABLE.log()
    t = t.float().clamp(0, len(TABLE) - 1)
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def comfy_simple(n: int) -> list[float]:
    ss = len(TABLE) / n
    return [float(TABLE[-(1 + int(x * ss))]) for x in range(n)] + [0.0]


def comfy_ddim(n: int) -> list[float]:
    ss, x, sigs = max(len(TABLE) // n, 1), 1, [0.0]
    while x < len(TABLE):
        sigs.append(float(TABLE[x]))
        x += ss
    return sigs[::-1]


def comfy_normal(n: int) -> list[float]:
    t = torch.linspace(len(TABLE) - 1, 0, n)
    return comfy_sigma(t).tolist() + [0.0]


def comfy_beta(n: int) -> list[float]:
    ts = np.rint(scipy_stats.beta.ppf(1 - np.linspace(0, 1, n, endpoint=False), 0.6, 0.6) * (len(TABLE) - 1))
    sigs, last = [], -1
    for t in ts:
        if t != last:
            sigs.append(float(TABLE[int(t)]))
        last = t
    return sigs + [0.0]


def comfy_kl_optimal(n: int, sigma_min: float, sigma_max: float) -> list[float]:
    adj = torch.arange(n, dtype=torch.float).div_(n - 1)
    return (adj * math.atan(sigma_min) + (1 - adj) * math.atan(sigma_max)).tan_().tolist() + [0.0]


def comfy_ays(n: int) -> list[float]:
    levels = np.array(AYS_SDXL)
    if n + 1 != len(levels):
        xs, ys = np.linspace(0, 1, len(levels)), np.log(levels[::-1])
        levels = np.exp(np.interp(np.linspace(0, 1, n + 1), xs, ys))[::-1].copy()
    levels[-1] = 0
    return levels.tolist()


def check(schedule: str, n: int, expected: list[float], sampler: str = VE_SAMPLER, rtol: float = 1e-6):
    plan = make_plan(TRAINING, sampler, schedule, n)
    np.testing.assert_allclose(plan.sigmas.numpy(), np.array(expected, dtype=np.float32), rtol=rtol, atol=0,
                               err_msg=f"{schedule} {n}")
    return plan


@pytest.mark.parametrize("sampler", [VE_SAMPLER, VP_SAMPLER, "tcd"])
def test_simple_equals_comfyui(sampler):
    for n in STEPS:
        plan = check("simple", n, comfy_simple(n), sampler, rtol=0)
        assert plan.timesteps.tolist() == [len(TABLE) - 1 - int(x * len(TABLE) / n) for x in range(n)]


def test_ddim_uniform_equals_comfyui_where_it_has_the_steps_asked():
    differs = []
    for n in [*STEPS, 100, 333]:
        comfy = comfy_ddim(n)
        plan = make_plan(TRAINING, VE_SAMPLER, "ddim_uniform", n)
        if len(comfy) == n + 1:
            np.testing.assert_array_equal(plan.sigmas.numpy(), np.array(comfy, dtype=np.float32))
        else:  # ComfyUI runs more steps than asked: the plan keeps its n lowest-noise ones
            differs.append(n)
            assert len(comfy) > n + 1
            np.testing.assert_array_equal(plan.sigmas.numpy(), np.array(comfy[-(n + 1):], dtype=np.float32))
        # = diffusers' "leading" spacing with steps_offset 1
        assert plan.timesteps.tolist() == [k * (1000 // n) + 1 for k in range(n - 1, -1, -1)]
    assert differs == [7, 11, 30, 77]  # where 1 + k (1000 // n) < 1000 for more than n values of k
    with pytest.raises(ValueError, match="ddim_uniform supports at most 999 steps"):
        make_plan(TRAINING, VE_SAMPLER, "ddim_uniform", 1000)


@pytest.mark.parametrize("sampler", [VE_SAMPLER, VP_SAMPLER])
def test_normal_equals_comfyui(sampler):
    for n in STEPS:
        plan = check("normal", n, comfy_normal(n), sampler)
        np.testing.assert_allclose(plan.timesteps.numpy(), torch.linspace(999, 0, n).numpy(), rtol=0, atol=1e-4)
    assert make_plan(TRAINING, VE_SAMPLER, "normal", 5).sigmas[-2] == TABLE[0]  # ends at t = 0, then 0


def test_beta_equals_comfyui():
    for n in [*STEPS, 100, 150, 200]:
        expected = comfy_beta(n)
        plan = check("beta", n, expected, rtol=0)
        assert plan.steps == len(expected) - 1
    assert make_plan(TRAINING, VE_SAMPLER, "beta", 150).steps == 149  # a repeated t dropped, as ComfyUI does
    for q in np.linspace(0, 1, 101):
        assert _beta_ppf(float(q), 0.6, 0.6) == pytest.approx(scipy_stats.beta.ppf(q, 0.6, 0.6), abs=1e-12)
    for q, a, b in [(0.3, 2.0, 5.0), (0.99, 0.5, 0.5), (0.01, 3.0, 1.2)]:
        assert _beta_ppf(q, a, b) == pytest.approx(scipy_stats.beta.ppf(q, a, b), abs=1e-12)


def test_polyexponential_karras_exponential_equal_k_diffusion():
    kd = load_k_diffusion()
    lo, hi = TABLE[0].item(), TABLE[-1].item()
    for n in STEPS:
        check("polyexponential", n, kd.get_sigmas_polyexponential(n, lo, hi, rho=1.0).tolist())
        # the samplers without a diffusers twin run Karras / exponential over the model's range, as k-diffusion
        check("karras", n, kd.get_sigmas_karras(n, lo, hi).tolist(), "ipndm", rtol=2e-6)
        check("exponential", n, kd.get_sigmas_exponential(n, lo, hi).tolist(), "dpmpp_3m_sde", rtol=2e-6)


def test_kl_optimal_equals_comfyui():
    lo, hi = TABLE[0].item(), TABLE[-1].item()
    for n in STEPS[1:]:
        check("kl_optimal", n, comfy_kl_optimal(n, lo, hi), rtol=2e-6)
    assert make_plan(TRAINING, VE_SAMPLER, "kl_optimal", 1).sigmas.tolist() == [pytest.approx(hi), 0.0]


def test_align_your_steps_equals_the_papers_table_and_comfyui():
    plan = make_plan(TRAINING, VE_SAMPLER, "align_your_steps", 10)
    np.testing.assert_allclose(plan.sigmas.numpy(), np.array([*AYS_SDXL[:-1], 0.0], dtype=np.float32), rtol=0)
    for n in STEPS:
        check("align_your_steps", n, comfy_ays(n), VP_SAMPLER, rtol=1e-6)


@pytest.mark.parametrize("schedule", ["polyexponential", "kl_optimal", "align_your_steps", "normal", "sgm_uniform"])
def test_model_times_and_initial_noise_follow_comfyui(schedule):
    for n in (4, 30):
        plan = make_plan(TRAINING, VE_SAMPLER, schedule, n)
        t = sigma_to_t(plan.sigmas[:-1].double(), TRAINING)
        torch.testing.assert_close(plan.timesteps.double(), t, atol=2e-3, rtol=0)
        # ComfyUI's KSampler from sigma_max: noise * sqrt(1 + sigma^2); VP samplers' boundary noise is unit
        assert plan.init_noise_sigma == pytest.approx((1 + plan.sigmas[0].item() ** 2) ** 0.5, rel=1e-6)
        assert make_plan(TRAINING, VP_SAMPLER, schedule, n).init_noise_sigma == 1.0
    # ddim_uniform starts below sigma_max: ComfyUI scales the noise by the first sigma
    plan = make_plan(TRAINING, VE_SAMPLER, "ddim_uniform", 30)
    assert plan.init_noise_sigma == pytest.approx(plan.sigmas[0].item(), rel=1e-6)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_trims_the_new_schedules(sampler):
    # img2img and a base -> refiner hand-off on ComfyUI's schedules: the kept steps are the schedule's
    for schedule in ("simple", "beta", "align_your_steps"):
        full = make_plan(TRAINING, sampler, schedule, 20)
        img2img = make_plan(TRAINING, sampler, schedule, 20, strength=0.5)
        assert img2img.steps == 10 and torch.equal(img2img.sigmas, full.sigmas[10:])
        base = make_plan(TRAINING, sampler, schedule, 20, denoising_end=0.8)
        refiner = make_plan(TRAINING, sampler, schedule, 20, denoising_start=0.8)
        # the base stops at a sigma of the schedule; the refiner runs the rest (heun: from one step earlier)
        assert base.sigmas[-1] == full.sigmas[base.steps] > 0
        assert torch.equal(base.sigmas[:-1], full.sigmas[:base.steps])
        assert torch.equal(refiner.sigmas, full.sigmas[full.steps - refiner.steps:])
        assert refiner.steps == 20 - base.steps + (1 if sampler == "heun" else 0)
        assert base.trimmed == (0, 20 - base.steps) and refiner.trimmed == (20 - refiner.steps, 0)
