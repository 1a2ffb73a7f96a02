"""LoRA (Hu et al. 2021) for the U-Net: low-rank adapters on its transformer Linear layers.

    names = add_lora(unet, rank=8, alpha=8, targets=("to_q", "to_k", "to_v", "to_out.0"))
    ... train the parameters of lora_parameters(unet) ...
    save_lora_kohya(unet, "style.safetensors")       # lora_unet_<sgm path>.lora_down / lora_up / alpha
    save_lora_peft(unet, "style_peft.safetensors")   # unet.<diffusers path>.lora_A / lora_B
    load_lora(other_unet, "style.safetensors", scale=1.0)   # merged into the weights (either format)

A wrapped layer y = W x + b + (alpha / rank) * up(down(x)) keeps W and b under their own names
(`to_q.weight`), so the model's state dict, and so `save_single_file`, are unchanged; the adapter
adds `to_q.lora_down.weight` / `to_q.lora_up.weight`. `up` starts at zero: training starts from the
base model exactly.

File formats:
- kohya (sd-scripts, A1111, ComfyUI): `lora_unet_<our sgm module name, "." -> "_">.lora_down.weight`
  (rank, in), `.lora_up.weight` (out, rank), `.alpha` (scalar).
- diffusers / PEFT: `unet.<diffusers module name>.lora_A.weight` (rank, in) / `.lora_B.weight`
  (out, rank). That format has no alpha (diffusers then takes alpha = rank), so the scale
  alpha / rank is folded into lora_B. The diffusers names come from the checkpoint key table
  (`unet_keys.diffusers_unet_keys`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoints.files import open_tensors, save_tensors
from ..checkpoints.unet_keys import diffusers_unet_keys
from ..models.unet import UNet

KOHYA_PREFIX = "lora_unet_"
PEFT_PREFIX = "unet."
METADATA = "sdxl.lora"


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

    def forward(self, x: Tensor) -> Tensor:
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
# Files.


def _diffusers_names(unet: UNet) -> dict[str, str]:
    """Our module name -> diffusers module name, from the checkpoint key table (weights only)."""
    out = {}
    for rule in diffusers_unet_keys(unet.config):
        if rule.target.endswith(".weight") and len(rule.sources) == 1:
            out[rule.target.removesuffix(".weight")] = rule.sources[0].removesuffix(".weight")
    return out


def _metadata(layers: dict[str, LoRALinear], fmt: str) -> dict[str, str]:
    any_layer = next(iter(layers.values()))
    return {METADATA: json.dumps({"format": fmt, "rank": any_layer.rank, "alpha": any_layer.alpha})}


def save_lora_kohya(unet: UNet, path: str | Path, dtype: torch.dtype = torch.float16) -> None:
    layers = lora_layers(unet)
    out: dict[str, Tensor] = {}
    for name, layer in layers.items():
        key = KOHYA_PREFIX + name.replace(".", "_")
        out[f"{key}.lora_down.weight"] = layer.lora_down.weight.detach().to(dtype)
        out[f"{key}.lora_up.weight"] = layer.lora_up.weight.detach().to(dtype)
        out[f"{key}.alpha"] = torch.tensor(float(layer.alpha), dtype=dtype)
    save_tensors(out, path, metadata=_metadata(layers, "kohya"))


def save_lora_peft(unet: UNet, path: str | Path, dtype: torch.dtype = torch.float16) -> None:
    layers = lora_layers(unet)
    names = _diffusers_names(unet)
    out: dict[str, Tensor] = {}
    for name, layer in layers.items():
        key = PEFT_PREFIX + names[name]
        out[f"{key}.lora_A.weight"] = layer.lora_down.weight.detach().to(dtype)
        out[f"{key}.lora_B.weight"] = (layer.lora_up.weight.detach().float() * layer.scale).to(dtype)
    save_tensors(out, path, metadata=_metadata(layers, "peft"))


def read_lora(unet: UNet, path: str | Path) -> dict[str, Tensor]:
    """A LoRA file (kohya or diffusers/PEFT) -> {our module name: float32 weight update (scale 1)}."""
    tensors = open_tensors(Path(path))
    keys = list(tensors)
    deltas: dict[str, Tensor] = {}
    if any(k.startswith(KOHYA_PREFIX) for k in keys):
        ours = {KOHYA_PREFIX + name.replace(".", "_"): name for name, _ in unet.named_modules() if name}
        for k in keys:
            if not k.endswith(".lora_down.weight"):
                continue
            stem = k.removesuffix(".lora_down.weight")
            if stem not in ours:
                raise ValueError(f"{path}: {stem} is not a layer of this U-Net")
            down, up = tensors[k].float(), tensors[f"{stem}.lora_up.weight"].float()
            alpha = float(tensors[f"{stem}.alpha"]) if f"{stem}.alpha" in tensors else down.shape[0]
            deltas[ours[stem]] = (up.flatten(1) @ down.flatten(1)) * (alpha / down.shape[0])
    elif any(k.startswith(PEFT_PREFIX) and ".lora_A." in k for k in keys):
        ours = {theirs: mine for mine, theirs in _diffusers_names(unet).items()}
        for k in keys:
            if not k.endswith(".lora_A.weight"):
                continue
            stem = k.removesuffix(".lora_A.weight")
            name = ours.get(stem.removeprefix(PEFT_PREFIX))
            if name is None:
                raise ValueError(f"{path}: {stem} is not a layer of this U-Net")
            down, up = tensors[k].float(), tensors[f"{stem}.lora_B.weight"].float()
            deltas[name] = up.flatten(1) @ down.flatten(1)  # alpha = rank: the scale is in lora_B
    else:
        raise ValueError(f"{path}: not a U-Net LoRA file (expected lora_unet_* or unet.*.lora_A/B keys)")
    if not deltas:
        raise ValueError(f"{path}: no LoRA layers found")
    return deltas


@torch.no_grad()
def load_lora(unet: UNet, path: str | Path, scale: float = 1.0) -> list[str]:
    """Merge a LoRA file (either format) into the U-Net's weights: W += scale * delta. Returns the
    layers changed. Merging is permanent: load the model again to undo it (or merge with -scale)."""
    deltas = read_lora(unet, path)
    for name, delta in deltas.items():
        module = unet.get_submodule(name)
        weight = module.weight
        if delta.shape != weight.shape[:2] or weight.ndim not in (2, 4):
            raise ValueError(f"{path}: LoRA update for {name} has shape {tuple(delta.shape)}, the layer {tuple(weight.shape)}")
        weight.add_((scale * delta).reshape(weight.shape).to(weight.dtype))
    return sorted(deltas)
