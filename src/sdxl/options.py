"""What one generation call can set (`GenerationOptions`), its validation, and SDXL's trained sizes.

The pipeline, the command line, the server and training all read the same definitions from here:
the options dataclass (validated on construction, with one-line ValueErrors naming what is
allowed), the one table of SDXL's multi-aspect buckets, and the warning for sizes outside them.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import images as imaging
from . import sampling

__all__ = [
    "DEFAULT_CFG",
    "MAX_PIXELS",
    "OUTPUTS",
    "SDXL_BUCKETS",
    "SDXL_RESOLUTIONS",
    "SEEDS",
    "GenerationOptions",
    "OptionError",
    "ResolutionWarning",
    "check_clip_skip",
    "check_pixels",
    "planned_size",
    "warn_if_untrained_size",
]

Size = tuple[int, int]

# SDXL's multi-aspect buckets, as (height, width) exactly as printed in the SDXL paper, appendix I
# ("Multi-Aspect Training"; the same 40 entries as kohya-ss/sd-scripts' and PixArt's 1024 lists). Every side is a
# multiple of 64 and every area is within 10 % of 1024^2. The table is not symmetric: it has
# 704 x 1344 (h x w) but not 1344 x 704.
_SDXL_PAPER_HW: tuple[Size, ...] = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856),
    (576, 1792), (576, 1728), (576, 1664),
    (640, 1600), (640, 1536),
    (704, 1472), (704, 1408), (704, 1344),
    (768, 1344), (768, 1280),
    (832, 1216), (832, 1152),
    (896, 1152), (896, 1088),
    (960, 1088), (960, 1024),
    (1024, 1024),
    (1024, 960),
    (1088, 960), (1088, 896),
    (1152, 896), (1152, 832),
    (1216, 832), (1280, 768),
    (1344, 768), (1408, 704), (1472, 704),
    (1536, 640), (1600, 640),
    (1664, 576), (1728, 576), (1792, 576),
    (1856, 512), (1920, 512), (1984, 512), (2048, 512),
)  # fmt: skip

SDXL_BUCKETS: tuple[Size, ...] = tuple((w, h) for h, w in _SDXL_PAPER_HW)
"""SDXL's ~1-megapixel training buckets as (width, height), from 2048x512 to 512x2048 (SDXL paper, appendix I)."""

# Sizes (width, height) generated without a warning: the buckets and their transposes (a portrait of a trained
# landscape bucket is as good as the bucket; the paper's table lacks only 704x1344's twin).
SDXL_RESOLUTIONS: frozenset[Size] = frozenset(SDXL_BUCKETS) | {(h, w) for w, h in SDXL_BUCKETS}

OUTPUTS = ("pil", "np", "latent")
# What inpainting puts under the mask before sampling (AUTOMATIC1111's "masked content" 0-3: fill, original,
# latent noise, latent nothing)
INPAINT_FILLS = ("fill", "original", "noise", "zeros")
# Latent upscalers of the hires fix: AUTOMATIC1111's "Latent (...)" modes -> (torch interpolate mode, antialias)
LATENT_UPSCALERS = {"Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True),
                    "Latent (bicubic)": ("bicubic", False), "Latent (bicubic antialiased)": ("bicubic", True),
                    "Latent (nearest)": ("nearest", False), "Latent (nearest-exact)": ("nearest-exact", False)}
EMPHASIS = ("original", "no_norm", "comfy", "none")  # sdxl.conditioning's weightings of (word:1.2)
DEFAULT_CFG = 5.0  # the guidance scale for models that recommend none (SDXL's usual 5-7)
MAX_CFG = 100.0  # ComfyUI's bound (A1111's slider stops at 30): beyond it the guided prediction only overflows
MAX_STEPS = 10_000  # ComfyUI's bound: a schedule is an array of steps + 1 numbers
SEEDS = 2**32  # seeds are 0 <= seed < 2**32, AUTOMATIC1111's range (image i of a batch uses seed + i)
# The most pixels one call makes (width x height x batch) unless the caller allows more: 16 times SDXL's 1024x1024,
# e.g. one 4096x4096 image or a batch of 16 at 1024x1024; the VAE alone needs about 1 GB per megapixel in float16.
MAX_PIXELS = 4096 * 4096
SDXL_LATENT_SIZE = 128  # sample_size of a full-size SDXL U-Net (1024 pixels): the one the bucket table is for


