"""CLIP text encoders: parity with transformers, key maps against the official SDXL layouts."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import randomize

from sdxl.checkpoints.clip_keys import (
    OPENCLIP_EXTRAS,
    OPENCLIP_IGNORED,
    TRANSFORMERS_IGNORED,
    clip_config_from_transformers,
    clip_config_to_transformers,
    detect_transformers_prefix,
    openclip_keys,
    prefixed_patterns,
    transformers_clip_keys,
)
from sdxl.checkpoints.keymap import CheckpointError, check_covers, check_shapes, convert, invert, prefixed
from sdxl.models.clip import (
    CLIPConfig,
    CLIPTextEncoder,
    clip_g,
    clip_g_tiny,
    clip_l,
    clip_l_tiny,
    count_parameters,
)

transformers = pytest.importorskip("transformers")
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

KEYS = Path(__file__).parent / "data" / "checkpoint-keys"
VOCAB, BOS, EOS = 1000, 998, 999  # tiny vocabulary; like CLIP's, end-of-text is the largest id
TOL = 1e-4


# ---------------------------------------------------------------------------------------------
# helpers


def tiny_hf_config(
    *, act: str, eos: int, width: int = 48, layers: int = 4, proj: int = 40, attn: str = "sdpa"
) -> CLIPTextConfig:
    config = CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=77, hidden_act=act, projection_dim=proj,
        pad_token_id=1, bos_token_id=BOS, eos_token_id=eos,
    )
    config._attn_implementation = attn  # "eager": transformers' own mask + softmax, independent of SDPA
    return config


def sdxl_tokens(lengths: list[int], *, pad: int, eos: int = EOS, seed: int = 0) -> torch.Tensor:
    """Rows like SDXL's tokenizers make: start, prompt ids, end, then padding up to 77."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(1, BOS, (n,), generator=g)
        ids[ids == eos] = 3  # the end token appears only where we put it
        row = torch.cat([torch.tensor([BOS]), ids, torch.tensor([eos])])
        rows.append(torch.cat([row, torch.full((77 - len(row),), pad)]))
    return torch.stack(rows)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def load_transformers_folder(folder: Path, with_projection: bool | None = None) -> CLIPTextEncoder:
    """Our loader path (local stand-in for sdxl.checkpoints.load.load_clip_transformers)."""
    hf_config = json.loads((folder / "config.json").read_text())
    config = clip_config_from_transformers(hf_config, with_projection=with_projection)
    tensors = read_safetensors(folder / "model.safetensors")
    rules = transformers_clip_keys(config, detect_transformers_prefix(tensors))
    with torch.device("meta"):
        model = CLIPTextEncoder(config)
    check_covers(rules, model, where=str(folder))
    state = convert(tensors, rules, where=str(folder), ignore=TRANSFORMERS_IGNORED)
    check_shapes(state, model, where=str(folder))
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


def manifest(name: str) -> dict:
    return json.loads((KEYS / name).read_text())


