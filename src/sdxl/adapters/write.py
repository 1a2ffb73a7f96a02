"""Writing LoRA files that other tools load: kohya (sd-scripts, A1111, ComfyUI, diffusers) and PEFT (diffusers).

    save_lora(path, unet.config, {"input_blocks.4.1.transformer_blocks.0.attn1.to_q": LoRAWeights(down, up, 8.0)})

The names come from the same tables reading uses (`keys.KOHYA`, `keys.PEFT`). kohya files carry
`alpha` and sd-scripts' metadata keys (`ss_base_model_version`, `ss_network_module`,
`ss_network_dim`, `ss_network_alpha`, `ss_output_name`); PEFT files have no alpha tensor (diffusers
then takes alpha = rank), so the scale alpha / rank is folded into lora_B.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..checkpoints.files import save_tensors
from ..models.unet import UNetConfig
from .keys import KOHYA, PEFT, Naming, stems_of

METADATA = "sdxl.lora"  # our own record: {"format", "rank", "alpha"}
KOHYA_METADATA = {"ss_base_model_version": "sdxl_base_v1-0", "ss_network_module": "networks.lora"}
WRITERS = {"kohya": KOHYA, "peft": PEFT}


@dataclass(frozen=True)
class LoRAWeights:
    """One Linear layer's adapter: W + (alpha / rank) up @ down."""

    down: Tensor  # (rank, in)
    up: Tensor  # (out, rank)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def lora_tensors(layers: Mapping[str, LoRAWeights], config: UNetConfig, naming: Naming,
                 dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
    """{our U-Net module name: weights} -> the file's tensors under `naming` (KOHYA or PEFT)."""
    stems = stems_of(naming, "unet", config)
    out: dict[str, Tensor] = {}
    for module, w in layers.items():
        stem = stems[module + ".weight"]
        if naming is PEFT:
            out[f"{stem}.lora_A.weight"] = w.down.detach().to(dtype)
            out[f"{stem}.lora_B.weight"] = (w.up.detach().float() * (w.alpha / w.rank)).to(dtype)
        else:
            out[f"{stem}.lora_down.weight"] = w.down.detach().to(dtype)
            out[f"{stem}.lora_up.weight"] = w.up.detach().to(dtype)
            out[f"{stem}.alpha"] = torch.tensor(float(w.alpha), dtype=dtype)
    return out


def lora_metadata(layers: Mapping[str, LoRAWeights], fmt: str, name: str) -> dict[str, str]:
    """safetensors metadata: kohya's keys (PEFT files: alpha = rank, as the scale is in lora_B) and ours."""
    first = next(iter(layers.values()))
    alpha = first.alpha if fmt == "kohya" else first.rank
    return {**KOHYA_METADATA, "ss_network_dim": str(first.rank), "ss_network_alpha": f"{alpha:g}",
            "ss_output_name": name, METADATA: json.dumps({"format": fmt, "rank": first.rank, "alpha": first.alpha})}


def save_lora(path: str | Path, config: UNetConfig, layers: Mapping[str, LoRAWeights], *, fmt: str = "kohya",
              dtype: torch.dtype = torch.float16, name: str | None = None) -> None:
    """Write a U-Net LoRA file in format `fmt` ("kohya" or "peft"); `name` (ss_output_name): the file's stem."""
    if fmt not in WRITERS:
        raise ValueError(f"unknown LoRA file format {fmt!r}; expected one of {', '.join(WRITERS)}")
    if not layers:
        raise ValueError("no LoRA layers to save")
    path = Path(path)
    tensors = lora_tensors(layers, config, WRITERS[fmt], dtype)
    save_tensors(tensors, path, metadata=lora_metadata(layers, fmt, name or path.stem))
