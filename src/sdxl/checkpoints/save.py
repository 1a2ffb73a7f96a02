"""Writing SDXL checkpoints: the official single-file layout and diffusers folders.

Single file (`save_single_file`): the file other SDXL tools load: `model.diffusion_model.*`,
`first_stage_model.*`, `conditioner.embedders.N.*`, in float16 by default as the official releases.
Models whose configs are not the official presets (our tiny models) also record their configs in
the safetensors metadata (`sdxl.configs`), so our loader can rebuild them; the official presets
need nothing.

diffusers folder (`save_diffusers`): the layout of the official `stabilityai/stable-diffusion-xl-*`
repos: model_index.json, unet/ and vae/ (diffusers configs and `diffusion_pytorch_model*.safetensors`),
text_encoder/ and text_encoder_2/ (transformers configs and `model*.safetensors` in the published
`text_model.*` spelling), tokenizer/ and tokenizer_2/ (CLIPTokenizer files), scheduler/. A config
that is not an official preset is written as it is: diffusers' config.json carries all we need.
The model's recommended generation settings (`Components.recommended`, e.g. the built-in model's cfg 3;
the single file's `sdxl.recommended` metadata) go into model_index.json as DIFFUSERS_RECOMMENDED, a key
diffusers ignores (it skips keys that start with "_").

Written weight files get the usual permissions (0644 under the default umask), as any other file.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..models.specs import COMPONENTS
from .files import save_tensors
from .formats import OFFICIAL_PREFIXES
from .keymap import CheckpointError, invert
from .official import DIFFUSERS_RECOMMENDED, METADATA_CONFIGS, METADATA_KIND, METADATA_RECOMMENDED, official_key_maps


def official_layout(components, dtype: torch.dtype | None = torch.float16) -> dict[str, torch.Tensor]:
    """The state of `components` under the official single-file names (floats cast to `dtype`)."""
    layout = "refiner" if components.kind == "refiner" else "base"
    prefixes = OFFICIAL_PREFIXES[layout]
    present = {name: getattr(components, name) for name in COMPONENTS if getattr(components, name, None) is not None}
    extra = [name for name in present if name not in prefixes]
    if extra:
        raise ValueError(f"an SDXL {layout} single file has no place for {', '.join(extra)} (the refiner has no CLIP ViT-L)")
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
    if getattr(components, "recommended", None):
        metadata[METADATA_RECOMMENDED] = json.dumps(components.recommended)
    save_tensors(official_layout(components, dtype), path, metadata=metadata)


# ---------------------------------------------------------------------------------------------
# diffusers folders.

# An SDXL-era diffusers release (the official folders say 0.19.0.dev0); diffusers reads the
# version only to apply fixes for much older (< 0.10) folders.
DIFFUSERS_VERSION = "0.20.0"
DIFFUSERS_CLASSES = {
    "unet": ("diffusers", "UNet2DConditionModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
}
DIFFUSERS_PIPELINE_CLASSES = {
    "base": "StableDiffusionXLPipeline",
    "inpaint": "StableDiffusionXLInpaintPipeline",
    "refiner": "StableDiffusionXLImg2ImgPipeline",
}
# stabilityai/stable-diffusion-xl-{base,refiner}-1.0 scheduler/scheduler_config.json.
SDXL_SCHEDULER: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": DIFFUSERS_VERSION,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
# model_index.json's key for Components.recommended ({"cfg": 3.0}): diffusers ignores keys starting with "_".
# The pad token of each tokenizer folder (tokenizer_2 pads with "!", id 0, as open_clip pads with 0).
TOKENIZER_PADS = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}


def diffusers_parts(kind: str) -> tuple[str, ...]:
    """The models a diffusers SDXL folder of this kind holds (the refiner has no CLIP ViT-L)."""
    if kind not in DIFFUSERS_PIPELINE_CLASSES:
        raise ValueError(f"unknown checkpoint kind {kind!r}; expected one of {', '.join(DIFFUSERS_PIPELINE_CLASSES)}")
    return ("unet", "vae", "text_encoder_2") if kind == "refiner" else COMPONENTS


def diffusers_config(name: str, config) -> dict[str, Any]:
    """The config.json of component `name` ("unet", "vae", "text_encoder", "text_encoder_2")."""
    from .clip_keys import clip_config_to_transformers
    from .unet_keys import unet_config_to_diffusers
    from .vae_keys import vae_config_to_diffusers

    if name == "unet":
        return {**unet_config_to_diffusers(config), "_diffusers_version": DIFFUSERS_VERSION}
    if name == "vae":
        return {**vae_config_to_diffusers(config), "_diffusers_version": DIFFUSERS_VERSION}
    if name not in ("text_encoder", "text_encoder_2"):
        raise ValueError(f"unknown component {name!r}")
    cls = DIFFUSERS_CLASSES[name][1]
    if (config.projection_dim is not None) != (cls == "CLIPTextModelWithProjection"):
        has = "has" if config.projection_dim is not None else "has no"
        raise CheckpointError(f"{name} {has} text projection, but an SDXL pipeline's {name} is a {cls}")
    return {**clip_config_to_transformers(config), "architectures": [cls]}


def diffusers_key_map(name: str, config):
    """The key map between our names and component `name`'s published diffusers/transformers names."""
    from .clip_keys import transformers_clip_keys
    from .unet_keys import diffusers_unet_keys
    from .vae_keys import diffusers_vae_keys

    if name == "unet":
        return diffusers_unet_keys(config)
    if name == "vae":
        return diffusers_vae_keys(config)
    return transformers_clip_keys(config, prefix="text_model.")  # the published files' spelling


