"""Key tables for the VAE: official (sgm/LDM) names and diffusers `AutoencoderKL` names.

Our module names are the official ones, so the official table is the identity; it is still written
out tensor by tensor (from the config) so that `convert` can check a file strictly. The diffusers
table differs in names only, plus two layout facts:

- the mid-block attention projections are stored as linear weights [C, C] (ours: 1x1 convs);
- diffusers numbers decoder blocks in execution order: `up_blocks.k` is our `up.{n-1-k}`.

`vae_config_from_diffusers` / `vae_config_to_diffusers` translate `vae/config.json`.
"""

from __future__ import annotations

from typing import Any

from ..models.vae import VAEConfig, decoder_levels, encoder_levels
from .keymap import CheckpointError, KeyMap, as_linear, params, rename

# Entries of official VAE files that are not weights (LitEma bookkeeping in sdxl_vae.safetensors).
VAE_IGNORED = (r"model_ema\..*",)


# ---------------------------------------------------------------------------------------------
# Pieces shared by both tables: `ours` and `theirs` are module prefixes.


def _resnet(ours: str, theirs: str, in_channels: int, out_channels: int, shortcut: str) -> KeyMap:
    """A res block; the 1x1 shortcut (named `shortcut` in the file) exists when the width changes."""
    rules = [r for name in ("norm1", "conv1", "norm2", "conv2") for r in params(f"{ours}.{name}", f"{theirs}.{name}")]
    if in_channels != out_channels:
        rules += params(f"{ours}.nin_shortcut", f"{theirs}.{shortcut}")
    return rules


def _blocks(ours: str, theirs: str, in_channels: int, out_channels: int, n: int, shortcut: str) -> KeyMap:
    """`n` res blocks `{ours}.{j}` <- `{theirs}.{j}`; only the first one changes the width."""
    rules = []
    for j in range(n):
        width_in = in_channels if j == 0 else out_channels
        rules += _resnet(f"{ours}.{j}", f"{theirs}.{j}", width_in, out_channels, shortcut)
    return rules


# ---------------------------------------------------------------------------------------------
# Official layout.


def _official_attention(prefix: str) -> KeyMap:
    return [r for name in ("norm", "q", "k", "v", "proj_out") for r in params(f"{prefix}.{name}", f"{prefix}.{name}")]


def _official_mid(prefix: str, width: int, config: VAEConfig) -> KeyMap:
    rules = _resnet(f"{prefix}.block_1", f"{prefix}.block_1", width, width, "nin_shortcut")
    if config.mid_attention:
        rules += _official_attention(f"{prefix}.attn_1")
    return rules + _resnet(f"{prefix}.block_2", f"{prefix}.block_2", width, width, "nin_shortcut")


def official_vae_keys(config: VAEConfig) -> KeyMap:
    """Our names <- official sgm/LDM VAE names (`sdxl_vae.safetensors`, `first_stage_model.*`): identical."""
    last = len(config.channel_mult) - 1
    width = config.block_out_channels[-1]
    same = lambda name: params(name, name)  # noqa: E731

    rules = same("encoder.conv_in")
    for i, (cin, cout) in enumerate(encoder_levels(config)):
        level = f"encoder.down.{i}"
        rules += _blocks(f"{level}.block", f"{level}.block", cin, cout, config.num_res_blocks, "nin_shortcut")
        if i < last:
            rules += same(f"{level}.downsample.conv")
    rules += _official_mid("encoder.mid", width, config) + same("encoder.norm_out") + same("encoder.conv_out")

    rules += same("decoder.conv_in") + _official_mid("decoder.mid", width, config)
    for i, (cin, cout) in enumerate(decoder_levels(config)):
        level = f"decoder.up.{i}"
        rules += _blocks(f"{level}.block", f"{level}.block", cin, cout, config.num_res_blocks + 1, "nin_shortcut")
        if i > 0:
            rules += same(f"{level}.upsample.conv")
    rules += same("decoder.norm_out") + same("decoder.conv_out")

    if config.use_quant_conv:
        rules += same("quant_conv")
    if config.use_post_quant_conv:
        rules += same("post_quant_conv")
    return rules


# ---------------------------------------------------------------------------------------------
# diffusers layout (diffusers.AutoencoderKL, vae/diffusion_pytorch_model.safetensors).


def _diffusers_attention(ours: str, theirs: str) -> KeyMap:
    """sgm AttnBlock <- diffusers Attention: q/k/v/proj_out are linear layers there."""
    rules = params(f"{ours}.norm", f"{theirs}.group_norm")
    for mine, their in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        rules += [
            as_linear(f"{ours}.{mine}.weight", f"{theirs}.{their}.weight"),
            rename(f"{ours}.{mine}.bias", f"{theirs}.{their}.bias"),
        ]
    return rules


def _diffusers_mid(ours: str, theirs: str, width: int, config: VAEConfig) -> KeyMap:
    rules = _resnet(f"{ours}.block_1", f"{theirs}.resnets.0", width, width, "conv_shortcut")
    if config.mid_attention:
        rules += _diffusers_attention(f"{ours}.attn_1", f"{theirs}.attentions.0")
    return rules + _resnet(f"{ours}.block_2", f"{theirs}.resnets.1", width, width, "conv_shortcut")


