"""sdxl.pipeline against diffusers' SDXL pipelines, on small random-weight models.

diffusers builds the reference pipelines (tiny UNet2DConditionModel, AutoencoderKL, CLIPTextModel,
CLIPTextModelWithProjection, the CLIP tokenizers from our own vocabulary files, EulerDiscreteScheduler
with the official SDXL config) and saves them with `save_pretrained`; our loader reads the folders.
Both sides then generate from the same prompt, seed, size and sampler, and the float images
(diffusers' output_type="np", ours output="np") must agree within 2/255 per pixel.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sdxl
from conftest import randomize

from sdxl import images as imaging
from sdxl.latents import PrecisionWarning, decode_latents
from sdxl.options import GenerationOptions, ResolutionWarning
from sdxl.pipeline import Pipeline
from sdxl.sampling import Cancelled

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore::sdxl.options.ResolutionWarning")

TOL = 2 / 255
PROMPT = "a red fox in the snow, detailed photograph"
NEGATIVE = "blurry, low quality"

SCHEDULER = {  # the official SDXL base scheduler_config.json
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}


def unet(kind: str) -> torch.nn.Module:
    common = dict(
        sample_size=8, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 1, 2), norm_num_groups=8,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    )
    if kind == "refiner":
        config = dict(common, in_channels=4, cross_attention_dim=64, projection_class_embeddings_input_dim=64 + 5 * 8)
    else:
        config = dict(common, in_channels=9 if kind == "inpaint" else 4, cross_attention_dim=32 + 64,
                      projection_class_embeddings_input_dim=64 + 6 * 8)
    model = randomize(diffusers.UNet2DConditionModel(**config), {"base": 1, "refiner": 11, "inpaint": 21}[kind], scale=0.2)
    with torch.no_grad():  # a modest noise prediction, so that images are neither flat nor saturated
        model.conv_out.weight.mul_(0.5)
        model.conv_out.bias.zero_()
    return model


def vae() -> torch.nn.Module:
    model = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32, 32), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.13025, force_upcast=True,
    )
    return randomize(model, 2, scale=0.2)


def clip(width: int, act: str, projection: bool, seed: int):
    config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, hidden_act=act, projection_dim=width, eos_token_id=2, pad_token_id=1, bos_token_id=0,
    )
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return randomize(cls(config), seed, scale=0.3)


def tokenizers(root: Path):
    from sdxl.models.tokenizer import write_transformers_files

    write_transformers_files(root / "tok", pad_token="<|endoftext|>")
    write_transformers_files(root / "tok_2", pad_token="!")
    return (transformers.CLIPTokenizer.from_pretrained(root / "tok"),
            transformers.CLIPTokenizer.from_pretrained(root / "tok_2"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{name: (diffusers pipeline, folder)} for base, refiner and 9-channel inpaint models."""
    root = tmp_path_factory.mktemp("pipelines")
    tok, tok_2 = tokenizers(root)
    scheduler = diffusers.EulerDiscreteScheduler.from_config(SCHEDULER)
    shared_vae = vae()
    te, te_2 = clip(32, "quick_gelu", False, 3), clip(64, "gelu", True, 4)
    base = diffusers.StableDiffusionXLPipeline(
        vae=shared_vae, text_encoder=te, text_encoder_2=te_2, tokenizer=tok, tokenizer_2=tok_2, unet=unet("base"),
        scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=shared_vae, text_encoder=None, text_encoder_2=te_2, tokenizer=None, tokenizer_2=tok_2,
        unet=unet("refiner"), scheduler=scheduler, requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False, add_watermarker=False,
    )
    inpaint = diffusers.StableDiffusionXLInpaintPipeline(
        vae=shared_vae, text_encoder=te, text_encoder_2=te_2, tokenizer=tok, tokenizer_2=tok_2, unet=unet("inpaint"),
        scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    out = {}
    for name, pipe in (("base", base), ("refiner", refiner), ("inpaint", inpaint)):
        pipe.set_progress_bar_config(disable=True)
        pipe.save_pretrained(root / name)
        out[name] = (pipe, root / name)
    return out


@pytest.fixture(scope="module")
def ours(models):
    return {
        "base": sdxl.load(models["base"][1]),
        "base+refiner": sdxl.load(models["base"][1], refiner=models["refiner"][1]),
        "refiner": sdxl.load(models["refiner"][1]),
        "inpaint": sdxl.load(models["inpaint"][1]),
    }


def reference(pipe, **kwargs) -> np.ndarray:
    """diffusers' float images (output_type="np") with one CPU generator per image, seeds seed + i."""
    seed, batch = kwargs.pop("seed", 0), kwargs.pop("batch", 1)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
    return pipe(generator=generators, num_images_per_prompt=batch, **kwargs).images


def assert_close_images(ours: np.ndarray, theirs, what: str) -> None:
    theirs = np.asarray(theirs)
    assert ours.shape == theirs.shape, f"{what}: shapes {ours.shape} vs {theirs.shape}"
    diff = np.abs(ours.astype(np.float64) - theirs.astype(np.float64)).max()
    print(f"{what}: max abs pixel difference {diff * 255:.4f}/255")
    assert diff <= TOL, f"{what}: max abs difference {diff * 255:.3f}/255 > 2/255"
    # non-trivial images: not flat, not saturated
    assert theirs.std() > 0.05, f"{what}: reference image is nearly flat (std {theirs.std():.4f})"
    assert ((theirs > 0.01) & (theirs < 0.99)).mean() > 0.5, f"{what}: reference image is saturated"


def swap_scheduler(pipe, sampler: str, schedule: str):
    if (sampler, schedule) == ("euler", "default"):
        pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(SCHEDULER)
    elif (sampler, schedule) == ("dpmpp_2m", "karras"):
        pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(SCHEDULER, use_karras_sigmas=True)
    elif (sampler, schedule) == ("euler_ancestral", "default"):
        pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(SCHEDULER)
    else:
        raise AssertionError((sampler, schedule))
    return pipe


TXT2IMG_CASES = {
    "64x64-euler": dict(width=64, height=64, sampler="euler", schedule="default"),
    "96x64-euler-batch2": dict(width=96, height=64, sampler="euler", schedule="default", batch=2, seed=3),
    "64x96-dpmpp_2m-karras": dict(width=64, height=96, sampler="dpmpp_2m", schedule="karras"),
    "96x64-dpmpp_2m-karras": dict(width=96, height=64, sampler="dpmpp_2m", schedule="karras", seed=7),
    "euler_ancestral-batch2": dict(width=64, height=64, sampler="euler_ancestral", schedule="default", seed=1, batch=2),
    "negative+rescale+microcond": dict(
        width=64, height=64, sampler="euler", schedule="default", negative_prompt=NEGATIVE, guidance_rescale=0.7,
        original_size=(128, 96), crop_top_left=(8, 16), target_size=(96, 128), cfg=7.0,
    ),
    "clip_skip+prompt_2+cfg1": dict(width=64, height=64, sampler="euler", schedule="default", clip_skip=1,
                                    prompt_2="an oil painting", cfg=1.0),
}


@pytest.mark.parametrize("case", list(TXT2IMG_CASES))
def test_text_to_image_matches_diffusers(models, ours, case):
    opts = {"steps": 5, "cfg": 5.0, "seed": 0, "batch": 1, **TXT2IMG_CASES[case]}
    pipe = swap_scheduler(models["base"][0], opts["sampler"], opts["schedule"])
    got = ours["base"].generate(PROMPT, output="np", **opts)
    kwargs = dict(
        prompt=PROMPT, width=opts["width"], height=opts["height"], num_inference_steps=opts["steps"],
        guidance_scale=opts["cfg"], seed=opts["seed"], batch=opts["batch"], output_type="np",
        negative_prompt=opts.get("negative_prompt"), guidance_rescale=opts.get("guidance_rescale", 0.0),
        prompt_2=opts.get("prompt_2"), clip_skip=opts.get("clip_skip"),
    )
    for name in ("original_size", "target_size"):
        if name in opts:
            kwargs[name] = opts[name]
    if "crop_top_left" in opts:
        kwargs["crops_coords_top_left"] = opts["crop_top_left"]
    want = reference(pipe, **kwargs)
    assert_close_images(got, want, case)
    # the latents handed to the VAE agree too
    latents = ours["base"].generate(PROMPT, output="latent", **opts)
    want_latents = reference(pipe, **dict(kwargs, output_type="latent"))
    torch.testing.assert_close(latents, want_latents, rtol=1e-4, atol=1e-4 * want_latents.abs().max().item())


def picture(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    """A smooth, colourful test picture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(2 * np.pi * (a * x + b * y) + c) for a, b, c in rng.uniform(0.3, 2.0, size=(3, 3))]
    return Image.fromarray(((np.stack(channels, -1) * 0.45 + 0.5) * 255).round().astype(np.uint8))


def box_mask(width: int = 64, height: int = 64) -> Image.Image:
    m = np.zeros((height, width), np.uint8)
    m[height // 4: 3 * height // 4, width // 8: width // 2 + 8] = 255
    return Image.fromarray(m)


def base_img2img(models):
    return diffusers.StableDiffusionXLImg2ImgPipeline.from_pipe(models["base"][0])


def base_inpaint(models):
    return diffusers.StableDiffusionXLInpaintPipeline.from_pipe(models["base"][0])


@pytest.mark.parametrize("sampler,schedule,strength", [("euler", "default", 0.6), ("dpmpp_2m", "karras", 0.75)])
def test_image_to_image_matches_diffusers(models, ours, sampler, schedule, strength):
    pipe = swap_scheduler(base_img2img(models), sampler, schedule)
    image = picture(96, 64)
    got = ours["base"].generate(PROMPT, init_image=image, strength=strength, steps=6, sampler=sampler,
                                schedule=schedule, seed=4, output="np")
    want = reference(pipe, prompt=PROMPT, image=image, strength=strength, num_inference_steps=6, guidance_scale=5.0,
                     seed=4, output_type="np")
    assert_close_images(got, want, f"img2img {sampler}")


@pytest.mark.parametrize("sampler,schedule", [("euler", "default"), ("dpmpp_2m", "karras")])
def test_inpainting_with_a_4_channel_unet_matches_diffusers(models, ours, sampler, schedule):
    pipe = swap_scheduler(base_inpaint(models), sampler, schedule)
    image, mask = picture(64, 64, 1), box_mask()
    got = ours["base"].generate(PROMPT, init_image=image, mask=mask, strength=0.8, steps=5, seed=2, output="np",
                                sampler=sampler, schedule=schedule)
    want = reference(pipe, prompt=PROMPT, image=image, mask_image=mask, strength=0.8, num_inference_steps=5,
                     guidance_scale=5.0, seed=2, output_type="np", width=64, height=64)
    assert_close_images(got, want, f"inpaint 4-channel {sampler}")
    # the kept region really comes from the init image: without the blend the result would differ
    plain = ours["base"].generate(PROMPT, init_image=image, strength=0.8, steps=5, seed=2, output="np",
                                  sampler=sampler, schedule=schedule)
    assert np.abs(plain - want).max() > 4 * TOL


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpainting_with_a_9_channel_unet_matches_diffusers(models, ours, strength):
    pipe = swap_scheduler(models["inpaint"][0], "euler", "default")
    image, mask = picture(96, 64, 2), box_mask(96, 64)
    got = ours["inpaint"].generate(PROMPT, init_image=image, mask=mask, strength=strength, steps=5, seed=3, output="np")
    want = reference(pipe, prompt=PROMPT, image=image, mask_image=mask, strength=strength, num_inference_steps=5,
                     guidance_scale=5.0, seed=3, output_type="np", width=96, height=64)
    assert_close_images(got, want, f"inpaint 9-channel strength {strength}")


def test_outpainting_is_inpainting_of_the_padded_canvas(models, ours):
    image = picture(48, 40, 3)
    canvas, mask = imaging.outpaint_canvas(image, (8, 8, 8, 16), overlap=4)
    assert canvas.size == (64, 64) and mask.size == (64, 64)
    m = np.asarray(mask)
    assert m[:8].min() == 255 and m[:, :8].min() == 255 and m[12:44, 12:52].max() == 0 and m[-16:].min() == 255
    assert np.array_equal(np.asarray(canvas)[8:48, 8:56], np.asarray(image))
    got = ours["inpaint"].generate(PROMPT, init_image=image, outpaint=(8, 8, 8, 16), strength=1.0, steps=4, seed=5,
                                   output="np")
    pipe = swap_scheduler(models["inpaint"][0], "euler", "default")
    # generate's canvas has no overlap: diffusers gets the same canvas and mask
    canvas0, mask0 = imaging.outpaint_canvas(image, (8, 8, 8, 16))
    want = reference(pipe, prompt=PROMPT, image=canvas0, mask_image=mask0, strength=1.0, num_inference_steps=4,
                     guidance_scale=5.0, seed=5, output_type="np", width=64, height=64)
    assert_close_images(got, want, "outpaint")


@pytest.mark.parametrize("sampler,schedule,switch", [("euler", "default", 0.8), ("dpmpp_2m", "karras", 0.5)])
def test_base_to_refiner_matches_diffusers(models, ours, sampler, schedule, switch):
    base = swap_scheduler(models["base"][0], sampler, schedule)
    refiner = swap_scheduler(models["refiner"][0], sampler, schedule)
    got = ours["base+refiner"].generate(PROMPT, width=64, height=64, steps=10, refiner_switch=switch, seed=6,
                                        sampler=sampler, schedule=schedule, output="np")
    generators = [torch.Generator().manual_seed(6)]
    latents = base(prompt=PROMPT, width=64, height=64, num_inference_steps=10, guidance_scale=5.0,
                   denoising_end=switch, generator=generators, output_type="latent").images
    want = refiner(prompt=PROMPT, image=latents, num_inference_steps=10, guidance_scale=5.0, denoising_start=switch,
                   generator=generators, output_type="np").images
    assert_close_images(got, want, f"base -> refiner {sampler}")
    # and the refiner changed something: the base alone to the end gives another image
    alone = ours["base"].generate(PROMPT, width=64, height=64, steps=10, seed=6, sampler=sampler, schedule=schedule,
                                  output="np")
    assert np.abs(alone - want).max() > TOL


def test_refiner_as_image_to_image_matches_diffusers(models, ours):
    refiner = swap_scheduler(models["refiner"][0], "euler", "default")
    image = picture(64, 64, 4)
    got = ours["base+refiner"].refine(image, PROMPT, strength=0.5, steps=6, seed=8, output="np",
                                      aesthetic_score=7.0, negative_aesthetic_score=2.0)
    want = reference(refiner, prompt=PROMPT, image=image, strength=0.5, num_inference_steps=6, guidance_scale=5.0,
                     seed=8, output_type="np", aesthetic_score=7.0, negative_aesthetic_score=2.0)
    assert_close_images(got, want, "refiner img2img")
    # a refiner loaded on its own does the same through generate
    alone = ours["refiner"].generate(PROMPT, init_image=image, strength=0.5, steps=6, seed=8, output="np",
                                     aesthetic_score=7.0, negative_aesthetic_score=2.0)
    np.testing.assert_array_equal(alone, got)


@pytest.mark.parametrize("mode", ["txt2img", "txt2img-euler_ancestral", "img2img", "inpaint"])
def test_image_i_of_a_batch_is_the_single_image_of_seed_plus_i(ours, mode):
    kwargs = dict(width=64, height=64, steps=3, output="latent")
    if mode.endswith("euler_ancestral"):
        kwargs["sampler"] = "euler_ancestral"
    if mode in ("img2img", "inpaint"):
        kwargs.update(init_image=picture(64, 64, 5), strength=0.7)
    if mode == "inpaint":
        kwargs["mask"] = box_mask()
    pipe = ours["inpaint" if mode == "inpaint" else "base"]
    batch = pipe.generate(PROMPT, seed=10, batch=3, **kwargs)
    assert batch.shape == (3, 4, 8, 8)
    for i in range(3):
        single = pipe.generate(PROMPT, seed=10 + i, batch=1, **kwargs)
        # (a batch of 3 and of 1 take different float32 GEMM paths; ancestral noise amplifies that a little)
        torch.testing.assert_close(batch[i:i + 1], single, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(batch[0], batch[1], atol=1e-2)


def test_callback_once_per_step_and_cancellation_between_steps(ours):
    calls = []
    ours["base"].generate(PROMPT, width=64, height=64, steps=4, output="latent",
                          callback=lambda step, total, x: calls.append((step, total, tuple(x.shape))))
    assert calls == [(i, 4, (1, 4, 8, 8)) for i in range(1, 5)]

    calls.clear()
    with pytest.raises(Cancelled):
        ours["base"].generate(PROMPT, width=64, height=64, steps=4, output="latent",
                              callback=lambda step, total, x: calls.append(step), cancel=lambda: len(calls) >= 2)
    assert calls == [1, 2]  # stopped between steps 2 and 3

    # base + refiner count their steps together
    calls.clear()
    ours["base+refiner"].generate(PROMPT, width=64, height=64, steps=10, refiner_switch=0.8, output="latent",
                                  callback=lambda step, total, x: calls.append((step, total)))
    assert [s for s, _ in calls] == list(range(1, len(calls) + 1)) and {t for _, t in calls} == {len(calls)}
    assert len(calls) == 10


def test_latent_output_decodes_to_the_image(ours):
    latents = ours["base"].generate(PROMPT, width=96, height=64, steps=3, seed=1, output="latent")
    assert isinstance(latents, torch.Tensor) and latents.shape == (1, 4, 8, 12) and latents.dtype == torch.float32
    images = ours["base"].generate(PROMPT, width=96, height=64, steps=3, seed=1)
    assert isinstance(images, list) and len(images) == 1 and images[0].size == (96, 64)
    decoded = imaging.to_pil(decode_latents(ours["base"].base.vae, latents))[0]
    assert np.array_equal(np.asarray(decoded), np.asarray(images[0]))


def test_repeated_prompts_reuse_the_text_encoding(ours, monkeypatch):
    pipe = Pipeline(ours["base"].base)
    calls = []
    encoder = pipe.base.text_encoder_2
    original = encoder.forward
    monkeypatch.setattr(encoder, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    first = pipe.generate("a cached prompt", negative_prompt="x", width=64, height=64, steps=1, output="latent")
    n = len(calls)
    assert n == 2  # prompt and negative prompt
    again = pipe.generate("a cached prompt", negative_prompt="x", width=64, height=64, steps=1, output="latent")
    assert len(calls) == n
    torch.testing.assert_close(first, again, rtol=0, atol=0)


BAD_INPUTS = {
    "width not a multiple of 8": (dict(width=100), "width must be a positive multiple of 8"),
    "height not a multiple of 8": (dict(height=60), "height must be a positive multiple of 8"),
    "empty batch": (dict(batch=0), "batch must be an integer >= 1"),
    "zero steps": (dict(steps=0), "steps must be an integer >= 1"),
    "strength 0": (dict(strength=0.0), r"strength must be in \(0, 1\]"),
    "strength above 1": (dict(strength=1.5), r"strength must be in \(0, 1\]"),
    "unknown sampler": (dict(sampler="euler_b"), "unknown sampler 'euler_b'; choose one of euler, "),
    "unknown schedule": (dict(schedule="cosine"), "unknown schedule 'cosine'; choose one of default, "),
    "unknown output": (dict(output="jpeg"), "output must be one of pil, np, latent"),
    "mask without image": (dict(mask=Image.new("L", (64, 64))), "a mask needs an init_image"),
    "mask of another size": (dict(init_image=Image.new("RGB", (64, 64)), mask=Image.new("L", (64, 48))),
                             r"mask \(64x48\) and init_image \(64x64\) must have the same size"),
    "refiner switch 1": (dict(refiner_switch=1.0), r"refiner_switch must be in \(0, 1\)"),
    "negative cfg": (dict(cfg=-1.0), "cfg must be a finite number >= 0"),
    "mask and outpaint": (dict(init_image=Image.new("RGB", (64, 64)), mask=Image.new("L", (64, 64)),
                               outpaint=(8, 0, 0, 0)), "either a mask or outpaint padding"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_clear_value_error(ours, case):
    kwargs, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        GenerationOptions(prompt="x", **kwargs)
    with pytest.raises(ValueError, match=message):
        ours["base"].generate("x", **kwargs)


def test_inpainting_model_needs_a_mask(ours):
    with pytest.raises(ValueError, match="9 input channels.*give an init_image and a mask"):
        ours["inpaint"].generate("x", width=64, height=64, steps=1)


def test_sizes_outside_the_sdxl_buckets_warn_but_run(ours, monkeypatch):
    unet = ours["base"].base.unet
    monkeypatch.setattr(unet, "config", dataclasses.replace(unet.config, sample_size=128))  # an SDXL-sized model
    with pytest.warns(ResolutionWarning, match="64x64 is not one of SDXL's trained"):
        ours["base"].generate("x", width=64, height=64, steps=1, output="latent")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResolutionWarning)
        with pytest.raises(Cancelled):  # 1152x896 is a bucket: no warning (cancelled before the first step)
            ours["base"].generate("x", width=1152, height=896, steps=1, output="latent", cancel=lambda: True)
        # A model trained at another size (the built-in one: 64 px) is not held to SDXL's list; its native size
        # is the default.
        monkeypatch.setattr(unet, "config", dataclasses.replace(unet.config, sample_size=8))
        latents = ours["base"].generate("x", steps=1, output="latent")
        assert latents.shape[-2:] == (8, 8)


def test_half_precision_vae_overflow_is_decoded_again_in_float32(models):
    pipe = sdxl.load(models["base"][1])
    vae = pipe.base.vae
    with torch.no_grad():  # a VAE whose activations overflow float16 for large latents
        vae.decoder.conv_in.weight.mul_(10.0)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    latents[1] *= 400.0  # image 1 overflows in float16, image 0 does not
    vae.half().float()  # weights rounded to float16 values, so float32 decodes compare exactly
    reference32 = decode_latents(vae, latents)
    assert torch.isfinite(reference32).all()
    vae.half()
    raw = vae.decode(vae.unscale_latents(latents).half())
    assert torch.isfinite(raw[0]).all() and not torch.isfinite(raw[1]).all(), "the test case must overflow image 1 only"
    with pytest.warns(PrecisionWarning, match=r"image\(s\) \[1\] to non-finite values in torch.float16"):
        images = decode_latents(vae, latents)
    assert torch.isfinite(images).all()
    torch.testing.assert_close(images[1], reference32[1])  # re-decoded in float32
    torch.testing.assert_close(images[0], reference32[0], atol=2e-2, rtol=0)  # decoded in float16
    assert all(p.dtype == torch.float16 for p in vae.parameters())  # the VAE is left in its dtype
    # Marked: from now on it runs in float32 straight away (no warning; image 0 now exactly the float32 one).
    assert vae.overflowed_in_half
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        again = decode_latents(vae, latents)
    torch.testing.assert_close(again, reference32, rtol=0, atol=0)
    assert all(p.dtype == torch.float16 for p in vae.parameters())

    # the same through generate, for a VAE not yet marked: every image finite, a warning
    vae.overflowed_in_half = False
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(20.0)
    with pytest.warns(PrecisionWarning):
        out = pipe.generate(PROMPT, width=64, height=64, steps=2, output="np")
    assert np.isfinite(out).all() and vae.overflowed_in_half


def test_load_with_a_replacement_vae_and_hub_ids(models, tmp_path):
    other = vae()
    randomize(other, 99, scale=0.2)
    other.save_pretrained(tmp_path / "vae")
    pipe = sdxl.load(models["base"][1], vae=tmp_path / "vae", dtype="float32", device="cpu")
    ours_vae = pipe.base.vae.state_dict()
    assert torch.equal(ours_vae["decoder.conv_in.weight"], other.state_dict()["decoder.conv_in.weight"])
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        sdxl.load("sdxl-tests-nobody/not-a-cached-repo")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        sdxl.load(tmp_path / "missing.safetensors")


def test_import_sdxl_stays_light():
    import subprocess
    import sys

    code = "import sys, sdxl; assert 'torch' not in sys.modules, 'torch imported'; assert callable(sdxl.load)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_masks_and_images_round_trip():
    image = picture(40, 24)
    t = imaging.to_tensor(image)
    assert t.shape == (1, 3, 24, 40) and t.min() >= -1 and t.max() <= 1
    assert np.array_equal(np.asarray(imaging.to_pil(t)[0]), np.asarray(image))
    mask = imaging.prepare_mask(box_mask(64, 64), 64, 64)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    soft = imaging.prepare_mask(box_mask(64, 64), 64, 64, blur=3)
    assert ((soft > 0.05) & (soft < 0.95)).any() and soft[0, 0, 32, 20] > 0.99 and soft[0, 0, 0, 0] < 0.01
