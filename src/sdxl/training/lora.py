"""LoRA (Hu et al. 2021) for the U-Net: low-rank adapters on its transformer Linear layers, for training.

    names = add_lora(unet, rank=8, alpha=8, targets=("to_q", "to_k", "to_v", "to_out.0"))
    ... train the parameters of lora_parameters(unet) ...
    save_lora_kohya(unet, "style.safetensors")       # lora_unet_<sgm path>.lora_down / lora_up / alpha
    save_lora_peft(unet, "style_peft.safetensors")   # unet.<diffusers path>.lora_A / lora_B
    load_lora(other_unet, "style.safetensors", scale=1.0)   # merged into the weights (any adapter format)

A wrapped layer y = W x + b + (alpha / rank) * up(down(x)) keeps W and b under their own names
(`to_q.weight`), so the model's state dict, and so `save_single_file`, are unchanged; the adapter
adds `to_q.lora_down.weight` / `to_q.lora_up.weight`. `up` starts at zero: training starts from the
base model exactly. `with adapters_off(unet):` runs the base model itself (Diffusion-DPO's frozen
reference, with no second copy of the weights).

Only what is particular to training lives here; the file names, formats and metadata (kohya's
`ss_*` keys) are `sdxl.adapters`' (`adapters.write`, `adapters.keys`), and reading and merging any
adapter file is `adapters.read_adapter` / `adapters.apply`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters import LoRAWeights, apply, read_adapter, save_lora
from ..checkpoints.keymap import CheckpointError
from ..models.specs import Components
from ..models.unet import UNet


class LoRALinear(nn.Module):
    """A Linear layer plus a low-rank update; `weight` and `bias` are the base layer's own parameters."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        self.lora_down = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))  # as nn.Linear / PEFT
        nn.init.zeros_(self.lora_up.weight)  # the update starts at zero
        self.enabled = True  # False inside `adapters_off`: the base layer alone

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return F.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias) + self.lora_up(self.lora_down(x)) * self.scale

    def delta(self) -> Tensor:
        """The update (alpha / rank) * up @ down as a weight-shaped tensor (float32)."""
        return (self.lora_up.weight.float() @ self.lora_down.weight.float()) * self.scale


def _targets(unet: nn.Module, targets: Iterable[str]) -> list[str]:
    targets = tuple(targets)
    return [name for name, module in unet.named_modules()
            if isinstance(module, nn.Linear) and any(name.endswith("." + t) for t in targets)]


def add_lora(unet: UNet, rank: int, alpha: float | None = None,
             targets: Iterable[str] = ("to_q", "to_k", "to_v", "to_out.0")) -> list[str]:
    """Wrap the U-Net's Linear layers whose names end in one of `targets` in place; freezes everything
    else. Returns the wrapped module names."""
    alpha = float(rank if alpha is None else alpha)
    names = _targets(unet, targets)
    if not names:
        raise ValueError(f"no Linear layers of the U-Net match the LoRA targets {list(targets)}")
    unet.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha))
    return names


def lora_layers(unet: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in unet.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(unet: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_layers(unet).values() for p in (m.lora_down.weight, m.lora_up.weight)]


@contextlib.contextmanager
def adapters_off(unet: nn.Module) -> Iterator[None]:
    """Inside the block every LoRA layer of `unet` computes its base layer alone: the model as it was before
    `add_lora`, exactly (the reference of preference tuning)."""
    layers = list(lora_layers(unet).values())
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.enabled = True


def remove_lora(unet: nn.Module, merge: bool = True) -> None:
    """Put plain Linear layers back, with the update merged into their weights (`merge`) or dropped."""
    for name, layer in lora_layers(unet).items():
        parent_name, _, child = name.rpartition(".")
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight, linear.bias = layer.weight, layer.bias
        if merge:
            with torch.no_grad():
                linear.weight.add_(layer.delta().to(linear.weight.dtype))
        setattr(unet.get_submodule(parent_name), child, linear)


# ---------------------------------------------------------------------------------------------
# Files (formats and names: sdxl.adapters).


def lora_weights(unet: nn.Module) -> dict[str, LoRAWeights]:
    """{module name: its adapter's factors and alpha}, for `adapters.save_lora`."""
    return {name: LoRAWeights(layer.lora_down.weight, layer.lora_up.weight, layer.alpha)
            for name, layer in lora_layers(unet).items()}


def save_lora_kohya(unet: UNet, path: str | Path, dtype: torch.dtype = torch.float16, name: str | None = None) -> None:
    save_lora(path, unet.config, lora_weights(unet), fmt="kohya", dtype=dtype, name=name)


def save_lora_peft(unet: UNet, path: str | Path, dtype: torch.dtype = torch.float16, name: str | None = None) -> None:
    save_lora(path, unet.config, lora_weights(unet), fmt="peft", dtype=dtype, name=name)


def load_lora(unet: UNet, path: str | Path, scale: float = 1.0) -> list[str]:
    """Merge an adapter file (any format `sdxl.adapters` reads) into a bare U-Net's weights: W += scale * delta.
    Returns the modules changed. Permanent here (no restore kept): load the model again to undo it."""
    try:
        adapter = read_adapter(path, Components(kind="base", unet=unet))
    except CheckpointError as e:
        raise ValueError(f"not a U-Net LoRA file: {e}") from None
    apply(Components(kind="base", unet=unet), [(adapter, scale, 0.0)])
    return sorted(p.target.ours.removesuffix(".weight") for p in adapter.patches)
