"""The one table of dtype names users type (`--dtype fp16`, `save_dtype = "bf16"`, `load(dtype="float16")`).

Nothing here imports torch until a name is turned into a torch dtype, so the command line's `--help` stays fast.
"""

from __future__ import annotations

from typing import Any

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}  # short name -> torch's name
NAMES = tuple(DTYPES)


def torch_dtype(value: Any):
    """A torch dtype from a short name ("fp16"), torch's name ("float16") or a torch dtype itself."""
    import torch

    if isinstance(value, torch.dtype):
        return value
    name = DTYPES.get(value, value)
    if name not in DTYPES.values():
        raise ValueError(f"unknown dtype {value!r}; use one of {', '.join(k for pair in DTYPES.items() for k in pair)}")
    return getattr(torch, name)


def short_name(dtype) -> str:
    """"fp16", "bf16" or "fp32" for a torch dtype (torch's own name for any other)."""
    name = str(dtype).removeprefix("torch.")
    return next((short for short, long in DTYPES.items() if long == name), name)
