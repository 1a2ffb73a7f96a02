"""Generation with SDXL: text-to-image, image-to-image, inpainting, outpainting, base -> refiner.

    pipe = sdxl.load("sd_xl_base_1.0.safetensors", refiner="sd_xl_refiner_1.0.safetensors", device="cuda", dtype="fp16")
    images = pipe.generate("a lighthouse at dusk", steps=30, cfg=5.0, seed=1, batch=2)

Every mode runs the same steps (`Pipeline.run`):

1. prompts -> conditioning: the penultimate hidden states of CLIP ViT-L (`prompt`) and OpenCLIP
   bigG (`prompt_2`, default `prompt`) concatenated (B, 77, 2048), and y = bigG's projected pooled
   output + sinusoidal embeddings of the micro-conditioning numbers: original (h, w), crop (top,
   left), target (h, w) for the base; original (h, w), crop (top, left), aesthetic score for the
   refiner (bigG only, 1280 wide). With guidance, the negative prompt's conditioning is computed
   the same way, or is all zeros when the negative prompts are empty and the model asks for that
   (`force_zeros_for_empty_prompt`: the official base does, the refiner does not).
2. starting latents: per image i, a CPU generator seeded with `seed + i` gives (in this order) the
   VAE sample of the init image (img2img / inpaint), the initial noise (1, 4, H/8, W/8) in float32,
   and the VAE sample of the masked image (inpaint), which is how diffusers' SDXL pipelines consume
   a list of CPU generators. So a seed gives the same image on any device, and image i of a batch
   is the single image of seed + i.
3. `sdxl.sampling.sample` runs the sampler; the model function does classifier-free guidance (and
   guidance rescale) on the U-Net's eps / v prediction. Inpainting with an ordinary 4-channel U-Net
   blends, after each step, the kept region back from the init latents noised to the next noise
   level; a 9-channel inpainting U-Net gets the mask and the masked image's latents as extra input
   channels instead.
4. base -> refiner: the base stops at `refiner_switch` of the schedule and the refiner finishes
   from its latents, not decoded in between.
5. decoding: in the VAE's dtype; an image that comes out non-finite (the official VAE overflows
   in float16) is decoded again in float32, with a warning.

Micro-conditioning sizes are (height, width) and the crop is (top, left), as in the SDXL paper and
diffusers. Differences from diffusers, on purpose: an empty negative prompt ("") counts as no
negative prompt (diffusers zeroes only for None); `clip_skip` applies to the negative prompt too; the
refiner's bigG encoder reads `prompt_2` (diffusers gives it `prompt`); negative micro-conditioning
values default to the positive ones wherever they are not given; image i of a batch never depends
on the batch size (diffusers' inpainting encodes a shared init image with the first generator only).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import builtin
from . import images as imaging
from . import sampling
from .acceleration import Offload, check_modes, compile_unet, execution_device, store_fp8
from .checkpoints.load import Components
from .models.tokenizer import clip_g_tokenizer, clip_l_tokenizer
from .models.unet import micro_conditioning
from .models.vae import AutoencoderKL, run_tiled
from .sampling import Cancelled

__all__ = [
    "Cancelled",
    "GenerationOptions",
    "Pipeline",
    "PrecisionWarning",
    "ResolutionWarning",
    "SDXL_RESOLUTIONS",
    "load",
]


class ResolutionWarning(UserWarning):
    """A size outside SDXL's trained ~1-megapixel buckets: allowed, but quality usually suffers."""


class PrecisionWarning(UserWarning):
    """The VAE produced non-finite values in half precision and was re-run in float32."""


# SDXL's training buckets (width, height), ~1 megapixel in steps of 64 (SDXL paper, appendix I).
_BUCKETS = [
    (1024, 1024), (1024, 960), (1088, 960), (1088, 896), (1152, 896), (1152, 832), (1216, 832), (1280, 768),
    (1344, 768), (1344, 704), (1408, 704), (1472, 704), (1536, 640), (1600, 640), (1664, 576), (1728, 576),
    (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512),
]
SDXL_RESOLUTIONS = frozenset(_BUCKETS + [(h, w) for w, h in _BUCKETS])

OUTPUTS = ("pil", "np", "latent")

Size = tuple[int, int]


