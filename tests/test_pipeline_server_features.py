"""What the server needs from the pipeline, on the built-in model: each step's prediction for previews,
AUTOMATIC1111's interrupt (the run ends on the last prediction), the hires fix (a second pass from upscaled
latents), img2img from latents, and inpainting's masked-content modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import sdxl
from sdxl.images import fill_masked
from sdxl.options import HiresFix, OptionError
from sdxl.pipeline import Cancelled, upscale_latents

pytestmark = pytest.mark.filterwarnings("ignore::sdxl.options.ResolutionWarning")
PROMPT = "a red circle on a blue background"
SMALL = dict(width=64, height=64, steps=6, cfg=3.0, seed=4)


@pytest.fixture(scope="module")
def pipe():
    return sdxl.load("builtin")


def test_preview_gets_each_steps_prediction_and_changes_nothing(pipe):
    seen = []
    plain = pipe.generate(PROMPT, output="np", **SMALL)
    watched = pipe.generate(PROMPT, output="np", preview=lambda s, t, d: seen.append((s, t, d.shape)), **SMALL)
    assert np.array_equal(plain, watched)
    assert [(s, t) for s, t, _ in seen] == [(i, 6) for i in range(1, 7)] and seen[0][2] == (1, 4, 8, 8)


def test_interrupt_returns_the_last_prediction_decoded(pipe):
    steps, last = [0], []

    def preview(step, total, denoised):
        steps[0] = step
        last[:] = [denoised.clone()]

    out = pipe.generate(PROMPT, output="latent", preview=preview, interrupt=lambda: steps[0] >= 3, **SMALL)
    assert pipe.last_interrupted and steps[0] == 3
    assert torch.equal(out, last[0])  # the run ended on step 3's prediction
    full = pipe.generate(PROMPT, output="latent", **SMALL)
    assert not pipe.last_interrupted and not torch.equal(out, full)
    with pytest.raises(Cancelled):  # before any step there is nothing to return
        pipe.generate(PROMPT, interrupt=lambda: True, **SMALL)


def test_hires_fix_is_txt2img_then_img2img_from_upscaled_latents(pipe):
    hires = HiresFix(96, 96, strength=0.5, steps=4)
    calls = []
    out = pipe.generate(PROMPT, output="np", hires=hires, callback=lambda s, t, x: calls.append((s, t)), **SMALL)
    assert out.shape == (1, 96, 96, 3)
    first = pipe.generate(PROMPT, output="latent", **SMALL)
    by_hand = pipe.generate(PROMPT, output="np", init_latents=upscale_latents(first, 12, 12), strength=0.5,
                            **{**SMALL, "steps": 4, "width": None, "height": None})
    assert np.array_equal(out, by_hand)
    total = calls[-1][1]
    assert [s for s, _ in calls] == list(range(1, total + 1)) and total == 6 + 2  # 4 steps at strength 0.5: 2


@pytest.mark.parametrize("bad", [dict(width=100, height=96), dict(width=96, height=96, strength=0),
                                 dict(width=96, height=96, upscaler="ESRGAN")])
def test_bad_hires_settings_are_option_errors(bad):
    with pytest.raises(OptionError, match="hires"):
        HiresFix(**bad)


def test_inpainting_fill_modes_start_the_masked_region_differently(pipe):
    init = Image.fromarray((pipe.generate(PROMPT, output="np", **SMALL)[0] * 255).astype(np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    outs = {fill: pipe.generate("a green square", init_image=init, mask=mask, strength=0.6, inpaint_fill=fill,
                                output="np", **SMALL) for fill in ("original", "fill", "noise", "zeros")}
    for a in outs:
        for b in outs:
            if a < b:
                assert not np.array_equal(outs[a], outs[b]), (a, b)
    with pytest.raises(OptionError, match="inpaint_fill"):
        sdxl.GenerationOptions(inpaint_fill="latent noise")


def test_fill_masked_paints_the_hole_from_its_surroundings():
    a = np.zeros((64, 64, 3), np.uint8)
    a[:, :32] = (255, 0, 0)
    a[:, 32:] = (0, 0, 255)
    a[20:44, 20:44] = (0, 255, 0)  # to be painted over
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (20, 20, 44, 44))
    out = np.asarray(fill_masked(Image.fromarray(a), mask)).astype(int)
    assert np.array_equal(out[np.asarray(mask) == 0], a[np.asarray(mask) == 0])  # the rest untouched
    assert out[30, 22, 0] > 150 and out[30, 41, 2] > 150 and out[20:44, 20:44, 1].max() < 30  # red left, blue right


def test_resize_latents_encodes_the_image_at_its_size_and_resizes_its_latents(pipe, monkeypatch):
    """AUTOMATIC1111's "Just resize (latent upscale)": the 32x32 image's latents (one posterior sample per image's
    generator) resized bilinear to 64x64's, then noised, as by hand; at the image's own size it is plain img2img."""
    from sdxl import sampling
    from sdxl.images import to_tensor
    from sdxl.latents import encode_image

    init = Image.fromarray((pipe.generate(PROMPT, output="np", **dict(SMALL, width=32, height=32))[0] * 255)
                           .astype(np.uint8))
    started, real = [], sampling.add_noise
    monkeypatch.setattr(sampling, "add_noise", lambda x, noise, plan: started.append(x) or real(x, noise, plan))
    out = pipe.generate(PROMPT, init_image=init, resize_latents=True, strength=0.6, output="np", batch=2, **SMALL)
    gens = [torch.Generator().manual_seed(SMALL["seed"] + i) for i in range(2)]
    by_hand = upscale_latents(encode_image(pipe.base.vae, to_tensor(init), gens), 8, 8)
    assert out.shape == (2, 64, 64, 3) and torch.equal(started[0], by_hand)
    plain = pipe.generate(PROMPT, init_image=init, strength=0.6, output="np", **SMALL)  # the image resized instead
    assert np.abs(out[0] - plain[0]).mean() > 1e-3
    same_size = dict(SMALL, width=32, height=32)
    assert np.array_equal(pipe.generate(PROMPT, init_image=init, resize_latents=True, output="np", **same_size),
                          pipe.generate(PROMPT, init_image=init, output="np", **same_size))
    with pytest.raises(OptionError, match="resize_latents"):
        sdxl.GenerationOptions(resize_latents=True)
    with pytest.raises(OptionError, match="resize_latents"):
        sdxl.GenerationOptions(init_image=init, mask=Image.new("L", (32, 32), 255), resize_latents=True)


def test_init_latents_shape_is_checked():
    with pytest.raises(OptionError, match="init_latents"):
        sdxl.GenerationOptions(init_latents=torch.zeros(1, 3, 8, 8))
    with pytest.raises(OptionError, match="width"):
        sdxl.GenerationOptions(init_latents=torch.zeros(1, 4, 8, 8), width=128)
