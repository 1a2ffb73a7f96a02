"""Telling checkpoints apart and refusing bad ones: `describe`, `open_tensors`, `load_single_file`.

Small real files are built once per session from the tiny model presets; the full-size official
layouts are checked without weights, through the key manifests in tests/data/checkpoint-keys.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import tiny_components

from sdxl.checkpoints import clip_keys, unet_keys, vae_keys
from sdxl.checkpoints.files import PickledTensors, Staging, TensorFile, open_tensors, read_safetensors_header
from sdxl.checkpoints.formats import describe, describe_tensors, diffusers_weight_files
from sdxl.checkpoints.keymap import CheckpointError, invert
from sdxl.checkpoints.load import Components, load_diffusers, load_official_tensors, load_single_file
from sdxl.checkpoints.save import official_layout, save_single_file
from sdxl.models import unet as unet_models
from sdxl.models import vae as vae_models
from sdxl.models.vae import AutoencoderKL

MANIFESTS = Path(__file__).parent / "data" / "checkpoint-keys"
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
TE2_BASE = "conditioner.embedders.1.model."


# ---------------------------------------------------------------------------------------------
# Helpers and session fixtures.


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def write_file(tensors, path: Path, metadata=None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Tiny base and refiner models and their single files in several storage dtypes."""
    d = tmp_path_factory.mktemp("tiny")
    base, refiner = tiny_components("base"), tiny_components("refiner", seed=1)
    files = {
        "base_fp16": d / "tiny_base.safetensors",
        "base_fp32": d / "tiny_base_fp32.safetensors",
        "base_bf16": d / "tiny_base_bf16.safetensors",
        "refiner_file": d / "tiny_refiner.safetensors",
    }
    save_single_file(base, files["base_fp16"])
    save_single_file(base, files["base_fp32"], dtype=torch.float32)
    save_single_file(base, files["base_bf16"], dtype=torch.bfloat16)
    save_single_file(refiner, files["refiner_file"])
    return SimpleNamespace(dir=d, base=base, refiner=refiner, **files)


@pytest.fixture
def base_tensors(tiny):
    """The tiny base file's tensors (float32) and metadata, to be edited into broken copies."""
    return read_file(tiny.base_fp32)


# ---------------------------------------------------------------------------------------------
# Our own tiny files.


@pytest.mark.parametrize(
    "which, dtype",
    [("base_fp16", "float16"), ("base_fp32", "float32"), ("base_bf16", "bfloat16")],
)
def test_describe_tiny_base(tiny, which, dtype):
    desc = describe(getattr(tiny, which))
    assert (desc.kind, desc.layout) == ("base", "single-file")
    assert list(desc.components) == list(PARTS)
    for name in PARTS:
        comp = desc.components[name]
        expected = n_params(getattr(tiny.base, name))
        # The OpenCLIP layout carries bigG's logit_scale (one scalar parameter of open_clip's
        # model, not of our text tower); it is counted, as in the official 694,659,841.
        if name == "text_encoder_2":
            expected += 1
        assert comp.parameters == expected, name
        assert set(comp.dtypes) == {dtype}, (name, comp.dtypes)
        assert comp.files == [getattr(tiny, which)]
    assert not desc.notes
    summary = desc.summary()
    assert "SDXL base (single-file)" in summary
    assert f"{desc.components['unet'].parameters:,}" in summary


def test_describe_tiny_refiner(tiny):
    desc = describe(tiny.refiner_file)
    assert (desc.kind, desc.layout) == ("refiner", "single-file")
    assert list(desc.components) == ["unet", "vae", "text_encoder_2"]
    assert desc.components["unet"].parameters == n_params(tiny.refiner.unet)
    assert desc.components["vae"].parameters == n_params(tiny.refiner.vae)
    assert desc.components["text_encoder_2"].parameters == n_params(tiny.refiner.text_encoder_2) + 1
    assert all(set(c.dtypes) == {"float16"} for c in desc.components.values())
    assert not desc.notes


def test_file_stores_what_was_asked(tiny):
    """Storage dtype in the header itself (not only what describe says), and the logit_scale extra."""
    header = read_safetensors_header(tiny.base_fp16)
    dtypes = {e["dtype"] for k, e in header.items() if k != "__metadata__"}
    assert dtypes == {"F16"}
    tensors, metadata = read_file(tiny.base_fp32)
    assert metadata["sdxl.kind"] == "base"
    assert set(json.loads(metadata["sdxl.configs"])) == set(PARTS)
    assert tensors[TE2_BASE + "logit_scale"].shape == ()


