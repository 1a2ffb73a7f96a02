"""Weights given back while a model is not needed, and read again from its file when it is.

    release(model, origin)   # its tensors become meta tensors: the memory is free
    restore(model, origin)   # the same tensors read again from the file, converted as loading converted them

For the text encoders in low-memory generation: once a prompt is encoded they sit idle through sampling and
decoding (1.6 GB in bfloat16 for SDXL's two, 3.3 GB in float32). The module objects stay the same, so
everything that refers to them (the prompt cache's keys, the pipeline) is unaffected; `restore` gives back the
bits loading gave (the same file's bytes through the same dtype conversion).
"""

from __future__ import annotations

import torch
from torch import nn

from ..acceleration import trim_memory
from .load import Origin, tensor_states

__all__ = ["is_released", "releasable", "release", "restore"]


def releasable(model: nn.Module | None, origin: Origin | None) -> bool:
    """Whether every tensor of `model` can be read again from `origin` (the model it loaded, its files unchanged,
    each tensor in the files)."""
    if model is None or origin is None or not origin.describes(model) or origin.changed() is not None:
        return False
    return all(origin.holds(name) for name in model.state_dict())


def is_released(model: nn.Module | None) -> bool:
    return model is not None and any(t.is_meta for t in model.state_dict().values())


def release(model: nn.Module, origin: Origin | None) -> bool:
    """Free `model`'s weights if `restore` can read them again; True if it did."""
    if is_released(model) or not releasable(model, origin):
        return False
    model.to_empty(device="meta")  # drops every parameter's and buffer's storage
    trim_memory()  # else glibc keeps most of it (see trim_memory)
    return True


@torch.no_grad()
def restore(model: nn.Module, origin: Origin) -> None:
    """Read a released model's tensors again, one at a time (the read buffer is freed after)."""
    if not is_released(model):
        return
    state = {}
    for name in model.state_dict():
        stored = origin.read(name)
        dtype = origin.dtype if stored.is_floating_point() else stored.dtype
        state[name] = stored.to(device=origin.device, dtype=dtype, copy=True)
    origin.release()
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False)
    for name, t in model.state_dict(keep_vars=True).items():
        origin.known[name] = tensor_states([(name.rpartition(".")[2], t)])  # as loading records it
