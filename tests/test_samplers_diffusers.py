"""The new samplers with a diffusers twin against that scheduler: plans and whole sampling runs.

Plans (sigmas, timesteps, init_noise_sigma) equal the scheduler's `set_timesteps` for many step counts and
every timestep spacing; runs with tests/test_sampling.py's toy U-Net, stepped as diffusers' SDXL pipelines step
them, agree within 1e-4 on unit-scale latents (max errors measured: see ERRORS, printed with -s).

Known differences, on purpose, that these tests do not cover: diffusers' LMS counts its warm-up from the
schedule's first step, so an img2img LMS run starts at order 4 with one derivative (ours, as k-diffusion,
warms up from the run's first step); KDPM2's pipelines cut denoising_end / denoising_start between a step's two
halves (ours keep whole steps); diffusers' UniPC "bh1" returns NaN on its last step to sigma 0 (0 * inf), so
its reference here takes that step's limit (the prediction), which is what ours returns.
"""

from __future__ import annotations

import logging

import pytest
import torch
from test_sampling import SDXL_CONFIG, TOL, inputs, run_diffusers, run_ours, toy_unet, training_for

from sdxl.sampling import Denoiser, TrainingSchedule, make_plan
from sdxl.sampling.samplers import SAMPLER_FUNCTIONS

diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning")]
logging.getLogger("diffusers").setLevel(logging.ERROR)

ORDER_3 = {"solver_order": 3}  # ComfyUI's UniPC and DEIS order (diffusers' default is 2)


class UniPCLimit(diffusers.UniPCMultistepScheduler):
    """diffusers' UniPC with its last step to sigma 0 taken as the limit of the update (the prediction m0):
    for solver_type "bh1" diffusers evaluates B(h) * 0 = -inf * 0 = NaN there."""

    def multistep_uni_p_bh_update(self, model_output, *args, sample=None, order=None, **kwargs):
        if self.sigmas[self.step_index + 1] == 0:
            return self.model_outputs[-1]
        return super().multistep_uni_p_bh_update(model_output, *args, sample=sample, order=order, **kwargs)


class DEIS64(diffusers.DEISMultistepScheduler):
    """diffusers' DEIS in float64: in float32 its closed-form coefficients (differences of close ind_fn values)
    lose about 2e-4 over a 30-step run (ours, from Python floats, agree with the float64 run to 2e-7)."""

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self.sigmas = self.sigmas.double()


TWINS = {  # our sampler -> (diffusers scheduler class, config overrides)
    "dpm_2": (diffusers.KDPM2DiscreteScheduler, {}),
    "dpm_2_ancestral": (diffusers.KDPM2AncestralDiscreteScheduler, {}),
    "lms": (diffusers.LMSDiscreteScheduler, {}),
    "dpmpp_2m_sde_heun": (diffusers.DPMSolverMultistepScheduler,
                          {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}),
    "uni_pc": (UniPCLimit, {"solver_type": "bh1", **ORDER_3}),
    "uni_pc_bh2": (diffusers.UniPCMultistepScheduler, {"solver_type": "bh2", **ORDER_3}),
    "deis": (DEIS64, ORDER_3),
    "tcd": (diffusers.TCDScheduler, {}),
}
KARRAS = [name for name in TWINS if name != "tcd"]  # TCDScheduler has no Karras sigmas
KDPM2 = ("dpm_2", "dpm_2_ancestral")
STOCHASTIC = ("dpm_2_ancestral", "dpmpp_2m_sde_heun", "tcd")
ERRORS: dict = {}


def twin(sampler: str, schedule: str = "default", prediction: str = "epsilon", spacing: str = "leading", **extra):
    cls, overrides = TWINS[sampler]
    config = dict(overrides, prediction_type=prediction, timestep_spacing=spacing, **extra)
    if schedule == "trailing":
        config["timestep_spacing"] = "trailing"
    elif schedule in ("karras", "exponential"):
        config[f"use_{schedule}_sigmas"] = True
    else:
        assert schedule == "default", schedule
    return cls.from_config(SDXL_CONFIG, **config)


