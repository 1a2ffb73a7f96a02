"""Merging and restoring: bit-identical restores in every weight dtype and with fp8 layers, offloaded models, a
compiled U-Net that does not recompile, strict refusal of other model families, warnings for partial matches, and
the summary `sdxl info` shows."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import tiny_components
from safetensors.torch import save_file

from sdxl.acceleration import FP8Linear, Offload, store_fp8
from sdxl.adapters import AdapterWarning, apply, describe_adapter, output_name, read_adapter
from sdxl.adapters.keys import KOHYA, stems
from sdxl.adapters.slots import Slot
from sdxl.checkpoints.keymap import CheckpointError
from sdxl.models.specs import Components
from sdxl.models.unet import UNet, UNetConfig


@pytest.fixture(scope="module")
def parts(one_thread):
    return tiny_components("base", seed=0, randomized=True)


def kohya_tensors(parts: Components, *, rank: int = 2, seed: int = 0, dora: bool = False) -> dict[str, torch.Tensor]:
    """A kohya LoRA/LoCon file's tensors for every Linear and convolution of the U-Net and both text encoders."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    models = {n: m for n, m in parts.models().items() if n != "vae"}
    for stem, (naming, target) in stems({n: m.config for n, m in models.items()}).items():
        ours = torch.empty(Slot(models[target.component], target.ours).shape, device="meta")
        shape = tuple(target.weight.save(ours)[target.index].shape)
        if naming is not KOHYA or len(shape) not in (2, 4) or "embedding" in target.module:
            continue
        out[f"{stem}.lora_down.weight"] = torch.randn(rank, *shape[1:], generator=g) * 0.3
        out[f"{stem}.lora_up.weight"] = torch.randn(shape[0], rank, *[1] * (len(shape) - 2), generator=g) * 0.3
        out[f"{stem}.alpha"] = torch.tensor(1.0)
        if dora and len(shape) == 2:
            out[f"{stem}.dora_scale"] = torch.rand(shape[0], 1, generator=g) + 0.5
    return out


def write(path, tensors, metadata=None):
    save_file(tensors, str(path), metadata=metadata)
    return path


def state(parts: Components) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.detach().clone() for n, m in parts.models().items() for k, v in m.state_dict().items()}


