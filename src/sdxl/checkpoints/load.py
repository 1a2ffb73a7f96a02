"""Loading SDXL checkpoints in every layout users have, into the dtype and device asked for.

Each model is built on the meta device (no memory, no random initialisation), its tensors are
taken from the memory-mapped file through the format's key map, checked against the model's shapes
and assigned in place (`load_state_dict(assign=True)`): a tensor whose dtype and device already
match is used without a copy.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import dtypes
from ..models import vae as vae_models
from ..models.clip import CLIPTextEncoder
from ..models.specs import MODEL_CLASSES, Components
from ..models.unet import UNet
from ..models.vae import AutoencoderKL
from . import clip_keys, unet_keys, vae_keys
from .files import TensorFile, open_shards, open_tensors
from .formats import (
    OFFICIAL_IGNORED,
    OFFICIAL_PREFIXES,
    UNET_IN,
    describe_tensors,
    diffusers_components,
    diffusers_weight_files,
    read_json,
    single_file_kind,
)
from .keymap import CheckpointError, KeyMap, check_shapes, convert
from .official import METADATA_RECOMMENDED, official_configs, official_key_maps, saved_configs

__all__ = ["Components", "build", "load", "load_diffusers", "load_single_file", "load_vae", "load_vae_file"]


class Prefixed(Mapping[str, Tensor]):
    """The tensors of a file under one prefix, with the prefix removed."""

    def __init__(self, tensors: Mapping[str, Tensor], prefix: str):
        self.tensors, self.prefix = tensors, prefix
        self._keys = [k[len(prefix):] for k in tensors if k.startswith(prefix)]

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[self.prefix + name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _device_dtype(dtype: torch.dtype | str | None, device: torch.device | str | None) -> tuple[torch.dtype, torch.device]:
    return dtypes.torch_dtype(dtype) if dtype is not None else torch.float32, torch.device(device or "cpu")


def _choose_reads(tensors: Mapping[str, Tensor], dtype: torch.dtype, device: torch.device) -> None:
    """Map the file when its tensors can be used as they are; read copies when each is converted,
    straight to the GPU when that is where they go."""
    source, prefix = (tensors.tensors, tensors.prefix) if isinstance(tensors, Prefixed) else (tensors, "")
    if isinstance(source, TensorFile):
        stored = {source.dtype(prefix + k) for k in tensors}
        floats = {d for d in stored if d is not None and d.is_floating_point}
        if device.type == "cuda":
            source.read_to = device  # through pinned buffers: reading the file overlaps with the copies
        elif device.type == "cpu" and floats == {dtype}:
            source.read_to = None  # the mapped tensors are used as they are
        else:
            source.read_to = torch.device("cpu")
        source.read_dtype = dtype


def build(
    model_cls: type[nn.Module],
    config,
    tensors: Mapping[str, Tensor],
    rules: KeyMap,
    *,
    where: str,
    ignore: tuple[str, ...] = (),
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Build `model_cls(config)` on the meta device and fill it from `tensors` through `rules`."""
    dtype, device = _device_dtype(dtype, device)
    _choose_reads(tensors, dtype, device)
    with torch.device("meta"):
        model = model_cls(config)
    state = convert(tensors, rules, where=where, ignore=ignore)
    check_shapes(state, model, where=where, rules=rules)
    for k, v in state.items():  # one at a time, so each stored-dtype copy is freed as its conversion is made
        state[k] = v.to(device=device, dtype=dtype if v.is_floating_point() else None)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Official single files (sd_xl_base_1.0.safetensors, sd_xl_refiner_1.0.safetensors, fine-tunes).


