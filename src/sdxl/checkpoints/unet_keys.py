"""U-Net key maps (official sgm names, diffusers names) and diffusers config.json conversion.

Our module names are the official single file's (`model.diffusion_model.` stripped), so the
official map is the identity. diffusers splits the same tensors into down/mid/up blocks; the flat
sgm indices follow from the config:
    input_blocks.0 = conv_in; level i's ResBlock j = input_blocks[1 + sum_{l<i}(R_l+1) + j]
    (.0 resnet, .1 attention); level i's Downsample = the next index, `.0.op`;
    output_blocks: R_i+1 per level, deepest level first; the Upsample is the last sub-module
    (.1 or .2) of a level's last output block.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..models.unet import UNetConfig
from .keymap import CheckpointError, KeyMap, Rule, params, rename

# ResBlock (sgm) <- ResnetBlock2D (diffusers) sub-layers.
RESBLOCK = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
)
# Layers of one transformer block (same names in both formats); attention projections have no bias.
TRANSFORMER_BLOCK = ("norm1", "attn1.to_out.0", "norm2", "attn2.to_out.0", "norm3", "ff.net.0.proj", "ff.net.2")
ATTENTION_WEIGHTS = tuple(f"{a}.to_{p}" for a in ("attn1", "attn2") for p in "qkv")


def _res_block(ours: str, theirs: str, skip: bool) -> KeyMap:
    """ResBlock <- ResnetBlock2D; `skip` when the widths differ (1x1 conv_shortcut)."""
    pairs = RESBLOCK + ((("skip_connection", "conv_shortcut"),) if skip else ())
    return [r for a, b in pairs for r in params(f"{ours}.{a}", f"{theirs}.{b}")]


def _projection(ours: str, theirs: str, linear: bool) -> KeyMap:
    """proj_in/proj_out: our Linear <- a Linear, or a 1x1 conv (use_linear_projection=False)."""
    if linear:
        return params(ours, theirs)
    weight = Rule(
        f"{ours}.weight", (f"{theirs}.weight",), load=lambda ts: ts[0].flatten(1), save=lambda t: [t[:, :, None, None]]
    )
    return [weight, rename(f"{ours}.bias", f"{theirs}.bias")]


def _transformer(ours: str, theirs: str, depth: int, linear: bool) -> KeyMap:
    """SpatialTransformer <- Transformer2DModel (identical names inside)."""
    rules = params(f"{ours}.norm", f"{theirs}.norm") + _projection(f"{ours}.proj_in", f"{theirs}.proj_in", linear)
    for k in range(depth):
        b = f"transformer_blocks.{k}"
        rules += [rename(f"{ours}.{b}.{w}.weight", f"{theirs}.{b}.{w}.weight") for w in ATTENTION_WEIGHTS]
        rules += [r for layer in TRANSFORMER_BLOCK for r in params(f"{ours}.{b}.{layer}", f"{theirs}.{b}.{layer}")]
    return rules + _projection(f"{ours}.proj_out", f"{theirs}.proj_out", linear)


def diffusers_unet_keys(config: UNetConfig) -> KeyMap:
    """Our (sgm) names <- diffusers UNet2DConditionModel names, generated from the config."""
    c, linear = config, config.use_linear_projection
    rules = (
        params("input_blocks.0.0", "conv_in")
        + params("time_embed.0", "time_embedding.linear_1")
        + params("time_embed.2", "time_embedding.linear_2")
        + params("label_emb.0.0", "add_embedding.linear_1")
        + params("label_emb.0.2", "add_embedding.linear_2")
    )
    block, ch = 1, c.model_channels
    for level in range(c.levels):
        down = f"down_blocks.{level}"
        for j, depth in enumerate(c.down_depths(level)):
            rules += _res_block(f"input_blocks.{block}.0", f"{down}.resnets.{j}", skip=ch != c.channels(level))
            if depth:
                rules += _transformer(f"input_blocks.{block}.1", f"{down}.attentions.{j}", depth, linear)
            block, ch = block + 1, c.channels(level)
        if level < c.levels - 1:
            rules += params(f"input_blocks.{block}.0.op", f"{down}.downsamplers.0.conv")
            block += 1

    mid = c.transformer_depth_middle
    if mid is not None:
        rules += _res_block("middle_block.0", "mid_block.resnets.0", skip=False)
    if mid:
        rules += _transformer("middle_block.1", "mid_block.attentions.0", mid, linear)
        rules += _res_block("middle_block.2", "mid_block.resnets.1", skip=False)

    block = 0
    for u, level in enumerate(reversed(range(c.levels))):
        up, depths = f"up_blocks.{u}", c.up_depths(level)
        for j, depth in enumerate(depths):
            rules += _res_block(f"output_blocks.{block}.0", f"{up}.resnets.{j}", skip=True)  # input = x + skip
            if depth:
                rules += _transformer(f"output_blocks.{block}.1", f"{up}.attentions.{j}", depth, linear)
            block += 1
        if level > 0:
            rules += params(f"output_blocks.{block - 1}.{2 if depths[-1] else 1}.conv", f"{up}.upsamplers.0.conv")

    return rules + params("out.0", "conv_norm_out") + params("out.2", "conv_out")


def official_unet_keys(config: UNetConfig) -> KeyMap:
    """Our names <- the official single file's (prefix `model.diffusion_model.` removed): the identity."""
    # Same tensors and reshapes as the diffusers table, each read from our own name.
    return [Rule(r.target, (r.target,), r.load, r.save) for r in diffusers_unet_keys(config)]


