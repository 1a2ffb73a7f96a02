"""sdxl.adapters against diffusers' `load_lora_weights` on small random models: kohya (sgm names, LoCon
convolutions, both text encoders), kohya with diffusers names, PEFT (alpha from the metadata) and diffusers' old
attention-processor names. After our merge, one U-Net call and both text encoders' outputs must equal diffusers'
(its PEFT layers run the adapters unmerged) to float32 rounding.

The adapter files are generated for every module the naming can name (from `adapters.keys`, the table under test:
diffusers' own, independent name conversion is what checks it), plus names written out by hand.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import randomize
from safetensors.torch import save_file

from sdxl.adapters import apply, read_adapter
from sdxl.adapters.keys import KOHYA, KOHYA_DIFFUSERS, PEFT, stems
from sdxl.checkpoints.load import load_clip_transformers, load_unet_diffusers
from sdxl.models.specs import Components
from sdxl.models.unet import micro_conditioning

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")  # diffusers' LoRA loading needs it

RANK = 2
# What float32 rounding allows between a merged weight and an unmerged adapter (outputs of unit scale).
TOL = 5e-5


def _unet():
    config = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 1, 2), norm_num_groups=8,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        cross_attention_dim=32 + 64, projection_class_embeddings_input_dim=64 + 6 * 8,
    )
    return randomize(diffusers.UNet2DConditionModel(**config), 1, scale=0.2)


def _clip(width: int, act: str, projection: bool, seed: int):
    config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, hidden_act=act, projection_dim=width, eos_token_id=2, pad_token_id=1, bos_token_id=0,
    )
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return randomize(cls(config), seed, scale=0.3)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(diffusers unet, text_encoder, text_encoder_2) and our Components loaded from their saved folders."""
    root = tmp_path_factory.mktemp("adapter_models")
    theirs = {"unet": _unet(), "text_encoder": _clip(32, "quick_gelu", False, 3), "text_encoder_2": _clip(64, "gelu", True, 4)}
    for name, model in theirs.items():
        model.save_pretrained(root / name)
    ours = Components(kind="base", unet=load_unet_diffusers(root / "unet"),
                      text_encoder=load_clip_transformers(root / "text_encoder"),
                      text_encoder_2=load_clip_transformers(root / "text_encoder_2"))
    return theirs, ours


def _pipeline(theirs: dict):
    m = {k: copy.deepcopy(v) for k, v in theirs.items()}
    return diffusers.StableDiffusionXLPipeline(vae=None, tokenizer=None, tokenizer_2=None, scheduler=None, **m)


def file_shape(parts: Components, target) -> tuple[int, ...]:
    """A module's weight shape in the layout its naming names (our tensor through the key table)."""
    ours = getattr(parts, target.component).get_parameter(target.ours)
    return tuple(target.weight.save(ours)[target.index].shape)


def lora_tensors(parts: Components, namings, *, seed: int = 0, linear_only: bool = False, scale: float = 0.3):
    """Random LoRA factors for every Linear and convolution the namings name: {stem: (down, up)}."""
    g = torch.Generator().manual_seed(seed)
    index = stems({n: m.config for n, m in parts.models().items() if n != "vae"})
    out = {}
    for stem, (naming, target) in index.items():
        shape = file_shape(parts, target)
        if naming not in namings or len(shape) not in (2, 4) or "embedding" in target.module:
            continue
        if linear_only and len(shape) == 4:
            continue
        down = torch.randn(RANK, *shape[1:], generator=g) * scale  # LoCon: (r, in, k, k)
        up = torch.randn(shape[0], RANK, *[1] * (len(shape) - 2), generator=g) * scale
        out[stem] = (down, up)
    return out


