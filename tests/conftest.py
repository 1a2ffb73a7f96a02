"""Shared test helpers: tiny SDXL-shaped models (`tiny_components`, and the `tiny_parts` fixture) and one way to
give a model random weights that make every parameter matter (`randomize`). Test files import the helpers with
`from conftest import ...` (pytest puts this folder on sys.path)."""

from __future__ import annotations

import dataclasses
import os
import tempfile

import pytest
import torch

from sdxl.models import specs
from sdxl.models.specs import Components


def pytest_configure(config):
    # The tests, and the commands they run, never read or write the user's own model-hash cache or config file.
    for var in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME"):
        os.environ[var] = tempfile.mkdtemp(prefix=f"sdxl-tests-{var.lower()}-")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on shared CPU cores: one thread is the fastest (more threads than free cores is 20-50x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randomize(model: torch.nn.Module, seed: int, *, scale: float | None = None) -> torch.nn.Module:
    """Fresh weights from a generator seeded with `seed`, so that no two tensors are alike and a swapped or
    missing one changes the outputs, while activations stay of unit scale: matrices and convolution kernels
    N(0, 1/fan_in), embeddings N(0, 1), norm scales N(1, 0.2^2), other vectors (biases) N(0, 0.2^2).
    scale: every parameter N(0, scale^2) instead (models whose outputs should be small, e.g. a U-Net whose
    noise prediction must leave images neither flat nor saturated)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if scale is not None:
                p.copy_(r * scale)
            elif p.ndim > 1:
                p.copy_(r if "embedding" in name else r / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * r)
            else:
                p.copy_(0.2 * r)
    return model.eval()


def tiny_components(kind: str = "base", seed: int = 0, *, unet=None, randomized: bool = False) -> Components:
    """The tiny base ("base", or a 9-channel "inpaint") or refiner ("refiner") of `sdxl.models.specs`, seeded.

    unet: another U-Net config. randomized: `randomize` every model (default init leaves many outputs near zero,
    e.g. LayerNorm's unit scales and zero biases), so that images and parity checks have content."""
    spec = specs.TINY_REFINER if kind == "refiner" else specs.TINY
    unet = unet or (dataclasses.replace(spec.unet, in_channels=9) if kind == "inpaint" else spec.unet)
    parts = specs.build_components(dataclasses.replace(spec, kind=kind, unet=unet), seed)
    if randomized:
        for i, model in enumerate(parts.models().values()):
            randomize(model, seed * 10 + i)
    return parts


@pytest.fixture(scope="session")
def tiny_parts() -> Components:
    """One randomized tiny base, shared by the tests that only read it."""
    return tiny_components("base", seed=0, randomized=True)