class ResolutionWarning(UserWarning):
    """A size outside SDXL's trained ~1-megapixel buckets: allowed, but quality usually suffers."""


def warn_if_untrained_size(width: int, height: int, sample_size: int, *, stacklevel: int = 2) -> None:
    """A ResolutionWarning when a full-size SDXL model is asked for a size it was not trained at."""
    if sample_size == SDXL_LATENT_SIZE and (width, height) not in SDXL_RESOLUTIONS:
        warnings.warn(
            f"{width}x{height} is not one of SDXL's trained ~1-megapixel resolutions (e.g. 1024x1024, 1152x896, "
            "1216x832, 1344x768, 1536x640); results may be worse", ResolutionWarning, stacklevel=stacklevel + 1,
        )


class OptionError(ValueError):
    """A GenerationOptions field with a value it does not allow; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _pair(name: str, value, *, allow_none: bool = True) -> Size | None:
    if value is None and allow_none:
        return None
    try:
        a, b = value
        ok = all(_is_number(v) and math.isfinite(v) and int(v) == v for v in (a, b))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise OptionError(name, f"{name} must be a pair of integers, got {value!r}")
    return int(a), int(b)


def _lora(entry) -> tuple[str, float, float]:
    """A LoRA entry as (name or path, U-Net weight, text-encoder weight)."""
    form = "(name or path, weight) or (name or path, U-Net weight, text-encoder weight)"
    if isinstance(entry, (str, bytes)) or not isinstance(entry, (tuple, list)) or len(entry) not in (2, 3):
        raise OptionError("loras", f"loras entries must be {form}, got {entry!r}")
    name, *weights = entry
    if not isinstance(name, str) or not name:
        raise OptionError("loras", f"loras entries must be {form}, got {entry!r}")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise OptionError("loras", f"LoRA {name!r}: weights must be finite numbers, got {weights!r}")
    return name, float(weights[0]), float(weights[-1])


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(name: str, value, low: float, high: float = math.inf, *, what: str = "") -> None:
    """value must be a finite number in [low, high] (OptionError naming `name` otherwise)."""
    if not (_is_number(value) and math.isfinite(value) and low <= value <= high):
        bounds = [f">= {low:g}"] if low > -math.inf else []
        bounds += [f"<= {high:g}"] if high < math.inf else []
        text = f" {' and '.join(bounds)}" if bounds else ""
        raise OptionError(name, f"{name} must be a finite number{text}{what}, got {value!r}")


@dataclass
class HiresFix:
    """A second pass at a larger size (AUTOMATIC1111's hires fix): the first pass's latents are upscaled
    (`upscaler`, one of LATENT_UPSCALERS) to width x height and denoised again from `strength` of the schedule
    with `steps` steps (None: the first pass's)."""

    width: int
    height: int
    strength: float = 0.7
    steps: int | None = None
    upscaler: str = "Latent"

    def __post_init__(self) -> None:
        for name in ("width", "height"):
            v = getattr(self, name)
            if not _is_int(v) or v <= 0 or v % 8:
                raise OptionError("hires", f"the hires fix's {name} must be a positive multiple of 8, got {v!r}")
        if not (_is_number(self.strength) and 0.0 < self.strength <= 1.0):
            raise OptionError("hires", f"the hires fix's denoising strength must be in (0, 1], got {self.strength!r}")
        if self.steps is not None and (not _is_int(self.steps) or not 1 <= self.steps <= MAX_STEPS):
            raise OptionError("hires", f"the hires fix's steps must be 1..{MAX_STEPS} or None, got {self.steps!r}")
        if self.upscaler not in LATENT_UPSCALERS:
            raise OptionError("hires", f"unknown hires upscaler {self.upscaler!r}; choose one of "
                                       f"{', '.join(LATENT_UPSCALERS)}")


@dataclasses.dataclass
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
    # how (word:1.2) weights apply: "original" (AUTOMATIC1111's default: scale, keep each chunk's mean), "no_norm",
    # "comfy" (ComfyUI's: from the empty prompt's encoding towards the word's), "none" (the text taken literally)
    emphasis: str = "original"
    # LoRA / LyCORIS files merged into the model for this call: (name or path, weight) or (name or path, U-Net
    # weight, text-encoder weight). Names are looked up in the pipeline's LoRA folders (by file stem or the file's
    # ss_output_name). Prompts add their own with <lora:NAME:WEIGHT>, by name only.
    loras: tuple = ()
    inpaint_fill: str = "original"  # one of INPAINT_FILLS: what the masked region starts from
    # img2img from latents instead of an image: (1 or batch, 4, height / 8, width / 8), in the U-Net's latent space
    # (the VAE's latents times its scaling factor), e.g. another call's output="latent"
    init_latents: Any = None
    hires: HiresFix | None = None  # a second pass at a larger size (txt2img and img2img, not inpainting)
    output: str = "pil"  # "pil" (list of images), "np" (float32 (B, H, W, 3) in [0, 1]), "latent"
    vae_tiling: bool = False  # encode / decode large images in tiles
    # img2img: encode init_image at its own size (rounded down to multiples of 8) and resize its latents to width x
    # height (bilinear), instead of resizing the image: AUTOMATIC1111's resize mode "Just resize (latent upscale)"
    resize_latents: bool = False

    def __post_init__(self) -> None:
        self._check_text()
        self._check_numbers()
        self._check_names()
        for name in ("original_size", "target_size", "negative_original_size", "negative_target_size",
                     "negative_crop_top_left"):
            setattr(self, name, _pair(name, getattr(self, name)))
        self.crop_top_left = _pair("crop_top_left", self.crop_top_left, allow_none=False)
        self.loras = tuple(_lora(entry) for entry in self.loras)
        self._check_images()

    def _check_text(self) -> None:
        for name in ("prompt", "negative_prompt", "prompt_2", "negative_prompt_2"):
            value = getattr(self, name)
            if value is None and name.endswith("_2"):
                continue
            if not isinstance(value, str):
                kind = "a string" if not name.endswith("_2") else "a string or None"
                raise OptionError(name, f"{name} must be {kind}, got {type(value).__name__}")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:  # lone surrogates: bytes that were not UTF-8 (e.g. on a command line)
                raise OptionError(name, f"{name} is not valid UTF-8 text (an undecodable byte at character "
                                        f"{e.start})") from None

    def _check_numbers(self) -> None:
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v <= 0 or v % 8):
                raise OptionError(name, f"{name} must be a positive multiple of 8 (pixels), got {v!r}")
        if not _is_int(self.steps) or not 1 <= self.steps <= MAX_STEPS:
            raise OptionError("steps", f"steps must be an integer >= 1 and <= {MAX_STEPS}, got {self.steps!r}")
        if not _is_int(self.batch) or self.batch < 1:
            raise OptionError("batch", f"batch must be an integer >= 1 (images per call), got {self.batch!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < SEEDS:
            raise OptionError("seed", f"seed must be an integer in 0..{SEEDS - 1} (AUTOMATIC1111's range), "
                                      f"got {self.seed!r}")
        if self.seed + self.batch > SEEDS:
            raise OptionError("seed", f"seed + batch - 1 must be at most {SEEDS - 1} (image i of a batch uses "
                                      f"seed + i), got seed {self.seed} with batch {self.batch}")
        if self.cfg is not None:
            _finite("cfg", self.cfg, 0.0, MAX_CFG)
        if not (_is_number(self.guidance_rescale) and 0.0 <= self.guidance_rescale <= 1.0):
            raise OptionError("guidance_rescale", f"guidance_rescale must be in [0, 1], got {self.guidance_rescale!r}")
        if not (_is_number(self.strength) and 0.0 < self.strength <= 1.0):
            raise OptionError("strength", f"strength must be in (0, 1] (1 = start from pure noise), "
                                          f"got {self.strength!r}")
        if self.refiner_switch is not None and not (_is_number(self.refiner_switch) and 0.0 < self.refiner_switch < 1.0):
            raise OptionError("refiner_switch", f"refiner_switch must be in (0, 1) or None (no refiner), "
                                                f"got {self.refiner_switch!r}")
        if self.clip_skip is not None and (not _is_int(self.clip_skip) or self.clip_skip < 0):
            raise OptionError("clip_skip", f"clip_skip must be None or an integer >= 0, got {self.clip_skip!r}")
        _finite("mask_blur", self.mask_blur, 0.0, what=" pixels")
        _finite("aesthetic_score", self.aesthetic_score, -math.inf)
        _finite("negative_aesthetic_score", self.negative_aesthetic_score, -math.inf)

    def _check_names(self) -> None:
        if self.sampler not in sampling.SAMPLERS:
            raise OptionError("sampler", f"unknown sampler {self.sampler!r}; choose one of {', '.join(sampling.SAMPLERS)}")
        if self.schedule not in sampling.SCHEDULES:
            raise OptionError("schedule", f"unknown schedule {self.schedule!r}; choose one of {', '.join(sampling.SCHEDULES)}")
        if self.emphasis not in EMPHASIS:
            raise OptionError("emphasis", f"unknown emphasis {self.emphasis!r}; choose one of {', '.join(EMPHASIS)}")
        if self.inpaint_fill not in INPAINT_FILLS:
            raise OptionError("inpaint_fill", f"unknown inpaint_fill {self.inpaint_fill!r}; choose one of "
                                              f"{', '.join(INPAINT_FILLS)}")
        if self.hires is not None and not isinstance(self.hires, HiresFix):
            raise OptionError("hires", f"hires must be a HiresFix or None, got {type(self.hires).__name__}")
        if self.output not in OUTPUTS:
            raise OptionError("output", f"output must be one of {', '.join(OUTPUTS)}, got {self.output!r}")

    def _check_images(self) -> None:
        if self.mask is not None and self.init_image is None:
            raise OptionError("mask", "a mask needs an init_image (the image to inpaint)")
        if self.outpaint is not None:
            if self.init_image is None:
                raise OptionError("outpaint", "outpaint needs an init_image (the image to extend)")
            if self.mask is not None:
                raise OptionError("outpaint", "give either a mask or outpaint padding, not both (outpainting makes its own mask)")
            if len(self.outpaint) != 4 or any(not isinstance(p, int) or p < 0 for p in self.outpaint):
                raise OptionError("outpaint", f"outpaint must be 4 non-negative integers (left, top, right, bottom), got {self.outpaint!r}")
        if self.init_latents is not None:
            self._check_latents()
        if self.resize_latents and (self.init_image is None or self.mask is not None or self.outpaint is not None):
            raise OptionError("resize_latents", "resize_latents resizes an img2img init_image's latents: it needs an "
                                                "init_image and no mask or outpaint")
        if self.init_image is not None:
            w, h = imaging.image_size(self.init_image)
            if w < 8 or h < 8:
                raise OptionError("init_image", f"init_image must be at least 8x8 pixels, got {w}x{h}")
            if self.mask is not None and imaging.image_size(self.mask) != (w, h):
                mw, mh = imaging.image_size(self.mask)
                raise OptionError("mask", f"mask ({mw}x{mh}) and init_image ({w}x{h}) must have the same size")

    def _check_latents(self) -> None:
        x = self.init_latents
        if self.init_image is not None:
            raise OptionError("init_latents", "give either init_latents or an init_image, not both")
        shape = tuple(getattr(x, "shape", ()))
        if len(shape) != 4 or shape[0] not in (1, self.batch) or shape[1] != 4:
            raise OptionError("init_latents", f"init_latents must be a tensor (1 or batch, 4, height / 8, width / 8), "
                                              f"got shape {shape}")
        for name, size in (("width", shape[3] * 8), ("height", shape[2] * 8)):
            if getattr(self, name) not in (None, size):
                raise OptionError(name, f"{name} {getattr(self, name)} differs from init_latents' {size}")

    def replace(self, **changes) -> GenerationOptions:
        return dataclasses.replace(self, **changes)


# -- checks that need more than the options: the memory a call may use, the model's text encoders


def planned_size(o: GenerationOptions, native: int | None = None) -> Size | None:
    """(width, height) of the images a call makes, as the pipeline chooses it: width / height, else the init
    image's size (after outpaint padding) rounded down to a multiple of 8, else `native` (the model's size).
    None when that depends on a model not given (`native` None)."""
    if o.init_image is not None:
        w, h = _canvas(o)
        return o.width or w // 8 * 8, o.height or h // 8 * 8
    if o.init_latents is not None:
        return o.init_latents.shape[3] * 8, o.init_latents.shape[2] * 8
    if native is None and (o.width is None or o.height is None):
        return None
    return o.width or native, o.height or native


def _canvas(o: GenerationOptions) -> Size:
    """(width, height) of the init image, padded by `outpaint` (each side rounded up to a multiple of 8)."""
    w, h = imaging.image_size(o.init_image)
    if o.outpaint is not None:
        left, top, right, bottom = o.outpaint
        w, h = -(-(w + left + right) // 8) * 8, -(-(h + top + bottom) // 8) * 8
    return w, h


def check_pixels(o: GenerationOptions, max_pixels: int = MAX_PIXELS, *, native: int | None = None,
                 override: str = "max_pixels") -> None:
    """OptionError when a call would make more than `max_pixels` pixels (width x height x batch; an outpaint
    canvas counts too), before anything is allocated. Sides still unknown (no `native` yet) count as 8 pixels,
    so absurd sizes are refused before the model loads; `override` names the setting that raises the bound."""
    size = planned_size(o, native)
    w, h = size if size is not None else (o.width or 8, o.height or 8)
    sizes = [(f"{w}x{h}" + (f" x batch {o.batch}" if o.batch > 1 else ""), w * h * o.batch)]
    if o.init_image is not None and o.outpaint is not None:
        cw, ch = _canvas(o)
        sizes.append((f"the outpainting canvas of {cw}x{ch}", cw * ch))
    if o.hires is not None:
        sizes.append((f"the hires fix's {o.hires.width}x{o.hires.height} x batch {o.batch}",
                      o.hires.width * o.hires.height * o.batch))
    for what, pixels in sizes:
        if pixels > max_pixels:
            raise OptionError("width", f"{what} = {pixels:,} pixels is more than the {max_pixels:,} one call may "
                                       f"make ({override} N allows more, where memory does: the VAE alone needs "
                                       "about 1 GB per megapixel in float16)")


def check_clip_skip(clip_skip: int | None, layers: Sequence[int]) -> None:
    """clip_skip must leave SDXL's layer in every text encoder: 0 .. (the fewest layers) - 2."""
    if clip_skip and layers and clip_skip > min(layers) - 2:
        raise OptionError("clip_skip", f"clip_skip {clip_skip} is out of range for this model: its text encoders "
                                       f"have {' and '.join(map(str, layers))} layers, so clip_skip is "
                                       f"0..{min(layers) - 2}")
