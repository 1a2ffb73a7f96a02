"""Writing SDXL checkpoints in the official single-file layout.

The file other SDXL tools load: `model.diffusion_model.*`, `first_stage_model.*`,
`conditioner.embedders.N.*`, in float16 by default as the official releases. Models whose configs
are not the official presets (our tiny models) also record their configs in the safetensors
metadata (`sdxl.configs`), so our loader can rebuild them; the official presets need nothing.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from .files import save_tensors
from .formats import OFFICIAL_PREFIXES
from .keymap import invert

METADATA_KIND = "sdxl.kind"
METADATA_CONFIGS = "sdxl.configs"
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def official_layout(components, dtype: torch.dtype | None = torch.float16) -> dict[str, torch.Tensor]:
    """The state of `components` under the official single-file names (floats cast to `dtype`)."""
    from .load import official_key_maps

    layout = "refiner" if components.kind == "refiner" else "base"
    prefixes = OFFICIAL_PREFIXES[layout]
    present = {name: getattr(components, name) for name in COMPONENTS if getattr(components, name, None) is not None}
    maps = official_key_maps({name: model.config for name, model in present.items()})
    out: dict[str, torch.Tensor] = {}
    for name, model in present.items():
        rules, _ = maps[name]
        for key, tensor in invert(model.state_dict(), rules).items():
            out[prefixes[name] + key] = tensor
    if "text_encoder_2" in present:
        from .clip_keys import OPENCLIP_EXTRAS

        for key, value in OPENCLIP_EXTRAS.items():
            out[prefixes["text_encoder_2"] + key] = torch.tensor(value)
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    return out


def save_single_file(components, path: str | Path, *, dtype: torch.dtype | None = torch.float16) -> None:
    """Save `components` (a `load.Components`) as one official-layout .safetensors file."""
    metadata = {METADATA_KIND: components.kind}
    configs = {
        name: asdict(getattr(components, name).config)
        for name in COMPONENTS
        if getattr(components, name, None) is not None
    }
    metadata[METADATA_CONFIGS] = json.dumps(configs)
    save_tensors(official_layout(components, dtype), path, metadata=metadata)