def assert_bit_identical(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for k, v in before.items():
        a = after[k]
        assert a.dtype == v.dtype and torch.equal(v.view(torch.uint8) if v.dtype.itemsize == 1 else v, a.view(torch.uint8)
                                                  if a.dtype.itemsize == 1 else a), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_restore_is_bit_identical(parts, tmp_path, dtype):
    local = tiny_components("base", seed=0, randomized=True)
    for m in local.models().values():
        m.to(dtype)
    path = write(tmp_path / "k.safetensors", kohya_tensors(local, dora=True))
    before = state(local)
    params = {n: id(p) for n, m in local.models().items() for n2, p in m.named_parameters()}
    q = local.unet.get_parameter("input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight")
    q0 = q.detach().clone()
    adapter = read_adapter(path, local)
    applied = apply(local, [(adapter, 0.8, 0.6), (adapter, -0.3, 0.2)])
    changed = sum(not torch.equal(before[k], v) for k, v in state(local).items())
    assert changed == sum(applied.touched.values()) > 100 and applied.touches_text_encoders
    assert q.dtype == dtype and not torch.equal(q, q0)
    assert applied.saved_bytes == sum(before[k].numel() * before[k].element_size() for k, v in state(local).items()
                                      if not torch.equal(before[k], v))
    applied.restore()
    assert_bit_identical(before, state(local))
    assert {n: id(p) for n, m in local.models().items() for n2, p in m.named_parameters()} == params


def test_half_precision_weights_are_rounded_once(parts, tmp_path):
    local = tiny_components("base", seed=0, randomized=True)
    local.unet.half()
    stem = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    name = "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    down, up = torch.randn(2, 64) * 0.01, torch.randn(64, 2) * 0.01
    path = write(tmp_path / "one.safetensors", {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up})
    w = local.unet.get_parameter(name).detach().clone()
    applied = apply(local, [(read_adapter(path, local), 0.5, 1.0), (read_adapter(path, local), 0.25, 1.0)])
    expected = (w.float() + 0.5 * (up @ down) + 0.25 * (up @ down)).half()  # float32 sum, one rounding
    assert torch.equal(local.unet.get_parameter(name), expected)
    applied.restore()


def test_fp8_layers_merge_and_restore(parts, tmp_path):
    local = tiny_components("base", seed=0, randomized=True)
    path = write(tmp_path / "k.safetensors", kohya_tensors(local))
    name = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    reference = tiny_components("base", seed=0, randomized=True)
    base = reference.unet.get_parameter(name + ".weight").detach().clone()
    apply(reference, [(read_adapter(path, reference), 1.0, 1.0)])
    exact = reference.unet.get_parameter(name + ".weight").detach().clone()  # merged in float32
    store_fp8(local.unet)
    store_fp8(reference.unet)  # merged, then quantised
    before = state(local)
    applied = apply(local, [(read_adapter(path, local), 1.0, 1.0)])
    layer, once = local.unet.get_submodule(name), reference.unet.get_submodule(name)
    assert isinstance(layer, FP8Linear)
    merged = layer.weight_fp8.float() * layer.scale.float()
    # quantised, de-quantised, merged and quantised again: within about one more fp8 rounding of the exact merge
    error, error_once = (merged - exact).abs().mean(), (once.weight_fp8.float() * once.scale.float() - exact).abs().mean()
    assert error < 2 * error_once and error < 0.1 * (exact - base).abs().mean()
    applied.restore()
    assert_bit_identical(before, state(local))


def test_offloaded_models_merge_into_their_cpu_weights(parts, tmp_path):
    local = tiny_components("base", seed=0, randomized=True)
    path = write(tmp_path / "k.safetensors", kohya_tensors(local))
    eager = tiny_components("base", seed=0, randomized=True)
    apply(eager, [(read_adapter(path, eager), 1.0, 1.0)])
    offload = Offload("model", "cpu", [local.text_encoder, local.text_encoder_2, local.unet])
    before = state(local)
    offload.load(local.unet)  # the U-Net resident: its device copy must not outlive the merge
    applied = apply(local, [(read_adapter(path, local), 1.0, 1.0)])
    assert offload.resident is None
    assert_bit_identical(state(eager), state(local))
    applied.restore()
    assert_bit_identical(before, state(local))
    offload.remove()


# One level, one transformer block (tests/test_speed.py's MICRO): a cold inductor compile takes seconds.
MICRO = UNetConfig(
    model_channels=16, channel_mult=(1,), num_res_blocks=1, transformer_depth=(1,), transformer_depth_middle=None,
    num_heads=(1,), context_dim=96, adm_in_channels=64 + 6 * 32, addition_time_embed_dim=32, norm_groups=8,
    sample_size=8,
)


def test_compiled_unet_does_not_recompile_when_weights_change(tmp_path, one_thread):
    import torch._dynamo
    from conftest import randomize
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    unet = randomize(UNet(MICRO), 3)
    parts = Components(kind="base", unet=unet)
    path = write(tmp_path / "k.safetensors", kohya_tensors(parts))
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500.0]), torch.randn(1, 77, 96, generator=g),
            torch.randn(1, MICRO.adm_in_channels, generator=g))
    with torch.no_grad():
        eager_base = unet(*args)
        applied = apply(parts, [(read_adapter(path, parts), 1.0, 1.0)])
        eager_merged = unet(*args)
        applied.restore()
    torch._dynamo.reset()
    # compile_unet's settings with a backend that skips inductor's code generation (seconds instead of minutes on
    # two cores): the guards that decide recompiling are dynamo's, the same for every backend.
    unet.forward = torch.compile(unet.forward, fullgraph=True, dynamic=False, backend="aot_eager")
    try:
        with torch.no_grad():
            first = unet(*args)
            graphs = counters["stats"]["unique_graphs"]
            with torch._dynamo.config.patch(error_on_recompile=True):
                applied = apply(parts, [(read_adapter(path, parts), 1.0, 1.0)])
                merged = unet(*args)
                applied.restore()
                restored = unet(*args)
            assert counters["stats"]["unique_graphs"] == graphs
    finally:
        torch._dynamo.reset()
    for ours, expected in ((first, eager_base), (merged, eager_merged), (restored, eager_base)):
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    assert (eager_merged - eager_base).abs().max() > 1e-2


