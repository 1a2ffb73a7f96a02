"""Live previews (sdxl.previews): the linear latent -> RGB map, the built-in model's fitted map, and TAESD decoders
against diffusers' AutoencoderTiny with the same random weights, through both file layouts."""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

from conftest import randomize

from sdxl import builtin
from sdxl.checkpoints.load import load
from sdxl.images import to_tensor
from sdxl.models import vae as vaes
from sdxl.models.specs import Components
from sdxl.models.taesd import TAESDConfig, TAESDDecoder
from sdxl.previews import BUILTIN_MAPS, SDXL_BIAS, SDXL_FACTORS, LatentToRGB, Previewer, load_taesd, vae_fingerprint
from sdxl.training.shapes import make_example

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SDXL = LatentToRGB.from_lists(SDXL_FACTORS, SDXL_BIAS, "SDXL factors")


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


def meta_parts(latent_channels: int = 4) -> Components:
    """A model whose VAE is only a config (for_model reads nothing else)."""
    with torch.device("meta"):
        vae = vaes.AutoencoderKL(dataclasses.replace(vaes.tiny, latent_channels=latent_channels))
    return Components(kind="base", vae=vae)


# ---------------------------------------------------------------------------------------------
# The linear map.


def test_the_linear_map_is_the_per_pixel_product():
    z = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(0))
    m, b = torch.tensor(SDXL_FACTORS), torch.tensor(SDXL_BIAS)
    out = SDXL(z)
    assert out.shape == (2, 3, 3, 5)
    for i in range(2):
        for y in range(3):
            for x in range(5):
                torch.testing.assert_close(out[i, :, y, x], z[i, :, y, x] @ m + b)
    image = Previewer.linear(SDXL).image(z, 1)
    assert image.mode == "RGB" and image.size == (5, 3)  # latent size: (width, height)
    expected = ((out[1] + 1) / 2).clamp(0, 1).permute(1, 2, 0).mul(255).round().numpy()
    np.testing.assert_array_equal(pixels(image), expected)


