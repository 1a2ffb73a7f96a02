"""LoCon CP/Tucker, LoHa, LoKr, full and DoRA updates: the merged weights equal the peers' formulas, and the LyCORIS
package (its functional `diff_weight` helpers and module classes) and PEFT's DoRA layer where they offer a reference.

Note on LyCORIS 4.1.3: its LoHa and LoKr *module classes* scale by (alpha / rank)^2 in `get_merged_weight` (the
rebuild and `get_diff_weight` both apply the scale), unlike its functional helpers, kohya, ComfyUI and A1111
(alpha / rank once). The module classes are therefore compared at alpha = rank only.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_components
from safetensors.torch import save_file
from torch import nn

from sdxl.adapters import apply, read_adapter
from sdxl.adapters.keys import KOHYA, PEFT, stems, stems_of

lycoris = pytest.importorskip("lycoris")
from lycoris.functional import locon as f_locon
from lycoris.functional import loha as f_loha
from lycoris.functional import lokr as f_lokr
from lycoris.modules.locon import LoConModule
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule

LINEAR = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"  # (64, 96): cross-attention key
CONV = "lora_unet_input_blocks_1_0_in_layers_2"  # (32, 32, 3, 3)
FUSED = "lora_te1_text_model_encoder_layers_0_self_attn_v_proj"  # the last third of in_proj_weight
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def parts(one_thread):
    return tiny_components("base", seed=0, randomized=True)


def base_weight(parts, stem: str) -> torch.Tensor:
    """The module's weight in the file's layout (float32 copy)."""
    _, target = stems({n: m.config for n, m in parts.models().items() if n != "vae"})[stem]
    ours = getattr(parts, target.component).get_parameter(target.ours)
    return target.weight.save(ours.detach())[target.index].clone().float()


def merge(parts, tmp_path, tensors: dict, multiplier: float = 1.0, metadata=None):
    """Merge the file into `parts` at `multiplier` and restore: (our touched tensors as merged, stem -> merged weight)."""
    path = tmp_path / "a.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    adapter = read_adapter(path, parts)
    applied = apply(parts, [(adapter, multiplier, multiplier)])
    names = {(p.target.component, r.target) for p in adapter.patches for r in (p.target.weight, p.target.bias) if r}
    merged = {name: getattr(parts, c).get_parameter(name).detach().clone() for c, name in names}
    applied.restore()
    index = stems({n: m.config for n, m in parts.models().items() if n != "vae"})

    def weight(stem: str) -> torch.Tensor:
        target = index[stem][1]
        return target.weight.save(merged[target.ours])[target.index]

    return merged, weight


def randn(*shape, seed=0, std=0.3):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


def test_locon_cp_tucker_matches_lycoris(parts, tmp_path):
    w = base_weight(parts, CONV)
    down, mid, up = randn(4, 32, 1, 1, seed=1), randn(4, 4, 3, 3, seed=2), randn(32, 4, 1, 1, seed=3)
    _, merged = merge(parts, tmp_path, {f"{CONV}.lora_down.weight": down, f"{CONV}.lora_mid.weight": mid,
                                        f"{CONV}.lora_up.weight": up, f"{CONV}.alpha": torch.tensor(2.0)}, 0.7)
    reference = w + 0.7 * f_locon.diff_weight(down, up, mid, gamma=2.0 / 4)
    torch.testing.assert_close(merged(CONV), reference, **TOL)
    with torch.no_grad():
        module = LoConModule.make_module_from_state_dict("x", _conv(w), up, down, mid, torch.tensor(2.0), None)
        torch.testing.assert_close(merged(CONV), module.get_merged_weight(0.7)[0], **TOL)


def _linear(w: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    layer.weight.data.copy_(w)
    return layer


def _conv(w: torch.Tensor) -> nn.Conv2d:
    layer = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], padding=1, bias=False)
    layer.weight.data.copy_(w)
    return layer


@pytest.mark.parametrize("stem", [LINEAR, FUSED, CONV])
@pytest.mark.parametrize("alpha", [4.0, 1.0])
def test_loha(parts, tmp_path, stem, alpha):
    w = base_weight(parts, stem)
    out, rank = w.shape[0], 4
    inner = w[0].numel()  # LyCORIS stores a convolution's LoHa factors flattened (in * k * k)
    f = dict(w1a=randn(out, rank, seed=1), w1b=randn(rank, inner, seed=2), w2a=randn(out, rank, seed=3),
             w2b=randn(rank, inner, seed=4))
    tensors = {f"{stem}.hada_{n[:2]}_{n[2]}": t for n, t in f.items()} | {f"{stem}.alpha": torch.tensor(alpha)}
    _, merged = merge(parts, tmp_path, tensors, 0.8)
    formula = (f["w1a"] @ f["w1b"]) * (f["w2a"] @ f["w2b"]) * (alpha / rank)
    torch.testing.assert_close(merged(stem), w + 0.8 * formula.reshape(w.shape), **TOL)
    lyco = f_loha.diff_weight(f["w1b"], f["w1a"], f["w2b"], f["w2a"], None, None, gamma=alpha / rank)
    torch.testing.assert_close(merged(stem), w + 0.8 * lyco.reshape(w.shape), **TOL)
    if alpha == rank and w.ndim == 2:
        with torch.no_grad():
            module = LohaModule.make_module_from_state_dict("x", _linear(w), f["w1a"], f["w1b"], f["w2a"], f["w2b"],
                                                            None, None, torch.tensor(alpha), None)
            torch.testing.assert_close(merged(stem), module.get_merged_weight(0.8)[0], **TOL)


def test_loha_tucker_conv(parts, tmp_path):
    w, rank = base_weight(parts, CONV), 3
    f = dict(w1a=randn(rank, 32, seed=1), w1b=randn(rank, 32, seed=2), t1=randn(rank, rank, 3, 3, seed=5),
             w2a=randn(rank, 32, seed=3), w2b=randn(rank, 32, seed=4), t2=randn(rank, rank, 3, 3, seed=6))
    tensors = {f"{CONV}.hada_{n[:2]}_{n[2]}" if len(n) == 3 else f"{CONV}.hada_{n}": t for n, t in f.items()}
    _, merged = merge(parts, tmp_path, tensors | {f"{CONV}.alpha": torch.tensor(float(rank))})
    # comfy/weight_adapter/loha.py: einsum('i j k l, j r, i p -> p r k l', t, w_b, w_a) for each factor
    rebuild = [torch.einsum("i j k l, j r, i p -> p r k l", f[t], f[b], f[a])
               for t, a, b in (("t1", "w1a", "w1b"), ("t2", "w2a", "w2b"))]
    torch.testing.assert_close(merged(CONV), w + rebuild[0] * rebuild[1], **TOL)
    lyco = f_loha.diff_weight(f["w1b"], f["w1a"], f["w2b"], f["w2a"], f["t1"], f["t2"], gamma=1.0)
    torch.testing.assert_close(merged(CONV), w + lyco, **TOL)


LOKR_CASES = {  # name -> (stem, tensors by short name, scale applied: alpha / rank, or 1 when both factors are whole)
    "w1 whole, w2 decomposed": (LINEAR, lambda: dict(w1=randn(4, 4, seed=1), w2a=randn(16, 3, seed=2),
                                                      w2b=randn(3, 24, seed=3)), 6.0 / 3),
    "both decomposed": (LINEAR, lambda: dict(w1a=randn(4, 2, seed=1), w1b=randn(2, 4, seed=2), w2a=randn(16, 2, seed=3),
                                             w2b=randn(2, 24, seed=4)), 6.0 / 2),
    "both whole (alpha ignored)": (FUSED, lambda: dict(w1=randn(4, 4, seed=1), w2=randn(8, 8, seed=2)), 1.0),
    "conv, Tucker w2": (CONV, lambda: dict(w1=randn(4, 4, seed=1), w2a=randn(2, 8, seed=2), w2b=randn(2, 8, seed=3),
                                           t2=randn(2, 2, 3, 3, seed=4)), 6.0 / 2),
    "conv, w2 whole": (CONV, lambda: dict(w1=randn(2, 4, seed=1), w2=randn(16, 8, 3, 3, seed=2)), 1.0),
}


@pytest.mark.parametrize("case", LOKR_CASES)
def test_lokr(parts, tmp_path, case):
    stem, make, expected_scale = LOKR_CASES[case]
    f, w = make(), base_weight(parts, stem)
    names = {"w1": "lokr_w1", "w1a": "lokr_w1_a", "w1b": "lokr_w1_b", "w2": "lokr_w2", "w2a": "lokr_w2_a",
             "w2b": "lokr_w2_b", "t2": "lokr_t2"}
    tensors = {f"{stem}.{names[n]}": t for n, t in f.items()} | {f"{stem}.alpha": torch.tensor(6.0)}
    _, merged = merge(parts, tmp_path, tensors, 0.5)
    w1 = f["w1"] if "w1" in f else f["w1a"] @ f["w1b"]
    if "w2" in f:
        w2 = f["w2"]
    elif "t2" in f:
        w2 = torch.einsum("i j k l, j r, i p -> p r k l", f["t2"], f["w2b"], f["w2a"])  # comfy weight_adapter/lokr.py
    else:
        w2 = f["w2a"] @ f["w2b"]
    kron = torch.kron(w1[:, :, None, None], w2.contiguous()) if w2.ndim == 4 else torch.kron(w1, w2)
    torch.testing.assert_close(merged(stem), w + 0.5 * expected_scale * kron, **TOL)
    # LyCORIS' rebuild, at the scale rule of ComfyUI (weight_adapter/lokr.py: alpha / w1_b or w2_b's rows, else 1;
    # lycoris.functional.lokr.diff_weight reads the rank off w2a's columns, which a Tucker w2a (r, out) does not hold)
    lyco = f_lokr.kron_weight(f.get("w1"), f.get("w1a"), f.get("w1b"), f.get("w2"), f.get("w2a"), f.get("w2b"),
                              f.get("t2"), scale=expected_scale, backend="torch")
    torch.testing.assert_close(merged(stem), w + 0.5 * lyco.reshape(w.shape), **TOL)
    if "t2" not in f:
        gamma = f_lokr.diff_weight(*(f.get(n) for n in ("w1", "w1a", "w1b", "w2", "w2a", "w2b", "t2")), gamma=6.0)
        torch.testing.assert_close(merged(stem), w + 0.5 * gamma.reshape(w.shape), **TOL)


def test_lokr_module_class_at_alpha_equal_rank(parts, tmp_path):
    w = base_weight(parts, LINEAR)
    w1, w2a, w2b = randn(4, 4, seed=1), randn(16, 3, seed=2), randn(3, 24, seed=3)
    _, merged = merge(parts, tmp_path, {f"{LINEAR}.lokr_w1": w1, f"{LINEAR}.lokr_w2_a": w2a, f"{LINEAR}.lokr_w2_b": w2b,
                                        f"{LINEAR}.alpha": torch.tensor(3.0)})
    with torch.no_grad():
        module = LokrModule.make_module_from_state_dict("x", _linear(w), w1, None, None, None, w2a, w2b, None, None,
                                                        torch.tensor(3.0), None)
        torch.testing.assert_close(merged(LINEAR), module.get_merged_weight(1.0)[0], **TOL)


def test_full_diff_and_bias(parts, tmp_path):
    stem = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_out_0"
    diff, diff_b = randn(64, 64, seed=1), randn(64, seed=2)
    w = base_weight(parts, stem)
    bias = parts.unet.get_parameter("input_blocks.4.1.transformer_blocks.0.attn1.to_out.0.bias").clone()
    fused_b = randn(32, seed=3)  # a text-encoder q bias: a third of in_proj_bias
    tensors, merged = merge(parts, tmp_path, {f"{stem}.diff": diff, f"{stem}.diff_b": diff_b,
                                              f"{FUSED}.diff_b": fused_b, f"{stem}.alpha": torch.tensor(1.0)}, 0.5)
    torch.testing.assert_close(merged(stem), w + 0.5 * diff, **TOL)  # full updates take no alpha
    torch.testing.assert_close(tensors["input_blocks.4.1.transformer_blocks.0.attn1.to_out.0.bias"], bias + 0.5 * diff_b, **TOL)
    b0, b1 = parts.text_encoder.transformer.resblocks[0].attn.in_proj_bias, tensors["transformer.resblocks.0.attn.in_proj_bias"]
    torch.testing.assert_close(b1[64:], b0[64:] + 0.5 * fused_b, **TOL)
    assert torch.equal(b1[:64], b0[:64])  # q and k untouched
    assert torch.equal(merged(FUSED), base_weight(parts, FUSED))  # a bias-only update leaves the weight


def _dora(w, delta, magnitude, axis, multiplier):
    """DoRA as written out by ComfyUI (weight_adapter/base.py weight_decompose), with the norm of W + dW on both axes."""
    calc = w + delta
    if axis == "out":
        norm = calc.reshape(calc.shape[0], -1).norm(dim=1, keepdim=True).reshape(calc.shape[0], *[1] * (calc.dim() - 1))
    else:
        norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1)
    calc = calc * (magnitude / (norm + torch.finfo(torch.float32).eps))
    return w + multiplier * (calc - w)


@pytest.mark.parametrize("stem", [LINEAR, CONV])
@pytest.mark.parametrize("axis", ["out", "in"])
def test_dora_matches_lycoris(parts, tmp_path, stem, axis):
    w = base_weight(parts, stem)
    rank = 4
    k = [1] * (w.ndim - 2)
    down, up = randn(rank, *w.shape[1:], seed=1), randn(w.shape[0], rank, *k, seed=2)
    magnitude = (randn(w.shape[0], *[1] * (w.ndim - 1), seed=3) if axis == "out" else
                 randn(1, w.shape[1], *[1] * (w.ndim - 2), seed=3)).abs() + 1.0
    tensors = {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(2.0),
               f"{stem}.dora_scale": magnitude}
    delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * (2.0 / rank)
    for multiplier in (1.0, 0.6):
        _, merged = merge(parts, tmp_path, tensors, multiplier)
        torch.testing.assert_close(merged(stem), _dora(w, delta, magnitude, axis, multiplier), **TOL)
    _, merged = merge(parts, tmp_path, tensors, 1.0)
    layer = _linear(w) if w.ndim == 2 else _conv(w)
    with torch.no_grad():
        module = LoConModule("x", layer, 1.0, rank, 2.0, weight_decompose=True, wd_on_out=axis == "out")
        module.lora_down.weight.copy_(down)
        module.lora_up.weight.copy_(up)
        module.dora_scale.copy_(magnitude)
        torch.testing.assert_close(merged(stem), module.get_merged_weight(1.0)[0], **TOL)


def test_peft_dora_matches_peft(parts, tmp_path):
    peft = pytest.importorskip("peft")
    stem_ours = "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    stem = stems_of(PEFT, "unet", parts.unet.config)[stem_ours]  # unet.down_blocks.1.attentions.0...attn2.to_k
    w = parts.unet.get_parameter(stem_ours).detach().clone()
    a, b, m = randn(4, 96, seed=1), randn(64, 4, seed=2), randn(64, seed=3).abs() + 1.0
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8.0})}
    tensors, _ = merge(parts, tmp_path, {f"{stem}.lora_A.weight": a, f"{stem}.lora_B.weight": b,
                                         f"{stem}.lora_magnitude_vector": m}, metadata=meta)

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.to_k = _linear(w)

    model = peft.get_peft_model(One(), peft.LoraConfig(r=4, lora_alpha=8.0, target_modules=["to_k"], use_dora=True))
    with torch.no_grad():
        layer = model.base_model.model.to_k
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
        layer.lora_magnitude_vector["default"].weight.copy_(m)
    reference = model.merge_and_unload().to_k.weight
    torch.testing.assert_close(tensors[stem_ours], reference, **TOL)


def test_missing_factors_and_bad_shapes_are_refused(parts, tmp_path):
    from sdxl.checkpoints.keymap import CheckpointError

    path = tmp_path / "bad.safetensors"
    save_file({f"{LINEAR}.hada_w1_a": randn(64, 2), f"{LINEAR}.hada_w1_b": randn(2, 96), f"{LINEAR}.hada_w2_a": randn(64, 2)},
              str(path))
    with pytest.raises(CheckpointError, match=r"loha without w2b"):
        read_adapter(path, parts)
    save_file({f"{CONV}.lora_down.weight": randn(2, 32, 3, 3), f"{CONV}.lora_up.weight": randn(32, 2, 1, 1),
               f"{CONV}.dora_scale": randn(7, 1, 1, 1)}, str(path))
    with pytest.raises(CheckpointError, match=r"DoRA magnitude \(7, 1, 1, 1\)"):
        read_adapter(path, parts)
    assert KOHYA.stem("unet", "input_blocks.1.0.in_layers.2") == CONV