def _pair(name: str, value, *, allow_none: bool = True) -> tuple[int, int] | None:
    if value is None and allow_none:
        return None
    try:
        a, b = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of integers, got {value!r}") from None
    if int(a) != a or int(b) != b:
        raise ValueError(f"{name} must be a pair of integers, got {value!r}")
    return int(a), int(b)


DEFAULT_CFG = 5.0  # the guidance scale for models that recommend none (SDXL's usual 5-7)


@dataclass
class GenerationOptions:
    """Everything one `generate` call can set. Validated on construction (ValueError naming what is allowed).

    Sizes for micro-conditioning are (height, width), crops (top, left); None means the default
    (output size, or the positive value for the negative_* ones).
    """

    prompt: str = ""
    prompt_2: str | None = None  # for OpenCLIP bigG; None: `prompt`
    negative_prompt: str = ""
    negative_prompt_2: str | None = None  # None: `negative_prompt`
    width: int | None = None  # None: the init image's width (rounded down to a multiple of 8), else the model's native size (1024 for SDXL)
    height: int | None = None
    steps: int = 30
    # classifier-free guidance scale; <= 1 runs the U-Net without the negative branch. None: the scale the model's
    # file recommends (the built-in model's is 3), else 5
    cfg: float | None = None
    guidance_rescale: float = 0.0  # 0..1, "Common Diffusion Noise Schedules and Sample Steps are Flawed" 3.4
    sampler: str = "euler"
    schedule: str = "default"
    seed: int = 0
    batch: int = 1
    init_image: Any = None  # PIL image, (H, W, 3) array or (3, H, W) tensor in [0, 1]: img2img / inpaint
    strength: float = 0.8  # img2img / inpaint: fraction of the schedule that is run (1: from pure noise)
    mask: Any = None  # inpainting: white = repaint; the init image's size
    mask_blur: float = 0.0  # Gaussian blur radius (pixels) of the mask's edge
    outpaint: tuple[int, int, int, int] | None = None  # (left, top, right, bottom) pixels to add around init_image
    outpaint_fill: str | tuple[int, int, int] = "edge"
    refiner_switch: float | None = 0.8  # with a refiner: fraction of the schedule the base runs; None: no refiner
    original_size: Size | None = None
    crop_top_left: Size = (0, 0)
    target_size: Size | None = None
    negative_original_size: Size | None = None
    negative_crop_top_left: Size | None = None
    negative_target_size: Size | None = None
    aesthetic_score: float = 6.0  # refiner only
    negative_aesthetic_score: float = 2.5
    clip_skip: int | None = None  # 0/None: penultimate layer (SDXL); k: k more layers skipped
    output: str = "pil"  # "pil" (list of images), "np" (float32 (B, H, W, 3) in [0, 1]), "latent"
    vae_tiling: bool = False  # encode / decode large images in tiles

    def __post_init__(self) -> None:
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {type(getattr(self, name)).__name__}")
        for name in ("prompt_2", "negative_prompt_2"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string or None, got {type(getattr(self, name)).__name__}")
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v % 8):
                raise ValueError(f"{name} must be a positive multiple of 8 (pixels), got {v!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not isinstance(self.batch, int) or isinstance(self.batch, bool) or self.batch < 1:
            raise ValueError(f"batch must be an integer >= 1 (images per call), got {self.batch!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.cfg is not None and (not isinstance(self.cfg, (int, float)) or not math.isfinite(self.cfg) or self.cfg < 0):
            raise ValueError(f"cfg must be a finite number >= 0, got {self.cfg!r}")
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {self.guidance_rescale!r}")
        if not (isinstance(self.strength, (int, float)) and 0.0 < self.strength <= 1.0):
            raise ValueError(f"strength must be in (0, 1] (1 = start from pure noise), got {self.strength!r}")
        if self.refiner_switch is not None and not 0.0 < self.refiner_switch < 1.0:
            raise ValueError(f"refiner_switch must be in (0, 1) or None (no refiner), got {self.refiner_switch!r}")
        if self.sampler not in sampling.SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(sampling.SAMPLERS)}")
        if self.schedule not in sampling.SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(sampling.SCHEDULES)}")
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {self.output!r}")
        if self.clip_skip is not None and (not isinstance(self.clip_skip, int) or self.clip_skip < 0):
            raise ValueError(f"clip_skip must be None or an integer >= 0, got {self.clip_skip!r}")
        if self.mask_blur < 0:
            raise ValueError(f"mask_blur must be >= 0 pixels, got {self.mask_blur!r}")
        for name in ("original_size", "target_size", "negative_original_size", "negative_target_size",
                     "negative_crop_top_left"):
            setattr(self, name, _pair(name, getattr(self, name)))
        self.crop_top_left = _pair("crop_top_left", self.crop_top_left, allow_none=False)
        if self.mask is not None and self.init_image is None:
            raise ValueError("a mask needs an init_image (the image to inpaint)")
        if self.outpaint is not None:
            if self.init_image is None:
                raise ValueError("outpaint needs an init_image (the image to extend)")
            if self.mask is not None:
                raise ValueError("give either a mask or outpaint padding, not both (outpainting makes its own mask)")
            if len(self.outpaint) != 4 or any(not isinstance(p, int) or p < 0 for p in self.outpaint):
                raise ValueError(f"outpaint must be 4 non-negative integers (left, top, right, bottom), got {self.outpaint!r}")
        if self.init_image is not None:
            w, h = imaging.image_size(self.init_image)
            if w < 8 or h < 8:
                raise ValueError(f"init_image must be at least 8x8 pixels, got {w}x{h}")
            if self.mask is not None and imaging.image_size(self.mask) != (w, h):
                mw, mh = imaging.image_size(self.mask)
                raise ValueError(f"mask ({mw}x{mh}) and init_image ({w}x{h}) must have the same size")

    def replace(self, **changes) -> GenerationOptions:
        return dataclasses.replace(self, **changes)