# ---------------------------------------------------------------------------------------------
# diffusers unet/config.json <-> UNetConfig.

# diffusers' UNet2DConditionModel defaults (0.42.1) for the options we read, when config.json omits them.
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "dropout": 0.0,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "use_linear_projection": False,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "upcast_attention": False,
    "projection_class_embeddings_input_dim": None,
}

# Options that change the architecture or its numerics, and the values we implement (the first is
# diffusers' default, assumed when config.json omits the option).
DIFFUSERS_FIXED: dict[str, tuple[Any, ...]] = {
    "center_input_sample": (False,),
    "flip_sin_to_cos": (True,),  # our embedding is cat[cos, sin]
    "freq_shift": (0,),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1,),
    "act_fn": ("silu", "swish"),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
}

DOWN_BLOCKS = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # type -> has attention
UP_BLOCKS = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}


def _compact(values: list) -> Any:
    """Per-level/per-block lists to our config form: one int when all entries are equal."""
    return values[0] if values and all(v == values[0] for v in values) and isinstance(values[0], int) else tuple(values)


def _per_level(value: Any, n: int, name: str) -> list:
    if isinstance(value, (int, float)) or value is None:
        return [value] * n
    if len(value) != n:
        raise CheckpointError(f"unet config: {name} = {value} needs {n} entries (one per block)")
    return list(value)


def _depths(value: Any, n_blocks: int, attention: bool, where: str) -> int | tuple[int, ...]:
    """One level's transformer depths (int or per-block list) in our form; 0 without attention."""
    if not attention:
        return 0
    per_block = _per_level(value, n_blocks, where)
    if any(not isinstance(d, int) or d < 1 for d in per_block):
        raise CheckpointError(
            f"unet config: {where} = {value}: cross-attention blocks need at least one transformer layer"
        )
    return _compact(per_block)


def _getter(config: Mapping[str, Any]) -> Callable[[str], Any]:
    """A config.json lookup that falls back to diffusers' default (what diffusers itself would use)."""
    return lambda key: config.get(key, DIFFUSERS_DEFAULTS[key])


