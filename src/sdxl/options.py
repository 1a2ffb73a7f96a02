"""What one generation call can set (`GenerationOptions`), its validation, and SDXL's trained sizes.

The pipeline, the command line, the server and training all read the same definitions from here:
the options dataclass (validated on construction, with one-line ValueErrors naming what is
allowed), the one table of SDXL's multi-aspect buckets, and the warning for sizes outside them.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any

from . import images as imaging
from . import sampling

__all__ = ["DEFAULT_CFG", "GenerationOptions", "OUTPUTS", "ResolutionWarning", "SDXL_BUCKETS", "SDXL_RESOLUTIONS",
           "warn_if_untrained_size"]

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
EMPHASIS = ("original", "no_norm", "comfy", "none")  # sdxl.conditioning's weightings of (word:1.2)
DEFAULT_CFG = 5.0  # the guidance scale for models that recommend none (SDXL's usual 5-7)
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


def _pair(name: str, value, *, allow_none: bool = True) -> Size | None:
    if value is None and allow_none:
        return None
    try:
        a, b = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of integers, got {value!r}") from None
    if int(a) != a or int(b) != b:
        raise ValueError(f"{name} must be a pair of integers, got {value!r}")
    return int(a), int(b)


def _lora(entry) -> tuple[str, float, float]:
    """A LoRA entry as (name or path, U-Net weight, text-encoder weight)."""
    form = "(name or path, weight) or (name or path, U-Net weight, text-encoder weight)"
    if isinstance(entry, (str, bytes)) or not isinstance(entry, (tuple, list)) or len(entry) not in (2, 3):
        raise ValueError(f"loras entries must be {form}, got {entry!r}")
    name, *weights = entry
    if not isinstance(name, str) or not name:
        raise ValueError(f"loras entries must be {form}, got {entry!r}")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise ValueError(f"LoRA {name!r}: weights must be finite numbers, got {weights!r}")
    return name, float(weights[0]), float(weights[-1])


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


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
    # how (word:1.2) weights apply: "original" (AUTOMATIC1111's default: scale, keep each chunk's mean), "no_norm",
    # "comfy" (ComfyUI's: from the empty prompt's encoding towards the word's), "none" (the text taken literally)
    emphasis: str = "original"
    # LoRA / LyCORIS files merged into the model for this call: (name or path, weight) or (name or path, U-Net
    # weight, text-encoder weight). Names are looked up in the pipeline's LoRA folders (by file stem or the file's
    # ss_output_name). Prompts add their own with <lora:NAME:WEIGHT>, by name only.
    loras: tuple = ()
    output: str = "pil"  # "pil" (list of images), "np" (float32 (B, H, W, 3) in [0, 1]), "latent"
    vae_tiling: bool = False  # encode / decode large images in tiles

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
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {type(getattr(self, name)).__name__}")
        for name in ("prompt_2", "negative_prompt_2"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string or None, got {type(getattr(self, name)).__name__}")

    def _check_numbers(self) -> None:
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v <= 0 or v % 8):
                raise ValueError(f"{name} must be a positive multiple of 8 (pixels), got {v!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not _is_int(self.batch) or self.batch < 1:
            raise ValueError(f"batch must be an integer >= 1 (images per call), got {self.batch!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.cfg is not None and (not isinstance(self.cfg, (int, float)) or not math.isfinite(self.cfg) or self.cfg < 0):
            raise ValueError(f"cfg must be a finite number >= 0, got {self.cfg!r}")
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {self.guidance_rescale!r}")
        if not (isinstance(self.strength, (int, float)) and 0.0 < self.strength <= 1.0):
            raise ValueError(f"strength must be in (0, 1] (1 = start from pure noise), got {self.strength!r}")
        if self.refiner_switch is not None and not 0.0 < self.refiner_switch < 1.0:
            raise ValueError(f"refiner_switch must be in (0, 1) or None (no refiner), got {self.refiner_switch!r}")
        if self.clip_skip is not None and (not isinstance(self.clip_skip, int) or self.clip_skip < 0):
            raise ValueError(f"clip_skip must be None or an integer >= 0, got {self.clip_skip!r}")
        if self.mask_blur < 0:
            raise ValueError(f"mask_blur must be >= 0 pixels, got {self.mask_blur!r}")

    def _check_names(self) -> None:
        if self.sampler not in sampling.SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(sampling.SAMPLERS)}")
        if self.schedule not in sampling.SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(sampling.SCHEDULES)}")
        if self.emphasis not in EMPHASIS:
            raise ValueError(f"unknown emphasis {self.emphasis!r}; choose one of {', '.join(EMPHASIS)}")
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {self.output!r}")

    def _check_images(self) -> None:
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