def kohya_file(path: Path, factors: dict, *, alpha: bool = True) -> Path:
    """lora_down / lora_up / alpha: 1 for linear layers, 4 for convolutions (scales 1/2 and 2: sd-scripts' network_alpha
    and conv_alpha), or no alpha at all (scale 1). Not tried: alphas that differ within one attention block, or
    alpha for some modules only, which diffusers maps differently from kohya and ComfyUI (it keeps one alpha per
    attention block, and takes the file's first alpha where one is missing)."""
    tensors = {}
    for stem, (down, up) in sorted(factors.items()):
        tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"] = down, up
        if alpha:
            tensors[f"{stem}.alpha"] = torch.tensor(4.0 if down.ndim == 4 else 1.0)
    save_file(tensors, str(path))
    return path


def peft_file(path: Path, factors: dict, *, metadata: bool) -> Path:
    """unet./text_encoder(_2). + module + .lora_A/B.weight; alpha 3 (to_q: 5) in diffusers' lora_adapter_metadata."""
    tensors, leaves = {}, {}
    for stem, (down, up) in factors.items():
        tensors[f"{stem}.lora_A.weight"], tensors[f"{stem}.lora_B.weight"] = down, up
        component, module = stem.split(".", 1)
        parts = module.split(".")
        leaves.setdefault(component, set()).add(".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1])
    fields = {}
    for component, names in leaves.items():
        fields.update({f"{component}.r": RANK, f"{component}.lora_alpha": 3.0, f"{component}.target_modules": sorted(names),
                       f"{component}.alpha_pattern": {"to_q": 5.0} if component == "unet" else {}})
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": json.dumps(fields)} if metadata else None)
    return path


def old_diffusers_file(path: Path, factors: dict) -> Path:
    """diffusers' attention-processor names: `attn1.processor.to_q_lora.down.weight`, `self_attn.to_q_lora`,
    `mlp.fc1.lora_linear_layer`."""
    tensors = {}
    for stem, (down, up) in factors.items():
        for role, t in (("down", down), ("up", up)):
            key = f"{stem}.lora.{role}.weight"
            for p in ("q", "k", "v"):
                key = key.replace(f".attn1.to_{p}.lora.", f".attn1.processor.to_{p}_lora.")
                key = key.replace(f".attn2.to_{p}.lora.", f".attn2.processor.to_{p}_lora.")
                key = key.replace(f".self_attn.{p}_proj.lora.", f".self_attn.to_{p}_lora.")
            for a in ("attn1", "attn2"):
                key = key.replace(f".{a}.to_out.0.lora.", f".{a}.processor.to_out_lora.")
            key = key.replace(".self_attn.out_proj.lora.", ".self_attn.to_out_lora.")
            for fc in ("fc1", "fc2"):
                key = key.replace(f".mlp.{fc}.lora.", f".mlp.{fc}.lora_linear_layer.")
            tensors[key] = t
    save_file(tensors, str(path))
    return path


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 500.0])
    context, pooled = torch.randn(2, 77, 96, generator=g), torch.randn(2, 64, generator=g)
    ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [48.0, 80.0, 8.0, 0.0, 64.0, 64.0]])
    tokens = torch.randint(0, 49406, (2, 77), generator=g)
    return x, t, context, pooled, ids, tokens


@torch.no_grad()
def outputs_ours(parts: Components) -> dict[str, torch.Tensor]:
    x, t, context, pooled, ids, tokens = inputs()
    h1, _ = parts.text_encoder(tokens)
    h2, p2 = parts.text_encoder_2(tokens)
    return {"unet": parts.unet(x, t, context, micro_conditioning(pooled, ids, dim=8)), "te1": h1, "te2": h2, "pooled": p2}


