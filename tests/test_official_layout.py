"""The official single-file layout, checked independently of our own key tables.

1. Reference models (diffusers / transformers, random weights) saved as a diffusers folder are loaded
   by our diffusers loader, written by our official-layout writer, and read back by *diffusers' own*
   single-file converters (`diffusers.loaders.single_file_utils`): the weights must come back equal.
2. Full-size base and refiner, built on the meta device through the same loader path a user's file
   takes, consume exactly the tensors of the published manifests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import randomize

from sdxl.checkpoints import load as loading
from sdxl.checkpoints.files import open_tensors
from sdxl.checkpoints.keymap import CheckpointError
from sdxl.checkpoints.save import official_layout, save_single_file

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.loaders import single_file_utils as sfu  # noqa: E402

MANIFESTS = Path(__file__).parent / "data" / "checkpoint-keys"


def unet_config(refiner: bool) -> dict:
    if refiner:
        return dict(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(32, 64, 64, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4, 4, 4), transformer_layers_per_block=2, norm_num_groups=8,
            cross_attention_dim=64, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=64 + 5 * 8,
        )
    return dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 1, 2), norm_num_groups=8,
        cross_attention_dim=32 + 64, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=64 + 6 * 8,
    )


VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32, 32), layers_per_block=1,
    norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=0.13025,
)


def clip_config(width: int, act: str, projection: int | None = None):
    return transformers.CLIPTextConfig(
        vocab_size=1000, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, hidden_act=act, projection_dim=projection or width,
        eos_token_id=2, pad_token_id=1, bos_token_id=0,
    )


def make_reference_folder(root: Path, refiner: bool) -> dict[str, dict[str, torch.Tensor]]:
    """A diffusers-format SDXL folder of small random reference models; returns their state dicts."""
    models = {
        "unet": randomize(diffusers.UNet2DConditionModel(**unet_config(refiner)), 1, scale=0.2),
        "vae": randomize(diffusers.AutoencoderKL(**VAE_CONFIG), 2, scale=0.2),
        "text_encoder_2": randomize(transformers.CLIPTextModelWithProjection(clip_config(64, "gelu", 64)), 4, scale=0.2),
    }
    index = {
        "_class_name": "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline",
        "force_zeros_for_empty_prompt": not refiner,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": [None, None] if refiner else ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    }
    if not refiner:
        models["text_encoder"] = randomize(transformers.CLIPTextModel(clip_config(32, "quick_gelu")), 3, scale=0.2)
    for name, model in models.items():
        model.save_pretrained(root / name)
    (root / "model_index.json").write_text(json.dumps(index))
    return {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in models.items()}


def assert_same(converted: dict, reference: dict, what: str) -> None:
    reference = {k: v for k, v in reference.items() if not k.endswith("position_ids")}
    assert set(converted) == set(reference), f"{what}: names differ: {sorted(set(converted) ^ set(reference))[:5]}"
    for k, v in reference.items():
        assert torch.equal(converted[k].to(v.dtype), v), f"{what}: {k} differs"


@pytest.mark.parametrize("refiner", [False, True], ids=["base", "refiner"])
def test_official_layout_reads_back_through_diffusers_converters(tmp_path, refiner):
    reference = make_reference_folder(tmp_path / "ref", refiner)
    parts = loading.load_diffusers(tmp_path / "ref")
    assert parts.kind == ("refiner" if refiner else "base")
    assert (parts.text_encoder is None) == refiner
    assert parts.force_zeros_for_empty_prompt == (not refiner)

    path = tmp_path / "model.safetensors"
    save_single_file(parts, path, dtype=None)  # float32, so the comparison is exact
    ckpt = dict(open_tensors(path))

    unet_cfg = json.loads((tmp_path / "ref" / "unet" / "config.json").read_text())
    assert_same(sfu.convert_ldm_unet_checkpoint(ckpt, unet_cfg), reference["unet"], "unet")
    vae_cfg = json.loads((tmp_path / "ref" / "vae" / "config.json").read_text())
    assert_same(sfu.convert_ldm_vae_checkpoint(ckpt, vae_cfg), reference["vae"], "vae")
    if not refiner:
        clip_l = sfu.convert_ldm_clip_checkpoint(ckpt)
        # transformers 5 keeps CLIPTextModel's tensors without the `text_model.` level in memory.
        ref_l = {"text_model." + k if not k.startswith("text_model.") else k: v for k, v in reference["text_encoder"].items()}
        assert_same(clip_l, ref_l, "text_encoder")
    g_prefix = "conditioner.embedders.0.model." if refiner else "conditioner.embedders.1.model."

    class _Stub:  # the converter reads only config.hidden_size, and only without a text projection
        config = type("C", (), {"hidden_size": 64})

    clip_g = sfu.convert_open_clip_checkpoint(_Stub(), ckpt, prefix=g_prefix)
    assert_same(clip_g, reference["text_encoder_2"], "text_encoder_2")


def test_single_file_round_trip_in_storage_dtypes(tmp_path):
    make_reference_folder(tmp_path / "ref", refiner=False)
    parts = loading.load_diffusers(tmp_path / "ref")
    for dtype in (torch.float16, torch.bfloat16):
        path = tmp_path / f"model-{dtype}.safetensors"
        save_single_file(parts, path, dtype=dtype)
        back = loading.load_single_file(path, dtype=torch.float32)
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            original, loaded = getattr(parts, name).state_dict(), getattr(back, name).state_dict()
            assert original.keys() == loaded.keys()
            for k, v in original.items():
                assert loaded[k].dtype == torch.float32
                assert torch.equal(loaded[k], v.to(dtype).float()), f"{name}.{k}"
        half = loading.load_single_file(path, dtype=dtype)
        assert all(p.dtype == dtype for p in half.unet.parameters())


class ManifestTensors(dict):
    """A manifest of an official file as a lazy tensor source: meta tensors with the file's shapes."""

    def __init__(self, manifest: dict, path: Path, with_optional: bool = True):
        entries = dict(manifest["tensors"])
        if with_optional:
            entries.update(manifest.get("optional", {}))
        dtypes = {"float16": torch.float16, "float32": torch.float32, "int64": torch.int64, "int32": torch.int32}
        super().__init__({
            name: torch.empty(e["shape"], dtype=dtypes.get(e["dtype"].split()[0], torch.float32), device="meta")
            for name, e in entries.items()
        })
        self.paths = [path]
        self.path = path
        self.metadata: dict[str, str] = {}

    def shape(self, name):
        return tuple(self[name].shape)

    def dtype(self, name):
        return self[name].dtype


