"""The SDXL U-Net: parity with diffusers through our loader, official layouts, key maps and configs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import randomize

from sdxl.checkpoints.keymap import CheckpointError, check_covers, check_shapes, convert, invert
from sdxl.checkpoints.load import load_unet_diffusers
from sdxl.checkpoints.unet_keys import (
    diffusers_unet_keys,
    official_unet_keys,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
)
from sdxl.models import unet as unet_models
from sdxl.models.unet import UNet, UNetConfig, count_parameters, micro_conditioning, timestep_embedding

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402

KEYS = Path(__file__).parent / "data" / "checkpoint-keys"
OFFICIAL_PREFIX = "model.diffusion_model."

# Small diffusers configs with the SDXL topologies (and the variants diffusers can express).
BASE_LIKE = dict(
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 4, 4),
    cross_attention_dim=32,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=16 + 6 * 8,
    use_linear_projection=True,
    norm_num_groups=8,
    sample_size=16,
)
REFINER_LIKE = dict(
    BASE_LIKE,
    block_out_channels=(32, 64, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    transformer_layers_per_block=2,
    attention_head_dim=(2, 4, 4, 4),
    projection_class_embeddings_input_dim=16 + 5 * 8,
)
# Inpainting input, 1x1-conv projections, per-level ResBlock counts, upcast attention.
INPAINT_LIKE = dict(BASE_LIKE, in_channels=9, use_linear_projection=False, layers_per_block=(1, 2, 1), upcast_attention=True)
# Distilled-SDXL style: per-block transformer depths, different on the way up, mid block without attention.
ASYMMETRIC = dict(
    BASE_LIKE,
    transformer_layers_per_block=(1, (1, 2), (2, 1)),
    reverse_transformer_layers_per_block=((1, 2, 1), (2, 1, 1), 1),
    mid_block_type="UNetMidBlock2D",
)
NO_MIDDLE = dict(REFINER_LIKE, mid_block_type=None)

# name -> (diffusers kwargs, latent height, width, micro-conditioning scalars)
TOPOLOGIES = {
    "base": (BASE_LIKE, 16, 24, 6),
    "refiner": (REFINER_LIKE, 16, 8, 5),
    "inpaint-odd-size": (INPAINT_LIKE, 9, 14, 6),
    "asymmetric": (ASYMMETRIC, 12, 8, 6),
    "no-middle": (NO_MIDDLE, 8, 24, 5),
}


def _reference(kwargs: dict, folder: Path) -> UNet2DConditionModel:
    torch.manual_seed(0)
    model = UNet2DConditionModel(**kwargs)
    randomize(model, 0)
    model.save_pretrained(folder, safe_serialization=True)
    return model.eval()


def _inputs(kwargs: dict, h: int, w: int, scalars: int, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    pooled_dim = kwargs["projection_class_embeddings_input_dim"] - scalars * kwargs["addition_time_embed_dim"]
    x = torch.randn(batch, kwargs.get("in_channels", 4), h, w, generator=g)
    t = torch.tensor([999.0, 37.5])[:batch]
    context = torch.randn(batch, 7, kwargs["cross_attention_dim"], generator=g)
    pooled = torch.randn(batch, pooled_dim, generator=g)
    sizes = [[8.0 * h, 8.0 * w, 0.0, 16.0, 8.0 * h, 8.0 * w], [1024.0, 768.0, 32.0, 0.0, 6.0, 2.5]]
    time_ids = torch.tensor([s[:scalars] for s in sizes])[:batch]
    return x, t, context, pooled, time_ids


@pytest.mark.parametrize("name", list(TOPOLOGIES))
def test_parity_with_diffusers(name: str, tmp_path: Path) -> None:
    kwargs, h, w, scalars = TOPOLOGIES[name]
    reference = _reference(kwargs, tmp_path / "unet")
    ours = load_unet_diffusers(tmp_path / "unet")
    assert ours.config == unet_config_from_diffusers(json.loads((tmp_path / "unet" / "config.json").read_text()))
    x, t, context, pooled, time_ids = _inputs(kwargs, h, w, scalars)
    with torch.no_grad():
        expected = reference(
            x, t, encoder_hidden_states=context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        ).sample
        y = micro_conditioning(pooled, time_ids, dim=kwargs["addition_time_embed_dim"])
        got = ours(x, t, context, y)
    assert got.shape == expected.shape == (2, 4, h, w)
    assert 0.3 < expected.std() < 30, f"reference output scale {expected.std():.3g} is not meaningful"
    err = (got - expected).abs().max().item()
    print(f"{name}: max abs err {err:.2e} (output std {expected.std():.2f})")
    assert err <= 1e-4


def test_manual_load_path_and_scalar_timestep(tmp_path: Path) -> None:
    """The steps of the loader spelled out; a scalar t equals the same t for every sample."""
    kwargs, h, w, scalars = TOPOLOGIES["base"]
    _reference(kwargs, tmp_path / "unet")
    from safetensors.torch import load_file

    config = unet_config_from_diffusers(json.loads((tmp_path / "unet" / "config.json").read_text()))
    tensors = load_file(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    with torch.device("meta"):
        model = UNet(config)
    state = convert(tensors, diffusers_unet_keys(config), where="unet")
    check_shapes(state, model, where="unet")
    model.load_state_dict(state, strict=True, assign=True)
    x, _, context, pooled, time_ids = _inputs(kwargs, h, w, scalars)
    y = micro_conditioning(pooled, time_ids, dim=8)
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.tensor(500.0), context, y), model(x, torch.full((2,), 500.0), context, y))


def test_micro_conditioning_matches_diffusers_time_ids() -> None:
    from diffusers.models.embeddings import Timesteps, get_timestep_embedding

    values = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [832.0, 1216.0, 64.0, 12.0, 896.0, 1152.0]])
    proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
    expected = proj(values.flatten()).reshape(2, -1)
    for i in range(6):  # each scalar on its own
        assert torch.equal(timestep_embedding(values[:, i], 256), proj(values[:, i]))
    pooled = torch.randn(2, 1280)
    y = micro_conditioning(pooled, values)
    assert y.shape == (2, 2816)
    assert torch.equal(y, torch.cat([pooled, expected], dim=1))
    # Shared values broadcast over the batch; timesteps with the U-Net's width; odd widths.
    assert torch.equal(micro_conditioning(pooled, values[0].tolist()), micro_conditioning(pooled, values[:1].expand(2, -1)))
    t = torch.tensor([0.0, 1.0, 500.5, 999.0])
    assert torch.equal(timestep_embedding(t, 320), get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0))
    assert torch.equal(timestep_embedding(t, 7), get_timestep_embedding(t, 7, flip_sin_to_cos=True, downscale_freq_shift=0))


# ---------------------------------------------------------------------------------------------
# Full-size models on the meta device.


def _manifest(name: str) -> dict:
    return json.loads((KEYS / name).read_text())


def _meta_tensors(entries: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: torch.empty(v["shape"], device="meta") for k, v in entries.items() if k.startswith(prefix)}


@pytest.mark.parametrize(
    "preset, official, diffusers_file, parameters",
    [
        ("base", "sd_xl_base_1.0.json", "diffusers_base.json", 2_567_463_684),
        ("refiner", "sd_xl_refiner_1.0.json", "diffusers_refiner.json", 2_259_526_660),
    ],
)
def test_full_size_layouts(preset: str, official: str, diffusers_file: str, parameters: int) -> None:
    config = getattr(unet_models, preset)
    assert count_parameters(config) == parameters
    with torch.device("meta"):
        model = UNet(config)
    for rules, tensors, where in [
        (official_unet_keys(config), _meta_tensors(_manifest(official)["tensors"], OFFICIAL_PREFIX), official),
        (diffusers_unet_keys(config), _meta_tensors(_manifest(diffusers_file)["unet"]["tensors"]), diffusers_file),
    ]:
        check_covers(rules, model, where=where)
        state = convert(tensors, rules, where=where)  # strict: every file tensor used
        check_shapes(state, model, where=where)
        assert len(state) == len(tensors) == len(model.state_dict())
    # Official map really is the identity.
    assert all(r.sources == (r.target,) for r in official_unet_keys(config))
    diffusers_config = _manifest(diffusers_file)["unet"]["config_used"]
    assert unet_config_from_diffusers(diffusers_config) == config
    written = unet_config_to_diffusers(config)
    assert {k: written[k] for k in diffusers_config} == diffusers_config


def test_no_buffers_and_tiny_presets_run() -> None:
    for config in (unet_models.tiny, unet_models.tiny_refiner):
        model = UNet(config)
        assert not list(model.buffers())
        y = torch.randn(1, config.adm_in_channels)
        out = model(torch.randn(1, 4, 8, 8), torch.tensor(10.0), torch.randn(1, 77, config.context_dim), y)
        assert out.shape == (1, 4, 8, 8)
    with pytest.raises(ValueError, match="context of width 96"):
        UNet(unet_models.tiny)(torch.randn(1, 4, 8, 8), torch.tensor(1.0), torch.randn(1, 77, 95), torch.randn(1, 256))


def test_forward_traces_without_graph_breaks() -> None:
    """No host syncs or data-dependent control flow: dynamo captures one graph."""
    model = UNet(replace(unet_models.tiny, num_res_blocks=1, transformer_depth=(0, 1, 1), transformer_depth_middle=1))
    x, t, ctx, y = torch.randn(2, 4, 8, 12), torch.tensor([3.0, 700.0]), torch.randn(2, 77, 96), torch.randn(2, 256)
    explanation = torch._dynamo.explain(model)(x, t, ctx, y)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


# ---------------------------------------------------------------------------------------------
# Key maps and configs.


@pytest.mark.parametrize("name", ["base", "inpaint-odd-size", "asymmetric"])
def test_invert_gives_back_diffusers_tensors(name: str) -> None:
    torch.manual_seed(0)
    reference = UNet2DConditionModel(**TOPOLOGIES[name][0])
    config = unet_config_from_diffusers(dict(reference.config))
    rules = diffusers_unet_keys(config)
    theirs = reference.state_dict()
    model = UNet(config)
    model.load_state_dict(convert(theirs, rules, where=name), strict=True)
    back = invert(model.state_dict(), rules)
    assert back.keys() == theirs.keys()
    assert all(torch.equal(back[k], theirs[k]) for k in theirs)
    official = invert(model.state_dict(), official_unet_keys(config))
    assert official.keys() == model.state_dict().keys()


@pytest.mark.parametrize(
    "config",
    [
        unet_models.base,
        unet_models.refiner,
        unet_models.tiny,
        unet_models.tiny_refiner,
        UNetConfig(in_channels=9, use_linear_projection=False, upcast_attention=True, sample_size=None),
        UNetConfig(num_res_blocks=(1, 2, 3), transformer_depth_middle=None),
        UNetConfig(
            transformer_depth=(0, (1, 2), 3),
            transformer_depth_up=(0, (2, 1, 1), 3),
            transformer_depth_middle=0,
        ),
        UNetConfig(transformer_depth=(0, 2, 0), transformer_depth_up=(1, 2, 0), transformer_depth_middle=3),
    ],
)
def test_config_round_trip_and_diffusers_builds_the_same_tensors(config: UNetConfig) -> None:
    written = unet_config_to_diffusers(config)
    assert unet_config_from_diffusers(json.loads(json.dumps(written))) == config
    with torch.device("meta"):
        reference = UNet2DConditionModel.from_config(written)
        ours = UNet(config)
    state = convert(reference.state_dict(), diffusers_unet_keys(config), where="from_config")
    check_shapes(state, ours, where="from_config")


def test_config_from_json_lists() -> None:
    """Configs saved as JSON (lists, nested lists) come back equal."""
    config = UNetConfig(transformer_depth=(0, (1, 2), 3), transformer_depth_up=(0, (2, 1, 1), 3))
    from dataclasses import asdict

    values = json.loads(json.dumps(asdict(config)))
    for loaded in (UNetConfig(**values), UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})):
        assert loaded == config and hash(loaded) == hash(config)


@pytest.mark.parametrize(
    "option, value",
    [
        ("class_embed_type", "timestep"),
        ("addition_embed_type", "text"),
        ("time_cond_proj_dim", 256),
        ("attention_type", "gated"),
        ("resnet_time_scale_shift", "scale_shift"),
        ("dual_cross_attention", True),
        ("only_cross_attention", [False, True, False]),
        ("flip_sin_to_cos", False),
        ("encoder_hid_dim_type", "text_proj"),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("down_block_types", ["DownBlock2D", "SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D"]),
        ("block_out_channels", [32, 48, 64]),
        ("cross_attention_dim", [32, 64, 32]),
    ],
)
def test_unsupported_diffusers_options(option: str, value) -> None:
    config = dict(BASE_LIKE, **{option: value})
    with pytest.raises(CheckpointError, match=option if option != "down_block_types" else "SimpleCrossAttnDownBlock2D"):
        unet_config_from_diffusers(config)


def test_unsupported_structures_are_checkpoint_errors() -> None:
    with pytest.raises(CheckpointError, match="at least one transformer layer"):
        unet_config_from_diffusers(dict(BASE_LIKE, transformer_layers_per_block=(1, 0, 2)))
    with pytest.raises(CheckpointError, match="reverse_transformer_layers_per_block"):
        unet_config_from_diffusers(dict(BASE_LIKE, transformer_layers_per_block=(1, (1, 2), 2)))
    with pytest.raises(CheckpointError, match="not divisible by 3 heads"):
        unet_config_from_diffusers(dict(BASE_LIKE, attention_head_dim=(2, 3, 4)))
    with pytest.raises(CheckpointError, match="middle depth"):
        unet_config_to_diffusers(UNetConfig(transformer_depth_middle=4))


def test_wrong_or_missing_tensors_are_reported() -> None:
    torch.manual_seed(0)
    reference = UNet2DConditionModel(**BASE_LIKE)
    config = unet_config_from_diffusers(dict(reference.config))
    rules = diffusers_unet_keys(config)
    with torch.device("meta"):
        model = UNet(config)
    tensors = dict(reference.state_dict())
    tensors["down_blocks.1.attentions.0.proj_in.weight"] = torch.zeros(64, 32)
    state = convert(tensors, rules, where="bad.safetensors")
    with pytest.raises(CheckpointError, match=r"bad.safetensors: 1 tensor.*input_blocks\.4\.1\.proj_in\.weight: file \(64, 32\)"):
        check_shapes(state, model, where="bad.safetensors")
    del tensors["conv_out.bias"]
    with pytest.raises(CheckpointError, match="missing 1 tensor.*conv_out.bias"):
        convert(tensors, rules, where="bad.safetensors")
    tensors["conv_out.bias"], tensors["extra.weight"] = torch.zeros(4), torch.zeros(1)
    with pytest.raises(CheckpointError, match="unexpected tensor.*extra.weight"):
        convert(tensors, rules, where="bad.safetensors")