def _unsupported(config: Mapping[str, Any]) -> list[str]:
    """Every option of a diffusers unet/config.json that this U-Net cannot build, in words (all at once)."""
    get = _getter(config)
    problems = []
    for key, allowed in DIFFUSERS_FIXED.items():
        value = config.get(key, allowed[0])
        values = value if isinstance(value, list) and key == "only_cross_attention" else [value]
        if any(v not in allowed for v in values):
            problems.append(f"{key}={value!r} (supported: {' or '.join(map(repr, allowed))})")
    if get("addition_embed_type") != "text_time":
        problems.append(f"addition_embed_type={get('addition_embed_type')!r} (SDXL U-Nets use 'text_time')")
    if get("norm_num_groups") is None:
        problems.append("norm_num_groups=None (GroupNorm is required)")
    time_dim = config.get("time_embedding_dim")
    if time_dim is not None and time_dim != 4 * get("block_out_channels")[0]:
        problems.append(f"time_embedding_dim={time_dim} (only 4 x block_out_channels[0])")
    down, up, mid = list(get("down_block_types")), list(get("up_block_types")), get("mid_block_type")
    problems += [f"down block type {t!r}" for t in down if t not in DOWN_BLOCKS]
    problems += [f"up block type {t!r}" for t in up if t not in UP_BLOCKS]
    if mid not in ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None):
        problems.append(f"mid_block_type={mid!r}")
    widths = list(get("block_out_channels"))
    if len(down) != len(widths) or len(up) != len(widths):
        problems.append(f"{len(down)} down / {len(up)} up block types for {len(widths)} block_out_channels")
    elif any(w % widths[0] for w in widths):
        problems.append(f"block_out_channels={widths} (each must be a multiple of the first)")
    if len(set(_per_level(get("cross_attention_dim"), len(widths), "cross_attention_dim"))) != 1:
        problems.append(f"cross_attention_dim={get('cross_attention_dim')} (one text width for all blocks)")
    return problems


def _depths_from_diffusers(
    config: Mapping[str, Any], layers: list[int]
) -> tuple[tuple[int | tuple[int, ...], ...], tuple[int | tuple[int, ...], ...], int | None]:
    """(down, up, middle) transformer depths in our form from diffusers' per-block lists and block types."""
    get = _getter(config)
    down, up, mid = list(get("down_block_types")), list(get("up_block_types")), get("mid_block_type")
    n = len(layers)
    depth = _per_level(get("transformer_layers_per_block"), n, "transformer_layers_per_block")
    reverse = get("reverse_transformer_layers_per_block")
    if reverse is None:
        if any(isinstance(d, list) for d in depth):
            raise CheckpointError(
                "unet config: per-block transformer_layers_per_block needs reverse_transformer_layers_per_block"
            )
        reverse = depth[::-1]
    reverse = _per_level(reverse, n, "reverse_transformer_layers_per_block")
    down_depth = tuple(
        _depths(depth[i], layers[i], DOWN_BLOCKS[down[i]], f"transformer_layers_per_block[{i}]") for i in range(n)
    )
    up_depth = tuple(  # up block u serves level n-1-u
        _depths(reverse[u], layers[i] + 1, UP_BLOCKS[up[u]], f"reverse_transformer_layers_per_block[{u}]")
        for i, u in ((i, n - 1 - i) for i in range(n))
    )
    if mid == "UNetMidBlock2DCrossAttn":  # diffusers takes the last level's (first) entry
        middle = depth[-1] if isinstance(depth[-1], int) else depth[-1][0]
    else:
        middle = None if mid is None else 0  # UNetMidBlock2D: one ResBlock
    if middle == 0 and mid == "UNetMidBlock2DCrossAttn":
        raise CheckpointError("unet config: a UNetMidBlock2DCrossAttn with 0 transformer layers is not supported")
    return down_depth, up_depth, middle


def unet_config_from_diffusers(config: Mapping[str, Any]) -> UNetConfig:
    """UNetConfig from a diffusers unet/config.json (any SDXL-family UNet2DConditionModel)."""
    problems = _unsupported(config)
    if problems:
        raise CheckpointError("unet config: unsupported by this SDXL U-Net: " + "; ".join(problems))

    get = _getter(config)
    widths = list(get("block_out_channels"))
    n = len(widths)
    layers = _per_level(get("layers_per_block"), n, "layers_per_block")
    heads = _per_level(get("num_attention_heads") or get("attention_head_dim"), n, "attention_head_dim")
    down_depth, up_depth, middle = _depths_from_diffusers(config, layers)
    try:
        return UNetConfig(
            in_channels=get("in_channels"),
            out_channels=get("out_channels"),
            model_channels=widths[0],
            channel_mult=tuple(w // widths[0] for w in widths),
            num_res_blocks=_compact(layers),
            transformer_depth=down_depth,
            transformer_depth_middle=middle,
            transformer_depth_up=None if up_depth == down_depth else up_depth,
            num_heads=tuple(heads),
            # `_unsupported` checked there is one text width for all blocks
            context_dim=_per_level(get("cross_attention_dim"), n, "cross_attention_dim")[0],
            adm_in_channels=get("projection_class_embeddings_input_dim"),
            addition_time_embed_dim=get("addition_time_embed_dim"),
            norm_groups=get("norm_num_groups"),
            norm_eps=get("norm_eps"),
            use_linear_projection=get("use_linear_projection"),
            upcast_attention=get("upcast_attention"),
            dropout=get("dropout"),
            sample_size=get("sample_size"),
        )
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"unet config: {e}") from None


