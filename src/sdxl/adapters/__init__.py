"""Adapters: LoRA / LoCon / LoHa / LoKr / full / DoRA files (kohya, LyCORIS, PEFT, old diffusers names) merged into
the weights and taken out again, and textual-inversion embeddings.

    adapter = read_adapter("style.safetensors", components)        # format detected from the keys; strict
    applied = apply(components, [(adapter, 0.8, 0.8)])             # (adapter, U-Net x, text encoders x)
    applied.restore()                                              # the base weights, bit for bit
    print(describe_adapter("style.safetensors"))                   # `sdxl info` for an adapter
    emb = read_embedding("token.safetensors", components)          # Embedding(name, clip_l, clip_g)
"""

from .apply import Applied, apply
from .embeddings import Embedding, read_embedding
from .read import Adapter, AdapterWarning, Patch, describe_adapter, output_name, read_adapter
from .write import LoRAWeights, save_lora

__all__ = ["Adapter", "AdapterWarning", "Applied", "Embedding", "LoRAWeights", "Patch", "apply", "describe_adapter",
           "output_name", "read_adapter", "read_embedding", "save_lora"]
