"""Merging adapters into the weights, and putting the base weights back.

    applied = apply(components, [(style, 0.8, 0.8), (detail, 0.5, 0.0)])  # (adapter, U-Net x, text encoders x)
    ... generate: a step costs what it costs without adapters ...
    if applied.touches_text_encoders: drop cached prompt encodings
    applied.restore()                                                       # the base weights, bit for bit

Each touched tensor is read once in float32 (de-quantised for fp8 layers), every adapter's update
for it is added in order (a DoRA update renormalises what came before it), and the sum is rounded
once to the tensor's dtype and copied back into the same tensor: parameters stay the same objects,
so a compiled U-Net does not recompile. The float32 sums and LoRA products are made in buffers reused
from tensor to tensor (fresh memory for each was page-faulted in every time, costing more than the
arithmetic): a rank-32 LoRA of every transformer linear layer of the SDXL base U-Net and both text
encoders (float16, loaded from its file) merges in 2.9 s on 2 CPU cores, 12-15 s before; the first
merge after loading takes about 12 s (28-32 s before), as it also copies each page of the mapped file
it writes to (benchmarks/lora_apply.py).

Restoring reads the touched tensors again from the checkpoint the models were loaded from
(`checkpoints.load.Origin`; `slots` says when that gives their bits): nothing is kept for them, so
a model loaded from a file holds no second copy while adapters are merged (0 bytes for that LoRA,
peak RSS 6.8 -> 7.1 GiB in float16, 12.3 GiB before). Where the file cannot give a tensor's present bits
(models built in memory or trained, tensors written since loading, a replaced component, a file
changed on disk, pickle checkpoints) its original is kept in host memory in its storage dtype, as
before: 5.4 GiB in float16 for that LoRA, a second copy of most of the model; nothing on the
accelerator. Offloaded models (`acceleration.Offload`) keep their weights in CPU memory: the device
copy is dropped first, the update is computed on the offload's device and stored in the CPU tensors,
which are also what restoring reads into.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..acceleration import execution_device
from ..checkpoints.keymap import CheckpointError
from ..checkpoints.load import Origin
from ..models.specs import Components
from .algorithms import DELTAS, decompose
from .keys import TEXT_ENCODERS
from .read import Adapter, Patch
from .slots import Saved, Slot, restore

AdapterUse = tuple[Adapter, float, float]  # (adapter, U-Net multiplier, text-encoder multiplier)
# One update of one tensor: (adapter, patch, multiplier, "weight" or "bias").
Update = tuple[Adapter, Patch, float, str]


@dataclass
class Applied:
    """Adapters merged into `components`; `restore()` undoes it exactly."""

    components: Components
    saved: list[Saved] = field(default_factory=list, repr=False)
    touched: dict[str, int] = field(default_factory=dict)  # component -> tensors changed

    @property
    def touches_text_encoders(self) -> bool:
        """Whether prompt encodings computed before `apply` (or before `restore`) are stale."""
        return any(self.touched.get(name) for name in TEXT_ENCODERS)

    @property
    def saved_bytes(self) -> int:
        """Host memory held for restoring (tensors read back from the model's file hold none)."""
        return sum(entry.nbytes for entry in self.saved)

    def restore(self) -> None:
        """Put back the tensors as they were before `apply` (restore the last applied first when stacking)."""
        for model in self.components.models().values():
            _drop_device_copy(model)
        saved, self.saved, self.touched = self.saved, [], {}
        restore(saved)


def _drop_device_copy(model: nn.Module) -> None:
    """An offloaded model's weights are its CPU tensors once the device copy is gone."""
    offload = model.__dict__.get("_offload")
    if offload is not None:
        offload.unload()


def _origin(components: Components, component: str, model: nn.Module) -> Origin | None:
    """Where `model`'s weights can be read again from: its origin, if it is still the model that was loaded."""
    origin = getattr(components, "origins", {}).get(component)
    return origin if origin is not None and origin.describes(model) else None


def _plan(components: Components, uses: Iterable[AdapterUse]) -> dict[tuple[str, str], list[Update]]:
    """(component, our tensor name) -> its updates, in the order given; multipliers of 0 are skipped."""
    plan: dict[tuple[str, str], list[Update]] = {}
    for adapter, unet_multiplier, text_multiplier in uses:
        for patch in adapter.patches:
            component = patch.target.component
            multiplier = unet_multiplier if component == "unet" else text_multiplier
            if multiplier == 0 or getattr(components, component) is None:
                continue
            if patch.algorithm != "full" or "diff" in patch.keys:
                plan.setdefault((component, patch.target.ours), []).append((adapter, patch, multiplier, "weight"))
            if "diff_b" in patch.keys:
                plan.setdefault((component, patch.target.bias.target), []).append((adapter, patch, multiplier, "bias"))
    return plan


def delta(adapter: Adapter, patch: Patch, device: torch.device, part: str = "weight") -> Tensor:
    """The scaled float32 update of a patch's weight (or bias), in its natural shape (see algorithms)."""
    if part == "bias":
        return adapter.tensors[patch.keys["diff_b"]].to(device, torch.float32)
    factors = {n: adapter.tensors[k].to(device, torch.float32) for n, k in patch.keys.items()
               if n not in ("alpha", "dora", "diff_b")}
    return DELTAS[patch.algorithm](factors) * patch.scale


class Scratch:
    """float32 buffers reused from tensor to tensor: fresh memory for each would be page-faulted in every time
    (about as long again as the arithmetic on a CPU)."""

    def __init__(self):
        self.buffers: dict[tuple[str, torch.device], Tensor] = {}

    def get(self, use: str, shape: tuple[int, ...], device: torch.device) -> Tensor:
        n = math.prod(shape)
        buffer = self.buffers.get((use, device))
        if buffer is None or buffer.numel() < n:
            buffer = self.buffers[use, device] = torch.empty(n, dtype=torch.float32, device=device)
        return buffer[:n].view(shape)


def _delta_into(adapter: Adapter, patch: Patch, device: torch.device, part: str, scratch: Scratch) -> Tensor:
    """`delta`, bit for bit, with a plain LoRA's product (most updates) made in a scratch buffer."""
    if part != "weight" or patch.algorithm != "lora" or "mid" in patch.keys:
        return delta(adapter, patch, device, part)
    up = adapter.tensors[patch.keys["up"]].to(device, torch.float32)
    down = adapter.tensors[patch.keys["down"]].to(device, torch.float32)
    up, rest = up.flatten(1), down.shape[1:]
    product = torch.mm(up, down.flatten(1), out=scratch.get("delta", (up.shape[0], math.prod(rest)), device))
    product = product.view(up.shape[0], *rest)  # algorithms.lora: (up @ down) in down's trailing shape
    return product.mul_(patch.scale) if patch.scale != 1 else product  # x * 1 is x


def _view(weight: Tensor, patch: Patch, part: str) -> Tensor:
    """The module's tensor inside ours, in the file's layout (a view: q of a fused q/k/v, a transpose)."""
    t = patch.target
    rule, index = (t.weight, t.index) if part == "weight" else (t.bias, t.bias_index)
    view = rule.save(weight)[index]
    if view.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr():
        raise AssertionError(f"key table rule for {rule.target} does not save to a view; adapters cannot use it")
    return view


def _merge(slot: Slot, updates: list[Update], device: torch.device, scratch: Scratch) -> None:
    """Add each update to the tensor in float32, then store it once."""
    weight = slot.read(device, out=scratch.get("weight", slot.shape, device))
    for adapter, patch, multiplier, part in updates:
        view = _view(weight, patch, part)
        d = _delta_into(adapter, patch, device, part, scratch)
        if d.numel() != view.numel():
            raise CheckpointError(f"{adapter.path}: {patch.stem} has {d.numel()} values for {slot.name} "
                                  f"{tuple(view.shape)} (read for another model?)")
        d = d.reshape(view.shape)
        if patch.dora_axis and part == "weight":
            magnitude = adapter.tensors[patch.keys["dora"]].to(device, torch.float32)
            view.copy_(decompose(view, d, magnitude, patch.dora_axis, multiplier))
        else:
            view.add_(d, alpha=multiplier)
    slot.write(weight)


@torch.no_grad()
def apply(components: Components, uses: Iterable[AdapterUse]) -> Applied:
    """Merge adapters into the models' weights: (adapter, U-Net multiplier, text-encoder multiplier) each."""
    applied = Applied(components)
    scratch = Scratch()
    try:
        for (component, name), updates in _plan(components, uses).items():
            model = getattr(components, component)
            _drop_device_copy(model)
            slot = Slot(model, name)
            applied.saved.append(slot.keep(_origin(components, component, model)))
            _merge(slot, updates, execution_device(model), scratch)
            applied.touched[component] = applied.touched.get(component, 0) + 1
    except BaseException:
        applied.restore()  # all or nothing
        raise
    finally:
        for origin in getattr(components, "origins", {}).values():
            origin.release()
    return applied