def test_other_model_families_are_refused_in_one_line(parts, tmp_path):
    cases = {
        "sd15": ({"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 768),
                  "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(64, 4),
                  "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768),
                  "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(3072, 4)},
                 r"looks like a LoRA for SD 1\.x .*; 0 of 4 keys match, 1 module\(s\) do not fit"),
        "sd2": ({"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 1024),
                 "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(64, 4)},
                r"SD 2\.x"),
        "flux": ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 3072),
                  "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(9216, 4)},
                 r"looks like a Flux LoRA; 0 of 2 keys match"),
        "sdxl-base-on-refiner": (None, r"looks like a LoRA for a model with 96-wide text context; \d+ of \d+ keys match"),
        "not-an-adapter": ({"foo": torch.zeros(1)}, r"looks like an adapter for another model; 0 of 1 keys match"),
    }
    refiner = tiny_components("refiner", seed=0)
    for name, (tensors, message) in cases.items():
        path = write(tmp_path / f"{name}.safetensors", tensors if tensors is not None else kohya_tensors(parts))
        with pytest.raises(CheckpointError, match=message) as e:
            read_adapter(path, refiner if tensors is None else parts)
        assert str(e.value).startswith(str(path)) and "\n" not in str(e.value), name


def test_partly_matching_files_load_the_rest_and_warn_once(parts, tmp_path):
    tensors = kohya_tensors(parts)
    extra = {f"lora_unet_no_such_layer_{i}.lora_down.weight": torch.zeros(2, 8) for i in range(9)}
    path = write(tmp_path / "partial.safetensors", tensors | extra | {"lora_unet_x.oft_blocks": torch.zeros(2)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter = read_adapter(path, parts)
    ours = [w for w in caught if issubclass(w.category, AdapterWarning)]
    assert len(ours) == 1 and "10 of" in str(ours[0].message) and "(10 in all)" in str(ours[0].message)
    assert len(adapter.patches) == len(tensors) // 3 and len(adapter.unmatched) == 10


def test_describe_and_output_name(parts, tmp_path):
    tensors = kohya_tensors(parts)
    tensors["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.dora_scale"] = torch.ones(64, 1)
    metadata = {"ss_output_name": "paper-cut", "ss_base_model_version": "sdxl_base_v1-0",
                "ss_network_module": "networks.lora", "ss_network_dim": "2", "ss_network_alpha": "1",
                "ss_tag_frequency": json.dumps({"10_cut": {"papercut": 30, " red": 4}, "5_more": {"red": 3, "blue": 1}})}
    path = write(tmp_path / "file-name.safetensors", tensors, metadata)
    text = describe_adapter(path, parts)
    assert output_name(path) == "paper-cut" and read_adapter(path, parts).name == "paper-cut"
    assert output_name(write(tmp_path / "plain.safetensors", tensors)) == "plain"
    n_unet = sum(1 for k in tensors if k.startswith("lora_unet") and k.endswith("lora_down.weight"))
    for expected in ("'paper-cut'", "kohya names", "lora x ", "lora + DoRA x 1", "rank        2", "alpha 1",
                     f"unet ({n_unet} modules)", "text_encoder (", "text_encoder_2 (", "base model  sdxl_base_v1-0",
                     "tags        papercut, red, blue", "networks.lora (dim 2, alpha 1)"):
        assert expected in text, expected
    assert len(text.splitlines()) <= 10


def test_describe_without_a_model_uses_the_sdxl_base_shapes(tmp_path):
    stem, te = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    tensors = {f"{stem}.lora_down.weight": torch.zeros(1, 2048), f"{stem}.lora_up.weight": torch.zeros(640, 1),
               f"{te}.lora_down.weight": torch.zeros(1, 1280), f"{te}.lora_up.weight": torch.zeros(5120, 1)}
    text = describe_adapter(write(tmp_path / "sdxl.safetensors", tensors))
    assert "unet (1 modules), text_encoder_2 (1 modules)" in text and "alpha none (scale 1)" in text
    tensors[f"{stem}.lora_down.weight"] = torch.zeros(1, 768)
    with pytest.raises(CheckpointError, match=r"SD 1\.x"):
        describe_adapter(write(tmp_path / "sd1.safetensors", tensors))


def test_pickled_adapters_are_read_weights_only(parts, tmp_path):
    tensors = kohya_tensors(parts)
    torch.save(tensors, tmp_path / "k.pt")
    assert len(read_adapter(tmp_path / "k.pt", parts).patches) == len(tensors) // 3


def test_describe_without_a_model_tries_the_refiner(tmp_path):
    stem = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"  # refiner: 768 wide, 1280-wide context
    path = write(tmp_path / "refiner.safetensors", {f"{stem}.lora_down.weight": torch.zeros(1, 1280),
                                                    f"{stem}.lora_up.weight": torch.zeros(768, 1)})
    assert describe_adapter(path).endswith("fits        the SDXL refiner")
