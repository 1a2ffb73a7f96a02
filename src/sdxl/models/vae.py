"""The SD/SDXL variational autoencoder (AutoencoderKL): images <-> 8x smaller, 4-channel latents.

Port of sgm's `AutoencoderKL` (`sgm/modules/diffusionmodules/model.py`: Encoder, Decoder,
ResnetBlock, AttnBlock), which is also what diffusers' `AutoencoderKL` computes. Module names mirror
the official single-file keys (`encoder.down.0.block.1.conv2.weight`, `decoder.mid.attn_1.q.weight`,
`quant_conv.weight`, ...), so `sdxl_vae.safetensors` loads with an identity key map; diffusers names
are mapped in `sdxl.checkpoints.vae_keys`.

Layout (SDXL: 128 base channels, multipliers 1,2,4,4, two res blocks per level):

    encoder: conv_in -> down[0..3] (res blocks, then a stride-2 conv except on the last level)
             -> mid (res, attention, res) -> norm_out, SiLU, conv_out -> 2 x latent channels
    quant_conv (1x1) -> (mean, logvar)
    post_quant_conv (1x1) -> decoder: conv_in -> mid -> up[3..0] (res blocks + 1, then 2x nearest
             upsampling and a conv except on level 0) -> norm_out, SiLU, conv_out -> RGB

Latents here are "raw": multiplying by `config.scaling_factor` (and shifting) is the pipeline's
business; `scale_latents` / `unscale_latents` do it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3  # RGB in
    out_channels: int = 3  # RGB out
    base_channels: int = 128  # width of conv_in (sgm `ch`)
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # width of each level = base x mult; len-1 halvings (8x)
    num_res_blocks: int = 2  # res blocks per encoder level (decoder levels have one more); diffusers layers_per_block
    latent_channels: int = 4  # z channels; the encoder emits twice as many (mean and logvar)
    norm_groups: int = 32  # GroupNorm groups everywhere; diffusers norm_num_groups
    eps: float = 1e-6  # GroupNorm epsilon everywhere (fixed in both sgm and diffusers)
    mid_attention: bool = True  # single-head self-attention in both mid blocks; diffusers mid_block_add_attention
    use_quant_conv: bool = True  # 1x1 conv on the moments (SD-era VAEs have it; Flux's doesn't)
    use_post_quant_conv: bool = True  # 1x1 conv on the latents before decoding
    # Pipeline-side latent normalisation (no effect on this module's forward):
    scaling_factor: float = 0.13025  # SDXL's; SD 1.x uses 0.18215
    shift_factor: float | None = None  # subtracted before scaling (SD3/Flux VAEs); None for SDXL
    latents_mean: tuple[float, ...] | None = None  # per-channel mean/std used instead of the shift
    latents_std: tuple[float, ...] | None = None  #   (e.g. Playground v2.5); None for SDXL
    force_upcast: bool = True  # SDXL's VAE overflows in float16: pipelines should decode in float32
    sample_size: int = 1024  # diffusers' default tile size (kept only to round-trip config.json)

    def __post_init__(self) -> None:
        if not self.channel_mult:
            raise ValueError("VAEConfig.channel_mult must have at least one level")
        widths = (self.base_channels, *self.block_out_channels)
        if any(c % self.norm_groups for c in widths):
            raise ValueError(f"VAEConfig: norm_groups {self.norm_groups} must divide every width {widths}")
        for name in ("latents_mean", "latents_std"):
            v = getattr(self, name)
            if v is not None and len(v) != self.latent_channels:
                raise ValueError(f"VAEConfig.{name} needs {self.latent_channels} values, got {len(v)}")

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        """Width of each level (diffusers' name)."""
        return tuple(self.base_channels * m for m in self.channel_mult)

    @property
    def downscale_factor(self) -> int:
        """Pixels per latent along each side (8 for SDXL)."""
        return 2 ** (len(self.channel_mult) - 1)


base = VAEConfig()  # SDXL's VAE: base and refiner share it (also `sdxl_vae.safetensors`); 83,653,863 parameters
refiner = base
# Same structure and 8x downscaling, 4x narrower with one res block per level: for tests.
tiny = VAEConfig(base_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8)

PRESETS: dict[str, VAEConfig] = {"base": base, "refiner": refiner, "tiny": tiny}


def encoder_levels(config: VAEConfig) -> list[tuple[int, int]]:
    """(input width, output width) of each encoder level; as sgm's `in_ch_mult = (1,) + ch_mult`."""
    widths = config.block_out_channels
    return [(config.base_channels if i == 0 else widths[i - 1], widths[i]) for i in range(len(widths))]


def decoder_levels(config: VAEConfig) -> list[tuple[int, int]]:
    """(input width, output width) of decoder level i (run from the last level down to 0)."""
    widths = config.block_out_channels
    return [(widths[min(i + 1, len(widths) - 1)], widths[i]) for i in range(len(widths))]


# ---------------------------------------------------------------------------------------------
# Building blocks (sgm names).


def group_norm(channels: int, config: VAEConfig) -> nn.GroupNorm:
    return nn.GroupNorm(config.norm_groups, channels, eps=config.eps)


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice, plus a 1x1 `nin_shortcut` when the width changes (dropout is 0)."""

    def __init__(self, in_channels: int, out_channels: int, config: VAEConfig):
        super().__init__()
        self.norm1 = group_norm(in_channels, config)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, config)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H x W positions; q/k/v/proj_out are 1x1 convs as in sgm."""

    def __init__(self, channels: int, config: VAEConfig):
        super().__init__()
        self.norm = group_norm(channels, config)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)

        def tokens(t: Tensor) -> Tensor:  # (B, C, H, W) -> (B, 1 head, H*W, C)
            return t.reshape(b, 1, c, height * width).transpose(2, 3)

        h = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        h = h.transpose(2, 3).reshape(b, c, height, width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one pixel right and bottom only (sgm's asymmetric padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """2x nearest-neighbour upsampling, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def res_blocks(in_channels: int, out_channels: int, n: int, config: VAEConfig) -> nn.ModuleList:
    """`n` res blocks; the first one changes the width."""
    return nn.ModuleList(ResnetBlock(in_channels if j == 0 else out_channels, out_channels, config) for j in range(n))


class DownLevel(nn.Module):
    """Encoder level: res blocks `block.{j}`, then `downsample` (not on the last level)."""

    def __init__(self, in_channels: int, out_channels: int, config: VAEConfig, *, downsample: bool):
        super().__init__()
        self.block = res_blocks(in_channels, out_channels, config.num_res_blocks, config)
        self.downsample = Downsample(out_channels) if downsample else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return self.downsample(x)


class UpLevel(nn.Module):
    """Decoder level: one res block more than the encoder's, then `upsample` (not on level 0)."""

    def __init__(self, in_channels: int, out_channels: int, config: VAEConfig, *, upsample: bool):
        super().__init__()
        self.block = res_blocks(in_channels, out_channels, config.num_res_blocks + 1, config)
        self.upsample = Upsample(out_channels) if upsample else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return self.upsample(x)


class MidBlock(nn.Module):
    """res block, attention (optional), res block, all at the deepest width."""

    def __init__(self, channels: int, config: VAEConfig):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, config)
        self.attn_1 = AttnBlock(channels, config) if config.mid_attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, config)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image (B, in, H, W) -> moments (B, 2 x latent, H/f, W/f); sgm Encoder with double_z."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        last = len(config.channel_mult) - 1
        self.conv_in = nn.Conv2d(config.in_channels, config.base_channels, 3, padding=1)
        self.down = nn.ModuleList(
            DownLevel(cin, cout, config, downsample=i < last)
            for i, (cin, cout) in enumerate(encoder_levels(config))
        )
        width = config.block_out_channels[-1]
        self.mid = MidBlock(width, config)
        self.norm_out = group_norm(width, config)
        self.conv_out = nn.Conv2d(width, 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents (B, latent, h, w) -> image (B, out, h*f, w*f). `up[i]` is level i, run deepest first."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        width = config.block_out_channels[-1]
        self.conv_in = nn.Conv2d(config.latent_channels, width, 3, padding=1)
        self.mid = MidBlock(width, config)
        self.up = nn.ModuleList(
            UpLevel(cin, cout, config, upsample=i > 0)
            for i, (cin, cout) in enumerate(decoder_levels(config))
        )
        first = config.block_out_channels[0]
        self.norm_out = group_norm(first, config)
        self.conv_out = nn.Conv2d(first, config.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ---------------------------------------------------------------------------------------------
# The autoencoder.


def fast_layout(x: Tensor) -> Tensor:
    """x in the memory layout the VAE's convolutions run fastest on: channels-last for bfloat16 on the
    CPU, where oneDNN otherwise reorders every activation to and from it around each convolution
    (a whole 1024x1024 decode took 0.58x the time, benchmarks/README.md); unchanged elsewhere (float32
    on the CPU showed no clear gain; GPUs not measured yet). The weights keep their layout."""
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        return x.contiguous(memory_format=torch.channels_last)
    return x


class AutoencoderKL(nn.Module):
    """The SDXL VAE. `encode`/`decode` work on raw latents; see `scale_latents` for the pipeline's."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        moments = 2 * config.latent_channels
        self.quant_conv = nn.Conv2d(moments, moments, 1) if config.use_quant_conv else nn.Identity()
        latent = config.latent_channels
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if config.use_post_quant_conv else nn.Identity()
        # Set by the pipeline once a half-precision run overflowed (the official SDXL VAE does in float16):
        # from then on it runs this VAE in float32 straight away rather than in float16 first.
        self.overflowed_in_half = False

    # -- encoding

    def _moments(self, images: Tensor) -> Tensor:
        return self.quant_conv(self.encoder(fast_layout(images))).contiguous()

    @staticmethod
    def _split_moments(moments: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # as sgm's DiagonalGaussianDistribution

    def encode_moments(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images in [-1, 1] (B, 3, H, W) -> (mean, logvar) of the latent Gaussian, each (B, 4, H/8, W/8)."""
        return self._split_moments(self._moments(images))

    def _sample(self, mean: Tensor, logvar: Tensor, generator: torch.Generator | None) -> Tensor:
        # Noise is drawn in float32 on the generator's device, so a CPU generator gives the same
        # latents for a model on any device or in any dtype.
        device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=device, dtype=torch.float32)
        return mean + torch.exp(0.5 * logvar) * noise.to(mean.device, mean.dtype)

    def encode(self, images: Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Images in [-1, 1] -> raw latents: the mean, or a sample mean + std * noise if `sample`."""
        mean, logvar = self.encode_moments(images)
        return self._sample(mean, logvar, generator) if sample else mean

    # -- decoding

    def decode(self, latents: Tensor) -> Tensor:
        """Raw latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in about [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(fast_layout(latents))).contiguous()

    # -- tiled versions for large images: bounded memory, linearly blended overlaps

    def encode_tiled(
        self,
        images: Tensor,
        *,
        tile: int = 1024,
        overlap: int = 128,
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """`encode` in overlapping tiles of at most `tile` pixels, overlapping by at least `overlap` pixels.

        The moments of the tiles are blended linearly where they overlap; a sample is drawn once
        for the whole image, so with a single tile this equals `encode` exactly.
        """
        f = self.config.downscale_factor
        height, width = images.shape[-2:]
        for name, v in (("height", height), ("width", width), ("tile", tile), ("overlap", overlap)):
            if v % f:
                raise ValueError(f"encode_tiled: {name} {v} must be a multiple of {f}")
        moments = run_tiled(self._moments, images, tile=tile // f, overlap=overlap // f, in_scale=f, out_scale=1)
        mean, logvar = self._split_moments(moments)
        return self._sample(mean, logvar, generator) if sample else mean

    def decode_tiled(self, latents: Tensor, *, tile: int = 128, overlap: int = 16) -> Tensor:
        """`decode` in overlapping tiles of at most `tile` latents, overlapping by at least `overlap` latents.

        Each tile is decoded on its own (GroupNorm statistics and attention are per tile, so the
        result differs slightly from `decode` when there are several tiles); the overlaps are
        cross-faded linearly, so there are no seams. With a single tile it equals `decode` exactly.
        """
        f = self.config.downscale_factor
        return run_tiled(self.decode, latents, tile=tile, overlap=overlap, in_scale=1, out_scale=f)

    # -- the pipeline's latent normalisation (diffusers: `latents * vae.config.scaling_factor`)

    def _mean_std(self, z: Tensor) -> tuple[Tensor, Tensor]:
        c = self.config
        as_tensor = lambda v: torch.tensor(v, dtype=z.dtype, device=z.device).view(1, -1, 1, 1)  # noqa: E731
        return as_tensor(c.latents_mean), as_tensor(c.latents_std)

    def scale_latents(self, z: Tensor) -> Tensor:
        """Raw VAE latents -> the diffusion model's latents: (z - shift) * scaling_factor."""
        c = self.config
        if c.latents_mean is not None:  # per-channel normalisation, as diffusers' SDXL pipeline
            mean, std = self._mean_std(z)
            return (z - mean) * c.scaling_factor / std
        if c.shift_factor is not None:
            z = z - c.shift_factor
        return z * c.scaling_factor

    def unscale_latents(self, z: Tensor) -> Tensor:
        """The inverse of `scale_latents`: the diffusion model's latents -> raw VAE latents."""
        c = self.config
        if c.latents_mean is not None:
            mean, std = self._mean_std(z)
            return z * std / c.scaling_factor + mean
        z = z / c.scaling_factor
        return z + c.shift_factor if c.shift_factor is not None else z


# ---------------------------------------------------------------------------------------------
# Tiling.


def tile_spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Cover [0, size) with the fewest equal tiles of at most `tile` that overlap by >= `overlap`,
    spread evenly (no thin last tile, whose statistics would be poor), each only as long as that
    needs: 256 latents in tiles of up to 128 overlapping by 16 take three of 96, not three of 128
    (which would overlap by 64 and decode 2.25x the image's area instead of 1.27x)."""
    if tile <= 0 or not 0 <= overlap < tile:
        raise ValueError(f"tiling needs 0 <= overlap < tile, got tile {tile}, overlap {overlap}")
    if size <= tile:
        return [(0, size)]
    n = math.ceil((size - overlap) / (tile - overlap))
    tile = math.ceil((size + (n - 1) * overlap) / n)  # n of these still overlap by >= overlap
    return [(s, s + tile) for s in (i * (size - tile) // (n - 1) for i in range(n))]


def blend_weights(spans: list[tuple[int, int]], scale: int) -> list[Tensor]:
    """Per-tile 1-D weights on the output grid (span x scale): 1 inside, ramping linearly towards
    each neighbour across the overlap with it, such that two overlapping tiles' weights sum to 1."""
    weights = []
    for i, (start, stop) in enumerate(spans):
        p = torch.arange(start * scale, stop * scale, dtype=torch.float32) + 0.5  # pixel centres
        w = torch.ones_like(p)
        if i > 0 and spans[i - 1][1] > start:  # fade in over the overlap with the previous tile
            w = torch.minimum(w, (p - start * scale) / ((spans[i - 1][1] - start) * scale))
        if i + 1 < len(spans) and stop > spans[i + 1][0]:  # fade out over the next one
            w = torch.minimum(w, (stop * scale - p) / ((stop - spans[i + 1][0]) * scale))
        weights.append(w)
    return weights


def run_tiled(
    fn: Callable[[Tensor], Tensor], x: Tensor, *, tile: int, overlap: int, in_scale: int, out_scale: int
) -> Tensor:
    """Apply `fn` to overlapping tiles of `x` and blend the results.

    `tile` and `overlap` count cells of a common grid: one cell is `in_scale` pixels of `x` and
    `out_scale` pixels of fn's output (decode: 1 latent -> 8 pixels; encode: 8 pixels -> 1 latent).
    Results are accumulated in float32 and divided by the summed weights.
    """
    rows = tile_spans(x.shape[-2] // in_scale, tile, overlap)
    cols = tile_spans(x.shape[-1] // in_scale, tile, overlap)
    if len(rows) == 1 and len(cols) == 1:
        return fn(x)  # one tile: exactly the untiled computation
    row_w, col_w = blend_weights(rows, out_scale), blend_weights(cols, out_scale)
    total = out = None
    for (r0, r1), wr in zip(rows, row_w, strict=True):
        for (c0, c1), wc in zip(cols, col_w, strict=True):
            y = fn(x[..., r0 * in_scale : r1 * in_scale, c0 * in_scale : c1 * in_scale])
            if out is None:
                shape = (*y.shape[:-2], rows[-1][1] * out_scale, cols[-1][1] * out_scale)
                out = torch.zeros(shape, dtype=torch.float32, device=y.device)
                total = torch.zeros(shape[-2:], dtype=torch.float32, device=y.device)
                dtype = y.dtype
            w = (wr[:, None] * wc[None, :]).to(y.device)
            out[..., r0 * out_scale : r1 * out_scale, c0 * out_scale : c1 * out_scale] += w * y.float()
            total[r0 * out_scale : r1 * out_scale, c0 * out_scale : c1 * out_scale] += w
    return (out / total).to(dtype)


__all__ = [
    "VAEConfig",
    "AutoencoderKL",
    "base",
    "refiner",
    "tiny",
    "PRESETS",
    "encoder_levels",
    "decoder_levels",
    "fast_layout",
    "run_tiled",
    "tile_spans",
    "blend_weights",
]
