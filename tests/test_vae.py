"""The VAE: numerical parity with diffusers, the official and diffusers key layouts, tiling."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import randomize

from sdxl.checkpoints.keymap import CheckpointError, check_covers, check_shapes, convert, invert
from sdxl.checkpoints.load import load_vae_diffusers
from sdxl.checkpoints.vae_keys import (
    VAE_IGNORED,
    diffusers_vae_keys,
    official_vae_keys,
    vae_config_from_diffusers,
    vae_config_to_diffusers,
)
from sdxl.models import vae as vae_models
from sdxl.models.vae import AutoencoderKL, VAEConfig, blend_weights, fast_layout, run_tiled, tile_spans

diffusers = pytest.importorskip("diffusers")

MANIFESTS = Path(__file__).parent / "data" / "checkpoint-keys"

# Small but complete: 4 levels (8x), distinct widths on every level (so a level mixed up in a key
# table is a shape error), 2 res blocks per level, width-changing shortcuts in both halves.
SMALL = dict(
    block_out_channels=(16, 32, 48, 64),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    norm_num_groups=8,
    latent_channels=4,
    scaling_factor=0.13025,
)


def meta_model(config: VAEConfig) -> AutoencoderKL:
    with torch.device("meta"):
        return AutoencoderKL(config)


def load_ours(folder: Path) -> AutoencoderKL:
    """A diffusers vae/ folder -> our model through the shared loader (config.json ->
    vae_config_from_diffusers, meta build, strict diffusers_vae_keys map, shape check, assign)."""
    model = load_vae_diffusers(folder)
    assert not model.training and model.config == vae_config_from_diffusers(
        json.loads((folder / "config.json").read_text())
    )
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[torch.nn.Module, AutoencoderKL, Path]:
    """(diffusers AutoencoderKL with random weights, ours loaded from its saved folder, the folder)."""
    torch.manual_seed(0)
    ref = randomize(diffusers.AutoencoderKL(**SMALL), seed=1)
    folder = tmp_path_factory.mktemp("diffusers") / "vae"
    ref.save_pretrained(folder, safe_serialization=True)
    return ref, load_ours(folder), folder


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------
# Numerical parity with diffusers.


@torch.no_grad()
def test_encode_matches_diffusers(pair):
    ref, ours, _ = pair
    images = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    dist = ref.encode(images).latent_dist
    mean, logvar = ours.encode_moments(images)
    assert mean.shape == (2, 4, 8, 6)
    assert mean.std() > 0.05 and logvar.std() > 0.05  # not a trivial output
    assert max_err(mean, dist.mean) <= 1e-4
    assert max_err(logvar, dist.logvar) <= 1e-4
    assert torch.equal(ours.encode(images), mean)
    # Sampling: the same generator draws the same noise as diffusers' latent_dist.sample.
    sampled = ours.encode(images, sample=True, generator=torch.Generator().manual_seed(3))
    expected = dist.sample(generator=torch.Generator().manual_seed(3))
    assert max_err(sampled, expected) <= 1e-4
    assert max_err(sampled, mean) > 0.01


@torch.no_grad()
def test_decode_matches_diffusers(pair):
    ref, ours, _ = pair
    latents = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(4))
    expected = ref.decode(latents).sample
    got = ours.decode(latents)
    assert got.shape == (2, 3, 64, 48)
    assert got.std() > 0.05
    assert max_err(got, expected) <= 1e-4


@pytest.mark.parametrize(
    "options",
    [
        dict(mid_block_add_attention=False),
        dict(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611),
    ],
    ids=["no-mid-attention", "no-quant-convs"],
)
@torch.no_grad()
def test_config_options_match_diffusers(options, tmp_path):
    """Options a diffusers config can switch change our modules the same way (keys and numbers)."""
    small = dict(SMALL, block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1)
    ref = randomize(diffusers.AutoencoderKL(**(small | options)), seed=5)
    ref.save_pretrained(tmp_path / "vae", safe_serialization=True)
    ours = load_ours(tmp_path / "vae")
    assert ours.config.mid_attention == options.get("mid_block_add_attention", True)
    assert ours.config.use_quant_conv == options.get("use_quant_conv", True)
    images = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(6)) * 2 - 1
    assert max_err(ours.encode(images), ref.encode(images).latent_dist.mean) <= 1e-4
    latents = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(7))
    assert max_err(ours.decode(latents), ref.decode(latents).sample) <= 1e-4


# ---------------------------------------------------------------------------------------------
# Key layouts: the official file, the diffusers folder, and back.


def manifest_tensors(entries: dict) -> dict[str, torch.Tensor]:
    dtypes = {"float32": torch.float32, "float16": torch.float16, "int32": torch.int32, "int64": torch.int64}
    return {k: torch.empty(v["shape"], dtype=dtypes[v["dtype"]], device="meta") for k, v in entries.items()}


def test_base_parameter_count_and_no_buffers():
    model = meta_model(vae_models.base)
    assert sum(p.numel() for p in model.parameters()) == 83_653_863
    assert list(model.buffers()) == []  # nothing a meta build + assign-load could leave unset
    assert vae_models.base.downscale_factor == 8 and vae_models.tiny.downscale_factor == 8
    assert vae_models.refiner == vae_models.base


def test_official_file_layout():
    """`sdxl_vae.safetensors` loads through the identity map: every tensor used, shapes equal."""
    manifest = json.loads((MANIFESTS / "sdxl_vae.json").read_text())
    tensors = manifest_tensors(manifest["tensors"] | manifest["optional"])
    model = meta_model(vae_models.base)
    rules = official_vae_keys(vae_models.base)
    check_covers(rules, model, where="official map")
    assert all(r.sources == (r.target,) for r in rules)  # identity
    assert {s for r in rules for s in r.sources} == set(manifest["tensors"])  # only model_ema.* is left
    state = convert(tensors, rules, where="sdxl_vae.json", ignore=VAE_IGNORED)
    check_shapes(state, model, where="sdxl_vae.json")
    model.load_state_dict(state, assign=True, strict=True)  # names and shapes are all load needs
    with pytest.raises(CheckpointError, match="unexpected.*model_ema"):
        convert(tensors, rules, where="sdxl_vae.json")  # strict without the ignore list


def test_diffusers_folder_layout():
    """The official diffusers vae/ of SDXL: its config gives our base config, and its tensors map exactly."""
    entry = json.loads((MANIFESTS / "diffusers_base.json").read_text())["vae"]
    config = vae_config_from_diffusers(entry["config_used"])
    assert config == vae_models.base
    model = meta_model(config)
    rules = diffusers_vae_keys(config)
    check_covers(rules, model, where="diffusers map")
    assert {s for r in rules for s in r.sources} == set(entry["tensors"])
    state = convert(manifest_tensors(entry["tensors"]), rules, where="diffusers_base.json")
    check_shapes(state, model, where="diffusers_base.json")
    # Two layout facts worth pinning: decoder blocks are numbered in run order there, attention is linear.
    names = {r.target: r.sources[0] for r in rules}
    assert names["decoder.up.3.block.0.conv1.weight"] == "decoder.up_blocks.0.resnets.0.conv1.weight"
    assert names["decoder.up.0.block.2.conv2.weight"] == "decoder.up_blocks.3.resnets.2.conv2.weight"
    assert entry["tensors"]["encoder.mid_block.attentions.0.to_q.weight"]["shape"] == [512, 512]
    assert tuple(state["encoder.mid.attn_1.q.weight"].shape) == (512, 512, 1, 1)


def test_diffusers_round_trip(pair):
    """invert(map) of our state dict gives back diffusers' names and tensors exactly."""
    _, ours, folder = pair
    original = load_file(folder / "diffusion_pytorch_model.safetensors")
    back = invert(ours.state_dict(), diffusers_vae_keys(ours.config))
    assert back.keys() == original.keys()
    for name, tensor in original.items():
        assert back[name].shape == tensor.shape and torch.equal(back[name], tensor), name


