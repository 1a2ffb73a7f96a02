"""Where one of our tensors lives in a model, read and written in float32, and what putting it back takes.

A plain parameter or buffer is one tensor; the weight of a `QuantisedLinear` (fp8, int8) is two (`weight_fp8` or
`weight_int8`, and its per-row `scale`): it is read de-quantised and written re-quantised as its layer quantises.
Writes copy into the existing tensors, so parameters stay the same objects at the same addresses
(a compiled U-Net does not recompile, CUDA graphs stay valid, offloaded weights stay pinned).

Putting a tensor back (`Slot.keep`, then `Saved.restore`) reads it again from the file the model was loaded from
(`checkpoints.load.Origin`) where that gives its present bits: the tensor is as loading left it (its version
counter, address, dtype and shape are those recorded then, or when it was last restored from the file), or, where
that is not known (fp8 layers quantised after loading, weights moved into pinned memory by an offload), reading it
again was checked to give the same bits, once. Anything else (a model built in memory or trained, a tensor
written since loading, a file changed on disk) is kept as a copy in host memory, as it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..acceleration import QuantisedLinear
from ..checkpoints.keymap import CheckpointError
from ..checkpoints.load import Origin, tensor_states


class Slot:
    """Our tensor `name` (`input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight`) of `model`."""

    def __init__(self, model: nn.Module, name: str):
        path, _, leaf = name.rpartition(".")
        self.name = name
        self.module = model.get_submodule(path) if path else model
        self.fp8 = isinstance(self.module, QuantisedLinear) and leaf == "weight"  # fp8 or int8
        self.attrs = (self.module.stored, "scale") if self.fp8 else (leaf,)
        if not isinstance(getattr(self.module, self.attrs[0], None), Tensor):
            raise AttributeError(f"{type(model).__name__} has no tensor {name}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self.module, self.attrs[0]).shape)

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        return ((attr, getattr(self.module, attr).detach()) for attr in self.attrs)

    def read(self, device: torch.device, out: Tensor | None = None) -> Tensor:
        """A float32 copy on `device` (into `out`, a float32 tensor of the slot's shape, when given)."""
        if out is None:
            out = torch.empty(self.shape, dtype=torch.float32, device=device)
        if self.fp8:
            m = self.module
            out.copy_(getattr(m, m.stored))  # exact: every float8 and int8 value is a float32 value
            return out.mul_(m.scale.to(device, torch.float32))
        return out.copy_(getattr(self.module, self.attrs[0]).detach())

    def write(self, value: Tensor) -> None:
        """Store a float32 value in place, rounded once to the tensor's dtype (re-quantised for fp8)."""
        with torch.no_grad():
            for (_, t), v in zip(self.tensors(), self._stored(value)):
                t.copy_(v)

    def _stored(self, value: Tensor) -> tuple[Tensor, ...]:
        """What the slot's tensors hold for the weight `value`: itself (converted as it is copied in), or for fp8 its
        quantisation as its layer quantises a weight of the layer's dtype."""
        if not self.fp8:
            return (value,)
        return type(self.module).quantise(value.to(self.module.scale.dtype))

    def keep(self, origin: Origin | None) -> Saved:
        """What putting the tensor back as it is now takes: nothing but `origin` where reading it again from there
        gives its present bits, else copies (in host memory when it lives on an accelerator)."""
        if origin is not None and self._rereadable(origin):
            return Saved(self, (), origin)
        copies = tuple(t.to("cpu", copy=True) if t.device.type != "cpu" else t.clone() for _, t in self.tensors())
        return Saved(self, copies, None)

    def _rereadable(self, origin: Origin) -> bool:
        if not origin.holds(self.name) or origin.changed() is not None:
            return False
        now, known = tensor_states(self.tensors()), origin.known.get(self.name)
        if now == known:
            return True
        if known is not None and [(s[0], *s[2:]) for s in now] == [(s[0], *s[2:]) for s in known]:
            return False  # the same tensors, written in place since (merged into, trained): not the file's any more
        # Not known: an fp8 layer quantised after loading, a tensor moved (offload's pinned copies), converted.
        if not all(_same_bits(t, v) for (_, t), v in zip(self.tensors(), self._reread(origin))):
            return False
        origin.known[self.name] = now
        return True

    def _reread(self, origin: Origin) -> tuple[Tensor, ...]:
        """The slot's tensors as read again from `origin`, on their devices: fp8 weights quantised there (where
        store_fp8 quantised them), others converted to their dtype."""
        stored = origin.read(self.name)
        t = getattr(self.module, self.attrs[-1])
        if self.fp8:
            return self._stored(stored.to(t.device))
        return (stored.to(t.device, t.dtype if stored.is_floating_point() else None),)

    def reread(self, origin: Origin) -> None:
        """Put the tensors back from `origin`: read straight into them where they hold the file's bytes as they are,
        else copied in from a read (converting as the loader converts on the CPU), re-quantised for fp8."""
        with torch.no_grad():
            if self.fp8:
                for (_, t), v in zip(self.tensors(), self._reread(origin)):
                    t.copy_(v)
            else:
                t = getattr(self.module, self.attrs[0]).detach()
                if not origin.read_into(self.name, t):
                    t.copy_(origin.read(self.name))
        origin.known[self.name] = tensor_states(self.tensors())


def _same_bits(a: Tensor, b: Tensor) -> bool:
    """Equal bit for bit (torch.equal takes -0.0 for 0.0 and no NaN for itself)."""
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    if a.is_floating_point():
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, b = a.view(bits), b.view(bits)
    return torch.equal(a, b)


@dataclass
class Saved:
    """What putting one slot back takes: copies of its tensors, or (`copies` empty) the origin to read it from."""

    slot: Slot
    copies: tuple[Tensor, ...]
    origin: Origin | None

    @property
    def nbytes(self) -> int:
        """Host memory held."""
        return sum(t.numel() * t.element_size() for t in self.copies)

    def restore(self) -> None:
        """Put the tensors back in place, bit for bit."""
        if self.origin is not None:
            self.slot.reread(self.origin)
            return
        with torch.no_grad():
            for (_, t), original in zip(self.slot.tensors(), self.copies):
                t.copy_(original)


def restore(saved: list[Saved]) -> None:
    """Put saved tensors back (in place, bit for bit), last saved first. Tensors whose file changed on disk since
    loading cannot be read back: the others are restored, then CheckpointError says which file."""
    failed: list[str] = []
    try:
        for entry in reversed(saved):
            try:
                entry.restore()
            except CheckpointError as e:
                failed.append(str(e))
    finally:
        for origin in {id(e.origin): e.origin for e in saved if e.origin is not None}.values():
            origin.release()
    if failed:
        raise CheckpointError(f"{failed[0]} ({len(failed)} merged tensor(s) could not be put back)")
