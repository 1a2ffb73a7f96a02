"""The new samplers through the whole pipeline against diffusers' SDXL pipeline with the twin scheduler, and
CFG++ (euler_cfg_pp, euler_ancestral_cfg_pp) through the pipeline's model function.

The small random-weight models and our pipelines are tests/test_pipeline.py's (`models`, `ours`); images agree
within 2/255 per pixel, with the model's default schedule and with Karras sigmas where the scheduler offers
them (`use_karras_sigmas`). UniPC "bh1" runs against diffusers' UniPC with its last step's 0 * inf taken as the
limit (tests/test_samplers_diffusers.py `UniPCLimit`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_pipeline import PROMPT, SCHEDULER, TOL, assert_close_images, models, ours, reference  # noqa: F401
from test_samplers_diffusers import UniPCLimit

from sdxl.conditioning import Conditioning
from sdxl.pipeline import guided_unet

diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.filterwarnings("ignore::sdxl.options.ResolutionWarning"),
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning")]

ORDER_3 = {"solver_order": 3}  # ComfyUI's UniPC / DEIS order, ours
TWINS = {  # sampler -> (diffusers scheduler class, config overrides, extra pipeline arguments)
    "dpm_2": (diffusers.KDPM2DiscreteScheduler, {}, {}),
    "dpm_2_ancestral": (diffusers.KDPM2AncestralDiscreteScheduler, {}, {}),
    "lms": (diffusers.LMSDiscreteScheduler, {}, {}),
    "dpmpp_2m_sde_heun": (diffusers.DPMSolverMultistepScheduler,
                          {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}, {}),
    "uni_pc": (UniPCLimit, {"solver_type": "bh1", **ORDER_3}, {}),
    "uni_pc_bh2": (diffusers.UniPCMultistepScheduler, {"solver_type": "bh2", **ORDER_3}, {}),
    "deis": (diffusers.DEISMultistepScheduler, ORDER_3, {}),
    "tcd": (diffusers.TCDScheduler, {}, {"eta": 0.3}),  # the SDXL pipeline's eta is TCD's gamma (its default: 0)
}
CASES = [(name, "default") for name in TWINS] + [(name, "karras") for name in TWINS if name != "tcd"]


@pytest.mark.parametrize("sampler,schedule", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_text_to_image_matches_diffusers(models, ours, sampler, schedule):  # noqa: F811
    cls, config, extra = TWINS[sampler]
    pipe = models["base"][0]
    karras = {"use_karras_sigmas": True} if schedule == "karras" else {}
    pipe.scheduler = cls.from_config(SCHEDULER, **config, **karras)
    steps = 4 if sampler == "tcd" else 6
    got = ours["base"].generate(PROMPT, width=64, height=64, steps=steps, cfg=5.0, seed=2, sampler=sampler,
                                schedule=schedule, output="np")
    want = reference(pipe, prompt=PROMPT, width=64, height=64, num_inference_steps=steps, guidance_scale=5.0, seed=2,
                     output_type="np", **extra)
    assert_close_images(got, want, f"{sampler} {schedule}")


def test_guided_unet_hands_out_the_unconditional_prediction(ours):  # noqa: F811
    parts = ours["base"].base
    unet = parts.unet
    g = torch.Generator().manual_seed(0)
    context, y = torch.randn(2, 77, 96, generator=g), torch.randn(2, 112, generator=g)
    cond = Conditioning(context, y, guided=True)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor(500.0)
    with torch.no_grad():
        guided, uncond = guided_unet(unet, cond, 4.0, 0.0, uncond=True)(x, t)
        plain = guided_unet(unet, cond, 4.0, 0.0)(x, t)
        negative, text = unet(torch.cat([x, x]), t, context, y).chunk(2)
    torch.testing.assert_close(guided, plain, rtol=0, atol=0)
    torch.testing.assert_close(uncond, negative, rtol=0, atol=0)
    torch.testing.assert_close(guided, negative + 4.0 * (text - negative), rtol=1e-6, atol=1e-6)


def test_cfg_pp_through_the_pipeline(ours):  # noqa: F811
    kwargs = {"width": 64, "height": 64, "steps": 5, "seed": 3, "output": "np"}
    pipe = ours["base"]
    # with the negative prompt equal to the prompt both predictions are one: CFG++ is then Euler
    same = dict(kwargs, negative_prompt=PROMPT, cfg=5.0)
    np.testing.assert_allclose(pipe.generate(PROMPT, sampler="euler_cfg_pp", **same),
                               pipe.generate(PROMPT, sampler="euler", **same), rtol=0, atol=1e-5)
    cfg_pp = pipe.generate(PROMPT, sampler="euler_cfg_pp", cfg=0.8, **kwargs)
    euler = pipe.generate(PROMPT, sampler="euler", cfg=0.8, **kwargs)  # cfg <= 1: plain Euler has no negative
    assert np.abs(cfg_pp - euler).max() > 4 * TOL  # CFG++ guides even below cfg 1 (its usual range)
    assert np.isfinite(cfg_pp).all() and cfg_pp.std() > 0.05
    ancestral = [pipe.generate(PROMPT, sampler="euler_ancestral_cfg_pp", cfg=1.5, **kwargs) for _ in range(2)]
    np.testing.assert_array_equal(ancestral[0], ancestral[1])  # seeded: the same image every run
    assert np.abs(ancestral[0] - pipe.generate(PROMPT, sampler="euler_cfg_pp", cfg=1.5, **kwargs)).max() > TOL