def test_config_round_trip(pair):
    ref, ours, _ = pair
    written = vae_config_to_diffusers(ours.config)
    assert vae_config_from_diffusers(written) == ours.config
    for key, value in written.items():  # what diffusers itself recorded for this model
        if key != "_class_name":
            expected = ref.config[key]
            assert (list(expected) if isinstance(expected, tuple) else expected) == value, key
    # SDXL's own config.json round-trips too, and an unusual config is built by diffusers the same way.
    odd = dataclasses.replace(vae_models.tiny, mid_attention=False, use_quant_conv=False, latents_mean=(0.1,) * 4,
                              latents_std=(0.9,) * 4)
    written = vae_config_to_diffusers(odd)
    assert vae_config_from_diffusers(written) == odd
    with torch.device("meta"):
        theirs = diffusers.AutoencoderKL(**{k: v for k, v in written.items() if not k.startswith("_")})
    theirs_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    state = convert(manifest_tensors({k: {"shape": s, "dtype": "float32"} for k, s in theirs_shapes.items()}),
                    diffusers_vae_keys(odd), where="diffusers-built")
    check_shapes(state, meta_model(odd), where="diffusers-built")


# ---------------------------------------------------------------------------------------------
# Clear errors.


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(act_fn="gelu"), "act_fn 'gelu'"),
        (dict(down_block_types=["AttnDownEncoderBlock2D"] * 4), "AttnDownEncoderBlock2D"),
        (dict(up_block_types=["UpDecoderBlock2D"] * 3), "3 up blocks"),
        (dict(block_out_channels=[128, 192, 512, 512]), "multiples"),
        (dict(norm_num_groups=48), "norm_groups 48"),
        (dict(_class_name="AutoencoderTiny"), "AutoencoderTiny"),
        (dict(use_tiling_magic=True), "use_tiling_magic"),
    ],
    ids=["act_fn", "block-type", "block-count", "widths", "groups", "class", "unknown-option"],
)
def test_unsupported_diffusers_config(change, message):
    entry = json.loads((MANIFESTS / "diffusers_base.json").read_text())["vae"]["config_used"]
    with pytest.raises(CheckpointError, match=message):
        vae_config_from_diffusers(entry | change)


