"""The SDXL U-Net: a latent-diffusion U-Net with text cross-attention and a pooled/size embedding.

    x (B, 4, h, w) --conv_in--> [ResBlock (+ SpatialTransformer)] x R, Downsample ... per level
                                middle: ResBlock, SpatialTransformer, ResBlock
                                [cat skip, ResBlock (+ SpatialTransformer)] x (R+1), Upsample ... per level
                   --GroupNorm, SiLU, conv--> eps (B, 4, h, w)

Every ResBlock gets `emb = time_embed(sin(t)) + label_emb(y)`; every transformer block attends to
the text tokens `context` (B, 77, 2048). Module names mirror the official single file
(sgm `openaimodel.UNetModel`, `model.diffusion_model.*`), so it loads by an identity key map.

Port notes (from Stability-AI/generative-models `sgm/modules/diffusionmodules/openaimodel.py` and
`sgm/modules/attention.py`, checked against diffusers `UNet2DConditionModel`):
- sgm's `TimestepEmbedSequential` dispatches on each layer's class at every call; here each layer
  declares once, as the class attribute `takes`, which conditioning input it needs.
- Latent sizes that are not a multiple of 2**(levels-1) work as in diffusers: each Upsample resizes
  to the size of the skip connection it is joined with (sgm fails on those sizes).
- The transformers' `proj_in`/`proj_out` are always Linear layers; 1x1-conv checkpoints
  (`use_linear_projection=False`) are reshaped by the key map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Depths = tuple[int | tuple[int, ...], ...]


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4  # latent channels; 9 for inpainting U-Nets (latent + mask + masked-image latent)
    out_channels: int = 4  # the prediction (eps or v) has the latent's shape
    model_channels: int = 320  # width of conv_in and level 0; the time embedding is 4x this
    channel_mult: tuple[int, ...] = (1, 2, 4)  # width of level i = model_channels x mult[i]; len-1 halvings
    num_res_blocks: int | tuple[int, ...] = 2  # ResBlocks per level on the way down (one more going up)
    # Transformer blocks after each down ResBlock, per level (0 = no attention at that level).
    # A tuple instead of an int gives each ResBlock of the level its own depth (distilled SDXLs).
    transformer_depth: Depths = (0, 2, 10)
    # Middle: ResBlock, SpatialTransformer(depth), ResBlock. 0 = a lone ResBlock (diffusers
    # UNetMidBlock2D); None = no middle block at all (diffusers mid_block_type None).
    transformer_depth_middle: int | None = 10
    # The same per level for the way up (num_res_blocks + 1 ResBlocks each); None = as on the way down.
    transformer_depth_up: Depths | None = None
    # Attention heads per level (the middle uses the last). SDXL uses 64-channel heads. diffusers
    # stores this list as `attention_head_dim` (a historical misnomer).
    num_heads: tuple[int, ...] = (5, 10, 20)
    context_dim: int = 2048  # text token width: CLIP ViT-L hidden 768 + OpenCLIP bigG hidden 1280
    adm_in_channels: int = 2816  # y: pooled bigG 1280 + 6 micro-conditioning scalars x 256
    addition_time_embed_dim: int = 256  # sinusoidal width of each micro-conditioning scalar
    norm_groups: int = 32  # GroupNorm groups everywhere (diffusers norm_num_groups)
    norm_eps: float = 1e-5  # ResBlocks' and the output GroupNorm's eps (the transformers' are fixed, below)
    use_linear_projection: bool = True  # file layout: proj_in/out stored as Linear (SDXL) or 1x1 conv
    upcast_attention: bool = False  # attention in float32 for half-precision runs (SD 2.x-era option)
    dropout: float = 0.0  # ResBlock and attention dropout (training only)
    sample_size: int | None = 128  # default latent size (1024 px / 8); kept for diffusers' config.json

    def __post_init__(self) -> None:
        # JSON gives (nested) lists; keep tuples so configs compare and hash.
        for f in fields(self):
            if isinstance(getattr(self, f.name), (list, tuple)):
                object.__setattr__(self, f.name, _tuples(getattr(self, f.name)))
        n = self.levels
        if n == 0:
            raise ValueError("UNetConfig.channel_mult needs at least one level")
        for name in ("num_heads", "transformer_depth", "num_res_blocks", "transformer_depth_up"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != n:
                raise ValueError(f"UNetConfig.{name} = {value} needs one entry per level ({n})")
        if self.transformer_depth_up is None and any(isinstance(d, tuple) for d in self.transformer_depth):
            raise ValueError("UNetConfig: per-block transformer_depth needs an explicit transformer_depth_up")
        depths = [self.down_depths(lv) + self.up_depths(lv) for lv in range(n)]  # also checks per-block lengths
        widths = (self.model_channels, *self.block_out_channels)
        if any(c % self.norm_groups for c in widths):
            raise ValueError(f"UNetConfig: norm_groups {self.norm_groups} must divide every width {widths}")
        attended = {lv for lv in range(n) if any(depths[lv])} | ({n - 1} if self.transformer_depth_middle else set())
        for lv in sorted(attended):
            width, heads = self.channels(lv), self.num_heads[lv]
            if width % heads:
                raise ValueError(f"UNetConfig: level {lv} width {width} is not divisible by {heads} heads")

    @property
    def levels(self) -> int:
        return len(self.channel_mult)

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        """Width of each level (diffusers' name)."""
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    def channels(self, level: int) -> int:
        return self.model_channels * self.channel_mult[level]

    def res_blocks(self, level: int) -> int:
        r = self.num_res_blocks
        return r if isinstance(r, int) else r[level]

    def down_depths(self, level: int) -> tuple[int, ...]:
        """Transformer depth after each down ResBlock of `level` (0 = none)."""
        return _per_block(self.transformer_depth[level], self.res_blocks(level), f"transformer_depth[{level}]")

    def up_depths(self, level: int) -> tuple[int, ...]:
        """Transformer depth after each up ResBlock of `level` (num_res_blocks + 1 of them)."""
        d = self.transformer_depth if self.transformer_depth_up is None else self.transformer_depth_up
        return _per_block(d[level], self.res_blocks(level) + 1, f"transformer_depth_up[{level}]")


def _tuples(value):
    return tuple(map(_tuples, value)) if isinstance(value, (list, tuple)) else value


def _per_block(depth: int | tuple[int, ...], n: int, name: str) -> tuple[int, ...]:
    if isinstance(depth, int):
        return (depth,) * n
    if len(depth) != n:
        raise ValueError(f"UNetConfig.{name} = {depth} needs {n} entries (one per ResBlock)")
    return tuple(depth)


def heads_of(model_channels: int, channel_mult: tuple[int, ...], head_channels: int = 64) -> tuple[int, ...]:
    """Heads per level for fixed-width heads (sgm's `num_head_channels`)."""
    return tuple(model_channels * m // head_channels for m in channel_mult)


# sd_xl_base.yaml: 320 channels, mult 1/2/4, attention at levels 1 and 2 (depth 2 and 10), 64-ch heads.
# 2,567,463,684 parameters.
base = UNetConfig()
# sd_xl_refiner.yaml: 384 channels, mult 1/2/4/4, depth 4 at levels 1 and 2 and in the middle,
# context = bigG only (1280), y = pooled 1280 + 5 x 256 (sizes, crop, aesthetic score).
# 2,259,526,660 parameters.
refiner = UNetConfig(
    model_channels=384,
    channel_mult=(1, 2, 4, 4),
    transformer_depth=(0, 4, 4, 0),
    transformer_depth_middle=4,
    num_heads=heads_of(384, (1, 2, 4, 4)),
    context_dim=1280,
    adm_in_channels=2560,
)
# Small SDXL-shaped U-Nets for tests and built-in toy models. Their context and pooled widths fit
# the tiny text encoders of models/clip.py: context = 32 (clip_l_tiny) + 64 (clip_g_tiny), pooled 64.
tiny = UNetConfig(
    model_channels=32,
    channel_mult=(1, 2, 2),
    transformer_depth=(0, 1, 2),
    transformer_depth_middle=2,
    num_heads=heads_of(32, (1, 2, 2), head_channels=16),
    context_dim=96,
    adm_in_channels=64 + 6 * 32,
    addition_time_embed_dim=32,
    norm_groups=8,
    sample_size=16,
)
tiny_refiner = UNetConfig(
    model_channels=32,
    channel_mult=(1, 2, 2, 2),
    transformer_depth=(0, 1, 1, 0),
    transformer_depth_middle=1,
    num_heads=heads_of(32, (1, 2, 2, 2), head_channels=16),
    context_dim=64,
    adm_in_channels=64 + 5 * 32,
    addition_time_embed_dim=32,
    norm_groups=8,
    sample_size=16,
)

# Fixed in both references, whatever the config says.
TRANSFORMER_GROUPNORM_EPS = 1e-6
LAYERNORM_EPS = 1e-5


# ---------------------------------------------------------------------------------------------
# Conditioning embeddings.


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (..., dim) = cat[cos(t f), sin(t f)], f_i = max_period^(-i / (dim/2)).

    sgm `timestep_embedding` (= diffusers `get_timestep_embedding` with flip_sin_to_cos=True,
    downscale_freq_shift=0; the same operation order, so both give identical float32 values).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[..., None].float() * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))  # odd widths get a zero column