@pytest.mark.parametrize("name", ["sd_xl_base_1.0", "sd_xl_refiner_1.0"])
@pytest.mark.parametrize("with_optional", [True, False])
def test_full_size_models_consume_the_official_manifests_exactly(name, with_optional):
    manifest = json.loads((MANIFESTS / f"{name}.json").read_text())
    tensors = ManifestTensors(manifest, Path(f"{name}.safetensors"), with_optional)
    # The same path a user's file takes, with the models left on the meta device.
    parts = loading.load_official_tensors(tensors, tensors.path, dtype=torch.float16, device="meta")
    refiner = "refiner" in name
    assert parts.kind == ("refiner" if refiner else "base")
    expected = {"unet": 2_259_526_660 if refiner else 2_567_463_684, "vae": 83_653_863, "text_encoder_2": 694_659_840}
    if not refiner:
        expected["text_encoder"] = 123_060_480
    assert (parts.text_encoder is None) == refiner
    for component, count in expected.items():
        assert sum(p.numel() for p in getattr(parts, component).parameters()) == count, component

    # Writing these models back in the official layout gives exactly the manifest's required tensors
    # (plus logit_scale, which the official bigG carries), with the same shapes.
    written = official_layout(parts, dtype=None)
    required = {k: tuple(v["shape"]) for k, v in manifest["tensors"].items()}
    assert {k: tuple(v.shape) for k, v in written.items()} == required