def test_wrong_shape_missing_and_extra_tensors(pair):
    _, ours, folder = pair
    tensors = load_file(folder / "diffusion_pytorch_model.safetensors")
    rules = diffusers_vae_keys(ours.config)
    model = meta_model(ours.config)

    bad = dict(tensors, **{"decoder.up_blocks.1.resnets.0.conv1.weight": torch.zeros(48, 32, 3, 3)})
    expected = r"decoder\.up\.2\.block\.0\.conv1\.weight: file \(48, 32, 3, 3\), model \(48, 64, 3, 3\)"
    with pytest.raises(CheckpointError, match=expected):
        check_shapes(convert(bad, rules, where="bad"), model, where="bad")

    missing = {k: v for k, v in tensors.items() if k != "quant_conv.bias"}
    with pytest.raises(CheckpointError, match="missing 1 tensor.*quant_conv.bias"):
        convert(missing, rules, where="missing")

    extra = dict(tensors, **{"encoder.down_blocks.9.resnets.0.norm1.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="unexpected.*down_blocks.9"):
        convert(extra, rules, where="extra", ignore=VAE_IGNORED)


# ---------------------------------------------------------------------------------------------
# Tiling.


@pytest.fixture(scope="module")
def tiny_model() -> AutoencoderKL:
    return randomize(AutoencoderKL(vae_models.tiny), seed=8)


@torch.no_grad()
def test_one_tile_is_exactly_plain(tiny_model):
    latents = torch.randn(1, 4, 12, 16, generator=torch.Generator().manual_seed(9))
    assert torch.equal(tiny_model.decode_tiled(latents, tile=16, overlap=4), tiny_model.decode(latents))
    images = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(10)) * 2 - 1
    assert torch.equal(tiny_model.encode_tiled(images, tile=96, overlap=32), tiny_model.encode(images))
    gen = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    tiled = tiny_model.encode_tiled(images, tile=128, overlap=32, sample=True, generator=gen())
    assert torch.equal(tiled, tiny_model.encode(images, sample=True, generator=gen()))


@torch.no_grad()
def test_bfloat16_on_the_cpu_runs_channels_last(tiny_model):
    import copy

    x = torch.randn(1, 4, 8, 8)
    assert fast_layout(x) is x  # float32: as it is
    assert fast_layout(x.bfloat16()).is_contiguous(memory_format=torch.channels_last)
    half = copy.deepcopy(tiny_model).bfloat16()
    latents = torch.randn(2, 4, 12, 16, generator=torch.Generator().manual_seed(12))
    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(13)) * 2 - 1
    decoded = half.decode(latents.bfloat16())
    assert decoded.is_contiguous()  # callers get the usual layout back
    for got, want in ((decoded, tiny_model.decode(latents)), (half.encode(images.bfloat16()), tiny_model.encode(images))):
        assert (got.float() - want).abs().max() < 0.03 * want.abs().max()  # bfloat16 rounding, nothing worse


