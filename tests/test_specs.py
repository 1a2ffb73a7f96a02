"""The model presets bundle (`sdxl.models.specs`) and the pieces split out of the pipeline: options' bucket table,
the path resolver's built-in names, the dtype table."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sdxl import dtypes
from sdxl.checkpoints.paths import resolve_path
from sdxl.models import specs
from sdxl.models.vae import VAEConfig
from sdxl.options import SDXL_BUCKETS, SDXL_RESOLUTIONS


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return model.state_dict()


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = state(a), state(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_build_components_is_seeded_per_component_and_leaves_the_global_generator_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = specs.build_components(specs.TINY, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    b = specs.build_components(specs.TINY, seed=5)
    c = specs.build_components(specs.TINY, seed=6)
    for name in specs.COMPONENTS:
        assert same(getattr(a, name), getattr(b, name)), name
        assert not same(getattr(a, name), getattr(c, name)), name
    # Another VAE beside them changes nothing else: a trained VAE can be swapped in afterwards.
    other_vae = dataclasses.replace(specs.TINY, vae=VAEConfig(base_channels=16, channel_mult=(1, 2, 4, 4),
                                                             num_res_blocks=1, norm_groups=8))
    d = specs.build_components(other_vae, seed=5)
    assert same(a.unet, d.unet) and same(a.text_encoder_2, d.text_encoder_2)
    assert not a.unet.training and not any(p.requires_grad for p in a.unet.parameters())


def test_specs_hold_what_belongs_together():
    refiner = specs.build_components(specs.TINY_REFINER)
    assert refiner.kind == "refiner" and refiner.text_encoder is None and not refiner.force_zeros_for_empty_prompt
    assert list(refiner.models()) == ["unet", "vae", "text_encoder_2"]
    for spec in specs.SPECS.values():  # the U-Net's context and label widths fit its text encoders
        width = (spec.text_encoder.width if spec.text_encoder else 0) + spec.text_encoder_2.width
        assert spec.unet.context_dim == width
        n = 6 if spec.kind == "base" else 5
        assert spec.unet.adm_in_channels == spec.text_encoder_2.projection_dim + n * spec.unet.addition_time_embed_dim


def test_one_bucket_table():
    from sdxl.training import data

    assert data.SDXL_BUCKETS is SDXL_BUCKETS and len(SDXL_BUCKETS) == 40
    assert set(SDXL_BUCKETS) <= SDXL_RESOLUTIONS and all((h, w) in SDXL_RESOLUTIONS for w, h in SDXL_BUCKETS)
    assert (704, 1344) in SDXL_RESOLUTIONS and (704, 1344) not in SDXL_BUCKETS  # the paper's one asymmetry
    assert (1000, 1000) not in SDXL_RESOLUTIONS


def test_builtin_names_resolve_to_the_packaged_files():
    assert resolve_path("builtin").name == "builtin_base.safetensors"
    assert resolve_path("Builtin-Refiner").name == "builtin_refiner.safetensors"
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_path("no-such-model.safetensors")


def test_dtype_names():
    assert dtypes.torch_dtype("fp16") is torch.float16 and dtypes.torch_dtype("bfloat16") is torch.bfloat16
    assert dtypes.torch_dtype(torch.float32) is torch.float32
    assert [dtypes.short_name(dtypes.torch_dtype(n)) for n in dtypes.NAMES] == list(dtypes.NAMES)
    with pytest.raises(ValueError, match="unknown dtype 'fp8'; use one of fp16, float16"):
        dtypes.torch_dtype("fp8")
