"""The official single-file layout's names: each component's key map and the metadata our files add.

Loading (`load.py`) and saving (`save.py`) both read these tables, so neither imports the other.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace

from torch import Tensor

from ..models import specs
from ..models.clip import CLIPConfig
from ..models.unet import UNetConfig
from ..models.vae import VAEConfig
from . import clip_keys, unet_keys, vae_keys
from .keymap import CheckpointError, KeyMap

# safetensors metadata of the files we write (other tools ignore it).
METADATA_KIND = "sdxl.kind"  # "base", "refiner" or "inpaint"
METADATA_CONFIGS = "sdxl.configs"  # JSON {component: config fields}, for models that are not the official presets
METADATA_RECOMMENDED = "sdxl.recommended"  # generation settings for this model, e.g. {"cfg": 3.0}
DIFFUSERS_RECOMMENDED = "_" + METADATA_RECOMMENDED  # the same in a diffusers folder's model_index.json (diffusers
# ignores keys that start with "_")
RECOMMENDABLE = {"cfg": float}  # GenerationOptions fields a file may recommend

# component -> (key map relative to its prefix, entries that are not weights)
OFFICIAL_KEY_MAPS = {
    "unet": lambda c: (unet_keys.official_unet_keys(c), ()),
    "vae": lambda c: (vae_keys.official_vae_keys(c), vae_keys.VAE_IGNORED),
    "text_encoder": lambda c: (clip_keys.transformers_clip_keys(c, prefix="text_model."), clip_keys.TRANSFORMERS_IGNORED),
    "text_encoder_2": lambda c: (clip_keys.openclip_keys(c), clip_keys.OPENCLIP_IGNORED),
}

CONFIG_CLASSES = {"unet": UNetConfig, "vae": VAEConfig, "text_encoder": CLIPConfig, "text_encoder_2": CLIPConfig}


def official_key_maps(configs: dict[str, object]) -> dict[str, tuple[KeyMap, tuple[str, ...]]]:
    """component -> (key map, ignored entries) for the official single-file layout."""
    return {name: OFFICIAL_KEY_MAPS[name](config) for name, config in configs.items()}


def config_from_dict(cls, values: dict):
    """A config dataclass from JSON (lists back to tuples)."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def saved_configs(tensors: Mapping[str, Tensor]) -> dict[str, object] | None:
    """The model configs that files we wrote (models of other sizes) carry in their metadata; None if there are none."""
    saved = getattr(tensors, "metadata", {}).get(METADATA_CONFIGS)
    if not saved:
        return None
    try:
        return {name: config_from_dict(CONFIG_CLASSES[name], c) for name, c in json.loads(saved).items()}
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{getattr(tensors, 'path', '?')}: unreadable model configs in the file's metadata ({e})") from None


def official_configs(tensors: Mapping[str, Tensor], kind: str, unet_in_channels: int) -> dict[str, object]:
    """The configs of a single file's models: the official presets, with what a file may vary.

    Files we wrote for models of other sizes carry their configs in the metadata.
    """
    saved = saved_configs(tensors)
    if saved:
        return saved
    spec = specs.BASE if kind == "base" else specs.REFINER
    unet_config = spec.unet
    if unet_in_channels != unet_config.in_channels:  # inpainting fine-tunes: 4 latent + 1 mask + 4 masked-image
        unet_config = replace(unet_config, in_channels=unet_in_channels)
    return {"unet": unet_config, "vae": spec.vae, "text_encoder": specs.BASE.text_encoder,
            "text_encoder_2": spec.text_encoder_2}
