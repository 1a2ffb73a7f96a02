"""Textual-inversion embeddings for SDXL: a few learned token vectors for each text encoder.

    emb = read_embedding("style.safetensors", components)   # Embedding("style", clip_l (n, 768), clip_g (n, 1280))

Layouts read (A1111 `modules/textual_inversion/textual_inversion.py` `load_from_file` reads the same):
- SDXL files: `clip_l` (n, 768) and `clip_g` (n, 1280) tensors (safetensors, or a weights-only pickle);
- A1111 `.pt` files: `string_to_param` with one entry, either such a pair or one (n, 768 + 1280) tensor
  (split in the order SDXL concatenates the two encoders' context).
Pickles are read with `torch.load(weights_only=True)` only: nothing in a file runs. Vectors for
models with one text encoder (SD 1.x: 768, SD 2.x: 1024 wide) are refused with a one-line error.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..checkpoints.files import PICKLE_SUFFIXES, open_tensors
from ..checkpoints.keymap import CheckpointError
from ..models import specs
from ..models.specs import Components

ONE_ENCODER = {768: "an SD 1.x embedding (768-wide, for one CLIP ViT-L text encoder)",
               1024: "an SD 2.x embedding (1024-wide, for one OpenCLIP ViT-H text encoder)"}


@dataclass(frozen=True)
class Embedding:
    """`vectors` token vectors for each SDXL text encoder, named as prompts name them (the file's stem)."""

    name: str
    clip_l: Tensor  # (n, 768) float32, for `text_encoder` (CLIP ViT-L)
    clip_g: Tensor  # (n, 1280) float32, for `text_encoder_2` (OpenCLIP bigG)

    @property
    def vectors(self) -> int:
        return self.clip_g.shape[0]


def _load(path: Path) -> Mapping:
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        tensors = open_tensors(path)
        return {k: tensors[k] for k in tensors}
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for objects other than tensors and containers, corrupt files, ...
        raise CheckpointError(f"{path}: refused to load this pickle (only weights-only pickles are read): "
                              f"{' '.join(str(e).split())[:160]}") from None
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path}: not an embedding file (a pickled {type(data).__name__})")
    return data


def _pair(data: Mapping, path: Path) -> tuple[Tensor, Tensor]:
    """(clip_l, clip_g) from any of the layouts."""
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, Mapping) or len(params) != 1:
            raise CheckpointError(f"{path}: string_to_param must hold exactly one embedding")
        data = next(iter(params.values()))
        if isinstance(data, Tensor):
            return _split(data, path)
    if isinstance(data, Mapping) and "clip_l" in data and "clip_g" in data:
        return data["clip_l"], data["clip_g"]
    tensors = [v for v in data.values() if isinstance(v, Tensor)] if isinstance(data, Mapping) else []
    if len(tensors) == 1:  # diffusers' one-token files ({"<token>": vectors})
        return _split(tensors[0], path)
    raise CheckpointError(f"{path}: not an SDXL embedding: expected clip_l and clip_g tensors or A1111's "
                          f"string_to_param, found {', '.join(map(str, list(data)[:5])) or 'nothing'}")


def _split(vectors: Tensor, path: Path) -> tuple[Tensor, Tensor]:
    """One (n, 2048) tensor -> (n, 768) and (n, 1280), as SDXL's context concatenates them."""
    vectors = vectors.reshape(-1, vectors.shape[-1]) if vectors.ndim else vectors
    width = vectors.shape[-1]
    if width in ONE_ENCODER:
        raise CheckpointError(f"{path}: not an SDXL embedding: {ONE_ENCODER[width]}; SDXL needs 768 + 1280 wide "
                              "vectors")
    l_width = specs.BASE.text_encoder.width
    if width != l_width + specs.BASE.text_encoder_2.width:
        raise CheckpointError(f"{path}: not an SDXL embedding: {width}-wide vectors (SDXL: 768 + 1280)")
    return vectors[:, :l_width], vectors[:, l_width:]


def _widths(components: Components | None) -> dict[str, int | None]:
    if components is None:
        return {"clip_l": specs.BASE.text_encoder.width, "clip_g": specs.BASE.text_encoder_2.width}
    models = {"clip_l": components.text_encoder, "clip_g": components.text_encoder_2}
    return {k: m.config.width if m is not None else None for k, m in models.items()}


def read_embedding(path: str | Path, components: Components | None = None) -> Embedding:
    """An SDXL embedding file, checked against the text encoders' widths (default: the official 768 and 1280)."""
    path = Path(path)
    clip_l, clip_g = (t.detach().float().reshape(-1, t.shape[-1]) for t in _pair(_load(path), path))
    if clip_l.shape[0] != clip_g.shape[0]:
        raise CheckpointError(f"{path}: {clip_l.shape[0]} clip_l vectors but {clip_g.shape[0]} clip_g vectors")
    for key, t in (("clip_l", clip_l), ("clip_g", clip_g)):
        width = _widths(components)[key]
        if width is not None and t.shape[1] != width:
            raise CheckpointError(f"{path}: {key} vectors are {t.shape[1]} wide, this model's text encoder takes "
                                  f"{width}")
    if clip_g.shape[0] == 0:
        raise CheckpointError(f"{path}: an embedding with no vectors")
    return Embedding(path.stem, clip_l, clip_g)