@pytest.mark.parametrize("size, tile, overlap",
                         [(32, 16, 4), (37, 10, 3), (17, 10, 4), (100, 16, 0), (9, 16, 4), (256, 128, 16), (129, 128, 16)])
def test_tile_spans_cover_evenly(size, tile, overlap):
    spans = tile_spans(size, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == size
    lengths = {b - a for a, b in spans}
    assert len(lengths) == 1 and max(lengths) <= tile  # equal tiles (no thin last one), none longer than asked
    assert all(s1 - e0 <= -overlap for (_, e0), (s1, _) in zip(spans, spans[1:]))  # overlap at least `overlap`
    # As short as the count allows: one latent less per tile would break the overlap or the cover.
    n, length = len(spans), lengths.pop()
    assert n == 1 or n * (length - 1) < size + (n - 1) * overlap
    # The weights cross-fade pairwise overlaps exactly (they sum to 1 without normalising).
    if all(spans[i + 2][0] >= spans[i][1] for i in range(len(spans) - 2)):
        total = torch.zeros(size * 8)
        for (a, b), w in zip(spans, blend_weights(spans, 8)):
            assert w.min() > 0 and w.max() <= 1
            total[a * 8 : b * 8] += w
        assert torch.allclose(total, torch.ones_like(total))


def test_run_tiled_has_no_seams():
    """A tile function with a per-tile offset (what per-tile GroupNorm statistics cause) leaves a jump
    at every seam without overlap; with overlap the offset is faded linearly across the overlap."""
    ramp = torch.arange(40.0).expand(1, 1, 24, 40)  # smooth input, rising along the width

    def offset_per_tile(x: torch.Tensor) -> torch.Tensor:  # 8x upsampling, constant = the tile's mean
        return torch.zeros_like(x).repeat_interleave(8, -2).repeat_interleave(8, -1) + x.mean()

    def largest_step(y: torch.Tensor) -> float:
        return max(y.diff(dim=-1).abs().max().item(), y.diff(dim=-2).abs().max().item())

    naive = run_tiled(offset_per_tile, ramp, tile=20, overlap=0, in_scale=1, out_scale=8)
    assert largest_step(naive) == 20.0  # tile means 9.5 and 29.5

    spans = tile_spans(40, 16, 4)  # (0,16), (12,28), (24,40): tile means 7.5, 19.5, 31.5
    blended = run_tiled(offset_per_tile, ramp, tile=16, overlap=4, in_scale=1, out_scale=8)
    overlap_pixels = (spans[0][1] - spans[1][0]) * 8
    assert blended.shape == (1, 1, 24 * 8, 40 * 8)
    assert spans == [(0, 16), (12, 28), (24, 40)] and overlap_pixels == 32
    assert largest_step(blended) <= 12.0 / overlap_pixels + 1e-5  # each step of 12 spread over 32 pixels
    assert torch.all(blended.diff(dim=-1) >= 0)  # a monotone cross-fade, no overshoot
    # Placement: a pointwise tile function gives exactly the untiled result, in both directions.
    x = torch.randn(2, 3, 24, 40)
    up = lambda t: torch.tanh(t).repeat_interleave(8, -2).repeat_interleave(8, -1)  # noqa: E731
    assert torch.allclose(run_tiled(up, x, tile=10, overlap=3, in_scale=1, out_scale=8), up(x), atol=1e-6)
    down = lambda t: F.avg_pool2d(torch.tanh(t), 8)  # noqa: E731
    big = torch.randn(2, 3, 24 * 8, 40 * 8)
    assert torch.allclose(run_tiled(down, big, tile=10, overlap=3, in_scale=8, out_scale=1), down(big), atol=1e-6)


@torch.no_grad()
def test_tiled_model_close_to_plain(tiny_model):
    """With several tiles the VAE's output differs from the untiled one (GroupNorm and attention see
    only a tile); blending overlaps must bring it much closer than tiling without overlap."""
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(12))
    plain = tiny_model.decode(latents)
    assert tile_spans(32, 16, 0) == [(0, 16), (16, 32)] and tile_spans(32, 16, 8) == [(0, 16), (8, 24), (16, 32)]
    naive = tiny_model.decode_tiled(latents, tile=16, overlap=0)  # 2 x 2 tiles side by side
    blended = tiny_model.decode_tiled(latents, tile=16, overlap=8)  # 3 x 3 tiles, 8 latents shared
    assert blended.shape == plain.shape == (1, 3, 256, 256) and torch.isfinite(blended).all()
    err_naive, err_blended = (naive - plain).abs(), (blended - plain).abs()
    assert err_blended.mean() < 0.7 * err_naive.mean()  # measured: 0.48x
    assert err_blended.max() < 0.5 * err_naive.max()  # measured: 0.22x (the worst errors sit on naive seams)

    images = torch.rand(1, 3, 128, 192, generator=torch.Generator().manual_seed(13)) * 2 - 1
    plain = tiny_model.encode(images)
    naive = tiny_model.encode_tiled(images, tile=64, overlap=0)  # 2 x 3 tiles of 8 x 8 latents
    blended = tiny_model.encode_tiled(images, tile=64, overlap=32)  # 3 x 5 tiles, 4 latents shared
    assert blended.shape == plain.shape == (1, 4, 16, 24) and torch.isfinite(blended).all()
    err_naive, err_blended = (naive - plain).abs(), (blended - plain).abs()
    assert err_blended.mean() < 0.7 * err_naive.mean()  # measured: 0.53x
    assert err_blended.max() < 0.7 * err_naive.max()  # measured: 0.52x
    with pytest.raises(ValueError, match="multiple of 8"):
        tiny_model.encode_tiled(images, tile=100, overlap=48)