def diffusers_vae_keys(config: VAEConfig) -> KeyMap:
    """Our names <- diffusers `AutoencoderKL` names (down_blocks/up_blocks/mid_block, linear attention)."""
    n = len(config.channel_mult)
    width = config.block_out_channels[-1]

    rules = params("encoder.conv_in", "encoder.conv_in")
    for i, (cin, cout) in enumerate(encoder_levels(config)):
        ours, theirs = f"encoder.down.{i}", f"encoder.down_blocks.{i}"
        rules += _blocks(f"{ours}.block", f"{theirs}.resnets", cin, cout, config.num_res_blocks, "conv_shortcut")
        if i < n - 1:
            rules += params(f"{ours}.downsample.conv", f"{theirs}.downsamplers.0.conv")
    rules += _diffusers_mid("encoder.mid", "encoder.mid_block", width, config)
    rules += params("encoder.norm_out", "encoder.conv_norm_out") + params("encoder.conv_out", "encoder.conv_out")

    rules += params("decoder.conv_in", "decoder.conv_in")
    rules += _diffusers_mid("decoder.mid", "decoder.mid_block", width, config)
    for i, (cin, cout) in enumerate(decoder_levels(config)):
        ours, theirs = f"decoder.up.{i}", f"decoder.up_blocks.{n - 1 - i}"  # diffusers counts in run order
        rules += _blocks(f"{ours}.block", f"{theirs}.resnets", cin, cout, config.num_res_blocks + 1, "conv_shortcut")
        if i > 0:
            rules += params(f"{ours}.upsample.conv", f"{theirs}.upsamplers.0.conv")
    rules += params("decoder.norm_out", "decoder.conv_norm_out") + params("decoder.conv_out", "decoder.conv_out")

    if config.use_quant_conv:
        rules += params("quant_conv", "quant_conv")
    if config.use_post_quant_conv:
        rules += params("post_quant_conv", "post_quant_conv")
    return rules


# ---------------------------------------------------------------------------------------------
# diffusers vae/config.json <-> VAEConfig.

# diffusers' AutoencoderKL.__init__ defaults: what a key missing from config.json means.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
_SILU = ("silu", "swish")  # diffusers' get_activation maps both to nn.SiLU


def vae_config_from_diffusers(config: dict[str, Any], *, where: str = "vae/config.json") -> VAEConfig:
    """A diffusers `AutoencoderKL` config.json dict -> VAEConfig; CheckpointError for what we can't build."""
    cls = config.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise CheckpointError(f"{where}: a {cls}, not an AutoencoderKL; only the SD/SDXL KL autoencoder is supported")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _DIFFUSERS_DEFAULTS)
    if unknown:
        raise CheckpointError(f"{where}: unsupported AutoencoderKL option(s) {', '.join(unknown)}")
    c = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}

    widths = list(c["block_out_channels"])
    n = len(widths)
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    if any(t != "DownEncoderBlock2D" for t in down) or any(t != "UpDecoderBlock2D" for t in up):
        raise CheckpointError(
            f"{where}: unsupported block types {sorted(set(down + up) - {'DownEncoderBlock2D', 'UpDecoderBlock2D'})}"
            " (only DownEncoderBlock2D / UpDecoderBlock2D)"
        )
    if len(down) != n or len(up) != n:
        raise CheckpointError(
            f"{where}: {len(down)} down and {len(up)} up blocks for {n} block_out_channels; they must be equal"
        )
    if c["act_fn"] not in _SILU:
        raise CheckpointError(f"{where}: unsupported act_fn {c['act_fn']!r} (only 'silu')")
    if any(w % widths[0] for w in widths):
        raise CheckpointError(f"{where}: block_out_channels {widths} are not multiples of the first width")
    sample_size = c["sample_size"]
    if isinstance(sample_size, (list, tuple)):
        sample_size = sample_size[0]
    as_tuple = lambda v: None if v is None else tuple(float(x) for x in v)  # noqa: E731
    try:
        return VAEConfig(
            in_channels=c["in_channels"],
            out_channels=c["out_channels"],
            base_channels=widths[0],
            channel_mult=tuple(w // widths[0] for w in widths),
            num_res_blocks=c["layers_per_block"],
            latent_channels=c["latent_channels"],
            norm_groups=c["norm_num_groups"],
            mid_attention=bool(c["mid_block_add_attention"]),
            use_quant_conv=bool(c["use_quant_conv"]),
            use_post_quant_conv=bool(c["use_post_quant_conv"]),
            scaling_factor=float(c["scaling_factor"]),
            shift_factor=None if c["shift_factor"] is None else float(c["shift_factor"]),
            latents_mean=as_tuple(c["latents_mean"]),
            latents_std=as_tuple(c["latents_std"]),
            force_upcast=bool(c["force_upcast"]),
            sample_size=int(sample_size),
        )
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None


def vae_config_to_diffusers(config: VAEConfig) -> dict[str, Any]:
    """VAEConfig -> a diffusers `AutoencoderKL` config.json dict (what `save_pretrained` would write)."""
    if config.channel_mult[0] != 1:
        raise CheckpointError("diffusers' AutoencoderKL needs channel_mult[0] == 1 (conv_in width = first level width)")
    if config.eps != 1e-6:
        raise CheckpointError(f"diffusers' AutoencoderKL has GroupNorm eps 1e-6, not {config.eps}")
    n = len(config.channel_mult)
    as_list = lambda v: None if v is None else list(v)  # noqa: E731
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(config.block_out_channels),
        "layers_per_block": config.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": config.latent_channels,
        "norm_num_groups": config.norm_groups,
        "sample_size": config.sample_size,
        "scaling_factor": config.scaling_factor,
        "shift_factor": config.shift_factor,
        "latents_mean": as_list(config.latents_mean),
        "latents_std": as_list(config.latents_std),
        "force_upcast": config.force_upcast,
        "use_quant_conv": config.use_quant_conv,
        "use_post_quant_conv": config.use_post_quant_conv,
        "mid_block_add_attention": config.mid_attention,
    }


__all__ = [
    "official_vae_keys",
    "diffusers_vae_keys",
    "vae_config_from_diffusers",
    "vae_config_to_diffusers",
    "VAE_IGNORED",
]
