"""Telling checkpoint files apart: what a file or folder is, before anything is loaded.

Only the tensor names and shapes in the file header are read. An SDXL single file is recognised by
its U-Net's additional-embedding input (2816 for the base, 2560 for the refiner); anything else that
looks like a known model family gets a message that names it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .files import PICKLE_SUFFIXES, open_shards, open_tensors
from .keymap import CheckpointError
from .official import METADATA_KIND

# Where each component lives in the official single-file layout (sd_xl_base_1.0.safetensors, ...).
OFFICIAL_PREFIXES = {
    "base": {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "conditioner.embedders.0.transformer.",  # OpenAI CLIP ViT-L, transformers names
        "text_encoder_2": "conditioner.embedders.1.model.",  # OpenCLIP bigG, open_clip names
    },
    "refiner": {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder_2": "conditioner.embedders.0.model.",
    },
}
# Entries of official files that are not weights (see tests/data/checkpoint-keys/README.md).
OFFICIAL_IGNORED = (r"denoiser\.sigmas", r"model_ema\..*")

# U-Net additional-embedding input width -> kind (pooled 1280 + 6 or 5 x 256 micro-conditioning).
ADM_WIDTHS = {2816: "base", 2560: "refiner"}
LABEL_EMB = "model.diffusion_model.label_emb.0.0.weight"
UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"

DIFFUSERS_PIPELINES = {
    "StableDiffusionXLPipeline": "base",
    "StableDiffusionXLImg2ImgPipeline": "refiner",  # the official refiner repo names this class
    "StableDiffusionXLInpaintPipeline": "base",
}
DIFFUSERS_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@dataclass
class Component:
    name: str  # "unet", "vae", "text_encoder", "text_encoder_2"
    parameters: int
    dtypes: dict[str, int]  # storage dtype -> number of tensors
    files: list[Path] = field(default_factory=list)


@dataclass
class Description:
    """What a checkpoint is. `layout`: "single-file", "vae-file" or "diffusers"."""

    path: Path
    layout: str
    kind: str  # "base", "refiner", "inpaint" (a 9-channel base U-Net) or "vae"
    components: dict[str, Component]
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{self.path}: SDXL {self.kind} ({self.layout})"]
        for c in self.components.values():
            dts = ", ".join(f"{n} x {d}" for d, n in sorted(c.dtypes.items(), key=lambda kv: -kv[1]))
            lines.append(f"  {c.name:<15} {c.parameters:>15,} parameters   stored as {dts}")
        total = sum(c.parameters for c in self.components.values())
        lines.append(f"  {'total':<15} {total:>15,} parameters")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _component(tensors, name: str, prefix: str, skip: tuple[str, ...] = ()) -> Component:
    names = [k for k in tensors if k.startswith(prefix) and not any(s in k for s in skip)]
    dtypes: dict[str, int] = {}
    for k in names:
        d = str(tensors.dtype(k)).removeprefix("torch.")
        dtypes[d] = dtypes.get(d, 0) + 1
    return Component(name, sum(math.prod(tensors.shape(k)) for k in names), dtypes, list(tensors.paths))


def single_file_kind(tensors) -> str:
    """"base" or "refiner" (the key layout) of an official-layout file.

    Our own files of non-official sizes (tiny models) say so in their metadata; otherwise the
    U-Net's additional-embedding width tells.
    """
    kind = getattr(tensors, "metadata", {}).get(METADATA_KIND)
    if kind in ("base", "refiner", "inpaint"):
        return "refiner" if kind == "refiner" else "base"
    shape = tensors.shape(LABEL_EMB)
    adm = shape[1] if len(shape) == 2 else None
    if adm not in ADM_WIDTHS:
        if adm is None:
            raise CheckpointError(
                f"{tensors.path}: {LABEL_EMB} has shape {tuple(shape)}; SDXL's is an [out, 2816 or 2560] matrix"
            )
        raise CheckpointError(
            f"{tensors.path}: a U-Net with a {adm}-wide additional embedding; SDXL base has 2816 and the refiner 2560"
        )
    return ADM_WIDTHS[adm]


def identify_keys(keys: set[str]) -> str | None:
    """A short description of a non-SDXL (or partial) checkpoint from its tensor names."""

    def has(fragment: str) -> bool:
        return any(fragment in k for k in keys)

    if has("double_blocks.") and has("single_blocks."):
        return "a Flux model"
    if has("joint_blocks."):
        return "a Stable Diffusion 3 model"
    if has("cond_stage_model.model.") or has("cond_stage_model.model.transformer"):
        return "a Stable Diffusion 2.x checkpoint (OpenCLIP ViT-H text encoder)"
    if has("cond_stage_model.transformer."):
        return "a Stable Diffusion 1.x checkpoint (CLIP ViT-L text encoder, 768-wide context)"
    if has("model.diffusion_model.") and has("conditioner.embedders."):
        return (
            f"an sgm-layout checkpoint whose U-Net has no {LABEL_EMB} "
            "(another model family such as SD 2.1 Turbo, or a damaged SDXL file)"
        )
    if has("lora_") or has(".lora.") or has("lora_unet_"):
        return "a LoRA (a set of weight differences), not a full model"
    if has("down_blocks.") and has("conv_in.weight") and not has("encoder."):
        return "a diffusers U-Net weight file on its own (pass the diffusers folder instead)"
    if has("text_model.encoder.layers.") or has("encoder.layers.0.self_attn"):
        return "a text encoder on its own"
    return None


def describe(path: str | Path) -> Description:
    """What `path` is: an SDXL single file, a standalone VAE, or a diffusers folder.

    Raises CheckpointError with a one-line reason for anything that is not SDXL.
    """
    path = Path(path)
    if path.is_dir():
        return _describe_diffusers(path)
    return describe_tensors(open_tensors(path), path)


def describe_tensors(tensors, path: Path) -> Description:
    """`describe` for an opened weight file (anything with keys, `shape()`, `dtype()` and `metadata`)."""
    keys = set(tensors)
    if LABEL_EMB in keys:
        kind = single_file_kind(tensors)
        if UNET_IN not in keys or len(tensors.shape(UNET_IN)) != 4:
            raise CheckpointError(f"{path}: an SDXL-like U-Net without a 4-d {UNET_IN} (a damaged or partial file)")
        # position_ids is a buffer, not a weight; bigG's logit_scale is a parameter of the OpenCLIP
        # model and is counted, as in the official numbers (694,659,841).
        components = {
            name: _component(tensors, name, prefix, skip=("position_ids",))
            for name, prefix in OFFICIAL_PREFIXES[kind].items()
            if any(k.startswith(prefix) for k in keys)
        }
        notes = []
        in_channels = tensors.shape(UNET_IN)[1]
        if in_channels == 9:
            kind = "inpaint" if kind == "base" else kind
            notes.append("9 input channels: an inpainting U-Net (latents + mask + masked-image latents)")
        missing = [n for n in OFFICIAL_PREFIXES[kind if kind != "inpaint" else "base"] if n not in components]
        if missing:
            notes.append("lacks " + ", ".join(missing) + ": supply them from another checkpoint")
        return Description(path, "single-file", kind, components, notes)
    if "encoder.conv_in.weight" in keys and "decoder.conv_out.weight" in keys:
        if "post_quant_conv.weight" not in keys and "decoder.conv_in.weight" not in keys:
            raise CheckpointError(f"{path}: a VAE-like file without decoder.conv_in.weight (a damaged or partial file)")
        latent = tensors.shape("post_quant_conv.weight")[0] if "post_quant_conv.weight" in keys else tensors.shape("decoder.conv_in.weight")[1]
        if latent != 4:
            raise CheckpointError(f"{path}: a VAE with {latent} latent channels (SD3/Flux style); SDXL's VAE has 4")
        layout = "vae-file" if any(k.startswith("encoder.down.") for k in keys) else "vae-file (diffusers names)"
        return Description(path, layout, "vae", {"vae": _component(tensors, "vae", "", skip=("model_ema.",))})
    what = identify_keys(keys)
    if what is None:
        sample = ", ".join(sorted(keys)[:3])
        what = f"an unknown model ({len(keys)} tensors, e.g. {sample})" if keys else "an empty weight file"
    raise CheckpointError(f"{path}: not an SDXL checkpoint: this is {what}")


def diffusers_weight_files(folder: Path, variant: str | None = None) -> list[Path]:
    """The weight files of one diffusers component folder, preferring `variant` ("fp16") if given.

    Handles single files and sharded ones (`*.safetensors.index.json`). Pickled `.bin` files are
    used only when no safetensors file exists (and then only with weights_only loading).
    """
    stems = ("diffusion_pytorch_model", "model")
    variants = [variant, None] if variant else [None, "fp16"]
    for v in variants:
        for stem in stems:
            name = f"{stem}.{v}.safetensors" if v else f"{stem}.safetensors"
            if (folder / name).is_file():
                return [folder / name]
            index = folder / f"{name}.index.json"
            if index.is_file():
                info = read_json(index)
                weight_map = info.get("weight_map") if isinstance(info, dict) else None
                if not isinstance(weight_map, dict) or not weight_map:
                    raise CheckpointError(f"{index}: no 'weight_map' in this shard index")
                return [folder / f for f in sorted(set(weight_map.values()))]
    for v in variants:
        for stem in stems:
            name = f"{stem}.{v}.bin" if v else f"{stem}.bin"
            if (folder / name).is_file():
                return [folder / name]
    found = ", ".join(sorted(p.name for p in folder.iterdir())) if folder.is_dir() else "no such folder"
    raise CheckpointError(f"{folder}: no weight file (*.safetensors) found; the folder holds: {found or 'nothing'}")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def diffusers_components(folder: Path) -> tuple[str, dict[str, str]]:
    """(kind, {component: class name}) from a diffusers folder's model_index.json."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise CheckpointError(f"{folder}: not a diffusers folder (no model_index.json) and not a weight file")
    info = read_json(index)
    if not isinstance(info, dict):
        raise CheckpointError(f"{index}: not a JSON object")
    cls = info.get("_class_name", "?")
    if cls not in DIFFUSERS_PIPELINES:
        raise CheckpointError(f"{folder}: not an SDXL pipeline: model_index.json names {cls}")
    parts = {
        name: entry[1]
        for name, entry in info.items()
        if name in DIFFUSERS_COMPONENTS and isinstance(entry, list) and entry[1] is not None
    }
    return DIFFUSERS_PIPELINES[cls], parts


def _describe_diffusers(folder: Path, variant: str | None = None) -> Description:
    kind, parts = diffusers_components(folder)
    components = {}
    for name in parts:
        files = diffusers_weight_files(folder / name, variant)
        tensors = open_shards(files)
        components[name] = _component(tensors, name, "", skip=("position_ids",))
    notes = []
    unet_config = folder / "unet" / "config.json"
    if unet_config.is_file() and read_json(unet_config).get("in_channels") == 9:
        kind = "inpaint"
        notes.append("9 input channels: an inpainting U-Net")
    return Description(folder, "diffusers", kind, components, notes)


__all__ = ["describe", "Description", "Component", "OFFICIAL_PREFIXES", "OFFICIAL_IGNORED", "identify_keys", "PICKLE_SUFFIXES"]
