"""Where one of our tensors lives in a model, read and written in float32.

A plain parameter or buffer is one tensor; the weight of an `FP8Linear` is two (`weight_fp8` and its
per-row `scale`): it is read de-quantised and written re-quantised the way `store_fp8` quantises.
Writes copy into the existing tensors, so parameters stay the same objects at the same addresses
(a compiled U-Net does not recompile, CUDA graphs stay valid, offloaded weights stay pinned).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor, nn

from ..acceleration import FP8Linear

# (module, attribute, a copy of the tensor as it was): what restoring needs.
Saved = tuple[nn.Module, str, Tensor]


class Slot:
    """Our tensor `name` (`input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight`) of `model`."""

    def __init__(self, model: nn.Module, name: str):
        path, _, leaf = name.rpartition(".")
        self.name = name
        self.module = model.get_submodule(path) if path else model
        self.fp8 = isinstance(self.module, FP8Linear) and leaf == "weight"
        self.attrs = ("weight_fp8", "scale") if self.fp8 else (leaf,)
        if not isinstance(getattr(self.module, self.attrs[0], None), Tensor):
            raise AttributeError(f"{type(model).__name__} has no tensor {name}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self.module, self.attrs[0]).shape)

    def save(self) -> list[Saved]:
        """Copies of the tensors as they are (in host memory when they live on an accelerator)."""
        out = []
        for attr in self.attrs:
            t = getattr(self.module, attr).detach()
            out.append((self.module, attr, t.to("cpu", copy=True) if t.device.type != "cpu" else t.clone()))
        return out

    def read(self, device: torch.device) -> Tensor:
        """A float32 copy on `device`."""
        if self.fp8:
            m = self.module
            return m.weight_fp8.to(device, torch.float32) * m.scale.to(device, torch.float32)
        return getattr(self.module, self.attrs[0]).detach().to(device=device, dtype=torch.float32, copy=True)

    def write(self, value: Tensor) -> None:
        """Store a float32 value in place, rounded once to the tensor's dtype (re-quantised for fp8)."""
        if self.fp8:
            scale = self.module.scale
            # Quantised as store_fp8 would quantise a weight of the layer's dtype (FP8Linear.__init__).
            linear = SimpleNamespace(weight=value.to(scale.dtype), bias=None, in_features=value.shape[1],
                                     out_features=value.shape[0])
            q = FP8Linear(linear)
            values = (q.weight_fp8, q.scale)
        else:
            values = (value,)
        with torch.no_grad():
            for attr, v in zip(self.attrs, values):
                getattr(self.module, attr).copy_(v)


def restore(saved: list[Saved]) -> None:
    """Put saved tensors back (in place, bit for bit), last saved first."""
    with torch.no_grad():
        for module, attr, original in reversed(saved):
            getattr(module, attr).copy_(original)
