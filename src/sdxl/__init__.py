"""sdxl: Stable Diffusion XL from scratch in PyTorch.

Import stays light: nothing heavy (torch, the models) is imported until it is used.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `sdxl.load`, `sdxl.Pipeline` and `sdxl.GenerationOptions` import torch and the models only when first used.
    if name in ("load", "Pipeline"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "GenerationOptions":
        from .options import GenerationOptions

        return GenerationOptions
    raise AttributeError(f"module 'sdxl' has no attribute {name!r}")
