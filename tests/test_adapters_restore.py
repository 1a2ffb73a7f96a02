"""Restoring merged weights from the checkpoint they were loaded from: bit for bit against a fresh load, for single
files and diffusers folders in every float dtype (and converted on loading), with nothing kept in memory; copies kept
where the file cannot give the present bits (models built in memory, weights changed since loading, replaced
components, files changed on disk); fp8 layers and offloaded models; merges identical to the float32 formula."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import tiny_components
from test_adapters_apply import assert_bit_identical, kohya_tensors, state, write

from sdxl.acceleration import FP8Linear, Offload, store_fp8
from sdxl.adapters import apply, read_adapter
from sdxl.adapters.algorithms import decompose
from sdxl.adapters.apply import _plan, _view, delta
from sdxl.adapters.slots import Slot
from sdxl.checkpoints.keymap import CheckpointError
from sdxl.checkpoints.load import load_diffusers, load_single_file
from sdxl.checkpoints.save import save_diffusers, save_single_file

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
LINEAR = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"  # (64, 96)
CONV = "lora_unet_input_blocks_1_0_in_layers_2"  # (32, 32, 3, 3)
FUSED = "lora_te1_text_model_encoder_layers_0_self_attn_v_proj"  # (32, 32): the last third of in_proj_weight
OUT = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_out_0"  # (64, 64), with a bias


@pytest.fixture(scope="module")
def original(one_thread):
    return tiny_components("base", seed=0, randomized=True)


@pytest.fixture(scope="module")
def files(original, tmp_path_factory):
    """The tiny base as single files and diffusers folders, float32, float16 and bfloat16."""
    d = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for name, dtype in (("fp32", F32), ("fp16", F16), ("bf16", BF16)):
        save_single_file(original, d / f"tiny_{name}.safetensors", dtype=dtype)
        save_diffusers(original, d / f"tiny_{name}", dtype=dtype)
        out["single", dtype], out["diffusers", dtype] = d / f"tiny_{name}.safetensors", d / f"tiny_{name}"
    return out


@pytest.fixture(scope="module")
def lora(original, tmp_path_factory):
    """A kohya LoRA / LoCon with DoRA on the linear layers, for every layer of the U-Net and both text encoders."""
    return write(tmp_path_factory.mktemp("lora") / "k.safetensors", kohya_tensors(original, dora=True))


def load(files, layout: str, stored: torch.dtype, dtype: torch.dtype):
    loader = load_single_file if layout == "single" else load_diffusers
    return loader(files[layout, stored], dtype=dtype)


def touched_bytes(before: dict, parts) -> int:
    return sum(v.numel() * v.element_size() for k, v in state(parts).items() if not torch.equal(before[k], v))


CASES = [("single", F32, F32), ("single", F16, F16), ("single", BF16, BF16), ("single", F16, F32),
         ("single", F16, BF16), ("single", F32, F16), ("diffusers", F32, F32), ("diffusers", F16, F16),
         ("diffusers", BF16, BF16), ("diffusers", F16, BF16)]


@pytest.mark.parametrize("layout, stored, dtype", CASES, ids=lambda c: str(c).removeprefix("torch."))
def test_restore_reads_the_file_again(files, lora, layout, stored, dtype):
    parts = load(files, layout, stored, dtype)
    assert set(parts.origins) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    params = {n: id(p) for n, m in parts.models().items() for n2, p in m.named_parameters()}
    adapter = read_adapter(lora, parts)
    applied = apply(parts, [(adapter, 0.8, 0.6), (adapter, -0.3, 0.2)])
    assert applied.saved_bytes == 0 and applied.touches_text_encoders and sum(applied.touched.values()) > 100
    merged = state(parts)

    twin = load(files, layout, stored, dtype)  # the same weights, restored from copies
    twin.origins.clear()
    before = state(twin)
    kept = apply(twin, [(read_adapter(lora, twin), 0.8, 0.6), (read_adapter(lora, twin), -0.3, 0.2)])
    assert kept.saved_bytes == touched_bytes(before, twin) > 0
    assert_bit_identical(state(twin), merged)  # reading from the file changes nothing in the merge

    applied.restore()
    assert_bit_identical(state(load(files, layout, stored, dtype)), state(parts))
    assert {n: id(p) for n, m in parts.models().items() for n2, p in m.named_parameters()} == params
    again = apply(parts, [(adapter, 1.0, 1.0)])  # restored tensors are known to equal the file again
    assert again.saved_bytes == 0
    again.restore()
    kept.restore()
    assert_bit_identical(before, state(twin))


def test_models_built_in_memory_keep_copies(original, lora):
    parts = tiny_components("base", seed=0, randomized=True)
    before = state(parts)
    applied = apply(parts, [(read_adapter(lora, parts), 1.0, 1.0)])
    assert applied.saved_bytes == touched_bytes(before, parts) > 0
    applied.restore()
    assert_bit_identical(before, state(parts))


def test_weights_changed_since_loading_are_kept(files, lora):
    parts = load(files, "single", F16, F32)
    q = parts.unet.get_parameter("input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight")
    fc1 = parts.text_encoder.get_parameter("transformer.resblocks.0.mlp.c_fc.weight")
    with torch.no_grad():
        q.add_(1.0)  # trained, in place
        fc1.data = fc1.data * 2  # replaced: other address and values (checked against the file, then kept)
    parts.text_encoder_2 = tiny_components("base", seed=1, randomized=True).text_encoder_2  # not the loaded one
    before = state(parts)
    applied = apply(parts, [(read_adapter(lora, parts), 1.0, 1.0)])
    te2 = sum(v.numel() * v.element_size() for k, v in state(parts).items()
              if k.startswith("text_encoder_2.") and not torch.equal(before[k], v))
    assert applied.saved_bytes == q.numel() * 4 + fc1.numel() * 4 + te2 and te2 > 0
    applied.restore()
    assert_bit_identical(before, state(parts))


def test_stacked_merges_keep_what_the_first_changed(files, lora, tmp_path):
    parts = load(files, "single", F16, F16)
    first = apply(parts, [(read_adapter(lora, parts), 0.5, 0.5)])
    merged = state(parts)
    second = apply(parts, [(read_adapter(lora, parts), 0.5, 0.0)])  # on top: only the U-Net, all merged into
    assert first.saved_bytes == 0 and second.saved_bytes == touched_bytes(merged, parts) > 0
    second.restore()
    assert_bit_identical(merged, state(parts))
    first.restore()
    assert_bit_identical(state(load(files, "single", F16, F16)), state(parts))


@pytest.mark.parametrize("dtype", [F16, F32])
def test_fp8_layers_are_requantised_from_the_file(files, lora, dtype):
    parts, fresh = load(files, "single", F16, dtype), load(files, "single", F16, dtype)
    store_fp8(parts.unet)
    store_fp8(fresh.unet)
    layer = parts.unet.get_submodule("input_blocks.4.1.transformer_blocks.0.attn1.to_q")
    assert isinstance(layer, FP8Linear)
    adapter = read_adapter(lora, parts)
    applied = apply(parts, [(adapter, 1.0, 1.0)])  # fp8 layers: checked once against the file
    assert applied.saved_bytes == 0
    applied.restore()
    assert_bit_identical(state(fresh), state(parts))
    again = apply(parts, [(adapter, 1.0, 1.0)])
    assert again.saved_bytes == 0
    again.restore()
    assert_bit_identical(state(fresh), state(parts))
    with torch.no_grad():
        layer.weight_fp8.view(torch.uint8)[0, 0] ^= 1  # an fp8 layer that no longer matches the file
    before = state(parts)
    third = apply(parts, [(adapter, 1.0, 1.0)])
    assert third.saved_bytes == layer.weight_fp8.numel() + layer.scale.numel() * layer.scale.element_size()
    third.restore()
    assert_bit_identical(before, state(parts))


def test_offloaded_models_restore_into_their_cpu_tensors(files, lora):
    parts = load(files, "single", F16, F32)
    with torch.no_grad():  # as an offload's pinning does: every tensor moved to another address, values unchanged
        for model in parts.models().values():
            for p in model.parameters():
                p.data = p.data.clone()
    offload = Offload("model", "cpu", [parts.text_encoder, parts.text_encoder_2, parts.unet])
    offload.load(parts.unet)
    tensors = {n: p.data_ptr() for n, p in parts.unet.named_parameters()}
    applied = apply(parts, [(read_adapter(lora, parts), 1.0, 1.0)])
    assert offload.resident is None and applied.saved_bytes == 0
    applied.restore()
    assert {n: p.data_ptr() for n, p in parts.unet.named_parameters()} == tensors
    assert_bit_identical(state(load(files, "single", F16, F32)), state(parts))
    offload.remove()


def test_files_changed_on_disk(original, lora, tmp_path):
    path = tmp_path / "base.safetensors"
    save_single_file(original, path)
    parts = load_single_file(path)
    applied = apply(parts, [(read_adapter(lora, parts), 1.0, 1.0)])
    save_single_file(tiny_components("base", seed=2, randomized=True), path)  # renamed over the loaded file
    applied.restore()  # the loaded file stays open: still readable
    save_single_file(original, path)
    parts = load_single_file(path)
    expected = state(parts)
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # as if written in place
    applied = apply(parts, [(read_adapter(lora, parts), 1.0, 1.0)])
    assert applied.saved_bytes == touched_bytes(expected, parts) > 0  # not read from a changed file
    applied.restore()
    assert_bit_identical(expected, state(parts))

    parts = load_single_file(path)
    applied = apply(parts, [(read_adapter(lora, parts), 1.0, 1.0)])
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2 * 10**9))
    with pytest.raises(CheckpointError, match=f"{path}: changed on disk since it was loaded; load the model again"):
        applied.restore()
    assert applied.saved == []


def reference_merge(parts, uses) -> dict[str, torch.Tensor]:
    """The merge as a plain float32 formula: each tensor widened, every update (`delta`) added in order, rounded once."""
    out = {}
    for (component, name), updates in _plan(parts, uses).items():
        slot = Slot(getattr(parts, component), name)
        weight = getattr(slot.module, slot.attrs[0]).detach().to(torch.float32, copy=True)
        for adapter, patch, multiplier, part in updates:
            view = _view(weight, patch, part)
            d = delta(adapter, patch, torch.device("cpu"), part).reshape(view.shape)
            if patch.dora_axis and part == "weight":
                magnitude = adapter.tensors[patch.keys["dora"]].float()
                view.copy_(decompose(view, d, magnitude, patch.dora_axis, multiplier))
            else:
                view.add_(d, alpha=multiplier)
        out[f"{component}.{name}"] = weight.to(getattr(slot.module, slot.attrs[0]).dtype)
    return out


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.3


def test_merges_are_the_float32_formula_bit_for_bit(files, lora, tmp_path):
    algorithms = {  # CP/Tucker LoCon, LoHa, LoKr, a full diff with its bias
        f"{CONV}.lora_down.weight": randn(4, 32, 1, 1, seed=1), f"{CONV}.lora_mid.weight": randn(4, 4, 3, 3, seed=2),
        f"{CONV}.lora_up.weight": randn(32, 4, 1, 1, seed=3), f"{CONV}.alpha": torch.tensor(2.0),
        f"{LINEAR}.hada_w1_a": randn(64, 2, seed=4), f"{LINEAR}.hada_w1_b": randn(2, 96, seed=5),
        f"{LINEAR}.hada_w2_a": randn(64, 2, seed=6), f"{LINEAR}.hada_w2_b": randn(2, 96, seed=7),
        f"{FUSED}.lokr_w1": randn(4, 4, seed=8), f"{FUSED}.lokr_w2_a": randn(8, 2, seed=9),
        f"{FUSED}.lokr_w2_b": randn(2, 8, seed=10), f"{FUSED}.alpha": torch.tensor(1.0),
        f"{OUT}.diff": randn(64, 64, seed=11), f"{OUT}.diff_b": randn(64, seed=12),
    }
    other = write(tmp_path / "algorithms.safetensors", algorithms)
    parts = load(files, "single", F16, F16)
    uses = [(read_adapter(lora, parts), 0.7, 0.4), (read_adapter(other, parts), 0.9, 1.1)]
    expected = reference_merge(parts, uses)
    applied = apply(parts, uses)
    merged = state(parts)
    assert_bit_identical(expected, {k: merged[k] for k in expected})
    applied.restore()
