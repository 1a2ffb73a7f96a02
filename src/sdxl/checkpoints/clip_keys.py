"""Key maps for the CLIP text encoders: transformers (`CLIPTextModel[WithProjection]`) and OpenCLIP.

Our module names are OpenCLIP's (see `sdxl.models.clip`), so the OpenCLIP table is an identity
written out in full (it still documents, and checks, the exact tensor set). The transformers table
splits the fused q/k/v projection and transposes `text_projection`.

Where each spelling occurs:
- official single file `sd_xl_base_1.0.safetensors`: CLIP-L under
  `conditioner.embedders.0.transformer.` + transformers names with `text_model.` (plus the old
  `text_model.embeddings.position_ids` buffer); bigG under `conditioner.embedders.1.model.` in
  OpenCLIP names plus `logit_scale`. The refiner has bigG at `conditioner.embedders.0.model.`.
- diffusers folders: `text_encoder/model.safetensors` (`CLIPTextModel`) and `text_encoder_2/`
  (`CLIPTextModelWithProjection`), both `text_model.*`; the latter also `text_projection.weight`.
- transformers >= 5 `save_pretrained`: `CLIPTextModel` drops the `text_model.` level (the 5.x
  module *is* the text model and renames old files on load); `CLIPTextModelWithProjection` keeps
  `text_model.*` + `text_projection.weight`. Hence `prefix` and `detect_transformers_prefix`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

from sdxl.checkpoints.keymap import CheckpointError, KeyMap, fused, params, rename, transposed
from sdxl.models.clip import CLIPConfig

# File entries that are not weights. Patterns are relative to the component's root; prefix them
# with `prefixed_patterns` when the component sits inside a bigger file.
TRANSFORMERS_IGNORED = (r"(text_model\.)?embeddings\.position_ids",)  # persistent buffer before 4.31
OPENCLIP_IGNORED = (r"logit_scale",)  # CLIP's contrastive temperature; unused for text encoding

# Tensors a writer of the official OpenCLIP layout must add (the official file holds them). The
# value is ln(100) ~= 4.6052: open_clip clamps logit_scale.exp() at 100 during training, where
# trained CLIP models end up; it never influences text features. Store as a 0-d tensor.
OPENCLIP_EXTRAS: dict[str, float] = {"logit_scale": math.log(100.0)}

_BLOCK = "transformer.resblocks.{i}."


def prefixed_patterns(patterns: Iterable[str], prefix: str) -> tuple[str, ...]:
    """Ignore patterns for a component stored under `prefix` in a bigger file."""
    return tuple(re.escape(prefix) + p for p in patterns)


def transformers_clip_keys(config: CLIPConfig, prefix: str = "text_model.") -> KeyMap:
    """Our names <- transformers `CLIPTextModel` / `CLIPTextModelWithProjection` names."""
    p = prefix
    rules: KeyMap = [
        rename("token_embedding.weight", f"{p}embeddings.token_embedding.weight"),
        rename("positional_embedding", f"{p}embeddings.position_embedding.weight"),
    ]
    for i in range(config.layers):
        ours, theirs = _BLOCK.format(i=i), f"{p}encoder.layers.{i}."
        rules += params(ours + "ln_1", theirs + "layer_norm1")
        for n in ("weight", "bias"):
            qkv = (f"{theirs}self_attn.{x}_proj.{n}" for x in "qkv")
            rules.append(fused(f"{ours}attn.in_proj_{n}", qkv))
        rules += params(ours + "attn.out_proj", theirs + "self_attn.out_proj")
        rules += params(ours + "ln_2", theirs + "layer_norm2")
        rules += params(ours + "mlp.c_fc", theirs + "mlp.fc1")
        rules += params(ours + "mlp.c_proj", theirs + "mlp.fc2")
    rules += params("ln_final", f"{p}final_layer_norm")
    if config.projection_dim:
        # nn.Linear weight [P, W] (y = x W^T), outside `text_model`; ours is [W, P] used as x @ P.
        rules.append(transposed("text_projection", "text_projection.weight"))
    return rules


def openclip_keys(config: CLIPConfig) -> KeyMap:
    """Our names <- OpenCLIP text-tower names (official bigG); identical by construction."""
    names = ["token_embedding.weight", "positional_embedding"]
    for i in range(config.layers):
        b = _BLOCK.format(i=i)
        names += [b + "attn.in_proj_weight", b + "attn.in_proj_bias"]
        for sub in ("ln_1", "attn.out_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            names += [f"{b}{sub}.weight", f"{b}{sub}.bias"]
    names += ["ln_final.weight", "ln_final.bias"]
    if config.projection_dim:
        names.append("text_projection")  # [W, P], used as x @ P by OpenCLIP and by us
    return [rename(n, n) for n in names]


def detect_transformers_prefix(keys: Iterable[str]) -> str:
    """Which spelling a transformers CLIP text file uses: "text_model." (published files) or ""."""
    keys = set(keys)
    for prefix in ("text_model.", ""):
        if f"{prefix}embeddings.token_embedding.weight" in keys:
            return prefix
    raise CheckpointError(
        "not a transformers CLIP text model: found neither 'text_model.embeddings.token_embedding.weight' "
        f"nor 'embeddings.token_embedding.weight' among {len(keys)} tensor(s)"
    )


_ACTIVATIONS = ("quick_gelu", "gelu")


def _has_projection(
    config: dict[str, Any], with_projection: bool | None, keys: Iterable[str] | None, where: str
) -> bool:
    """Whether the model has a text projection, from every source given; they must agree (see the caller)."""
    votes: dict[str, bool] = {}  # who says -> has a projection
    if with_projection is not None:
        votes["the caller"] = with_projection
    if keys is not None:
        votes["the weights"] = "text_projection.weight" in set(keys)
    archs = config.get("architectures")
    if archs:
        if archs[0] not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
            raise CheckpointError(f"{where}: unsupported architecture {archs[0]!r}")
        votes["architectures"] = archs[0] == "CLIPTextModelWithProjection"
    if not votes:
        raise CheckpointError(f"{where}: no 'architectures'; say whether the model has a text projection")
    if len(set(votes.values())) > 1:
        said = ", ".join(f"{k}: {'with' if v else 'without'}" for k, v in votes.items())
        raise CheckpointError(f"{where}: conflicting answers on whether there is a text projection ({said})")
    return next(iter(votes.values()))


def clip_config_from_transformers(
    config: dict[str, Any], *, with_projection: bool | None = None, keys: Iterable[str] | None = None
) -> CLIPConfig:
    """CLIPConfig from a transformers `CLIPTextConfig` config.json dict.

    Whether the model has a text projection (`CLIPTextModelWithProjection`) cannot be read from
    the fields: `CLIPTextModel` configs carry a `projection_dim` too (SDXL's CLIP-L: 768). It is
    decided by, in this order: `with_projection` (diffusers' model_index.json names the class),
    the file's tensor names `keys` (`text_projection.weight` present), the config's
    `architectures`. When two of these are given and disagree, that is an error.
    Missing fields take transformers' `CLIPTextConfig` defaults.
    """
    where = "transformers CLIP text config"
    if "text_config" in config:
        raise CheckpointError(f"{where}: this is a full CLIPModel config; pass its 'text_config'")
    model_type = config.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
        raise CheckpointError(f"{where}: model_type {model_type!r} is not 'clip_text_model'")
    with_projection = _has_projection(config, with_projection, keys, where)
    act = config.get("hidden_act", "quick_gelu")
    if act not in _ACTIVATIONS:
        raise CheckpointError(f"{where}: hidden_act {act!r} is not supported (only {', '.join(_ACTIVATIONS)})")
    eos = config.get("eos_token_id", 49407)
    if not isinstance(eos, int):
        raise CheckpointError(f"{where}: eos_token_id must be one integer, got {eos!r}")
    width, heads = config.get("hidden_size", 512), config.get("num_attention_heads", 8)
    if width % heads:
        raise CheckpointError(f"{where}: hidden_size {width} not divisible by num_attention_heads {heads}")
    projection = config.get("projection_dim", 512) if with_projection else None
    if with_projection and not projection:
        raise CheckpointError(f"{where}: a model with projection needs projection_dim")
    return CLIPConfig(
        vocab_size=config.get("vocab_size", 49408),
        max_positions=config.get("max_position_embeddings", 77),
        width=width,
        layers=config.get("num_hidden_layers", 12),
        heads=heads,
        mlp_width=config.get("intermediate_size", 2048),
        activation=act,
        eps=config.get("layer_norm_eps") or 1e-5,
        projection_dim=projection,
        eos_token_id=eos,
    )


def clip_config_to_transformers(config: CLIPConfig) -> dict[str, Any]:
    """A transformers `CLIPTextConfig` config.json dict (for writing diffusers folders)."""
    projection = config.projection_dim is not None
    return {
        "architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": config.vocab_size,
        "hidden_size": config.width,
        "intermediate_size": config.mlp_width,
        # transformers always carries projection_dim; the official CLIP-L config says 768 = width.
        "projection_dim": config.projection_dim if projection else config.width,
        "num_hidden_layers": config.layers,
        "num_attention_heads": config.heads,
        "max_position_embeddings": config.max_positions,
        "hidden_act": config.activation,
        "layer_norm_eps": config.eps,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        # Token ids only matter to tokenizers; these are the official SDXL configs' values for
        # the legacy eos 2, and transformers' defaults otherwise.
        "pad_token_id": 1,
        "bos_token_id": 0 if config.eos_token_id == 2 else 49406,
        "eos_token_id": config.eos_token_id,
    }