def steps_for(sampler: str) -> int:
    return 6 if sampler == "tcd" else 30


def diffusers_plan(sched, sampler: str, training: TrainingSchedule):
    """(timesteps, sigmas with the final value, landings or None) that the scheduler runs, one per step."""
    timesteps = sched.timesteps.double()
    if sampler in KDPM2:  # every step's first timestep; its midpoints come between
        return timesteps[::2], sched.sigmas.double()[::2][: len(timesteps[::2]) + 1], None
    if sampler == "tcd":  # TCDScheduler indexes alphas_cumprod by timestep
        t_next = torch.cat([sched.timesteps[1:], torch.zeros(1, dtype=torch.long)])
        landing = training.sigmas().double()[torch.floor((1 - 0.3) * t_next).long()]
        sigmas = torch.cat([training.sigmas().double()[sched.timesteps], torch.zeros(1, dtype=torch.float64)])
        return timesteps, sigmas, landing
    sigmas = sched.sigmas.double()
    if sampler == "deis":  # DEIS' last step lands at its final sigma, our plans end at 0
        return timesteps, torch.cat([sigmas[:-1], torch.zeros(1, dtype=torch.float64)]), sigmas[1:]
    return timesteps, sigmas, None


def check_plan(plan, sched, sampler, training):
    timesteps, sigmas, landing = diffusers_plan(sched, sampler, training)
    assert plan.timesteps.shape == timesteps.shape, (plan.timesteps, timesteps)
    torch.testing.assert_close(plan.timesteps.double(), timesteps, atol=2e-4, rtol=0)
    torch.testing.assert_close(plan.sigmas.double(), sigmas.float().double(), atol=0, rtol=1e-6)
    if landing is None or torch.equal(landing.float(), plan.sigmas[1:]):
        assert plan.sigmas_to is None
    else:
        torch.testing.assert_close(plan.sigmas_to.double(), landing.float().double(), atol=0, rtol=1e-6)
    assert plan.init_noise_sigma == pytest.approx(float(sched.init_noise_sigma), rel=1e-6)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("sampler", list(TWINS))
def test_default_plans_equal_diffusers_for_many_step_counts(sampler, spacing):
    training = training_for(spacing=spacing)
    counts = [*range(1, 31), 40, 50, 100]
    if sampler == "tcd":
        counts = range(1, 51)
    elif sampler in KDPM2:  # diffusers' KDPM2 interpolates its midpoint times one by one in numpy: slow
        counts = [*range(1, 16), 20, 30, 50]
    for steps in counts:
        sched = twin(sampler, spacing=spacing)
        sched.set_timesteps(steps)
        check_plan(make_plan(training, sampler, "default", steps), sched, sampler, training)


@pytest.mark.parametrize("schedule", ["karras", "exponential"])
@pytest.mark.parametrize("sampler", KARRAS)
def test_karras_and_exponential_plans_equal_diffusers(sampler, schedule):
    training = training_for()
    for steps in [1, 2, 3, 5, 8, 13, 20, 25, 30, 50, 77]:
        sched = twin(sampler, schedule)
        sched.set_timesteps(steps)
        check_plan(make_plan(training, sampler, schedule, steps), sched, sampler, training)


