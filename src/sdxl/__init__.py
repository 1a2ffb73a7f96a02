"""sdxl: Stable Diffusion XL from scratch in PyTorch.

Import stays light: nothing heavy (torch, the models) is imported until it is used.
"""

__version__ = "0.1.0"