def diffusers_tensors(
    name: str, model: torch.nn.Module, dtype: torch.dtype | None = torch.float16
) -> dict[str, Tensor]:
    """`model`'s state under component `name`'s diffusers/transformers file names (floats cast to `dtype`)."""
    out = invert(model.state_dict(), diffusers_key_map(name, model.config))
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    return out


def diffusers_weight_name(name: str, variant: str | None = None) -> str:
    """The weight file name of component `name`: diffusers' or transformers' stem, `.{variant}` if given."""
    stem = "diffusion_pytorch_model" if DIFFUSERS_CLASSES[name][0] == "diffusers" else "model"
    return f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"


def diffusers_model_index(components) -> dict[str, Any]:
    """model_index.json for `components`, with the entries of the official SDXL repos."""
    kind = components.kind
    parts = diffusers_parts(kind)
    scheduler = (components.scheduler or SDXL_SCHEDULER).get("_class_name", "EulerDiscreteScheduler")
    index: dict[str, Any] = {
        "_class_name": DIFFUSERS_PIPELINE_CLASSES[kind],
        "_diffusers_version": DIFFUSERS_VERSION,
        "force_zeros_for_empty_prompt": bool(components.force_zeros_for_empty_prompt),
        "scheduler": ["diffusers", scheduler],
        "tokenizer": ["transformers", "CLIPTokenizer"] if "text_encoder" in parts else [None, None],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
    }
    if kind == "refiner":
        index["requires_aesthetics_score"] = True  # its U-Net is conditioned on an aesthetic score
    if getattr(components, "recommended", None):
        index[DIFFUSERS_RECOMMENDED] = dict(components.recommended)
    for name in COMPONENTS:
        index[name] = list(DIFFUSERS_CLASSES[name]) if name in parts else [None, None]
    return index


def _check_target(folder: Path) -> None:
    if folder.exists() or folder.is_symlink():
        if not folder.is_dir():
            raise FileExistsError(f"{folder}: exists and is not a folder; choose another output path")
        if any(folder.iterdir()):
            raise FileExistsError(
                f"{folder}: folder exists and is not empty; refusing to overwrite it (remove it or choose another path)"
            )


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_diffusers(
    components,
    folder: str | Path,
    *,
    dtype: torch.dtype | None = torch.float16,
    variant: str | None = None,
) -> None:
    """Write `components` (a load.Components) as a diffusers folder: model_index.json, unet/, vae/,
    text_encoder/ (base only), text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/.

    Floats are stored in `dtype` (None: as the models hold them); `variant` ("fp16") names the
    weight files `*.{variant}.safetensors`, as the official repos' float16 copies. The folder is
    written under a temporary name next to `folder` and renamed when complete, so a failure
    leaves no half-written folder; an existing non-empty `folder` is never overwritten.
    """
    folder = Path(folder)
    if variant is not None and (not variant or any(c in variant for c in "/\\.") or variant != variant.strip()):
        raise ValueError(f"variant {variant!r}: expected a plain name such as 'fp16'")
    models = _diffusers_models(components)
    # Configs diffusers cannot express are refused here, before anything is written.
    configs = {name: diffusers_config(name, model.config) for name, model in models.items()}
    _check_target(folder)

    folder.parent.mkdir(parents=True, exist_ok=True)
    where = folder.absolute()  # "." has no name to derive a sibling's from
    tmp = where.with_name(f".{where.name}.{uuid.uuid4().hex[:8]}.partial")
    os.mkdir(tmp)  # plain mkdir: the umask's permissions, which the final folder keeps
    try:
        _write_diffusers(tmp, components, models, configs, dtype, variant)
        _check_target(folder)  # again: something may have been written there meanwhile
        if folder.is_dir():
            folder.rmdir()  # empty; rename() cannot replace a folder on every system
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _diffusers_models(components) -> dict[str, torch.nn.Module]:
    """The models a diffusers folder of components' kind holds; ValueError when one is missing or extra."""
    parts = diffusers_parts(components.kind)
    missing = [name for name in parts if getattr(components, name, None) is None]
    if missing:
        raise ValueError(
            f"an SDXL {components.kind} diffusers folder needs {', '.join(missing)}, which the components lack"
        )
    if components.kind == "refiner" and components.text_encoder is not None:
        raise ValueError("an SDXL refiner folder has no text_encoder (CLIP ViT-L), but the components hold one")
    return {name: getattr(components, name) for name in parts}


def _write_diffusers(tmp: Path, components, models: dict, configs: dict, dtype: torch.dtype | None,
                     variant: str | None) -> None:
    """Every file of the folder, into `tmp`."""
    from ..models.tokenizer import write_transformers_files

    for name, model in models.items():
        (tmp / name).mkdir()
        config = dict(configs[name])
        if DIFFUSERS_CLASSES[name][0] == "transformers":
            stored = dtype or next(iter(model.state_dict().values())).dtype
            config["torch_dtype"] = str(stored).removeprefix("torch.")
        _write_json(tmp / name / "config.json", config)
        weights = tmp / name / diffusers_weight_name(name, variant)
        save_tensors(diffusers_tensors(name, model, dtype), weights, metadata={"format": "pt"})
    index = diffusers_model_index(components)
    for name, pad in TOKENIZER_PADS.items():
        if index[name][0] is not None:
            write_transformers_files(tmp / name, pad_token=pad)
    scheduler = dict(components.scheduler) if components.scheduler else dict(SDXL_SCHEDULER)
    scheduler.setdefault("_class_name", "EulerDiscreteScheduler")
    (tmp / "scheduler").mkdir()
    _write_json(tmp / "scheduler" / "scheduler_config.json", scheduler)
    _write_json(tmp / "model_index.json", index)