class CountOps(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def test_the_linear_map_is_vectorised():
    """The same number of torch calls for 4 latent pixels as for 16,384: no Python loop over pixels."""
    counts = []
    for size in (2, 128):
        with CountOps() as ops:
            SDXL(torch.randn(1, 4, size, size))
        counts.append(ops.n)
    assert counts[0] == counts[1] < 20


def test_previews_clamp_to_the_image_range():
    z = torch.zeros(1, 4, 2, 2)
    z[0, 0, 0, 0], z[0, 0, 1, 1] = 100.0, -100.0  # channel 0 is all-positive in SDXL's factors
    a = pixels(Previewer.linear(SDXL).image(z))
    assert (a[0, 0] == 255).all() and (a[1, 1] == 0).all()
    assert 0 < a[0, 1].min() and a[0, 1].max() < 255  # zero latents: the bias, mid-grey


def test_index_picks_one_image_of_the_batch():
    z = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    p = Previewer.linear(SDXL)
    images = [pixels(p.image(z, i)) for i in range(3)]
    assert not np.array_equal(images[0], images[1])
    np.testing.assert_array_equal(images[1], pixels(p.image(z[1:2])))
    np.testing.assert_array_equal(images[2], pixels(p.image(z, -1)))
    with pytest.raises(IndexError):
        p.image(z, 3)
    with pytest.raises(ValueError, match="expected latents"):
        p.image(torch.randn(1, 16, 4, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_latents_work(dtype):
    z = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    p = Previewer.linear(SDXL)
    diff = np.abs(pixels(p.image(z.to(dtype))) - pixels(p.image(z)))
    assert diff.max() <= 2  # levels of 255: only the rounding of the input differs


# ---------------------------------------------------------------------------------------------
# Which map a model gets.


@pytest.fixture(scope="module")
def builtin_parts():
    return {name: load(path) for name, path in builtin.FILES.items()}


def test_models_get_their_map(builtin_parts, tiny_parts):
    assert Previewer.for_model(builtin_parts["builtin"]).source.startswith("builtin fit")  # from the file's path
    assert Previewer.for_model(builtin_parts["builtin-refiner"]).source.startswith("builtin-refiner fit")
    assert Previewer.for_model(tiny_parts, name=" Builtin ").source.startswith("builtin fit")
    assert Previewer.for_model(tiny_parts).source.startswith("SDXL")
    assert Previewer.for_model(meta_parts(), name="sd_xl_base_1.0").source.startswith("SDXL")
    with pytest.raises(ValueError, match="16 latent channels"):
        Previewer.for_model(meta_parts(16))
    with pytest.raises(ValueError, match="'builtin' preview map is for 4-channel latents"):
        Previewer.for_model(meta_parts(16), name="builtin")
    with pytest.raises(ValueError, match="no VAE"):
        Previewer.for_model(Components(kind="base"))


def test_the_fitted_maps_belong_to_the_packaged_vaes(builtin_parts):
    """A retrained built-in VAE needs `python scripts/fit_preview_map.py` again."""
    maps = json.loads(BUILTIN_MAPS.read_text())["maps"]
    assert set(maps) == set(builtin.FILES)
    for name, parts in builtin_parts.items():
        assert maps[name]["vae_sha256"] == vae_fingerprint(parts.vae), name
        assert maps[name]["held_out_rms"] < 0.7 * maps[name]["sdxl_factors_held_out_rms"]


def test_the_builtin_map_previews_the_vae_decode(builtin_parts):
    """Against the built-in VAE's own decode, pooled to the latent grid: about half the error of SDXL's factors."""
    parts = builtin_parts["builtin"]
    rng = random.Random(123)  # not the fit's pictures (seeds 0 and 1 there)
    x = torch.cat([to_tensor(make_example(rng, 64, 64, kind)[0]) for kind in ["native", "small", "crop"] * 4])
    with torch.no_grad():
        z = parts.vae.scale_latents(parts.vae.encode_moments(x)[0])
        target = F.avg_pool2d(parts.vae.decode(parts.vae.unscale_latents(z)), 8)
    target = (target / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()

    def error(previewer: Previewer) -> float:
        got = np.stack([pixels(previewer.image(z, i)) / 255 for i in range(len(z))])
        return float(np.abs(got - target).mean())

    ours, sdxl = error(Previewer.for_model(parts)), error(Previewer.linear(SDXL))
    assert ours < 0.2 and ours < 0.6 * sdxl, (ours, sdxl)


# ---------------------------------------------------------------------------------------------
# TAESD.

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def reference():
    """diffusers' AutoencoderTiny (the released TAESD shapes) with random weights."""
    torch.manual_seed(0)
    return randomize(diffusers.AutoencoderTiny(), seed=3)


def original_layout(reference) -> dict[str, torch.Tensor]:
    """The decoder's tensors as madebyollin's taesdxl_decoder files name them (Clamp is layer 0 there)."""
    out = {}
    for k, v in reference.state_dict().items():
        if k.startswith("decoder.layers."):
            i, rest = k.removeprefix("decoder.layers.").split(".", 1)
            out[f"{int(i) + 1}.{rest}"] = v.clone()
    return out


def check_matches(decoder: TAESDDecoder, reference) -> None:
    z = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(4)) * 2
    with torch.no_grad():
        want = reference.decode(z).sample
        got = decoder(z)
    assert got.shape == want.shape == (2, 3, 48, 40)
    assert want.std() > 0.05  # the weights make a picture, not a constant
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_original_layout_matches_diffusers(reference, tmp_path):
    tensors = original_layout(reference)
    save_file(tensors, tmp_path / "taesdxl_decoder.safetensors")
    torch.save(tensors, tmp_path / "taesdxl_decoder.pth")
    for name in ("taesdxl_decoder.safetensors", "taesdxl_decoder.pth"):
        check_matches(load_taesd(tmp_path / name), reference)


def test_the_diffusers_layout_matches_diffusers(reference, tmp_path):
    reference.save_pretrained(tmp_path / "taesdxl")  # a folder: config.json + diffusion_pytorch_model.safetensors
    check_matches(load_taesd(tmp_path / "taesdxl"), reference)  # the encoder's tensors are skipped
    save_file({k: v.contiguous() for k, v in reference.state_dict().items() if k.startswith("decoder.")},
              tmp_path / "decoder_only.safetensors")
    check_matches(load_taesd(tmp_path / "decoder_only.safetensors"), reference)


def test_the_latent_channels_come_from_the_file(tmp_path):
    torch.manual_seed(0)
    save_file(TAESDDecoder(TAESDConfig(latent_channels=16)).state_dict(), tmp_path / "taesd3_decoder.safetensors")
    assert load_taesd(tmp_path / "taesd3_decoder.safetensors").config.latent_channels == 16
    with pytest.raises(ValueError, match="16-channel latents, but this model's VAE has 4"):
        Previewer.for_model(meta_parts(4), taesd=tmp_path / "taesd3_decoder.safetensors")


@pytest.mark.parametrize("change, named", [
    (lambda t: t.update({"20.weight": torch.zeros(3)}), "unexpected.*20.weight"),
    (lambda t: t.pop("19.bias"), "missing.*19.bias"),
    (lambda t: t.update({"7.weight": torch.zeros(64, 64, 1, 1)}), "wrong shape.*7.weight"),
])
def test_bad_files_are_refused_by_name(reference, tmp_path, change, named):
    tensors = original_layout(reference)
    change(tensors)
    path = tmp_path / "bad_decoder.safetensors"
    save_file(tensors, path)
    with pytest.raises(ValueError, match=named) as e:
        load_taesd(path)
    assert str(path) in str(e.value)


class Payload:
    """Unpickling this would create a file: weights_only loading must never get that far."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("extra", ["namespace", "code"])
def test_pickles_holding_objects_are_refused(reference, tmp_path, extra):
    tensors = original_layout(reference)
    marker = tmp_path / "ran"
    tensors["x"] = argparse.Namespace(a=1) if extra == "namespace" else Payload(marker)
    torch.save(tensors, tmp_path / "taesd_decoder.pth")
    with pytest.raises(ValueError, match="refused to load this pickle"):
        load_taesd(tmp_path / "taesd_decoder.pth")
    assert not marker.exists()


def test_taesd_previews(reference, tmp_path):
    save_file(original_layout(reference), tmp_path / "taesdxl_decoder.safetensors")
    p = Previewer.for_model(meta_parts(), taesd=tmp_path / "taesdxl_decoder.safetensors")
    assert p.kind == "taesd"
    z = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(5))
    image = p.image(z, 1)
    assert image.mode == "RGB" and image.size == (48, 64)
    with torch.no_grad():
        want = ((reference.decode(z[1:2]).sample[0] + 1) / 2).clamp(0, 1).permute(1, 2, 0).mul(255).numpy()
    assert np.abs(pixels(image) - want).max() <= 1

    # Latents of large images are area-downsampled to fit max_size (the decode's cost is its output's area).
    big = torch.randn(1, 4, 16, 12)
    assert Previewer.taesd(p.decode.decoder, max_size=64).image(big).size == (48, 64)
    assert Previewer.taesd(p.decode.decoder, max_size=None).image(big).size == (96, 128)


def test_taesd_runs_in_the_latents_dtype(reference, tmp_path):
    save_file(original_layout(reference), tmp_path / "taesdxl_decoder.safetensors")
    p = Previewer.taesd(tmp_path / "taesdxl_decoder.safetensors")
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(6))
    full = pixels(p.image(z))
    half = pixels(p.image(z.to(torch.bfloat16)))
    assert next(p.decode.decoder.parameters()).dtype == torch.bfloat16
    assert np.abs(half - full).mean() < 3  # levels of 255