def rescale_guidance(guided: Tensor, cond: Tensor, amount: float) -> Tensor:
    """Guidance rescale: match the guided prediction's per-image std to the conditional one's, mixed by `amount`."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return amount * rescaled + (1 - amount) * guided


def _param(module: torch.nn.Module) -> Tensor:
    return next(module.parameters())


def encode_prompts(
    text_encoder, text_encoder_2, prompts: Sequence[str], prompts_2: Sequence[str], *,
    hidden_layer: int = -2, device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """SDXL's text conditioning: (context (B, 77, 768 + 1280 or 1280), pooled bigG (B, 1280)).

    context = cat(CLIP ViT-L hidden[hidden_layer] of `prompts`, bigG hidden[hidden_layer] of
    `prompts_2`) with no final layer norm; `text_encoder` is None for the refiner (bigG only).
    Used by generation and by training, so both condition the U-Net the same way.
    """
    hidden = []
    if text_encoder is not None:
        h, _ = text_encoder(clip_l_tokenizer()(list(prompts)).to(execution_device(text_encoder)),
                            hidden_layer=hidden_layer, pooled=False)
        hidden.append(h)
    h2, pooled = text_encoder_2(clip_g_tokenizer()(list(prompts_2)).to(execution_device(text_encoder_2)),
                                hidden_layer=hidden_layer, pooled=True)
    device = device or h2.device
    return torch.cat([h.to(device) for h in (*hidden, h2)], dim=-1), pooled.to(device)


# ---------------------------------------------------------------------------------------------
# The VAE, with the float32 fallback.


def _run_vae(vae: AutoencoderKL, fn: Callable[[Tensor], Tensor], x: Tensor, what: str) -> Tensor:
    """fn(x) in the VAE's dtype; images whose result is not finite are run again in float32 (warning).

    A VAE that overflowed once is marked (`overflowed_in_half`) and runs in float32 from then on:
    the official SDXL VAE overflows float16 on most images, and a doomed half-precision pass per image
    would cost time and a warning each time (diffusers always decodes it in float32: `force_upcast`).
    """
    dtype = _param(vae).dtype
    if dtype == torch.float32:
        return fn(x.float()).float()
    if vae.overflowed_in_half:
        with _in_float32(vae):
            return fn(x.float()).float()
    out = fn(x.to(dtype))
    bad = (~torch.isfinite(out).flatten(1).all(dim=1)).nonzero().flatten().tolist()
    out = out.float()
    if bad:
        warnings.warn(
            f"the VAE {what} image(s) {bad} to non-finite values in {dtype}; redoing them in float32, and running "
            "this VAE in float32 from now on (a VAE fixed for half precision avoids it, e.g. "
            "load(..., vae='sdxl-vae-fp16-fix.safetensors'))",
            PrecisionWarning,
            stacklevel=3,
        )
        vae.overflowed_in_half = True
        with _in_float32(vae):
            for i in bad:
                out[i:i + 1] = fn(x[i:i + 1].float()).float()
    return out


@contextmanager
def _in_float32(vae: AutoencoderKL):
    """The VAE's weights in float32 for the block, then back in their dtype (float16/bfloat16 -> float32 ->
    back is exact). Converted for each use rather than kept, so the VAE keeps its dtype and memory between uses."""
    dtype = _param(vae).dtype
    vae.float()
    try:
        yield
    finally:
        vae.to(dtype)


def decode_latents(vae: AutoencoderKL, latents: Tensor, *, tiled: bool = False) -> Tensor:
    """Diffusion latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in about [-1, 1], float32."""
    z = vae.unscale_latents(latents.float())
    return _run_vae(vae, vae.decode_tiled if tiled else vae.decode, z, "decoded")


def encode_image(vae: AutoencoderKL, image: Tensor, generators: Sequence[torch.Generator], *, tiled: bool = False) -> Tensor:
    """One image (1, 3, H, W) in [-1, 1] -> scaled latents (len(generators), 4, H/8, W/8), float32.

    Latent i is a sample of the VAE's Gaussian drawn with generator i (float32 on the CPU), so it
    does not depend on the device or on the other images.
    """
    vae_device = execution_device(vae)
    image = image.to(vae_device)

    def moments(x: Tensor) -> Tensor:
        one = lambda t: torch.cat(vae.encode_moments(t), 1)  # noqa: E731
        if not tiled:
            return one(x)
        f = vae.config.downscale_factor
        return run_tiled(one, x, tile=1024 // f, overlap=128 // f, in_scale=f, out_scale=1)

    mean, logvar = _run_vae(vae, moments, image, "encoded").chunk(2, dim=1)
    std = torch.exp(0.5 * logvar)
    out = []
    for g in generators:
        noise = torch.randn(mean.shape, generator=g, dtype=torch.float32).to(mean.device)
        out.append(mean + std * noise)
    return vae.scale_latents(torch.cat(out))


# ---------------------------------------------------------------------------------------------
# The pipeline.


@dataclass
class _Conditioning:
    context: Tensor  # (B or 2B, 77, C): negative rows first when guided
    y: Tensor  # (B or 2B, adm)
    guided: bool


@dataclass
class _Inpaint:
    mask: Tensor  # (B, 1, h, w) latent-size mask, 1 = repaint
    image_latents: Tensor | None  # (B, 4, h, w) scaled latents of the init image (4-channel blend)
    masked_latents: Tensor | None  # (B, 4, h, w) scaled latents of the masked image (9-channel U-Nets)
    noise: Tensor  # (B, 4, h, w) the initial noise, re-used to noise the init latents at each step


class Pipeline:
    """An SDXL model (and optionally a refiner) ready to generate. Build it with `sdxl.load`."""

    cache_size = 16  # text conditionings kept for repeated prompts

    def __init__(self, base: Components, refiner: Components | None = None, *, compile: bool | str = False,
                 offload: str | None = None, device: torch.device | str | None = None, fp8: bool = False):
        """compile: torch.compile the U-Nets' forward (True, or a torch.compile mode name), compiled on
        the first image of each size and reused after; see `sdxl.acceleration.compile_unet`.
        offload: "model" or "sequential" keeps the weights in CPU memory and copies a component
        ("model") or one layer at a time ("sequential") to `device` only while it runs; see
        `sdxl.acceleration.Offload`. device: where offloaded components run (default: where the
        U-Net's weights are now); without offload every component runs where its weights are.
        fp8: keep the U-Nets' linear-layer weights in float8 (`sdxl.acceleration.store_fp8`): about
        half a float16 U-Net's memory, images close to (not equal to) the plain ones.
        """
        for name, parts in (("model", base), ("refiner", refiner)):
            if parts is not None and (parts.unet is None or parts.vae is None or parts.text_encoder_2 is None):
                raise ValueError(f"the {name} needs a U-Net, a VAE and the OpenCLIP bigG text encoder")
        check_modes(compile, offload)
        self.base, self.refiner = base, refiner
        self._text_cache: OrderedDict = OrderedDict()
        stages = [p for p in (base, refiner) if p is not None]
        if fp8:  # first: offload pins, and compile traces, the float8 tensors
            for parts in stages:
                store_fp8(parts.unet)
        self.offload: Offload | None = None
        if offload is not None:
            components = [m for p in stages for m in (p.text_encoder, p.text_encoder_2, p.unet, p.vae) if m is not None]
            self.offload = Offload(offload, device or execution_device(base.unet), components)
        if compile:
            for parts in stages:
                compile_unet(parts.unet, mode=None if compile is True else compile)

    @property
    def device(self) -> torch.device:
        """Where the models run (with offload: where they are copied to while they run)."""
        return execution_device(self.base.unet)

    @property
    def dtype(self) -> torch.dtype:
        return _param(self.base.unet).dtype

    # -- public API

    def generate(self, prompt: str | None = None, *, callback=None, cancel=None,
                 options: GenerationOptions | None = None, **overrides):
        """Generate images. Keyword arguments are the fields of `GenerationOptions` (or pass `options`).

        callback(step, total, latents): after every step, step = 1 .. total (base and refiner steps
        counted together). cancel(): asked
        before the first step and between steps; True stops the run with `sdxl.pipeline.Cancelled`.
        Returns a list of PIL images, a float32 array (B, H, W, 3) in [0, 1] for output="np", or the
        final latents (B, 4, H/8, W/8) for output="latent".
        Inpainting (mask or outpaint) runs the main model only, without the refiner.
        """
        if prompt is not None:
            overrides["prompt"] = prompt
        options = options.replace(**overrides) if options else GenerationOptions(**overrides)
        return self.run(options, callback=callback, cancel=cancel)

    def refine(self, image, prompt: str = "", *, strength: float = 0.3, callback=None, cancel=None, **overrides):
        """The refiner as plain image-to-image on a finished image."""
        model = self.refiner or (self.base if self.base.kind == "refiner" else None)
        if model is None:
            raise ValueError("no refiner loaded: pass refiner=... to sdxl.load")
        options = GenerationOptions(prompt=prompt, init_image=image, strength=strength, **overrides)
        return self.run(options, callback=callback, cancel=cancel, model=model, refiner=None)

    def recommended_cfg(self, model: Components | None = None) -> float:
        """The guidance scale used when none is given: the model file's recommendation, else 5."""
        return float((model or self.base).recommended.get("cfg", DEFAULT_CFG))

    def run(self, o: GenerationOptions, *, callback=None, cancel=None, model: Components | None = None,
            refiner: Components | None | bool = True):
        """The one generation loop behind `generate` and `refine`."""
        try:
            return self._run(o, callback=callback, cancel=cancel, model=model, refiner=refiner)
        finally:
            if self.offload is not None:
                self.offload.unload()  # model offload: nothing stays on the device between calls

    @torch.no_grad()
    def _run(self, o: GenerationOptions, *, callback, cancel, model: Components | None, refiner):
        model = model or self.base
        refiner = self.refiner if refiner is True else refiner
        if o.cfg is None:
            o = o.replace(cfg=self.recommended_cfg(model))
        gens = [torch.Generator().manual_seed(o.seed + i) for i in range(o.batch)]

        # Images in.
        init = mask = None
        if o.init_image is not None:
            image, mask_image = o.init_image, o.mask
            if o.outpaint is not None:
                image, mask_image = imaging.outpaint_canvas(image, o.outpaint, fill=o.outpaint_fill)
            w0, h0 = imaging.image_size(image)
            width, height = o.width or w0 // 8 * 8, o.height or h0 // 8 * 8
            init = imaging.to_tensor(image, width, height)
            if mask_image is not None:
                mask = imaging.prepare_mask(mask_image, width, height, o.mask_blur)
        else:
            native = model.unet.config.sample_size * 8  # the size the model was trained at: 1024 for SDXL
            width, height = o.width or native, o.height or native
        if model.unet.config.sample_size == 128 and (width, height) not in SDXL_RESOLUTIONS:
            warnings.warn(
                f"{width}x{height} is not one of SDXL's trained ~1-megapixel resolutions (e.g. 1024x1024, 1152x896, "
                "1216x832, 1344x768, 1536x640); results may be worse", ResolutionWarning, stacklevel=4,
            )
        use_refiner = refiner is not None and o.refiner_switch is not None and mask is None
        if mask is not None and model.unet.config.in_channels not in (4, 9):
            raise ValueError(f"inpainting needs a U-Net with 4 or 9 input channels, not {model.unet.config.in_channels}")
        if mask is None and model.unet.config.in_channels != 4:
            raise ValueError(f"this U-Net takes {model.unet.config.in_channels} input channels (an inpainting model): "
                             "give an init_image and a mask (or outpaint padding)")

        # Plans: the base runs to refiner_switch, the refiner from there.
        strength = o.strength if init is not None else 1.0
        plan = sampling.make_plan(
            sampling.TrainingSchedule.from_diffusers(model.scheduler), o.sampler, o.schedule, o.steps,
            strength=strength, denoising_end=o.refiner_switch if use_refiner else None,
        )
        plans = [(model, plan)]
        if use_refiner:
            plans.append((refiner, sampling.make_plan(
                sampling.TrainingSchedule.from_diffusers(refiner.scheduler), o.sampler, o.schedule, o.steps,
                denoising_start=o.refiner_switch,
            )))
        progress = _Progress(callback, sum(p.steps for _, p in plans))

        # Starting latents, consuming each image's generator in diffusers' order.
        device = execution_device(model.unet)
        shape = (1, 4, height // 8, width // 8)
        inpaint = None
        if init is None:
            noise = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens]).to(device)
            x = noise * plan.init_noise_sigma
        elif mask is None:
            latents = encode_image(model.vae, init, gens, tiled=o.vae_tiling).to(device)
            noise = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens]).to(device)
            x = sampling.add_noise(latents, noise, plan)
        else:
            inpaint, x = self._inpaint_start(model, o, init, mask, gens, plan, shape, strength, device)

        # Sampling, stage by stage.
        for parts, stage_plan in plans:
            cond = self._conditioning(parts, o, width, height)
            x = self._denoise(parts, o, cond, stage_plan, x, gens, inpaint, progress, cancel)

        if o.output == "latent":
            return x
        decoder = plans[-1][0].vae
        images = decode_latents(decoder, x.to(execution_device(decoder)), tiled=o.vae_tiling)
        if o.output == "np":
            return imaging.to_unit(images).numpy()
        return imaging.to_pil(images)

    # -- steps of `run`

    def _inpaint_start(self, model, o, init, mask, gens, plan, shape, strength, device):
        nine = model.unet.config.in_channels == 9
        full = strength == 1.0
        image_latents = None
        if not nine or not full:  # diffusers encodes the image only when it needs it
            image_latents = encode_image(model.vae, init, gens, tiled=o.vae_tiling).to(device)
        noise = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens]).to(device)
        if nine:
            masked = init * (mask < 0.5)
            masked_latents = encode_image(model.vae, masked, gens, tiled=o.vae_tiling).to(device)
        else:
            masked_latents = None
            for g in gens:  # diffusers encodes the masked image here even for 4-channel U-Nets
                torch.randn(shape, generator=g, dtype=torch.float32)
        x = noise * plan.init_noise_sigma if full else sampling.add_noise(image_latents, noise, plan)
        latent_mask = torch.nn.functional.interpolate(mask, size=shape[-2:]).to(device)  # nearest, as diffusers
        latent_mask = latent_mask.expand(len(gens), -1, -1, -1)
        return _Inpaint(latent_mask, image_latents, masked_latents, noise), x

    def _conditioning(self, parts: Components, o: GenerationOptions, width: int, height: int) -> _Conditioning:
        guided = o.cfg > 1.0
        hidden_layer = -2 - (o.clip_skip or 0)
        context, pooled = self._encode_text(parts, o.prompt, o.prompt_2 or o.prompt, hidden_layer)
        unet = parts.unet
        d = unet.config.addition_time_embed_dim
        n_values = (unet.config.adm_in_channels - pooled.shape[-1]) // d
        if n_values * d + pooled.shape[-1] != unet.config.adm_in_channels or n_values not in (5, 6):
            raise ValueError(f"U-Net label input of width {unet.config.adm_in_channels} does not fit pooled text of "
                             f"width {pooled.shape[-1]} plus 5 or 6 micro-conditioning values of width {d}")
        original = o.original_size or (height, width)
        target = o.target_size or (height, width)
        if n_values == 6:
            values = [*original, *o.crop_top_left, *target]
        else:
            values = [*original, *o.crop_top_left, o.aesthetic_score]
        y = micro_conditioning(pooled, values, dim=d)
        b = o.batch
        context, y = context.expand(b, -1, -1), y.expand(b, -1)
        if not guided:
            return _Conditioning(context, y, False)

        neg_2 = o.negative_prompt_2 or o.negative_prompt
        if parts.force_zeros_for_empty_prompt and not o.negative_prompt and not neg_2:
            neg_context, neg_pooled = torch.zeros_like(context[:1]), torch.zeros_like(pooled)
        else:
            neg_context, neg_pooled = self._encode_text(parts, o.negative_prompt, neg_2, hidden_layer)
        neg_original = o.negative_original_size or original
        neg_crop = o.negative_crop_top_left or o.crop_top_left
        neg_target = o.negative_target_size or target
        if n_values == 6:
            neg_values = [*neg_original, *neg_crop, *neg_target]
        else:
            neg_values = [*neg_original, *neg_crop, o.negative_aesthetic_score]
        neg_y = micro_conditioning(neg_pooled, neg_values, dim=d)
        context = torch.cat([neg_context.expand(b, -1, -1), context])
        y = torch.cat([neg_y.expand(b, -1), y])
        return _Conditioning(context, y, True)

    def _encode_text(self, parts: Components, prompt: str, prompt_2: str, hidden_layer: int) -> tuple[Tensor, Tensor]:
        """(context (1, 77, C), pooled (1, P)) of one prompt pair; recent pairs are cached."""
        key = (id(parts), id(parts.text_encoder), id(parts.text_encoder_2), prompt, prompt_2, hidden_layer)
        if key in self._text_cache:
            self._text_cache.move_to_end(key)
            return self._text_cache[key]
        result = encode_prompts(parts.text_encoder, parts.text_encoder_2, [prompt], [prompt_2],
                                hidden_layer=hidden_layer, device=execution_device(parts.unet))
        self._text_cache[key] = result
        while len(self._text_cache) > self.cache_size:
            self._text_cache.popitem(last=False)
        return result

    def _denoise(self, parts, o, cond, plan, x, gens, inpaint, progress, cancel) -> Tensor:
        unet = parts.unet
        dtype = _param(unet).dtype
        extra = None
        if inpaint is not None and unet.config.in_channels == 9:
            extra = torch.cat([inpaint.mask, inpaint.masked_latents], dim=1)
            extra = torch.cat([extra, extra]) if cond.guided else extra
            extra = extra.to(dtype)
        cfg, rescale = o.cfg, o.guidance_rescale

        def model_fn(x_in: Tensor, t: Tensor) -> Tensor:
            h = x_in.to(dtype)
            if cond.guided:
                h = torch.cat([h, h])
            if extra is not None:
                h = torch.cat([h, extra], dim=1)
            out = unet(h, t, cond.context, cond.y)
            if cond.guided:
                uncond, text = out.chunk(2)
                out = uncond + cfg * (text - uncond)
                if rescale > 0:
                    out = rescale_guidance(out, text, rescale)
            return out.float()

        denoiser = sampling.Denoiser(model_fn, sampling.TrainingSchedule.from_diffusers(parts.scheduler), plan)
        blend = inpaint is not None and unet.config.in_channels == 4
        sigmas = plan.sigmas.tolist()  # Python floats: no device reads in the loop
        due: list[int | None] = [None]  # the step whose start still needs the inpainting blend

        def on_step(step: int, steps: int, latents: Tensor) -> None:
            if blend:
                due[0] = step + 1
            progress.step(latents)

        def denoise(x: Tensor, sigma) -> Tensor:
            # Inpainting with a 4-channel U-Net, as diffusers: after each step the kept region is replaced
            # by the init latents noised to the next noise level. The samplers hand the denoiser the very
            # tensor they continue from (in VE scale), so the blend is applied to it in place at the start
            # of the next step; the blend after the last step (clean init latents) is applied below.
            if due[0] is not None:
                kept = inpaint.image_latents + sigmas[due[0]] * inpaint.noise
                x.copy_(torch.lerp(kept, x, inpaint.mask))
                due[0] = None
            return denoiser(x, sigma)

        x = sampling.sample(plan, denoise if blend else denoiser, x, generator=gens, callback=on_step, cancel=cancel)
        if blend:
            x = torch.lerp(inpaint.image_latents, x, inpaint.mask)
        return x