def meta_tensors(entries: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """Shape-only stand-ins for the tensors under `prefix` in a manifest (prefix kept)."""
    return {k: torch.empty(v["shape"], device="meta") for k, v in entries.items() if k.startswith(prefix)}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def assert_close_unit(ours: torch.Tensor, ref: torch.Tensor, what: str) -> float:
    assert ours.shape == ref.shape, what
    assert 0.1 < ref.std().item() < 100, f"{what}: reference not of unit scale ({ref.std().item()})"
    err = max_err(ours, ref)
    assert err <= TOL, f"{what}: max abs err {err}"
    return err


# ---------------------------------------------------------------------------------------------
# model basics


def test_presets_build_on_meta_without_buffers():
    for config, n in [(clip_l, 123_060_480), (clip_g, 694_659_840)]:
        with torch.device("meta"):
            model = CLIPTextEncoder(config)
        assert sum(p.numel() for p in model.parameters()) == n == count_parameters(config)
        assert list(model.buffers()) == []  # nothing that load_state_dict(assign=True) would miss
        check_covers(openclip_keys(config), model, where="openclip")
        check_covers(transformers_clip_keys(config), model, where="transformers")
    assert clip_l.activation == "quick_gelu" and clip_l.projection_dim is None
    assert clip_g.activation == "gelu" and clip_g.projection_dim == 1280 and clip_g.heads == 20


def test_tiny_presets_run():
    tokens = sdxl_tokens([3, 75], pad=0, eos=49407)
    tokens[:, 0] = 49406
    for config in (clip_l_tiny, clip_g_tiny):
        hidden, pooled = CLIPTextEncoder(config)(tokens)
        assert hidden.shape == (2, 77, config.width)
        assert pooled.shape == (2, config.projection_dim or config.width)
        assert torch.isfinite(hidden).all() and torch.isfinite(pooled).all()


def test_pooled_false_skips_blocks_after_hidden_layer():
    model = CLIPTextEncoder(clip_l_tiny)
    calls = []
    for i, block in enumerate(model.transformer.resblocks):
        block.register_forward_hook(lambda *_, i=i: calls.append(i))
    tokens = sdxl_tokens([5], pad=EOS, eos=49407)
    full, pooled = model(tokens)
    assert calls == [0, 1, 2] and pooled is not None
    calls.clear()
    hidden, none = model(tokens, pooled=False)
    assert calls == [0, 1] and none is None
    assert torch.equal(hidden, full)


def test_hidden_layer_out_of_range():
    model = CLIPTextEncoder(clip_l_tiny)
    tokens = sdxl_tokens([5], pad=EOS)
    with pytest.raises(IndexError):
        model(tokens, hidden_layer=3)
    with pytest.raises(IndexError):
        model(tokens, hidden_layer=-4)


# ---------------------------------------------------------------------------------------------
# parity with transformers, loaded through our key maps

PARITY_CASES = {
    # SDXL encoder 1: CLIPTextModel, quick_gelu, legacy eos 2, padded with the end token.
    # Reference runs transformers' eager attention (explicit causal mask), not SDPA like ours.
    "clip_l_like": dict(cls=CLIPTextModel, act="quick_gelu", eos_cfg=2, pad=EOS, width=48, attn="eager"),
    # SDXL encoder 2: CLIPTextModelWithProjection, gelu, legacy eos 2, zero padding; P != W.
    "clip_g_like": dict(cls=CLIPTextModelWithProjection, act="gelu", eos_cfg=2, pad=0, width=64),
    # A config with a real end-of-text id: pooled at the first occurrence, not at argmax.
    "real_eos": dict(cls=CLIPTextModelWithProjection, act="quick_gelu", eos_cfg=500, pad=500, width=32),
}


@pytest.mark.parametrize("case", PARITY_CASES)
def test_transformers_parity(case, tmp_path):
    c = PARITY_CASES[case]
    eos = EOS if c["eos_cfg"] == 2 else c["eos_cfg"]
    hf_config = tiny_hf_config(act=c["act"], eos=c["eos_cfg"], width=c["width"], attn=c.get("attn", "sdpa"))
    ref = randomize(c["cls"](hf_config), seed=1)
    assert ref.config._attn_implementation == c.get("attn", "sdpa")
    ref.save_pretrained(tmp_path)
    model = load_transformers_folder(tmp_path)
    assert model.config.activation == c["act"]
    assert model.config.projection_dim == (40 if c["cls"] is CLIPTextModelWithProjection else None)

    tokens = sdxl_tokens([4, 17, 75], pad=c["pad"], eos=eos, seed=2)
    if c["eos_cfg"] != 2:  # the two pooling rules must disagree here, or the case tests nothing
        assert (tokens.argmax(-1) != (tokens == eos).int().argmax(-1)).any()
    with torch.no_grad():
        out = ref(input_ids=tokens, output_hidden_states=True)
        hs = out.hidden_states
        assert len(hs) == 5  # embeddings + 4 blocks
        errs = {}
        for layer in (-1, -2, -3, 0):
            hidden, pooled = model(tokens, hidden_layer=layer)
            want = hs[layer] if layer < 0 else hs[layer + 1]
            errs[f"hidden[{layer}]"] = assert_close_unit(hidden, want, f"hidden_layer={layer}")
        errs["last_hidden_state"] = assert_close_unit(
            model.ln_final(model(tokens, hidden_layer=-1)[0]), out.last_hidden_state, "after ln_final"
        )
        want_pool = out.text_embeds if c["cls"] is CLIPTextModelWithProjection else out.pooler_output
        errs["pooled"] = assert_close_unit(pooled, want_pool, "pooled")
    print(case, {k: f"{v:.1e}" for k, v in errs.items()})


def test_both_transformers_spellings_load(tmp_path):
    ref = randomize(CLIPTextModel(tiny_hf_config(act="quick_gelu", eos=2)), seed=3)
    ref.save_pretrained(tmp_path / "bare")
    bare = read_safetensors(tmp_path / "bare" / "model.safetensors")
    # transformers 5.x writes CLIPTextModel without the `text_model.` level ...
    assert detect_transformers_prefix(bare) == ""
    assert "embeddings.token_embedding.weight" in bare
    # ... the published files (and transformers < 5) have it, some also the old position_ids buffer.
    published = tmp_path / "published"
    published.mkdir()
    (published / "config.json").write_text((tmp_path / "bare" / "config.json").read_text())
    tensors = {f"text_model.{k}": v for k, v in bare.items()}
    tensors["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(tensors, published / "model.safetensors")
    assert detect_transformers_prefix(tensors) == "text_model."

    a, b = load_transformers_folder(tmp_path / "bare"), load_transformers_folder(published)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    with pytest.raises(CheckpointError, match="neither"):
        detect_transformers_prefix(["model.token_embedding.weight"])


def test_with_projection_save_layout(tmp_path):
    ref = CLIPTextModelWithProjection(tiny_hf_config(act="gelu", eos=2, layers=2))
    ref.save_pretrained(tmp_path)
    keys = set(read_safetensors(tmp_path / "model.safetensors"))
    # transformers 5.x keeps `text_model.` for the projection class, and the projection outside it.
    assert detect_transformers_prefix(keys) == "text_model."
    assert "text_projection.weight" in keys and not any(k.startswith("text_model.text_projection") for k in keys)
    assert keys == {s for r in transformers_clip_keys(load_transformers_folder(tmp_path).config) for s in r.sources}


@pytest.mark.parametrize("with_projection", [False, True])
def test_write_transformers_folder_loads_in_transformers(tmp_path, with_projection):
    config = clip_g_tiny if with_projection else clip_l_tiny
    ours = randomize(CLIPTextEncoder(config), seed=4)
    hf_config = clip_config_to_transformers(config)
    assert clip_config_from_transformers(hf_config) == config
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    save_file(invert(ours.state_dict(), transformers_clip_keys(config, "text_model.")), tmp_path / "model.safetensors")
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    ref = cls.from_pretrained(tmp_path).eval()
    tokens = sdxl_tokens([6, 30], pad=0 if with_projection else EOS, eos=49407)
    tokens[:, 0] = 49406
    with torch.no_grad():
        out = ref(input_ids=tokens, output_hidden_states=True)
        hidden, pooled = ours(tokens)
    assert_close_unit(hidden, out.hidden_states[-2], "hidden")
    assert_close_unit(pooled, out.text_embeds if with_projection else out.pooler_output, "pooled")


def test_config_round_trip_and_errors():
    for config in (clip_l, clip_g, clip_l_tiny, clip_g_tiny, CLIPConfig(eos_token_id=49407)):
        d = clip_config_to_transformers(config)
        assert clip_config_from_transformers(d) == config
        hf = CLIPTextConfig(**d)
        assert (hf.hidden_size, hf.num_hidden_layers, hf.hidden_act) == (config.width, config.layers, config.activation)
    base = clip_config_to_transformers(clip_l)
    with pytest.raises(CheckpointError, match="hidden_act 'gelu_new'"):
        clip_config_from_transformers({**base, "hidden_act": "gelu_new"})
    with pytest.raises(CheckpointError, match="eos_token_id"):
        clip_config_from_transformers({**base, "eos_token_id": [2, 3]})
    with pytest.raises(CheckpointError, match="text_config"):
        clip_config_from_transformers({"model_type": "clip", "text_config": base})
    with pytest.raises(CheckpointError, match="architectures"):
        clip_config_from_transformers({k: v for k, v in base.items() if k != "architectures"})
    # The CLIP-L config carries projection_dim 768 but the model class has no projection.
    assert clip_config_from_transformers({**base, "projection_dim": 768}).projection_dim is None
    # Whether there is a projection: from the caller, the weights' names or `architectures`.
    bare = {k: v for k, v in clip_config_to_transformers(clip_g).items() if k != "architectures"}
    assert clip_config_from_transformers(bare, with_projection=True) == clip_g
    assert clip_config_from_transformers(bare, keys=["text_projection.weight", "x"]) == clip_g
    assert clip_config_from_transformers(bare, keys=["x"]).projection_dim is None
    with pytest.raises(CheckpointError, match="conflicting"):
        clip_config_from_transformers(base, keys=["text_projection.weight"])


# ---------------------------------------------------------------------------------------------
# official layouts (manifests: names and shapes only, checked on the meta device)


def check_layout(config: CLIPConfig, rules, tensors: dict, *, ignore=(), where: str) -> dict:
    with torch.device("meta"):
        model = CLIPTextEncoder(config)
    check_covers(rules, model, where=where)
    state = convert(tensors, rules, where=where, ignore=ignore)  # strict: every file tensor used
    check_shapes(state, model, where=where)
    model.load_state_dict(state, assign=True, strict=True)
    return state


@pytest.mark.parametrize(
    "file, prefix",
    [
        ("sd_xl_base_1.0.json", "conditioner.embedders.1.model."),
        ("sd_xl_refiner_1.0.json", "conditioner.embedders.0.model."),
    ],
)
def test_openclip_layout_official_bigG(file, prefix):
    entries = manifest(file)["tensors"]
    tensors = meta_tensors(entries, prefix)
    assert len(tensors) == 390
    rules = prefixed(openclip_keys(clip_g), source_prefix=prefix)
    check_layout(clip_g, rules, tensors, ignore=prefixed_patterns(OPENCLIP_IGNORED, prefix), where=file)
    # Only logit_scale is left over; without ignoring it the strict convert complains.
    assert set(tensors) - {s for r in rules for s in r.sources} == {prefix + "logit_scale"}
    with pytest.raises(CheckpointError, match="logit_scale"):
        convert(tensors, rules, where=file)
    # A writer of this layout emits exactly the official tensor set.
    with torch.device("meta"):
        state = CLIPTextEncoder(clip_g).state_dict()
    written = {prefix + k: v for k, v in invert(state, openclip_keys(clip_g)).items()}
    written.update({prefix + k: torch.tensor(v) for k, v in OPENCLIP_EXTRAS.items()})
    assert {k: list(v.shape) for k, v in written.items()} == {k: entries[k]["shape"] for k in tensors}


def test_transformers_layout_official_clip_l():
    data = manifest("sd_xl_base_1.0.json")
    prefix = "conditioner.embedders.0.transformer."
    tensors = meta_tensors(data["tensors"], prefix)
    assert len(tensors) == 196
    assert detect_transformers_prefix(k.removeprefix(prefix) for k in tensors) == "text_model."
    rules = prefixed(transformers_clip_keys(clip_l, "text_model."), source_prefix=prefix)
    ignore = prefixed_patterns(TRANSFORMERS_IGNORED, prefix)
    check_layout(clip_l, rules, tensors, ignore=ignore, where="base CLIP-L")
    tensors.update(meta_tensors(data["optional"], prefix))  # with the likely position_ids too
    assert len(tensors) == 197
    check_layout(clip_l, rules, tensors, ignore=ignore, where="base CLIP-L + position_ids")


@pytest.mark.parametrize("component, preset", [("text_encoder", clip_l), ("text_encoder_2", clip_g)])
def test_transformers_layout_diffusers(component, preset):
    entry = manifest("diffusers_base.json")[component]
    config = clip_config_from_transformers(
        entry["config_used"], with_projection=entry["class"] == "transformers.CLIPTextModelWithProjection"
    )
    assert config == preset
    tensors = meta_tensors(entry["tensors"])
    prefix = detect_transformers_prefix(tensors)
    assert prefix == "text_model."
    rules = transformers_clip_keys(config, prefix)
    state = check_layout(config, rules, tensors, ignore=TRANSFORMERS_IGNORED, where=component)
    assert sum(t.numel() for t in state.values()) == count_parameters(config)


# ---------------------------------------------------------------------------------------------
# numerical checks of the OpenCLIP map


@pytest.fixture(scope="module")
def hf_with_projection(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_proj")
    ref = randomize(CLIPTextModelWithProjection(tiny_hf_config(act="gelu", eos=2, width=64, layers=3, proj=40)), seed=5)
    ref.save_pretrained(folder)
    return ref, folder


def test_openclip_round_trip_numerics(hf_with_projection):
    ref, folder = hf_with_projection
    ours = load_transformers_folder(folder)
    config = ours.config
    openclip_state = invert(ours.state_dict(), openclip_keys(config))
    openclip_state.update({k: torch.tensor(v) for k, v in OPENCLIP_EXTRAS.items()})
    assert openclip_state["text_projection"].shape == (64, 40)  # [W, P], used as x @ P
    with torch.device("meta"):
        again = CLIPTextEncoder(config)
    state = convert(openclip_state, openclip_keys(config), where="openclip", ignore=OPENCLIP_IGNORED)
    again.load_state_dict(state, assign=True, strict=True)
    tokens = sdxl_tokens([2, 40], pad=0, seed=6)
    with torch.no_grad():
        out = ref(input_ids=tokens, output_hidden_states=True)
        hidden, pooled = again.eval()(tokens)
    assert_close_unit(hidden, out.hidden_states[-2], "hidden")
    assert_close_unit(pooled, out.text_embeds, "pooled")
    # and back to transformers names: bit-identical to the file transformers wrote
    original = read_safetensors(folder / "model.safetensors")
    back = invert(again.state_dict(), transformers_clip_keys(config, "text_model."))
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)


def test_diffusers_convert_open_clip_checkpoint_agrees(hf_with_projection):
    """Independent check: diffusers' own OpenCLIP -> transformers converter inverts our OpenCLIP map."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    _, folder = hf_with_projection
    ours = load_transformers_folder(folder)
    prefix = "conditioner.embedders.1.model."  # not SD2's "cond_stage_model.model.": see below
    ckpt = {prefix + k: v for k, v in invert(ours.state_dict(), openclip_keys(ours.config)).items()}
    ckpt[prefix + "logit_scale"] = torch.tensor(OPENCLIP_EXTRAS["logit_scale"])
    # It only reads `text_model.config.hidden_size` (when text_projection is absent) from the model.
    stub = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=ours.config.width))
    converted = convert_open_clip_checkpoint(stub, ckpt, prefix=prefix)
    original = read_safetensors(folder / "model.safetensors")
    assert converted.keys() == original.keys()
    assert all(torch.equal(converted[k], original[k]) for k in original)

    # Its quirk: with SD2's prefix it drops `text_projection` (and `resblocks.23.*`, which a
    # 3-layer model does not have) through the hard-coded SD_2_TEXT_ENCODER_KEYS_TO_IGNORE.
    sd2 = {"cond_stage_model.model." + k.removeprefix(prefix): v for k, v in ckpt.items()}
    dropped = original.keys() - convert_open_clip_checkpoint(stub, sd2).keys()
    assert dropped == {"text_projection.weight"}


def test_shared_loader_if_available(hf_with_projection):
    """The project's loader (sdxl.checkpoints.load, written separately) gives the same model."""
    try:
        from sdxl.checkpoints.load import load_clip_transformers
    except ImportError as e:
        pytest.skip(f"sdxl.checkpoints.load not importable yet: {e}")
    _, folder = hf_with_projection
    ours, shared = load_transformers_folder(folder), load_clip_transformers(folder)
    assert shared.config == ours.config
    for (ka, va), (kb, vb) in zip(ours.state_dict().items(), shared.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