def _depths_to_diffusers(
    c: UNetConfig, has_attention: list[bool], has_attention_up: list[bool]
) -> tuple[Any, list | None]:
    """(transformer_layers_per_block, reverse_transformer_layers_per_block) as diffusers writes them."""
    mid = c.transformer_depth_middle
    # diffusers derives the middle depth from the last level's entry; the others' entries of levels
    # without attention are unused (1 is diffusers' default).
    depth = [list(d) if isinstance(d, tuple) else d if a else 1 for d, a in zip(c.transformer_depth, has_attention)]
    if mid:
        last = depth[-1][0] if isinstance(depth[-1], list) else depth[-1]
        if has_attention[-1] and last != mid:
            raise CheckpointError(
                f"UNetConfig: middle depth {mid} differs from the last level's {c.transformer_depth[-1]}"
                " (diffusers derives one from the other)"
            )
        if not has_attention[-1]:
            depth[-1] = mid
    meaningful = [d for d, a in zip(depth, has_attention) if a] + ([mid] if mid else [])
    if all(isinstance(d, int) for d in depth) and len(set(meaningful)) == 1:
        depth = meaningful[0]  # one number, as the official refiner config writes it
    reverse = None
    if c.transformer_depth_up is not None:
        reverse = [list(c.up_depths(level)) if has_attention_up[level] else 1 for level in reversed(range(c.levels))]
    return depth, reverse


def unet_config_to_diffusers(config: UNetConfig) -> dict[str, Any]:
    """A diffusers unet/config.json dict for this config (inverse of `unet_config_from_diffusers`)."""
    c, n = config, config.levels
    has_attention = [any(c.down_depths(i)) for i in range(n)]
    has_attention_up = [any(c.up_depths(i)) for i in range(n)]
    for i in range(n):  # a diffusers block has attention after all of its ResBlocks or after none
        if any(any(ds) and not all(ds) for ds in (c.down_depths(i), c.up_depths(i))):
            raise CheckpointError(f"UNetConfig level {i} mixes ResBlocks with and without attention (not in diffusers)")
    mid = c.transformer_depth_middle
    depth, reverse = _depths_to_diffusers(c, has_attention, has_attention_up)
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": c.sample_size,
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attention],
        "mid_block_type": None if mid is None else "UNetMidBlock2DCrossAttn" if mid else "UNetMidBlock2D",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attention_up)],
        "only_cross_attention": False,
        "block_out_channels": list(c.block_out_channels),
        "layers_per_block": c.num_res_blocks if isinstance(c.num_res_blocks, int) else list(c.num_res_blocks),
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "dropout": c.dropout,
        "act_fn": "silu",
        "norm_num_groups": c.norm_groups,
        "norm_eps": c.norm_eps,
        "cross_attention_dim": c.context_dim,
        "transformer_layers_per_block": depth,
        "reverse_transformer_layers_per_block": reverse,
        "attention_head_dim": list(c.num_heads),  # diffusers' name for the number of heads
        "num_attention_heads": None,
        "dual_cross_attention": False,
        "use_linear_projection": c.use_linear_projection,
        "class_embed_type": None,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": c.addition_time_embed_dim,
        "num_class_embeds": None,
        "upcast_attention": c.upcast_attention,
        "resnet_time_scale_shift": "default",
        "projection_class_embeddings_input_dim": c.adm_in_channels,
        "time_embedding_type": "positional",
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
    }