class _Progress:
    """Counts steps over all stages for the user's callback."""

    def __init__(self, callback, total: int):
        self.callback, self.total, self.done = callback, total, 0

    def step(self, latents: Tensor) -> None:
        self.done += 1
        if self.callback is not None:
            self.callback(self.done, self.total, latents)


# ---------------------------------------------------------------------------------------------
# Loading.


def resolve_path(name: str | Path, *, allow_download: bool = False) -> Path:
    """A local file or folder, a built-in model name ("builtin", "builtin-refiner"), or a Hugging Face Hub repo
    id found in the local cache.

    The Hub is only asked (and the repo downloaded into the cache) with allow_download=True.
    """
    path = Path(name).expanduser()
    if path.exists():
        return path
    packaged = builtin.path(str(name))
    if packaged is not None:
        if not packaged.is_file():
            raise FileNotFoundError(f"{name}: the built-in model's file {packaged} is missing from this installation")
        return packaged
    text = str(name)
    if text.count("/") != 1 or text.startswith((".", "/", "~")) or text.endswith((".safetensors", ".ckpt")):
        raise FileNotFoundError(f"{text}: no such file or folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(
            f"{text!r} is not a local path; to use a Hugging Face Hub repo id install huggingface_hub "
            "(pip install 'sdxl[hub]') and download the repo first"
        ) from None
    try:
        return Path(snapshot_download(text, local_files_only=not allow_download))
    except Exception as e:  # LocalEntryNotFoundError, RepositoryNotFoundError, HFValidationError, ...
        if allow_download:
            raise FileNotFoundError(f"{text}: could not download this Hub repo ({type(e).__name__}: {e})") from None
        raise FileNotFoundError(
            f"{text}: not a local path, and the Hub repo is not in the local Hugging Face cache "
            f"({type(e).__name__}); download it first, e.g. `huggingface-cli download {text}`"
        ) from None