@torch.no_grad()
def outputs_theirs(pipe) -> dict[str, torch.Tensor]:
    x, t, context, pooled, ids, tokens = inputs()
    e = pipe.unet(x, t, encoder_hidden_states=context, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    o1 = pipe.text_encoder(input_ids=tokens, output_hidden_states=True)
    o2 = pipe.text_encoder_2(input_ids=tokens, output_hidden_states=True)
    return {"unet": e, "te1": o1.hidden_states[-2], "te2": o2.hidden_states[-2], "pooled": o2.text_embeds}


def lora_modules(model) -> int:
    return sum(1 for m in model.modules() if getattr(m, "lora_A", None) and len(m.lora_A))


CASES = {  # name -> (namings to generate, writer, linear layers only, the namings the summary reports)
    "kohya": ((KOHYA,), kohya_file, False, ["kohya"]),
    "kohya-no-alpha": ((KOHYA,), lambda p, f: kohya_file(p, f, alpha=False), False, ["kohya"]),
    "kohya-diffusers-names": ((KOHYA_DIFFUSERS,), kohya_file, False, ["kohya", "kohya (diffusers names)"]),
    "peft": ((PEFT,), lambda p, f: peft_file(p, f, metadata=True), True, ["PEFT"]),
    "peft-no-metadata": ((PEFT,), lambda p, f: peft_file(p, f, metadata=False), True, ["PEFT"]),
    "old-diffusers": ((PEFT,), old_diffusers_file, True, ["diffusers (attention processors)"]),
}


@pytest.mark.parametrize("case", CASES)
def test_merged_outputs_equal_diffusers_load_lora_weights(models, tmp_path, case, one_thread):
    theirs, ours = models
    namings, writer, linear_only, reported = CASES[case]
    parts = copy.deepcopy(ours)
    factors = lora_tensors(parts, namings, linear_only=linear_only)
    if case == "kohya-diffusers-names":  # the text encoders keep kohya's names
        factors.update({s: f for s, f in lora_tensors(parts, (KOHYA,)).items() if s.startswith("lora_te")})
    if case == "old-diffusers":  # the names diffusers' attention processors had: attention and CLIP layers only
        factors = {s: f for s, f in factors.items() if any(x in s for x in ("attn1.to_", "attn2.to_", "self_attn.", "mlp.fc"))}
    path = writer(tmp_path / f"{case}.safetensors", factors)
    base = outputs_ours(parts)

    adapter = read_adapter(path, parts)
    assert len(adapter.patches) == len(factors) and not adapter.unmatched and adapter.namings == reported
    applied = apply(parts, [(adapter, 1.0, 1.0)])
    assert applied.touches_text_encoders
    merged = outputs_ours(parts)

    pipe = _pipeline(theirs)
    pipe.load_lora_weights(str(path))
    # diffusers wrapped exactly the modules the file names (no unmatched keys on its side either)
    assert sum(lora_modules(getattr(pipe, n)) for n in ("unet", "text_encoder", "text_encoder_2")) == len(factors)
    reference = outputs_theirs(pipe)
    for name, value in reference.items():
        err = (merged[name] - value).abs().max().item()
        print(f"{case} {name}: max |ours - diffusers| = {err:.2e} (outputs up to {value.abs().max():.2f})")
        assert err < TOL * max(1.0, value.abs().max().item()), name
        assert (base[name] - value).abs().max() > 100 * TOL, f"{name}: the adapter changed nothing"
    applied.restore()
    assert all(torch.equal(a, b) for a, b in zip(outputs_ours(parts).values(), base.values()))


def test_kohya_names_include_the_ones_peers_write(models):
    """A few names as kohya sd-scripts / LyCORIS / diffusers write them (sgm U-Net, transformers CLIP); this U-Net
    has one ResBlock per level, so input_blocks 2 and 4 are downsamplers."""
    _, ours = models
    index = stems({n: m.config for n, m in ours.models().items()})
    for stem, component, ours_name in (  # (file stem, component, our tensor)
        ("lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q",
         "unet", "input_blocks.3.1.transformer_blocks.0.attn1.to_q.weight"),
        ("lora_unet_input_blocks_1_0_in_layers_2", "unet", "input_blocks.1.0.in_layers.2.weight"),
        ("lora_unet_output_blocks_1_2_conv", "unet", "output_blocks.1.2.conv.weight"),
        ("lora_unet_label_emb_0_0", "unet", "label_emb.0.0.weight"),
        ("lora_unet_middle_block_1_proj_in", "unet", "middle_block.1.proj_in.weight"),
        ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_2",
         "unet", "input_blocks.3.1.transformer_blocks.0.ff.net.2.weight"),
        ("lora_te1_text_model_encoder_layers_0_self_attn_k_proj",
         "text_encoder", "transformer.resblocks.0.attn.in_proj_weight"),
        ("lora_te2_text_model_encoder_layers_2_mlp_fc2", "text_encoder_2", "transformer.resblocks.2.mlp.c_proj.weight"),
        ("unet.up_blocks.0.attentions.1.transformer_blocks.1.attn2.to_k",
         "unet", "output_blocks.1.1.transformer_blocks.1.attn2.to_k.weight"),
        ("text_encoder_2.text_model.encoder.layers.1.self_attn.out_proj",
         "text_encoder_2", "transformer.resblocks.1.attn.out_proj.weight"),
    ):
        target = index[stem][1]
        assert (target.component, target.ours) == (component, ours_name), stem
    assert index["lora_te1_text_model_encoder_layers_0_self_attn_k_proj"][1].index == 1  # k: the middle third