def micro_conditioning(pooled: Tensor, values: Tensor | Sequence[float], dim: int = 256) -> Tensor:
    """y = cat(pooled, emb(v_0), emb(v_1), ...) (B, P + k dim) for k scalars per sample.

    `values` is (B, k), or k numbers shared by the batch: SDXL base uses original (h, w), crop
    (top, left), target (h, w); the refiner original (h, w), crop (top, left), aesthetic score.
    (sgm `ConcatTimestepEmbedderND`; diffusers `add_time_proj` on `time_ids`.)
    """
    values = torch.as_tensor(values, dtype=torch.float32, device=pooled.device)
    values = values.expand(pooled.shape[0], -1) if values.ndim == 1 else values
    emb = timestep_embedding(values, dim).flatten(1)  # (B, k * dim)
    return torch.cat([pooled, emb.to(pooled.dtype)], dim=-1)


# ---------------------------------------------------------------------------------------------
# Layers. `takes` names the conditioning input a layer needs besides x (None: x only).


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, add the projected time embedding, GroupNorm-SiLU-conv, plus a skip."""

    takes: ClassVar[str] = "emb"

    def __init__(self, channels: int, out_channels: int, config: UNetConfig):
        super().__init__()
        c, out = config, out_channels
        self.in_layers = nn.Sequential(
            nn.GroupNorm(c.norm_groups, channels, eps=c.norm_eps), nn.SiLU(), nn.Conv2d(channels, out, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(c.time_embed_dim, out))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(c.norm_groups, out, eps=c.norm_eps),
            nn.SiLU(),
            nn.Dropout(c.dropout),
            nn.Conv2d(out, out, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if channels == out else nn.Conv2d(channels, out, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        # Sums accumulate in place into fresh conv / linear outputs (which autograd does not keep):
        # the same values, one large temporary fewer per add (on the CPU each is new memory to fault in).
        h = self.in_layers(x).add_(self.emb_layers(emb)[:, :, None, None])
        return self.out_layers(h).add_(self.skip_connection(x))


class Attention(nn.Module):
    """Multi-head attention of x (B, N, C) over `context` (B, M, context_dim) (itself for self-attention)."""

    def __init__(self, dim: int, context_dim: int, heads: int, config: UNetConfig):
        super().__init__()
        self.heads, self.upcast = heads, config.upcast_attention
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(config.dropout))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        B, N, C = x.shape
        q, k, v = (self.to_q(x), self.to_k(context), self.to_v(context))
        q, k, v = (p.unflatten(-1, (self.heads, -1)).transpose(1, 2) for p in (q, k, v))  # (B, nh, N|M, hs)
        if self.upcast:
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v).to(x.dtype)  # (B, nh, N, hs)
        return self.to_out(out.transpose(1, 2).reshape(B, N, C))


class GEGLU(nn.Module):
    """Linear to 2 x inner, then value * gelu(gate) (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return F.gelu(gate).mul_(value)


class FeedForward(nn.Module):
    """GEGLU up to 4x width, dropout, back down."""

    def __init__(self, dim: int, config: UNetConfig):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(config.dropout), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, GEGLU feed-forward (sgm BasicTransformerBlock)."""

    def __init__(self, dim: int, heads: int, config: UNetConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        self.attn1 = Attention(dim, dim, heads, config)
        self.norm2 = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        self.attn2 = Attention(dim, config.context_dim, heads, config)
        self.norm3 = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        self.ff = FeedForward(dim, config)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        h = self.norm1(x)
        x = self.attn1(h, h).add_(x)  # in place, as in ResBlock
        x = self.attn2(self.norm2(x), context).add_(x)
        return self.ff(self.norm3(x)).add_(x)


class SpatialTransformer(nn.Module):
    """GroupNorm, pixels to tokens, `depth` transformer blocks, back to pixels, plus the input."""

    takes: ClassVar[str] = "context"

    def __init__(self, channels: int, heads: int, depth: int, config: UNetConfig):
        super().__init__()
        self.norm = nn.GroupNorm(config.norm_groups, channels, eps=TRANSFORMER_GROUPNORM_EPS)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(TransformerBlock(channels, heads, config) for _ in range(depth))
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # (B, HW, C)
        for block in self.transformer_blocks:
            h = block(h, context)
        return x + self.proj_out(h).transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    """Stride-2 3x3 conv: (h, w) -> (ceil(h/2), ceil(w/2))."""

    takes: ClassVar[None] = None

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour resize to `size` (the next skip's; 2x unless a Downsample rounded up), 3x3 conv."""

    takes: ClassVar[str] = "size"

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class TimestepSequential(nn.Sequential):
    """One entry of input_blocks / middle_block / output_blocks (sgm's TimestepEmbedSequential).

    Runs its layers in order, handing each the one input its class `takes` (decided when built);
    layers are named 0, 1, 2 as in the official checkpoint.
    """

    def __init__(self, *layers: nn.Module):
        super().__init__(*layers)
        self.takes = tuple(getattr(layer, "takes", None) for layer in layers)

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        inputs = {"emb": emb, "context": context, "size": size}
        for layer, takes in zip(self, self.takes):
            x = layer(x) if takes is None else layer(x, inputs[takes])
        return x


# ---------------------------------------------------------------------------------------------
# The U-Net.


class UNet(nn.Module):
    """eps(x, t, context, y): input_blocks down, middle_block, output_blocks up with skips, out."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        emb = c.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(c.model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(c.adm_in_channels, emb), nn.SiLU(), nn.Linear(emb, emb)))

        def stage(ch_in: int, level: int, depth: int, *resample: nn.Module) -> TimestepSequential:
            """ResBlock to the level's width, SpatialTransformer when depth > 0, then the resampler if any."""
            ch = c.channels(level)
            attn = (SpatialTransformer(ch, c.num_heads[level], depth, c),) if depth else ()
            return TimestepSequential(ResBlock(ch_in, ch, c), *attn, *resample)

        # Down: conv_in, then per level its ResBlocks and (except the last level) a Downsample.
        # `skips` records the width of every output that the way up will concatenate.
        conv_in = nn.Conv2d(c.in_channels, c.model_channels, 3, padding=1)
        self.input_blocks = nn.ModuleList([TimestepSequential(conv_in)])
        ch, skips = c.model_channels, [c.model_channels]
        for level in range(c.levels):
            for depth in c.down_depths(level):
                self.input_blocks.append(stage(ch, level, depth))
                ch = c.channels(level)
                skips.append(ch)
            if level < c.levels - 1:
                self.input_blocks.append(TimestepSequential(Downsample(ch)))
                skips.append(ch)

        mid = c.transformer_depth_middle
        middle = [] if mid is None else [ResBlock(ch, ch, c)]
        if mid:
            middle += [SpatialTransformer(ch, c.num_heads[-1], mid, c), ResBlock(ch, ch, c)]
        self.middle_block = TimestepSequential(*middle)

        # Up: per level (deepest first) R+1 ResBlocks on [x, skip]; the last one ends with an Upsample.
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(c.levels)):
            depths = c.up_depths(level)
            for j, depth in enumerate(depths):
                upsample = (Upsample(c.channels(level)),) if level > 0 and j == len(depths) - 1 else ()
                self.output_blocks.append(stage(ch + skips.pop(), level, depth, *upsample))
                ch = c.channels(level)

        self.out = nn.Sequential(
            nn.GroupNorm(c.norm_groups, ch, eps=c.norm_eps), nn.SiLU(), nn.Conv2d(ch, c.out_channels, 3, padding=1)
        )

    def forward(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor) -> Tensor:
        """x (B, C_in, h, w) latents; t (B,) or scalar timesteps (float, 0..999); context (B, 77, context_dim);
        y (B, adm_in_channels) = cat(pooled text, micro-conditioning embeddings) -> (B, C_out, h, w)."""
        c = self.config
        if x.shape[1] != c.in_channels or context.shape[-1] != c.context_dim or y.shape[-1] != c.adm_in_channels:
            raise ValueError(
                f"UNet expects x with {c.in_channels} channels, context of width {c.context_dim} and y of width "
                f"{c.adm_in_channels}; got x {tuple(x.shape)}, context {tuple(context.shape)}, y {tuple(y.shape)}"
            )
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, c.model_channels).to(x)) + self.label_emb(y.to(x))  # (B, 4 mc)
        context = context.to(x)

        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(h)


def count_parameters(config: UNetConfig) -> int:
    """Parameters of a U-Net with this config (built on the meta device: no memory used)."""
    with torch.device("meta"):
        return sum(p.numel() for p in UNet(config).parameters())