def _load_vae(path: str | Path, dtype, device) -> AutoencoderKL:
    from .checkpoints.load import load_vae_diffusers, load_vae_file

    path = resolve_path(path)
    if path.is_dir():
        return load_vae_diffusers(path / "vae" if (path / "vae" / "config.json").is_file() else path, dtype=dtype, device=device)
    return load_vae_file(path, dtype=dtype, device=device)


def load(model: str | Path, refiner: str | Path | None = None, *, device=None, dtype=None, vae: str | Path | None = None,
         variant: str | None = None, compile: bool | str = False, offload: str | None = None, fp8: bool = False,
         progress: Callable[[str], None] | None = None) -> Pipeline:
    """Load a model (and a refiner) into a `Pipeline`.

    model / refiner: an official-layout single file, a diffusers folder, or a Hub repo id already in
    the local cache. device / dtype: torch objects or strings ("cuda", "fp16", ...; default CPU and
    float32). vae: a VAE file (or diffusers VAE folder) used instead of the models' own, e.g. a VAE
    fixed for float16. compile / offload / fp8: see `Pipeline`; with offload the weights are loaded into
    CPU memory and run on `device`. progress(name) is called as each model is loaded ("unet", "vae", ...).
    """
    from .checkpoints.load import load as load_components

    check_modes(compile, offload)  # before the slow part
    device = torch.device(device) if device is not None else None
    run_on, device = (device, None) if offload is not None else (None, device)  # offload: weights stay in CPU memory
    base = load_components(resolve_path(model), dtype=dtype, device=device, variant=variant, progress=progress)
    second = (load_components(resolve_path(refiner), dtype=dtype, device=device, variant=variant,
                              progress=progress and (lambda name: progress(f"refiner {name}"))) if refiner else None)
    if vae is not None:
        replacement = _load_vae(vae, dtype, device)
        if progress is not None:
            progress("vae (replacement)")
        base.vae = replacement
        if second is not None:
            second.vae = replacement
    return Pipeline(base, second, compile=compile, offload=offload, device=run_on, fp8=fp8)