def test_scale_latents():
    z = torch.randn(2, 4, 3, 5)
    sdxl = meta_model(vae_models.base)  # scaling needs only the config
    assert torch.equal(sdxl.scale_latents(z), z * 0.13025)  # as diffusers' SDXL pipeline
    for config in (
        dataclasses.replace(vae_models.tiny, shift_factor=0.1159, scaling_factor=0.3611),
        dataclasses.replace(vae_models.tiny, latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(0.5, 1.0, 2.0, 4.0)),
    ):
        model = meta_model(config)
        assert torch.allclose(model.unscale_latents(model.scale_latents(z)), z, atol=1e-6)
    shifted = meta_model(dataclasses.replace(vae_models.tiny, shift_factor=0.5, scaling_factor=2.0))
    assert torch.allclose(shifted.scale_latents(z), (z - 0.5) * 2.0)


# ---------------------------------------------------------------------------------------------
# On a GPU (skipped without one): the full-size SDXL architecture against diffusers.


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@torch.no_grad()
def test_full_size_on_gpu(tmp_path):
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # compare in true float32
    try:
        entry = json.loads((MANIFESTS / "diffusers_base.json").read_text())["vae"]["config_used"]
        ref = randomize(diffusers.AutoencoderKL(**entry), seed=14).cuda()
        ref.save_pretrained(tmp_path / "vae", safe_serialization=True)
        ours = load_ours(tmp_path / "vae").cuda()
        assert ours.config == vae_models.base
        images = torch.rand(1, 3, 256, 384, generator=torch.Generator().manual_seed(15), device="cpu").cuda() * 2 - 1
        dist = ref.encode(images).latent_dist
        mean, logvar = ours.encode_moments(images)
        scale = dist.mean.abs().max().item()
        assert max_err(mean, dist.mean) <= 1e-4 * max(1.0, scale)
        gen = lambda: torch.Generator().manual_seed(16)  # noqa: E731  a CPU generator for a GPU model
        assert max_err(ours.encode(images, sample=True, generator=gen()), dist.sample(generator=gen())) <= 1e-3
        latents = torch.randn(1, 4, 32, 48, generator=torch.Generator().manual_seed(17)).cuda()
        expected = ref.decode(latents).sample
        got = ours.decode(latents)
        print(f"full-size max errors: mean {max_err(mean, dist.mean):.2e} (|mean| max {scale:.2f}), "
              f"logvar {max_err(logvar, dist.logvar):.2e}, decode {max_err(got, expected):.2e} "
              f"(|out| max {expected.abs().max().item():.2f})")
        assert max_err(got, expected) <= 1e-4 * max(1.0, expected.abs().max().item())
        half = ours.to(torch.bfloat16)
        big = torch.randn(1, 4, 160, 160, device="cuda", dtype=torch.bfloat16)
        tiled = half.decode_tiled(big, tile=96, overlap=16)
        assert tiled.shape == (1, 3, 1280, 1280) and tiled.dtype == torch.bfloat16 and torch.isfinite(tiled).all()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
