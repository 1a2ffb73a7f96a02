"""The built-in model: a tiny SDXL-family base and refiner that ship inside the package (float16 safetensors).

Both were trained from scratch by `sdxl train` on the procedural shapes data set (`sdxl.training.shapes`:
"a {colour} {shape} on a {colour} background"), at 64x64 pixels (8x8 latents) and the scaled SDXL aspect-ratio
buckets; `scripts/train_builtin.sh` reproduces them. They are the default model when none is configured, so
`sdxl generate "a red circle on a blue background"` works on a fresh machine with no download.

Names: "builtin" (the base) and "builtin-refiner" (the refiner), accepted wherever a model path is.
Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
FILES = {"builtin": DATA / "builtin_base.safetensors", "builtin-refiner": DATA / "builtin_refiner.safetensors"}
NATIVE_SIZE = 64  # pixels: the size it was trained at (other aspect ratios of about the same area work too)


def path(name: str) -> Path | None:
    """The packaged file of a built-in model name, or None when `name` is not one."""
    return FILES.get(str(name).strip().lower())