def test_load_roundtrip_fp32(tiny):
    loaded = load_single_file(tiny.base_fp32)
    assert loaded.kind == "base" and loaded.source == tiny.base_fp32
    for name in PARTS:
        ours, theirs = getattr(tiny.base, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        for k in ours:
            assert torch.equal(ours[k], theirs[k]), f"{name}.{k}"
    assert loaded.unet.config == tiny.base.unet.config
    assert loaded.text_encoder_2.config == tiny.base.text_encoder_2.config


def test_load_refiner_roundtrip(tiny):
    loaded = load_single_file(tiny.refiner_file, dtype="fp16")
    assert loaded.kind == "refiner" and loaded.text_encoder is None
    assert loaded.force_zeros_for_empty_prompt is False
    for name in ("unet", "vae", "text_encoder_2"):
        ours, theirs = getattr(tiny.refiner, name).state_dict(), getattr(loaded, name).state_dict()
        for k in ours:  # stored in fp16: equal after the same rounding
            assert torch.equal(ours[k].half(), theirs[k]), f"{name}.{k}"


@pytest.mark.parametrize(
    "dtype, expected",
    [("fp16", torch.float16), ("bf16", torch.bfloat16), (torch.float32, torch.float32), (None, torch.float32)],
)
def test_load_dtype(tiny, dtype, expected):
    loaded = load_single_file(tiny.base_fp32, dtype=dtype, device="cpu")
    for name in PARTS:
        model = getattr(loaded, name)
        assert {p.dtype for p in model.parameters()} == {expected}, name
        assert {p.device.type for p in model.parameters()} == {"cpu"}
        assert not any(p.requires_grad for p in model.parameters())


def test_load_some_components(tiny):
    loaded = load_single_file(tiny.base_fp16, components=("vae",))
    assert loaded.vae is not None
    assert loaded.unet is None and loaded.text_encoder is None and loaded.text_encoder_2 is None


def test_staged_reads_give_the_file_bytes(tiny):
    """The ring of reused buffers that carries a file's tensors to a GPU, run on the CPU with chunks so small that every
    tensor spans several of them and the ring wraps many times: each tensor arrives value for value, converted when
    asked, and a file that ends early is reported, not padded."""
    tensors = TensorFile([tiny.base_fp16])
    staging = Staging(torch.device("cpu"), buffers=3, chunk=100)
    with open(tiny.base_fp16, "rb", buffering=0) as f:
        for name in list(tensors)[:40]:
            expected = tensors[name]  # mapped
            for dtype in (expected.dtype, torch.float32):
                out = torch.empty(expected.numel(), dtype=dtype)
                f.seek(tensors._offsets[name])
                assert staging.read(f, out, expected.dtype)
                assert torch.equal(out.reshape(expected.shape), expected.to(dtype)), name
        f.seek(0, os.SEEK_END)
        f.seek(f.tell() - 50)
        assert not staging.read(f, torch.empty(60, dtype=torch.float16), torch.float16)
    tensors.read_to, tensors.read_dtype = torch.device("cpu"), torch.float32  # what a converting load sets
    mapped = safe_open(str(tiny.base_fp16), framework="pt")
    for name in tensors:
        stored = mapped.get_tensor(name)
        assert torch.equal(tensors[name], stored.float() if stored.is_floating_point() else stored), name
        assert tensors[name].dtype == (torch.float32 if stored.is_floating_point() else stored.dtype)


# ---------------------------------------------------------------------------------------------
# Full-size official layouts, without weights (from the manifests).


class ManifestTensors(dict):
    """A file's tensor mapping built from a key manifest: shapes and dtypes, meta tensors."""

    def __init__(self, manifest: str, file_name: str, edit=None):
        entries = json.loads((MANIFESTS / manifest).read_text())["tensors"]
        index = {k: (tuple(v["shape"]), getattr(torch, v["dtype"])) for k, v in entries.items()}
        if edit:
            edit(index)
        super().__init__(index)
        self.metadata: dict[str, str] = {}
        self.path = Path(file_name)
        self.paths = [self.path]

    def shape(self, name):
        return dict.__getitem__(self, name)[0]

    def dtype(self, name):
        return dict.__getitem__(self, name)[1]

    def __getitem__(self, name):
        shape, dtype = dict.__getitem__(self, name)
        return torch.empty(shape, device="meta", dtype=dtype)


# The counts of tests/data/checkpoint-keys/README.md.
OFFICIAL_COUNTS = {
    "base": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_841},
    "refiner": {"unet": 2_259_526_660, "vae": 83_653_863, "text_encoder_2": 694_659_841},
}
OFFICIAL_TENSORS = {
    "base": {"unet": 1680, "vae": 248, "text_encoder": 196, "text_encoder_2": 390},
    "refiner": {"unet": 1220, "vae": 248, "text_encoder_2": 390},
}


