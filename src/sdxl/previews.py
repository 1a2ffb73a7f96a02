"""Live previews of a running generation: the step's prediction of the clean latents -> a small RGB image.

    previewer = Previewer.for_model(pipe.base)                 # a linear latent -> RGB map
    previewer = Previewer.for_model(pipe.base, taesd="taesdxl_decoder.safetensors")   # TAESD
    pipe.generate(prompt, preview=lambda step, total, denoised: show(previewer.image(denoised)))

Two kinds:
- a linear map (C x 3 matrix + bias) applied to every latent pixel: an image at latent size (H/8 x W/8,
  not upscaled; a client scales it), costing next to nothing. Full-size SDXL uses the factors published
  with ComfyUI; the built-in model uses a map fitted to its own VAE (`scripts/fit_preview_map.py`, stored
  in `sdxl/data/builtin_previews.json`).
- a TAESD / TAESDXL decoder file (madebyollin/taesd): an image much closer to the VAE's, at a few percent
  of the VAE's cost, of at most 512 pixels a side by default (`max_size`: the latents of larger images are
  area-downsampled first: a full-size decode cost 14% of a CPU step at 1024x1024, 512 px 5%). Both the
  original layout (`taesdxl_decoder.safetensors` / `.pth`) and diffusers' `AutoencoderTiny` (a folder or its
  weight file) load; `.pth` files only with torch.load(weights_only=True).

Both see the diffusion model's latents (the U-Net's: VAE latents times the scaling factor).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from . import builtin
from .checkpoints.files import open_shards, open_tensors
from .checkpoints.formats import diffusers_weight_files
from .checkpoints.keymap import KeyMap, renamed
from .checkpoints.load import build
from .images import to_pil
from .models.specs import Components
from .models.taesd import TAESDConfig, TAESDDecoder
from .models.vae import AutoencoderKL

__all__ = ["SDXL_BIAS", "SDXL_FACTORS", "LatentToRGB", "Previewer", "builtin_maps", "load_taesd", "vae_fingerprint"]

# SDXL latent -> RGB factors as published in ComfyUI's comfy/latent_formats.py (class SDXL,
# latent_rgb_factors and latent_rgb_factors_bias; numbers only). They apply to the scaled latents (ComfyUI
# samples on latents * 0.13025) and give RGB in [-1, 1]: its latent_preview.py maps (x + 1) / 2 to [0, 1].
SDXL_FACTORS = (  # rows: latent channels 0..3; columns R, G, B
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
SDXL_BIAS = (0.1084, -0.0175, -0.0011)

BUILTIN_MAPS = Path(__file__).resolve().parent / "data" / "builtin_previews.json"
TAESD_MAX_SIZE = 512  # pixels: TAESD previews of larger images decode area-downsampled latents (their cost)


@dataclass(frozen=True)
class LatentToRGB:
    """rgb = latents^T @ matrix + bias per latent pixel, in about [-1, 1] (the VAE's image range)."""

    matrix: Tensor  # (C, 3) float32
    bias: Tensor  # (3,) float32
    source: str  # where the numbers come from, for messages

    @classmethod
    def from_lists(cls, matrix, bias, source: str) -> LatentToRGB:
        return cls(torch.tensor(matrix, dtype=torch.float32), torch.tensor(bias, dtype=torch.float32), source)

    @property
    def channels(self) -> int:
        return self.matrix.shape[0]

    def __call__(self, latents: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, 3, h, w) float32, on the latents' device."""
        z = latents.float()  # one image's latents: float32 costs nothing and works for every input dtype
        rgb = torch.einsum("bchw,cr->brhw", z, self.matrix.to(z.device))
        return rgb + self.bias.to(z.device).view(1, 3, 1, 1)


class _OnLatentsDevice:
    """A TAESD decoder run in the latents' dtype and on their device (moved there at the first call)."""

    def __init__(self, decoder: TAESDDecoder):
        self.decoder = decoder.eval().requires_grad_(False)

    def __call__(self, latents: Tensor) -> Tensor:
        p = next(self.decoder.parameters())
        if p.dtype != latents.dtype or p.device != latents.device:
            self.decoder.to(device=latents.device, dtype=latents.dtype)
        return self.decoder(latents).float()


class Previewer:
    """denoised latents -> a preview PIL image, cheaply."""

    def __init__(self, decode: Callable[[Tensor], Tensor], channels: int, kind: str, source: str, *,
                 upscale: int = 1, max_size: int | None = None):
        self.decode = decode  # (1, C, h, w) latents -> (1, 3, upscale h, upscale w) images in about [-1, 1]
        self.channels = channels
        self.kind = kind  # "linear" or "taesd"
        self.source = source
        self.upscale = upscale  # pixels per latent of `decode`'s images
        self.max_size = max_size  # longest side of a preview in pixels (None: no limit)

    @classmethod
    def linear(cls, to_rgb: LatentToRGB) -> Previewer:
        """A preview at latent size through a linear map."""
        return cls(to_rgb, to_rgb.channels, "linear", to_rgb.source)

    @classmethod
    def taesd(cls, decoder: TAESDDecoder | str | Path, *, max_size: int | None = TAESD_MAX_SIZE) -> Previewer:
        """A preview through a TAESD decoder (or the path of one, see `load_taesd`), at most `max_size` pixels
        on its longer side: larger latents are area-downsampled before decoding (the decoder's cost grows with
        the output's area: at 1024x1024 a full-size decode took 14% of an unguided float32 U-Net step on a CPU,
        a 512 px one 5%, `benchmarks/previews.py`)."""
        source = "TAESD decoder" if isinstance(decoder, TAESDDecoder) else str(decoder)
        if not isinstance(decoder, TAESDDecoder):
            decoder = load_taesd(decoder)
        return cls(_OnLatentsDevice(decoder), decoder.config.latent_channels, "taesd", source,
                   upscale=decoder.config.upscale_factor, max_size=max_size)

    @classmethod
    def for_model(cls, parts: Components, name: str | None = None, taesd: str | Path | None = None, *,
                  max_size: int | None = TAESD_MAX_SIZE) -> Previewer:
        """The previewer for a loaded model: its TAESD decoder when `taesd` is given, else a linear map.

        name: the model's name ("builtin", "builtin-refiner", ...); by default the built-in name of the file
        `parts` was loaded from, if it is one. Built-in models use the map fitted to their VAE; other models
        SDXL's factors when their VAE has 4 latent channels (a ValueError otherwise: give a TAESD decoder).
        max_size: of a TAESD preview, see `taesd` (linear previews are at latent size, 1/8 of the image's).
        """
        if parts.vae is None:
            raise ValueError("this model has no VAE, so there is no latent space to preview")
        channels = parts.vae.config.latent_channels
        if taesd is not None:
            previewer = cls.taesd(taesd, max_size=max_size)
            if previewer.channels != channels:
                raise ValueError(f"{taesd}: a TAESD decoder for {previewer.channels}-channel latents, but this "
                                 f"model's VAE has {channels} latent channels")
            return previewer
        name = _builtin_name(parts) if name is None else name.strip().lower()
        maps = builtin_maps()
        if name in maps:
            if maps[name].channels != channels:
                raise ValueError(f"the {name!r} preview map is for {maps[name].channels}-channel latents, but this "
                                 f"model's VAE has {channels} latent channels")
            return cls.linear(maps[name])
        if channels != 4:
            raise ValueError(f"no latent-to-RGB preview factors for a VAE with {channels} latent channels (SDXL's "
                             "need 4); give a TAESD decoder for this model's latents (taesd=...)")
        return cls.linear(LatentToRGB.from_lists(SDXL_FACTORS, SDXL_BIAS, "SDXL factors (ComfyUI)"))

    @torch.no_grad()
    def image(self, denoised: Tensor, index: int = 0) -> Image.Image:
        """Image `index` of the batch `denoised` (B, C, h, w) as an RGB PIL image."""
        if denoised.ndim != 4 or denoised.shape[1] != self.channels:
            raise ValueError(f"expected latents (B, {self.channels}, h, w) for this {self.kind} preview, got "
                             f"{tuple(denoised.shape)}")
        batch = denoised.shape[0]
        if not -batch <= index < batch:
            raise IndexError(f"image {index} of a batch of {batch}")
        index %= batch
        return to_pil(self.decode(self._fit(denoised[index:index + 1])))[0]

    def _fit(self, z: Tensor) -> Tensor:
        """z area-downsampled so that the preview fits in max_size (the decode's cost follows its output)."""
        h, w = z.shape[-2:]
        longest = max(h, w) * self.upscale
        if self.max_size is None or longest <= self.max_size:
            return z
        scale = self.max_size / longest
        return F.interpolate(z, size=(max(1, int(h * scale)), max(1, int(w * scale))), mode="area")


def _builtin_name(parts: Components) -> str | None:
    """The built-in name of the file `parts` was loaded from, or None."""
    if parts.source is None:
        return None
    source = Path(parts.source).resolve()
    return next((name for name, path in builtin.FILES.items() if path.resolve() == source), None)


def builtin_maps(path: Path = BUILTIN_MAPS) -> dict[str, LatentToRGB]:
    """name -> the fitted latent-to-RGB map of each built-in model (`scripts/fit_preview_map.py`)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return {name: LatentToRGB.from_lists(m["matrix"], m["bias"], f"{name} fit ({path.name})")
            for name, m in data["maps"].items()}


def vae_fingerprint(vae: AutoencoderKL) -> str:
    """A SHA-256 of the VAE's float32 weights: says whether a fitted map was fitted to this VAE."""
    h = hashlib.sha256()
    for name, t in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# TAESD decoder files.


def _diffusers_name(name: str) -> str:
    """Ours / the original's `3.conv.0.weight` -> diffusers' `decoder.layers.2.conv.0.weight`: DecoderTiny
    applies the clamp in its forward instead of as layer 0, so its layer i is the original's i + 1."""
    index, rest = name.split(".", 1)
    return f"decoder.layers.{int(index) - 1}.{rest}"


def taesd_keys(config: TAESDConfig, layout: str) -> KeyMap:
    """The key map of a TAESD decoder file: "taesd" (madebyollin's files: our names) or "diffusers"."""
    with torch.device("meta"):
        names = list(TAESDDecoder(config).state_dict())
    return renamed((n, n if layout == "taesd" else _diffusers_name(n)) for n in names)


def load_taesd(path: str | Path, *, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> TAESDDecoder:
    """A TAESD decoder from a file (.safetensors, or .pth/.pt/.bin with weights_only) or a diffusers
    AutoencoderTiny folder. Both layouts are read strictly: a missing, unknown or mis-shaped tensor is a
    ValueError (`CheckpointError`) naming the file and the tensor; an encoder beside the decoder is skipped."""
    path = Path(path)
    tensors = open_shards(diffusers_weight_files(path)) if path.is_dir() else open_tensors(path)
    layout = "diffusers" if any(k.startswith("decoder.layers.") for k in tensors) else "taesd"
    first = "decoder.layers.0.weight" if layout == "diffusers" else "1.weight"
    config = TAESDConfig()
    if first in tensors and len(tensors.shape(first)) == 4:  # conv latent -> width: the file says both
        width, latent_channels = tensors.shape(first)[:2]
        config = TAESDConfig(latent_channels=latent_channels, width=width)
    ignore = (r"encoder\..*",) if layout == "diffusers" else ()
    return build(TAESDDecoder, config, tensors, taesd_keys(config, layout), where=str(path), ignore=ignore,
                 dtype=dtype, device=device)