def test_multipliers_scale_each_part(models, tmp_path):
    _, ours = models
    parts = copy.deepcopy(ours)
    path = kohya_file(tmp_path / "k.safetensors", lora_tensors(parts, (KOHYA,)))
    adapter = read_adapter(path, parts)
    q = "input_blocks.3.1.transformer_blocks.0.attn1.to_q.weight"
    w0, t0 = parts.unet.get_parameter(q).clone(), parts.text_encoder.transformer.resblocks[0].mlp.c_fc.weight.clone()
    full = apply(parts, [(adapter, 1.0, 1.0)])
    d_unet = parts.unet.get_parameter(q) - w0
    d_text = parts.text_encoder.transformer.resblocks[0].mlp.c_fc.weight - t0
    full.restore()
    half = apply(parts, [(adapter, 0.5, -0.25), (adapter, 0.25, 0.0)])  # stacking: the updates add up
    torch.testing.assert_close(parts.unet.get_parameter(q) - w0, 0.75 * d_unet, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.text_encoder.transformer.resblocks[0].mlp.c_fc.weight - t0, -0.25 * d_text,
                               rtol=1e-5, atol=1e-6)
    half.restore()
    only_unet = apply(parts, [(adapter, 1.0, 0.0)])
    assert not only_unet.touches_text_encoders and set(only_unet.touched) == {"unet"}
    only_unet.restore()


def test_trainer_files_load_in_diffusers_with_every_key_matched(models, tmp_path, one_thread):
    from sdxl.training import lora

    theirs, ours = models
    unet = copy.deepcopy(ours.unet)
    names = lora.add_lora(unet, rank=4, alpha=2.0, targets=("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj",
                                                            "ff.net.2", "proj_in", "proj_out"))
    with torch.no_grad():
        for p in lora.lora_parameters(unet):
            p.normal_(std=0.2)
    parts = Components(kind="base", unet=unet, text_encoder=ours.text_encoder, text_encoder_2=ours.text_encoder_2)
    expected = outputs_ours(parts)["unet"]
    assert (expected - outputs_ours(ours)["unet"]).abs().max() > 0.1  # the trained layers matter
    for fmt, save in (("kohya", lora.save_lora_kohya), ("peft", lora.save_lora_peft)):
        path = tmp_path / f"{fmt}.safetensors"
        save(unet, path, dtype=torch.float32, name="my-style")
        pipe = _pipeline(theirs)
        pipe.load_lora_weights(str(path))
        assert lora_modules(pipe.unet) == len(names), fmt
        err = (outputs_theirs(pipe)["unet"] - expected).abs().max().item()
        print(f"trainer {fmt}: max |diffusers - ours (unmerged LoRA layers)| = {err:.2e}")
        assert err < TOL * max(1.0, expected.abs().max().item())
        from sdxl.checkpoints.files import open_tensors

        meta = open_tensors(path).metadata
        assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_network_module"] == "networks.lora"
        assert meta["ss_network_dim"] == "4" and meta["ss_output_name"] == "my-style"
        assert meta["ss_network_alpha"] == ("2" if fmt == "kohya" else "4")