@pytest.mark.parametrize(
    "kind, manifest, total",
    [("base", "sd_xl_base_1.0.json", 3_468_837_868), ("refiner", "sd_xl_refiner_1.0.json", 3_037_840_364)],
)
def test_describe_official_manifest(kind, manifest, total):
    name = manifest.replace(".json", ".safetensors")
    desc = describe_tensors(ManifestTensors(manifest, name), Path(name))
    assert (desc.kind, desc.layout) == (kind, "single-file")
    assert {n: c.parameters for n, c in desc.components.items()} == OFFICIAL_COUNTS[kind]
    assert {n: c.dtypes for n, c in desc.components.items()} == {
        n: {"float16": t} for n, t in OFFICIAL_TENSORS[kind].items()
    }
    assert sum(c.parameters for c in desc.components.values()) == total
    assert f"{total:,}" in desc.summary()
    assert not desc.notes


def test_describe_official_with_optional_entries():
    """position_ids and denoiser.sigmas (probably in the released files) are not parameters."""

    def add_optional(index):
        index["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = ((1, 77), torch.int64)
        index["denoiser.sigmas"] = ((1000,), torch.float32)

    tensors = ManifestTensors("sd_xl_base_1.0.json", "sd_xl_base_1.0.safetensors", add_optional)
    desc = describe_tensors(tensors, tensors.path)
    assert {n: c.parameters for n, c in desc.components.items()} == OFFICIAL_COUNTS["base"]


def test_describe_official_inpainting():
    def nine_channels(index):
        key = "model.diffusion_model.input_blocks.0.0.weight"
        index[key] = ((320, 9, 3, 3), torch.float16)

    tensors = ManifestTensors("sd_xl_base_1.0.json", "inpaint.safetensors", nine_channels)
    desc = describe_tensors(tensors, tensors.path)
    assert desc.kind == "inpaint"
    assert any("9 input channels" in n for n in desc.notes)


def test_describe_official_unet_only_notes_missing():
    def unet_only(index):
        for k in [k for k in index if not k.startswith("model.diffusion_model.")]:
            del index[k]

    tensors = ManifestTensors("sd_xl_base_1.0.json", "unet_only.safetensors", unet_only)
    desc = describe_tensors(tensors, tensors.path)
    assert list(desc.components) == ["unet"]
    assert any("lacks vae, text_encoder, text_encoder_2" in n for n in desc.notes)


def test_describe_official_vae_manifest():
    tensors = ManifestTensors("sdxl_vae.json", "sdxl_vae.safetensors")
    desc = describe_tensors(tensors, tensors.path)
    assert (desc.kind, desc.layout) == ("vae", "vae-file")
    assert list(desc.components) == ["vae"]
    assert desc.components["vae"].parameters == 83_653_863
    assert desc.components["vae"].dtypes == {"float32": 248}


@pytest.mark.parametrize(
    "manifest, kind, parts",
    [("sd_xl_base_1.0.json", "base", PARTS), ("sd_xl_refiner_1.0.json", "refiner", ("unet", "vae", "text_encoder_2"))],
)
def test_load_official_manifest_on_meta(manifest, kind, parts):
    """The official presets and key maps fill exactly the official layout (no weights involved)."""
    tensors = ManifestTensors(manifest, manifest.replace(".json", ".safetensors"))
    loaded = load_official_tensors(tensors, tensors.path, device="meta")
    assert loaded.kind == kind
    for name in PARTS:
        model = getattr(loaded, name)
        if name not in parts:
            assert model is None
            continue
        # Our text tower has no logit_scale: one parameter fewer than the file's bigG entries.
        expected = OFFICIAL_COUNTS[kind][name] - (name == "text_encoder_2")
        assert n_params(model) == expected, name


def test_official_label_emb_of_other_width():
    def wrong_width(index):
        index["model.diffusion_model.label_emb.0.0.weight"] = ((1280, 2048), torch.float16)

    tensors = ManifestTensors("sd_xl_base_1.0.json", "odd.safetensors", wrong_width)
    with pytest.raises(CheckpointError, match=r"odd\.safetensors.*2048-wide additional embedding"):
        describe_tensors(tensors, tensors.path)


# ---------------------------------------------------------------------------------------------
# Files of other model families.


def _t(*shape):
    return torch.zeros(shape, dtype=torch.float16)


UNET_SD = {
    "model.diffusion_model.input_blocks.0.0.weight": _t(8, 4, 3, 3),
    "model.diffusion_model.time_embed.0.weight": _t(16, 8),
    "model.diffusion_model.out.2.weight": _t(4, 8, 3, 3),
}
VAE_SD = {"first_stage_model.encoder.conv_in.weight": _t(8, 3, 3, 3), "first_stage_model.decoder.conv_out.weight": _t(3, 8, 3, 3)}

NOT_SDXL = {
    "sd15": (
        {**UNET_SD, **VAE_SD, "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": _t(10, 8)},
        "Stable Diffusion 1.x",
    ),
    "sd21": (
        {
            **UNET_SD,
            **VAE_SD,
            "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": _t(24, 8),
            "cond_stage_model.model.token_embedding.weight": _t(10, 8),
        },
        "Stable Diffusion 2.x",
    ),
    "sd3": (
        {
            "model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight": _t(24, 8),
            "model.diffusion_model.x_embedder.proj.weight": _t(8, 16, 2, 2),
            **VAE_SD,
        },
        "Stable Diffusion 3",
    ),
    "flux": (
        {
            "double_blocks.0.img_attn.qkv.weight": _t(24, 8),
            "single_blocks.0.linear1.weight": _t(32, 8),
            "img_in.weight": _t(8, 64),
        },
        "Flux",
    ),
    "lora": (
        {
            "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": _t(4, 8),
            "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight": _t(8, 4),
            "lora_unet_down_blocks_1_attentions_0_proj_in.alpha": _t(),
        },
        "LoRA",
    ),
    "diffusers_unet": (
        {
            "conv_in.weight": _t(8, 4, 3, 3),
            "time_embedding.linear_1.weight": _t(16, 8),
            "down_blocks.0.resnets.0.conv1.weight": _t(8, 8, 3, 3),
            "up_blocks.0.resnets.0.conv1.weight": _t(8, 16, 3, 3),
        },
        "diffusers U-Net weight file on its own",
    ),
    "empty": ({}, "empty weight file"),
    "flux_vae": (
        {
            "encoder.conv_in.weight": _t(8, 3, 3, 3),
            "encoder.conv_out.weight": _t(32, 8, 3, 3),
            "decoder.conv_in.weight": _t(8, 16, 3, 3),
            "decoder.conv_out.weight": _t(3, 8, 3, 3),
        },
        "16 latent channels",
    ),
    "unknown": ({"backbone.layer1.weight": _t(4, 4), "head.fc.bias": _t(4)}, "unknown model (2 tensors"),
    "text_encoder": (
        {
            "text_model.embeddings.token_embedding.weight": _t(10, 8),
            "text_model.encoder.layers.0.self_attn.q_proj.weight": _t(8, 8),
        },
        "text encoder on its own",
    ),
    "sgm_without_label_emb": (
        {**UNET_SD, "conditioner.embedders.0.model.token_embedding.weight": _t(10, 8)},
        "no model.diffusion_model.label_emb",
    ),
}


@pytest.mark.parametrize("name", list(NOT_SDXL))
def test_not_sdxl(tmp_path, name):
    tensors, family = NOT_SDXL[name]
    path = write_file(tensors, tmp_path / f"{name}.safetensors")
    with pytest.raises(CheckpointError) as e:
        describe(path)
    message = str(e.value)
    assert message.startswith(str(path)), message
    assert family in message, message
    assert "\n" not in message
    with pytest.raises(CheckpointError):  # nor can it be loaded as SDXL
        load_single_file(path)


def test_tiny_file_without_metadata_is_refused(tmp_path, tiny, base_tensors):
    """Without our config metadata a tiny U-Net's 256-wide label_emb is not SDXL's."""
    tensors, _ = base_tensors
    path = write_file(tensors, tmp_path / "no_metadata.safetensors")
    with pytest.raises(CheckpointError, match=r"no_metadata\.safetensors: a U-Net with a 256-wide additional embedding"):
        describe(path)


@pytest.mark.parametrize(
    "shape, match",
    [((128, 2000), "2000-wide additional embedding"), ((2816,), r"label_emb\.0\.0\.weight has shape \(2816,\)")],
)
def test_label_emb_of_wrong_shape(tmp_path, shape, match):
    tensors = {**UNET_SD, "model.diffusion_model.label_emb.0.0.weight": _t(*shape)}
    path = write_file(tensors, tmp_path / "label_emb.safetensors")
    with pytest.raises(CheckpointError, match=match) as e:
        describe(path)
    assert str(path) in str(e.value)


def test_label_emb_without_input_conv(tmp_path):
    tensors = {"model.diffusion_model.label_emb.0.0.weight": _t(16, 2816)}
    path = write_file(tensors, tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match=r"partial\.safetensors.*input_blocks\.0\.0\.weight"):
        describe(path)


# ---------------------------------------------------------------------------------------------
# Corrupt and truncated files.


@pytest.fixture(scope="session")
def small_vae_file(tmp_path_factory):
    """A real, small safetensors file: the tiny VAE in the official standalone layout."""
    torch.manual_seed(2)
    vae = AutoencoderKL(vae_models.tiny)
    state = invert(vae.state_dict(), vae_keys.official_vae_keys(vae_models.tiny))
    path = tmp_path_factory.mktemp("vae") / "small_vae.safetensors"
    write_file({k: v.half() for k, v in state.items()}, path)
    return path


def test_small_vae_file_is_fine(small_vae_file):
    desc = describe(small_vae_file)
    assert (desc.kind, desc.layout) == ("vae", "vae-file")
    assert desc.components["vae"].parameters == n_params(AutoencoderKL(vae_models.tiny))


def _header_size(path: Path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def _corrupt(kind: str, source: Path, dest: Path) -> Path:
    data = source.read_bytes()
    n = _header_size(source)
    contents = {
        "zero_bytes": b"",
        "five_bytes": data[:5],
        "cut_in_data": data[: 8 + n + (len(data) - 8 - n) // 2],
        "cut_in_header": data[: 8 + n // 2],
        "garbage_json": struct.pack("<Q", 16) + b"{not json at all" + b"\0" * 64,
        "json_list_header": struct.pack("<Q", 2) + b"[]",
        "bad_entry": struct.pack("<Q", 60) + b'{"a": {"dtype": "F16", "shape": [2], "data_offsets": "xy"}}'.ljust(60),
        "html": b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>Please log in</body></html>\n" * 20,
        "json": json.dumps({"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}).encode(),
    }[kind]
    dest.write_bytes(contents)
    return dest


CORRUPT = {
    "zero_bytes": "only 0 bytes",
    "five_bytes": "only 5 bytes",
    "cut_in_data": r"truncated: the header describes [\d,]+ bytes but the file has [\d,]+",
    "cut_in_header": "truncated .*cut short inside its header",
    "garbage_json": r"corrupt safetensors header \(not valid JSON\)",
    "json_list_header": r"corrupt safetensors header \(not a JSON object\)",
    "bad_entry": r"corrupt safetensors header \(bad entry for 'a'\)",
    "html": "HTML/XML page",
    "json": "looks like a JSON file",
}


@pytest.mark.parametrize("kind", list(CORRUPT))
def test_corrupt_files(tmp_path, small_vae_file, kind):
    path = _corrupt(kind, small_vae_file, tmp_path / f"{kind}.safetensors")
    for fn in (open_tensors, describe):
        with pytest.raises(CheckpointError, match=CORRUPT[kind]) as e:
            fn(path)
        assert str(e.value).startswith(f"{path}: "), str(e.value)
        assert "\n" not in str(e.value)


def test_truncated_single_file_does_not_load(tmp_path, tiny):
    data = tiny.base_fp16.read_bytes()
    path = tmp_path / "partial_download.safetensors"
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"partial_download\.safetensors: truncated"):
        load_single_file(path)


def test_pickle_renamed_as_safetensors(tmp_path):
    path = tmp_path / "renamed.safetensors"
    torch.save({"a": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match=r"renamed\.safetensors: .*zip archive"):
        describe(path)


def test_no_such_file_and_folder_given_as_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nothere\.safetensors: no such file"):
        describe(tmp_path / "nothere.safetensors")
    with pytest.raises(CheckpointError, match="is a folder"):
        open_tensors(tmp_path)


# ---------------------------------------------------------------------------------------------
# Pickle checkpoints: tensors only, never code.


@pytest.fixture(scope="session")
def ckpt_parts():
    """Tiny models whose U-Net takes SDXL's 2816-wide additional embedding (so the kind is readable
    from the shapes alone: pickles carry no metadata)."""
    return tiny_components("base", seed=3, unet=replace(unet_models.tiny, adm_in_channels=2816))


@pytest.mark.parametrize("wrapped, legacy", [(True, False), (False, True)])
def test_pickle_checkpoint_of_tensors(tmp_path, ckpt_parts, wrapped, legacy):
    state = official_layout(ckpt_parts, dtype=torch.float32)
    path = tmp_path / "tiny.ckpt"
    obj = {"state_dict": state, "global_step": 1000, "epoch": 3} if wrapped else state
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    tensors = open_tensors(path)
    assert isinstance(tensors, PickledTensors)
    assert set(tensors) == set(state)
    assert all(torch.equal(tensors[k], state[k]) for k in state)
    desc = describe(path)
    assert (desc.kind, desc.layout) == ("base", "single-file")
    for name in PARTS:
        expected = n_params(getattr(ckpt_parts, name)) + (name == "text_encoder_2")
        assert desc.components[name].parameters == expected, name
        assert set(desc.components[name].dtypes) == {"float32"}


def test_pickle_of_non_tensors_is_refused(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match=r"list\.pt: the pickle does not hold a state dict of tensors"):
        open_tensors(path)


@pytest.mark.parametrize("kind", ["garbage", "empty", "truncated_zip"])
def test_corrupt_pickle(tmp_path, kind):
    path = tmp_path / f"{kind}.ckpt"
    if kind == "garbage":
        path.write_bytes(b"hello, this is not a checkpoint at all")
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"state_dict": {"a": torch.ones(1000)}}, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="refused to load this pickle file: it is corrupt or not a PyTorch checkpoint") as e:
        describe(path)
    assert str(e.value).startswith(f"{path}: ")
    assert "\n" not in str(e.value) and "weights_only=False" not in str(e.value)


class Payload:
    """A pickle that runs `fn(arg)` when unpickled."""

    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


def _payloads(marker: Path):
    import builtins

    return {
        "os.system": Payload(os.system, f"touch '{marker}'"),
        "exec": Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
    }


def test_payloads_are_live(tmp_path):
    """Control: unpickled without protection, the payloads do run (so the tests below mean something)."""
    for name, payload in _payloads(tmp_path / "marker").items():
        marker = tmp_path / "marker"
        pickle.loads(pickle.dumps(payload))
        assert marker.exists(), name
        marker.unlink()


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt"])
@pytest.mark.parametrize("fn", ["os.system", "exec"])
def test_malicious_pickle_is_not_run(tmp_path, writer, suffix, fn):
    marker = tmp_path / "pwned"
    payload = _payloads(marker)[fn]
    path = tmp_path / f"evil{suffix}"
    obj = {"state_dict": {"model.diffusion_model.x": torch.ones(1), "evil": payload}}
    if writer == "torch.save":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))
    for call in (open_tensors, describe, load_single_file):
        with pytest.raises(CheckpointError, match="refused to load this pickle file: it holds more than plain tensors") as e:
            call(path)
        assert str(e.value).startswith(f"{path}: ")
        assert "\n" not in str(e.value)
    assert not marker.exists()


def test_malicious_bin_in_diffusers_folder_is_not_run(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "pipe"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"]})
    )
    torch.save({"conv_in.weight": _payloads(marker)["os.system"]}, folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.bin: refused"):
        describe(folder)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Loading: missing, mis-shaped and unexpected tensors.


def _edited(tmp_path, base_tensors, name, edit) -> Path:
    tensors, metadata = base_tensors
    tensors = dict(tensors)
    edit(tensors)
    return write_file(tensors, tmp_path / name, metadata)


@pytest.mark.parametrize(
    "key, shown",
    [
        ("model.diffusion_model.out.2.bias", "out.2.bias"),
        ("first_stage_model.decoder.conv_out.weight", "decoder.conv_out.weight"),
        ("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight", "text_model.final_layer_norm.weight"),
        (TE2_BASE + "text_projection", "text_projection"),
    ],
)
def test_load_missing_tensor(tmp_path, base_tensors, key, shown):
    path = _edited(tmp_path, base_tensors, "missing.safetensors", lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match="missing 1 tensor") as e:
        load_single_file(path)
    message = str(e.value)
    assert str(path) in message and shown in message, message
    prefix = key[: len(key) - len(shown)]
    assert prefix in message, message  # the component's prefix: the full file name is recoverable


def test_load_missing_unet_input(tmp_path, base_tensors):
    path = _edited(tmp_path, base_tensors, "no_conv_in.safetensors", lambda t: t.pop("model.diffusion_model.input_blocks.0.0.weight"))
    with pytest.raises(CheckpointError, match=r"input_blocks\.0\.0\.weight") as e:
        load_single_file(path)
    assert str(path) in str(e.value)


def test_load_missing_label_emb(tmp_path, base_tensors):
    path = _edited(tmp_path, base_tensors, "no_label_emb.safetensors", lambda t: t.pop("model.diffusion_model.label_emb.0.0.weight"))
    with pytest.raises(CheckpointError, match=r"no model\.diffusion_model\.label_emb\.0\.0\.weight") as e:
        describe(path)
    assert str(e.value).startswith(str(path))


def test_load_wrong_shape(tmp_path, base_tensors):
    key = "model.diffusion_model.time_embed.0.weight"
    good = tuple(base_tensors[0][key].shape)
    bad = (good[0], good[1] + 3)

    def edit(t):
        t[key] = torch.zeros(bad)

    path = _edited(tmp_path, base_tensors, "misshaped.safetensors", edit)
    with pytest.raises(CheckpointError, match="wrong shape") as e:
        load_single_file(path)
    message = str(e.value)
    assert str(path) in message and "time_embed.0.weight" in message, message
    assert str(bad) in message and str(good) in message, message


def test_load_wrong_shape_in_fused_projection(tmp_path, base_tensors):
    key = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"

    def edit(t):
        t[key] = torch.zeros(t[key].shape[0], t[key].shape[1] - 1)

    path = _edited(tmp_path, base_tensors, "misshaped_q.safetensors", edit)
    with pytest.raises(CheckpointError, match="q_proj.weight") as e:
        load_single_file(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize(
    "key, match",
    [
        ("model.diffusion_model.extra_block.weight", r"1 unexpected tensor\(s\): extra_block\.weight"),
        ("first_stage_model.encoder.extra.bias", r"1 unexpected tensor\(s\): encoder\.extra\.bias"),
        ("cond_stage_model.transformer.stray.weight", r"outside the SDXL components: cond_stage_model\.transformer\.stray\.weight"),
    ],
)
def test_load_extra_tensor(tmp_path, base_tensors, key, match):
    def edit(t):
        t[key] = torch.zeros(3)

    path = _edited(tmp_path, base_tensors, "extra.safetensors", edit)
    with pytest.raises(CheckpointError, match=match) as e:
        load_single_file(path)
    assert str(path) in str(e.value)


def test_load_ignores_non_weights(tmp_path, base_tensors, tiny):
    """The optional non-weight entries of the official files are skipped, not errors."""

    def edit(t):
        t["denoiser.sigmas"] = torch.linspace(0.03, 14.6, 1000)
        t["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]

    path = _edited(tmp_path, base_tensors, "with_extras.safetensors", edit)
    loaded = load_single_file(path)
    assert torch.equal(loaded.unet.state_dict()["out.2.bias"], tiny.base.unet.state_dict()["out.2.bias"])
    desc = describe(path)
    assert desc.components["text_encoder"].parameters == n_params(tiny.base.text_encoder)


# ---------------------------------------------------------------------------------------------
# diffusers folders.


def write_diffusers(folder: Path, parts: Components, *, variant: str | None = None, cls: str | None = None) -> Path:
    """Our models written as a diffusers pipeline folder, through the diffusers key maps."""
    folder.mkdir(parents=True)
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    dtype = torch.float16 if variant == "fp16" else torch.float32
    classes = {
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    }
    index = {
        "_class_name": cls or ("StableDiffusionXLImg2ImgPipeline" if parts.kind == "refiner" else "StableDiffusionXLPipeline"),
        "_diffusers_version": "0.20.0",
        "force_zeros_for_empty_prompt": parts.kind != "refiner",
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "tokenizer": ["transformers", "CLIPTokenizer"] if parts.text_encoder else [None, None],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
    }
    for name in PARTS:
        model = getattr(parts, name)
        if model is None:
            index[name] = [None, None]
            continue
        index[name] = classes[name]
        c = model.config
        if name == "unet":
            config, rules, stem = unet_keys.unet_config_to_diffusers(c), unet_keys.diffusers_unet_keys(c), "diffusion_pytorch_model"
        elif name == "vae":
            config, rules, stem = vae_keys.vae_config_to_diffusers(c), vae_keys.diffusers_vae_keys(c), "diffusion_pytorch_model"
        else:
            config, rules, stem = clip_keys.clip_config_to_transformers(c), clip_keys.transformers_clip_keys(c), "model"
        (folder / name).mkdir()
        (folder / name / "config.json").write_text(json.dumps(config))
        state = {k: v.to(dtype) for k, v in invert(model.state_dict(), rules).items()}
        write_file(state, folder / name / f"{stem}{suffix}", {"format": "pt"})
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="session")
def diffusers_base(tmp_path_factory, tiny):
    return write_diffusers(tmp_path_factory.mktemp("diffusers") / "tiny-sdxl", tiny.base)


def test_describe_diffusers_base(diffusers_base, tiny):
    desc = describe(diffusers_base)
    assert (desc.kind, desc.layout) == ("base", "diffusers")
    assert list(desc.components) == list(PARTS)
    for name in PARTS:
        comp = desc.components[name]
        assert comp.parameters == n_params(getattr(tiny.base, name)), name  # no logit_scale here
        assert set(comp.dtypes) == {"float32"}
        assert len(comp.files) == 1 and comp.files[0].parent == diffusers_base / name
    assert "SDXL base (diffusers)" in desc.summary()


def test_load_diffusers_roundtrip(diffusers_base, tiny):
    loaded = load_diffusers(diffusers_base)
    assert loaded.kind == "base"
    for name in PARTS:
        ours, theirs = getattr(tiny.base, name).state_dict(), getattr(loaded, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_describe_diffusers_refiner(tmp_path, tiny):
    folder = write_diffusers(tmp_path / "refiner", tiny.refiner)
    desc = describe(folder)
    assert (desc.kind, desc.layout) == ("refiner", "diffusers")
    assert list(desc.components) == ["unet", "vae", "text_encoder_2"]
    assert desc.components["unet"].parameters == n_params(tiny.refiner.unet)


def test_diffusers_fp16_variant_only(tmp_path, tiny):
    folder = write_diffusers(tmp_path / "fp16", tiny.base, variant="fp16")
    assert diffusers_weight_files(folder / "unet") == [folder / "unet" / "diffusion_pytorch_model.fp16.safetensors"]
    assert diffusers_weight_files(folder / "text_encoder") == [folder / "text_encoder" / "model.fp16.safetensors"]
    desc = describe(folder)
    assert list(desc.components) == list(PARTS)
    assert all(set(c.dtypes) == {"float16"} for c in desc.components.values())
    assert desc.components["vae"].parameters == n_params(tiny.base.vae)


def test_diffusers_variant_preferred_when_asked(tmp_path):
    folder = tmp_path / "unet"
    folder.mkdir()
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"):
        write_file({"a": torch.zeros(1)}, folder / name)
    assert diffusers_weight_files(folder) == [folder / "diffusion_pytorch_model.safetensors"]
    assert diffusers_weight_files(folder, "fp16") == [folder / "diffusion_pytorch_model.fp16.safetensors"]


def test_diffusers_sharded_component(tmp_path, diffusers_base, tiny):
    folder = tmp_path / "sharded"
    shutil.copytree(diffusers_base, folder)
    unet = folder / "unet"
    tensors, _ = read_file(unet / "diffusion_pytorch_model.safetensors")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(tensors)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2], "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for shard, names in shards.items():
        write_file({k: tensors[k] for k in names}, unet / shard)
        weight_map.update(dict.fromkeys(names, shard))
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    desc = describe(folder)
    assert desc.components["unet"].parameters == n_params(tiny.base.unet)
    assert [p.name for p in desc.components["unet"].files] == sorted(shards)


@pytest.mark.parametrize("cls", ["StableDiffusionPipeline", "FluxPipeline"])
def test_diffusers_other_pipeline(tmp_path, cls):
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": cls, "unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(CheckpointError, match=f"not an SDXL pipeline: model_index.json names {cls}") as e:
        describe(folder)
    assert str(e.value).startswith(str(folder))


@pytest.mark.parametrize(
    "contents, match",
    [("{broken", "not valid JSON"), ("[1, 2]", "not a JSON object")],
)
def test_diffusers_bad_model_index(tmp_path, contents, match):
    (tmp_path / "model_index.json").write_text(contents)
    with pytest.raises(CheckpointError, match=match) as e:
        describe(tmp_path)
    assert str(tmp_path / "model_index.json") in str(e.value)


def test_folder_without_model_index(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match=r"not a diffusers folder \(no model_index\.json\)") as e:
        describe(tmp_path)
    assert str(e.value).startswith(str(tmp_path))


def test_component_folder_without_weights(tmp_path, diffusers_base):
    folder = tmp_path / "broken"
    shutil.copytree(diffusers_base, folder)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "vae" / "README.md").write_text("weights go here")
    with pytest.raises(CheckpointError, match=r"no weight file .*the folder holds: README\.md, config\.json") as e:
        describe(folder)
    assert str(folder / "vae") in str(e.value)
    shutil.rmtree(folder / "vae")
    with pytest.raises(CheckpointError, match="no such folder"):
        describe(folder)


def test_sharded_index_without_weight_map(tmp_path):
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="no 'weight_map'"):
        diffusers_weight_files(tmp_path)


def test_tensor_file_reads_lazily_from_header(tiny):
    tensors = open_tensors(tiny.base_fp16)
    assert isinstance(tensors, TensorFile)
    key = "model.diffusion_model.out.2.weight"
    assert tensors.shape(key) == tuple(tiny.base.unet.state_dict()["out.2.weight"].shape)
    assert tensors.dtype(key) == torch.float16
    assert tensors.storage_dtypes("first_stage_model.") == {"F16": len(vae_keys.official_vae_keys(vae_models.tiny))}