def load_single_file(
    path: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    components: tuple[str, ...] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Components:
    """Load an official-layout SDXL file (base, refiner or a fine-tune of either).

    progress(name) is called after each component is loaded (e.g. to advance a progress bar)."""
    path = Path(path)
    return load_official_tensors(open_tensors(path), path, dtype=dtype, device=device, components=components,
                                 progress=progress)


def load_official_tensors(tensors, path: Path, *, dtype=None, device=None, components=None,
                          progress: Callable[[str], None] | None = None) -> Components:
    """`load_single_file` for an opened file (a TensorFile, or a manifest of meta tensors in tests)."""
    desc = describe_tensors(tensors, path)
    if desc.layout != "single-file":
        raise CheckpointError(f"{path}: not an SDXL single-file checkpoint but a {desc.kind} ({desc.layout})")
    kind = single_file_kind(tensors)
    prefixes = OFFICIAL_PREFIXES[kind]
    _check_no_strays(tensors, prefixes.values(), path)
    configs = official_configs(tensors, kind, tensors.shape(UNET_IN)[1])
    maps = official_key_maps(configs)
    out = Components(kind=desc.kind, source=path, force_zeros_for_empty_prompt=(kind == "base"),
                     recommended=_recommended(tensors, path))
    for name, prefix in prefixes.items():
        if name not in desc.components or (components is not None and name not in components):
            continue
        rules, ignore = maps[name]
        model = build(
            MODEL_CLASSES[name], configs[name], Prefixed(tensors, prefix), rules,
            where=f"{path} ({name}, {prefix}*)", ignore=ignore, dtype=dtype, device=device,
        )
        setattr(out, name, model)
        if progress is not None:
            progress(name)
    return out


RECOMMENDABLE = {"cfg": float}  # GenerationOptions fields a file may recommend


def _recommended(tensors: Mapping[str, Tensor], path: Path) -> dict:
    saved = getattr(tensors, "metadata", {}).get(METADATA_RECOMMENDED)
    if not saved:
        return {}
    try:
        values = json.loads(saved)
        return {k: RECOMMENDABLE[k](v) for k, v in values.items() if k in RECOMMENDABLE}
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable recommended settings in the file's metadata ({e})") from None


def _check_no_strays(tensors: Mapping[str, Tensor], prefixes, path: Path) -> None:
    import re

    ignored = [re.compile(p) for p in OFFICIAL_IGNORED]
    strays = [k for k in tensors if not any(k.startswith(p) for p in prefixes) and not any(p.fullmatch(k) for p in ignored)]
    if strays:
        shown = ", ".join(sorted(strays)[:5])
        raise CheckpointError(f"{path}: {len(strays)} tensor(s) outside the SDXL components: {shown}")


# ---------------------------------------------------------------------------------------------
# Standalone VAE files (sdxl_vae.safetensors, fp16-fix VAEs, diffusers-named VAE files).


def load_vae_file(path: str | Path, *, dtype=None, device=None) -> AutoencoderKL:
    """A VAE on its own: official names (`encoder.down.*`) or diffusers names (`encoder.down_blocks.*`)."""
    path = Path(path)
    tensors = open_tensors(path)
    desc = describe_tensors(tensors, path)
    if desc.kind != "vae":
        raise CheckpointError(f"{path}: not a VAE file but an SDXL {desc.kind} checkpoint ({desc.layout})")
    saved = saved_configs(tensors) or {}  # a VAE of another size that we wrote (e.g. by sdxl.training.train_vae)
    config = saved.get("vae", vae_models.base)
    official = any(k.startswith("encoder.down.") for k in tensors)
    rules = vae_keys.official_vae_keys(config) if official else vae_keys.diffusers_vae_keys(config)
    return build(AutoencoderKL, config, tensors, rules, where=str(path), ignore=vae_keys.VAE_IGNORED, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# diffusers folders: models built from each component's config.json.


def _open_component(folder: Path, variant: str | None) -> Mapping[str, Tensor]:
    return open_shards(diffusers_weight_files(folder, variant))


def load_unet_diffusers(folder: str | Path, *, dtype=None, device=None, variant: str | None = None) -> UNet:
    folder = Path(folder)
    config = unet_keys.unet_config_from_diffusers(read_json(folder / "config.json"))
    tensors = _open_component(folder, variant)
    return build(UNet, config, tensors, unet_keys.diffusers_unet_keys(config), where=str(folder), dtype=dtype, device=device)


def load_vae_diffusers(folder: str | Path, *, dtype=None, device=None, variant: str | None = None) -> AutoencoderKL:
    folder = Path(folder)
    config = vae_keys.vae_config_from_diffusers(read_json(folder / "config.json"))
    tensors = _open_component(folder, variant)
    return build(AutoencoderKL, config, tensors, vae_keys.diffusers_vae_keys(config), where=str(folder),
                 ignore=vae_keys.VAE_IGNORED, dtype=dtype, device=device)


def load_clip_transformers(folder: str | Path, *, dtype=None, device=None, variant: str | None = None) -> CLIPTextEncoder:
    """A transformers CLIPTextModel / CLIPTextModelWithProjection folder (either key spelling)."""
    folder = Path(folder)
    tensors = _open_component(folder, variant)
    config = clip_keys.clip_config_from_transformers(read_json(folder / "config.json"), keys=set(tensors))
    prefix = clip_keys.detect_transformers_prefix(set(tensors))
    rules = clip_keys.transformers_clip_keys(config, prefix=prefix)
    return build(CLIPTextEncoder, config, tensors, rules, where=str(folder), ignore=clip_keys.TRANSFORMERS_IGNORED,
                 dtype=dtype, device=device)


DIFFUSERS_LOADERS = {
    "unet": load_unet_diffusers,
    "vae": load_vae_diffusers,
    "text_encoder": load_clip_transformers,
    "text_encoder_2": load_clip_transformers,
}


def load_diffusers(
    folder: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    variant: str | None = None,
    components: tuple[str, ...] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Components:
    """Load a diffusers-format SDXL folder (model_index.json, unet/, vae/, text_encoder*/)."""
    folder = Path(folder)
    kind, parts = diffusers_components(folder)
    unet_config = folder / "unet" / "config.json"
    if unet_config.is_file() and read_json(unet_config).get("in_channels") == 9:
        kind = "inpaint"
    index = read_json(folder / "model_index.json")
    out = Components(kind=kind, source=folder, force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True))
    scheduler = folder / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        out.scheduler = read_json(scheduler)
    for name in parts:
        if components is None or name in components:
            setattr(out, name, DIFFUSERS_LOADERS[name](folder / name, dtype=dtype, device=device, variant=variant))
            if progress is not None:
                progress(name)
    return out


def load(
    path: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    variant: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> Components:
    """Load any SDXL checkpoint: an official-layout single file or a diffusers folder.

    progress(name) is called after each component (unet, vae, text_encoder, text_encoder_2) is loaded."""
    path = Path(path)
    if path.is_dir():
        return load_diffusers(path, dtype=dtype, device=device, variant=variant, progress=progress)
    return load_single_file(path, dtype=dtype, device=device, progress=progress)


def load_vae(path: str | Path, *, dtype: torch.dtype | str | None = None,
             device: torch.device | str | None = None) -> AutoencoderKL:
    """A VAE from a standalone file, a diffusers VAE folder, or the vae/ of a diffusers pipeline folder."""
    path = Path(path)
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        return load_vae_diffusers(folder, dtype=dtype, device=device)
    return load_vae_file(path, dtype=dtype, device=device)