def compare(sampler, schedule="default", *, prediction="epsilon", spacing="leading", seed=0, generator_seed=None,
            steps=None, **trim):
    training = training_for(prediction, spacing)
    latents, noise = (v.to(torch.float64 if sampler == "deis" else torch.float32) for v in inputs(seed))
    img2img = trim.get("strength", 1.0) < 1 or trim.get("denoising_start") is not None
    if trim.get("denoising_start") is not None:
        latents = latents * 0.6 + noise * 0.3  # a base pipeline's half-denoised latents
    steps = steps or steps_for(sampler)
    if generator_seed is None and sampler in STOCHASTIC:
        generator_seed = 0
    gens = [torch.Generator().manual_seed(generator_seed) if generator_seed is not None else None for _ in "ab"]
    theirs, _, _ = run_diffusers(twin(sampler, schedule, prediction, spacing), steps, latents, noise,
                                 img2img=img2img, generator=gens[0], **trim)
    ours, _ = run_ours(training, sampler, schedule, steps, latents, noise, img2img=img2img, generator=gens[1],
                       **trim)
    err = (ours - theirs).abs().max().item()
    ERRORS[(sampler, schedule, prediction, spacing, steps, generator_seed, tuple(sorted(trim.items())))] = err
    assert err <= TOL, f"{sampler}/{schedule} {trim}: max abs err {err}"
    assert theirs.abs().max() > 0.1 and torch.isfinite(theirs).all()
    if gens[0] is not None:  # the same draws, in the same order
        assert torch.equal(torch.randn(3, generator=gens[0]), torch.randn(3, generator=gens[1]))
    return ours, theirs


@pytest.mark.parametrize("sampler", list(TWINS))
def test_txt2img_equals_diffusers(sampler):
    compare(sampler)
    compare(sampler, steps=10 if sampler != "tcd" else 3)  # short schedules: DEIS' and UniPC's lower final orders


@pytest.mark.parametrize("schedule", ["karras", "exponential"])
@pytest.mark.parametrize("sampler", KARRAS)
def test_karras_and_exponential_runs_equal_diffusers(sampler, schedule):
    compare(sampler, schedule)


@pytest.mark.parametrize("sampler", list(TWINS))
def test_v_prediction_and_other_spacings_equal_diffusers(sampler):
    compare(sampler, prediction="v_prediction")
    if sampler != "tcd":  # TCD's "trailing" is the common trailing rule; TCDScheduler has one timestep rule
        compare(sampler, "trailing")
    compare(sampler, spacing="linspace")


@pytest.mark.parametrize("sampler", [s for s in TWINS if s != "lms"])
def test_img2img_equals_diffusers(sampler):
    compare(sampler, strength=0.6)
    if sampler not in KDPM2:
        compare(sampler, "karras" if sampler != "tcd" else "default", strength=0.5)


@pytest.mark.parametrize("sampler", [s for s in TWINS if s not in KDPM2])
def test_base_and_refiner_cuts_equal_diffusers(sampler):
    compare(sampler, denoising_end=0.8)
    if sampler != "lms":
        compare(sampler, denoising_start=0.8)
    if sampler in ("uni_pc", "uni_pc_bh2", "deis"):  # the lower-order rules count to the schedule's end
        compare(sampler, steps=12, denoising_end=0.6)
        compare(sampler, steps=12, strength=0.6)


@pytest.mark.parametrize("sampler", STOCHASTIC)
def test_stochastic_twins_draw_diffusers_noise(sampler):
    ours, _ = compare(sampler, generator_seed=1234)
    other, _ = compare(sampler, generator_seed=99)
    assert (other - ours).abs().max() > 1e-2


@pytest.mark.parametrize("sampler", ["uni_pc", "uni_pc_bh2", "deis"])
def test_order_2_equals_diffusers_default_order(sampler):
    # the sampler functions take the order; order 2 is diffusers' default solver_order
    training = training_for()
    latents, noise = inputs()
    latents, noise = latents.double(), noise.double()
    cls, overrides = TWINS[sampler]
    sched = cls.from_config(SDXL_CONFIG, **dict(overrides, solver_order=2))
    theirs, _, _ = run_diffusers(sched, 20, latents, noise)
    plan = make_plan(training, sampler, "default", 20)
    extra = {"sigmas_to": plan.sigmas_to} if sampler == "deis" else {}
    x = noise * (1 + plan.sigmas[0].item() ** 2) ** 0.5
    ours = SAMPLER_FUNCTIONS[sampler](Denoiser(toy_unet, training, plan), x, plan.sigmas, order=2, **extra)
    final = plan.sigmas_to[-1].item() if plan.sigmas_to is not None else 0.0
    ours = ours / (1 + final**2) ** 0.5
    assert (ours - theirs).abs().max().item() <= TOL