def test_a_manifest_with_a_tensor_missing_or_extra_is_refused():
    manifest = json.loads((MANIFESTS / "sd_xl_base_1.0.json").read_text())
    tensors = ManifestTensors(manifest, Path("damaged.safetensors"))
    missing = "model.diffusion_model.output_blocks.2.1.transformer_blocks.3.attn2.to_k.weight"
    del tensors[missing]
    with pytest.raises(CheckpointError, match="damaged.safetensors.*missing.*attn2.to_k"):
        loading.load_official_tensors(tensors, tensors.path, device="meta")
    tensors = ManifestTensors(manifest, Path("extra.safetensors"))
    tensors["model.diffusion_model.something_new.weight"] = torch.empty(3, device="meta")
    with pytest.raises(CheckpointError, match="extra.safetensors.*something_new"):
        loading.load_official_tensors(tensors, tensors.path, device="meta")


@pytest.mark.parametrize("name", ["diffusers_base", "diffusers_refiner"])
def test_diffusers_manifest_configs_build_the_official_presets(name):
    from sdxl.checkpoints import clip_keys, unet_keys, vae_keys
    from sdxl.models import clip, unet, vae

    manifest = json.loads((MANIFESTS / f"{name}.json").read_text())
    refiner = "refiner" in name
    assert unet_keys.unet_config_from_diffusers(manifest["unet"]["config_used"]) == (unet.refiner if refiner else unet.base)
    assert vae_keys.vae_config_from_diffusers(manifest["vae"]["config_used"]) == vae.base
    te2 = manifest["text_encoder_2"]
    assert clip_keys.clip_config_from_transformers(te2["config_used"], with_projection=True) == clip.clip_g


def test_unreadable_config_metadata_is_a_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file

    make_reference_folder(tmp_path / "ref", refiner=False)
    path = tmp_path / "model.safetensors"
    save_single_file(loading.load_diffusers(tmp_path / "ref"), path)
    damaged = tmp_path / "damaged.safetensors"
    save_file(load_file(path), damaged, metadata={"sdxl.kind": "base", "sdxl.configs": "{not json"})
    with pytest.raises(CheckpointError, match="damaged.safetensors: unreadable model configs"):
        loading.load_single_file(damaged)


def test_a_refiner_single_file_refuses_a_clip_l():
    from sdxl.models import clip
    from sdxl.models.clip import CLIPTextEncoder

    parts = loading.Components(kind="refiner", text_encoder=CLIPTextEncoder(clip.clip_l_tiny))
    with pytest.raises(ValueError, match="refiner single file has no place for text_encoder"):
        official_layout(parts)


def test_cli_convert_single_file_to_diffusers_and_back(tmp_path):
    import subprocess
    import sys

    make_reference_folder(tmp_path / "ref", refiner=False)
    parts = loading.load_diffusers(tmp_path / "ref")
    single = tmp_path / "model.safetensors"
    save_single_file(parts, single, dtype=torch.float32)

    def run(*argv):
        return subprocess.run([sys.executable, "-m", "sdxl", "convert", *map(str, argv)], capture_output=True, text=True)

    r = run(single, tmp_path / "folder", "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    assert "diffusers folder" in r.stdout
    r = run(tmp_path / "folder", tmp_path / "back.safetensors", "--dtype", "bf16")
    assert r.returncode == 0, r.stderr
    back = loading.load_single_file(tmp_path / "back.safetensors")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        for k, v in getattr(parts, name).state_dict().items():
            assert torch.equal(getattr(back, name).state_dict()[k], v.to(torch.bfloat16).float()), f"{name}.{k}"
    r = run(single, tmp_path / "back.safetensors")  # exists: refused, untouched
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr
