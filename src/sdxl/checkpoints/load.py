"""Loading SDXL checkpoints in every layout users have, into the dtype and device asked for.

Each model is built on the meta device (no memory, no random initialisation), its tensors are
taken from the memory-mapped file through the format's key map, checked against the model's shapes
and assigned in place (`load_state_dict(assign=True)`): a tensor whose dtype and device already
match is used without a copy.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from ..models.clip import CLIPConfig, CLIPTextEncoder
from ..models.unet import UNet, UNetConfig
from ..models.vae import AutoencoderKL, VAEConfig
from . import clip_keys, unet_keys, vae_keys
from .files import TensorFile, open_tensors
from .formats import (
    OFFICIAL_IGNORED,
    OFFICIAL_PREFIXES,
    UNET_IN,
    describe_tensors,
    single_file_kind,
    diffusers_components,
    diffusers_weight_files,
    read_json,
)
from .keymap import CheckpointError, KeyMap, check_shapes, convert
from .save import METADATA_CONFIGS, METADATA_RECOMMENDED
from ..models import clip as clip_models, unet as unet_models, vae as vae_models


@dataclass
class Components:
    """The models of one SDXL checkpoint. The refiner has no `text_encoder` (CLIP ViT-L)."""

    kind: str  # "base", "refiner" or "inpaint"
    unet: UNet | None = None
    vae: AutoencoderKL | None = None
    text_encoder: CLIPTextEncoder | None = None  # OpenAI CLIP ViT-L/14
    text_encoder_2: CLIPTextEncoder | None = None  # OpenCLIP ViT-bigG/14
    scheduler: dict = field(default_factory=dict)  # diffusers scheduler config, when the folder has one
    # diffusers' SDXL pipelines zero the negative conditioning for an empty negative prompt when the
    # model says so: the official base does, the official refiner does not.
    force_zeros_for_empty_prompt: bool = True
    source: Path | None = None
    # Generation settings the model's maker recommends (file metadata "sdxl.recommended", e.g. {"cfg": 3.0}); the
    # pipeline uses them where the user sets nothing.
    recommended: dict = field(default_factory=dict)


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
    device = torch.device(device or "cpu")
    if isinstance(dtype, str):
        names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
                 "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
        if dtype not in names:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
        dtype = names[dtype]
    return dtype or torch.float32, device


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


def config_from_dict(cls, values: dict):
    """A config dataclass from JSON (lists back to tuples)."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


CONFIG_CLASSES = {"unet": UNetConfig, "vae": VAEConfig, "text_encoder": CLIPConfig, "text_encoder_2": CLIPConfig}


def saved_configs(tensors: Mapping[str, Tensor]) -> dict[str, object] | None:
    """The model configs that files we wrote (models of other sizes) carry in their metadata; None if there are none."""
    saved = getattr(tensors, "metadata", {}).get(METADATA_CONFIGS)
    if not saved:
        return None
    try:
        return {name: config_from_dict(CONFIG_CLASSES[name], c) for name, c in json.loads(saved).items()}
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{getattr(tensors, 'path', '?')}: unreadable model configs in the file's metadata ({e})") from None


def official_configs(tensors: Mapping[str, Tensor], kind: str) -> dict[str, object]:
    """The configs of a single file's models: the official presets, with what a file may vary.

    Files we wrote for models of other sizes carry their configs in the metadata.
    """
    saved = saved_configs(tensors)
    if saved:
        return saved
    unet_config = unet_models.base if kind == "base" else unet_models.refiner
    in_channels = tensors.shape(UNET_IN)[1]
    if in_channels != unet_config.in_channels:  # inpainting fine-tunes: 4 latent + 1 mask + 4 masked-image
        unet_config = replace(unet_config, in_channels=in_channels)
    return {
        "unet": unet_config,
        "vae": vae_models.base,
        "text_encoder": clip_models.clip_l,
        "text_encoder_2": clip_models.clip_g,
    }


OFFICIAL_KEY_MAPS = {  # component -> (key map relative to its prefix, entries that are not weights)
    "unet": lambda c: (unet_keys.official_unet_keys(c), ()),
    "vae": lambda c: (vae_keys.official_vae_keys(c), vae_keys.VAE_IGNORED),
    "text_encoder": lambda c: (clip_keys.transformers_clip_keys(c, prefix="text_model."), clip_keys.TRANSFORMERS_IGNORED),
    "text_encoder_2": lambda c: (clip_keys.openclip_keys(c), clip_keys.OPENCLIP_IGNORED),
}


def official_key_maps(configs: dict[str, object]) -> dict[str, tuple[KeyMap, tuple[str, ...]]]:
    """component -> (key map, ignored entries) for the official single-file layout."""
    return {name: OFFICIAL_KEY_MAPS[name](config) for name, config in configs.items()}


MODEL_CLASSES = {"unet": UNet, "vae": AutoencoderKL, "text_encoder": CLIPTextEncoder, "text_encoder_2": CLIPTextEncoder}


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
    configs = official_configs(tensors, kind)
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
    files = diffusers_weight_files(folder, variant)
    return open_tensors(files[0]) if len(files) == 1 else TensorFile(files)


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
