"""`save_diffusers`: our models written as a diffusers folder (the official SDXL repos' layout).

Checked three ways: our loader reads the folder back to the same models; diffusers and
transformers themselves load it (each component, and the whole pipeline with the tokenizers we
write) and compute what our models compute; and at full size, on the meta device, the file names,
tensor names, shapes and configs are those of the published repos (tests/data/checkpoint-keys).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import randomize, tiny_components

from sdxl.checkpoints import save as saving
from sdxl.checkpoints.files import read_safetensors_header
from sdxl.checkpoints.formats import describe
from sdxl.checkpoints.keymap import CheckpointError
from sdxl.checkpoints.load import Components, load_diffusers, load_single_file
from sdxl.checkpoints.save import (
    SDXL_SCHEDULER,
    diffusers_config,
    diffusers_tensors,
    save_diffusers,
    save_single_file,
)
from sdxl.models import clip as clip_models
from sdxl.models import unet as unet_models
from sdxl.models import vae as vae_models
from sdxl.models.clip import CLIPTextEncoder
from sdxl.models.tokenizer import Tokenizer, clip_g_tokenizer, clip_l_tokenizer
from sdxl.models.unet import UNet, micro_conditioning
from sdxl.models.vae import AutoencoderKL

try:
    import diffusers
    import transformers
except ImportError:  # test-only dependencies
    diffusers = transformers = None
needs_reference = pytest.mark.skipif(diffusers is None, reason="needs diffusers and transformers")

MANIFESTS = Path(__file__).parent / "data" / "checkpoint-keys"
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
REFINER_PARTS = ("unet", "vae", "text_encoder_2")
TOKENIZER_FILES = ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")
PROMPTS = ["a photo of a cat", "Hello, World! wow!!", "<|startoftext|>x<|endoftext|> y", ""]


# ---------------------------------------------------------------------------------------------
# Helpers.


def assert_same_models(ours: Components, theirs: Components, names, cast: torch.dtype | None = None) -> None:
    for name in names:
        a, b = getattr(ours, name), getattr(theirs, name)
        assert a.config == b.config, name
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys(), name
        for k in sa:
            want = sa[k].to(cast) if cast is not None else sa[k]
            assert want.dtype == sb[k].dtype and torch.equal(want, sb[k]), f"{name}.{k}"


def files_in(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str, atol: float = 1e-4) -> None:
    assert ours.shape == theirs.shape, f"{what}: {tuple(ours.shape)} vs {tuple(theirs.shape)}"
    err = (ours - theirs).abs().max().item()
    assert err <= atol, f"{what}: max abs error {err:.3g} (outputs of scale {theirs.abs().max().item():.3g})"
    assert theirs.abs().max().item() > 100 * atol, f"{what}: outputs too small to tell anything apart"


@pytest.fixture(scope="module")
def base():
    return tiny_components("base", seed=0, randomized=True)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory, base) -> Path:
    folder = tmp_path_factory.mktemp("save") / "tiny-sdxl"
    save_diffusers(base, folder, dtype=None)  # float32: exact comparisons
    return folder


@pytest.fixture(scope="module")
def refiner():
    return tiny_components("refiner", seed=1, randomized=True)


@pytest.fixture(scope="module")
def refiner_folder(tmp_path_factory, refiner) -> Path:
    folder = tmp_path_factory.mktemp("save") / "tiny-refiner"
    folder.mkdir()  # an existing empty folder is filled
    save_diffusers(refiner, folder, dtype=None)
    return folder


# ---------------------------------------------------------------------------------------------
# The folder, read back by our loader.


def test_folder_layout(base_folder):
    expected = {f"{name}/config.json" for name in PARTS} | {"model_index.json", "scheduler/scheduler_config.json"}
    expected |= {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"}
    expected |= {"text_encoder/model.safetensors", "text_encoder_2/model.safetensors"}
    expected |= {f"{tok}/{f}" for tok in ("tokenizer", "tokenizer_2") for f in TOKENIZER_FILES}
    assert files_in(base_folder) == expected
    assert [p.name for p in base_folder.parent.iterdir()] == ["tiny-sdxl"]  # no temporary folder left


def test_roundtrip_fp32(base, base_folder):
    loaded = load_diffusers(base_folder)
    assert loaded.kind == "base" and loaded.force_zeros_for_empty_prompt is True
    assert_same_models(base, loaded, PARTS)
    assert loaded.scheduler == SDXL_SCHEDULER
    desc = describe(base_folder)
    assert (desc.kind, desc.layout) == ("base", "diffusers")
    assert set(desc.components) == set(PARTS)
    for name in PARTS:
        comp = desc.components[name]
        assert comp.parameters == sum(p.numel() for p in getattr(base, name).parameters()), name
        model = getattr(base, name)
        split_qkv = 4 * model.config.layers if name.startswith("text") else 0  # in_proj_* -> q/k/v_proj.*
        assert comp.dtypes == {"float32": len(model.state_dict()) + split_qkv}, name


def test_model_index_and_configs(base_folder):
    assert read_json(base_folder / "model_index.json") == {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": saving.DIFFUSERS_VERSION,
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    unet, vae = read_json(base_folder / "unet" / "config.json"), read_json(base_folder / "vae" / "config.json")
    assert (unet["_class_name"], vae["_class_name"]) == ("UNet2DConditionModel", "AutoencoderKL")
    assert unet["_diffusers_version"] == vae["_diffusers_version"] == saving.DIFFUSERS_VERSION
    assert unet["block_out_channels"] == [32, 64, 64] and unet["cross_attention_dim"] == 96
    te1 = read_json(base_folder / "text_encoder" / "config.json")
    te2 = read_json(base_folder / "text_encoder_2" / "config.json")
    assert te1["architectures"] == ["CLIPTextModel"] and te2["architectures"] == ["CLIPTextModelWithProjection"]
    assert (te1["hidden_size"], te1["hidden_act"]) == (32, "quick_gelu")
    assert (te2["hidden_size"], te2["hidden_act"]) == (64, "gelu")
    assert te1["torch_dtype"] == te2["torch_dtype"] == "float32"
    # the official SDXL scheduler
    official = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    steps_offset=1, timestep_spacing="leading", prediction_type="epsilon", interpolation_type="linear",
                    use_karras_sigmas=False, clip_sample=False, sample_max_value=1.0, set_alpha_to_one=False,
                    skip_prk_steps=True, _class_name="EulerDiscreteScheduler")
    scheduler = read_json(base_folder / "scheduler" / "scheduler_config.json")
    assert {k: scheduler[k] for k in official} == official
    # weight files: diffusers' metadata, the published `text_model.*` spelling
    for name, file in (("unet", "diffusion_pytorch_model"), ("text_encoder", "model"), ("text_encoder_2", "model")):
        with safe_open(str(base_folder / name / f"{file}.safetensors"), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            keys = set(f.keys())
        if name != "unet":
            outside = {"text_projection.weight"} if name == "text_encoder_2" else set()
            assert {k for k in keys if not k.startswith("text_model.")} == outside


def test_fp16_variant(tmp_path, base):
    folder = tmp_path / "fp16"
    save_diffusers(base, folder, variant="fp16")  # float16 by default
    weights = {f for f in files_in(folder) if f.endswith(".safetensors")}
    assert weights == {
        "unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/model.fp16.safetensors", "text_encoder_2/model.fp16.safetensors",
    }
    for f in weights:
        header = read_safetensors_header(folder / f)
        assert {e["dtype"] for k, e in header.items() if k != "__metadata__"} == {"F16"}, f
    assert read_json(folder / "text_encoder_2" / "config.json")["torch_dtype"] == "float16"
    loaded = load_diffusers(folder, variant="fp16", dtype="fp16")
    assert_same_models(base, loaded, PARTS, cast=torch.float16)
    assert describe(folder).components["unet"].dtypes == {"float16": len(base.unet.state_dict())}


def test_dtype_without_variant(tmp_path, base):
    folder = tmp_path / "bf16"
    save_diffusers(base, folder, dtype=torch.bfloat16)
    assert "unet/diffusion_pytorch_model.safetensors" in files_in(folder)
    loaded = load_diffusers(folder, components=("vae",), dtype="bf16")
    assert_same_models(base, loaded, ("vae",), cast=torch.bfloat16)


def test_refiner_folder(refiner, refiner_folder):
    folder = refiner_folder
    assert [p.name for p in folder.parent.iterdir()] == ["tiny-refiner"]
    index = read_json(folder / "model_index.json")
    assert index["_class_name"] == "StableDiffusionXLImg2ImgPipeline"
    assert index["text_encoder"] == index["tokenizer"] == [None, None]
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["requires_aesthetics_score"] is True and index["force_zeros_for_empty_prompt"] is False
    assert not (folder / "text_encoder").exists() and not (folder / "tokenizer").exists()
    assert {f"tokenizer_2/{f}" for f in TOKENIZER_FILES} <= files_in(folder)
    loaded = load_diffusers(folder)
    assert loaded.kind == "refiner" and loaded.text_encoder is None and loaded.force_zeros_for_empty_prompt is False
    assert_same_models(refiner, loaded, REFINER_PARTS)
    assert describe(folder).kind == "refiner"


def test_inpaint_folder_and_own_scheduler(tmp_path, base):
    unet = randomize(UNet(replace(unet_models.tiny, in_channels=9)), 2)
    inpaint = Components(kind="inpaint", unet=unet, vae=base.vae, text_encoder=base.text_encoder,
                         text_encoder_2=base.text_encoder_2)
    inpaint.scheduler = {"_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000,
                         "beta_schedule": "scaled_linear"}
    folder = tmp_path / "inpaint"
    save_diffusers(inpaint, folder, dtype=None)
    index = read_json(folder / "model_index.json")
    assert index["_class_name"] == "StableDiffusionXLInpaintPipeline"
    assert index["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"]
    assert read_json(folder / "scheduler" / "scheduler_config.json") == inpaint.scheduler
    loaded = load_diffusers(folder, components=("unet",))
    assert loaded.kind == "inpaint" and loaded.unet.config.in_channels == 9
    assert_same_models(inpaint, loaded, ("unet",))


def test_tokenizer_files(tmp_path, base_folder):
    for folder, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        special = read_json(base_folder / folder / "special_tokens_map.json")
        config = read_json(base_folder / folder / "tokenizer_config.json")
        assert special["pad_token"] == config["pad_token"] == pad
        assert special["bos_token"]["content"] == "<|startoftext|>"
        assert special["eos_token"]["content"] == special["unk_token"]["content"] == "<|endoftext|>"
        assert (config["tokenizer_class"], config["model_max_length"]) == ("CLIPTokenizer", 77)
        vocab = read_json(base_folder / folder / "vocab.json")
        assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
        assert (vocab["!"], vocab["!</w>"], vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (0, 256, 49406, 49407)
        merges = (base_folder / folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894
        assert vocab["".join(merges[1].split())] == 512 and vocab["".join(merges[-1].split())] == 49405
    from sdxl.models.tokenizer import write_transformers_files

    with pytest.raises(ValueError, match="not a token"):
        write_transformers_files(tmp_path / "tok", pad_token="<pad>")


# ---------------------------------------------------------------------------------------------
# Converting: official single file -> diffusers folder -> single file.


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_single_file_to_diffusers_and_back(tmp_path, request, kind):
    source = tmp_path / "model.safetensors"
    save_single_file(request.getfixturevalue(kind), source)  # float16, as the official files
    save_diffusers(load_single_file(source), tmp_path / "diffusers")  # float16 by default
    back = tmp_path / "back.safetensors"
    save_single_file(load_diffusers(tmp_path / "diffusers"), back)

    with safe_open(str(source), framework="pt") as a, safe_open(str(back), framework="pt") as b:
        assert a.metadata() == b.metadata()
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            ta, tb = a.get_tensor(k), b.get_tensor(k)
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), k


# ---------------------------------------------------------------------------------------------
# Full size, without weights: the published names, shapes and configs.


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_full_size_layout_is_the_official_one(kind):
    manifest = read_json(MANIFESTS / f"diffusers_{kind}.json")
    configs = {
        "unet": unet_models.base if kind == "base" else unet_models.refiner,
        "vae": vae_models.base,
        "text_encoder": clip_models.clip_l,
        "text_encoder_2": clip_models.clip_g,
    }
    classes = {"unet": UNet, "vae": AutoencoderKL, "text_encoder": CLIPTextEncoder, "text_encoder_2": CLIPTextEncoder}
    parts = PARTS if kind == "base" else REFINER_PARTS
    assert saving.diffusers_parts(kind) == parts
    assert {k for k in PARTS if manifest.get(k)} == set(parts)
    for name in parts:
        entry = manifest[name]
        with torch.device("meta"):
            model = classes[name](configs[name])
        tensors = diffusers_tensors(name, model, dtype=None)
        official = {k: e["shape"] for k, e in entry["tensors"].items()}
        assert {k: list(t.shape) for k, t in tensors.items()} == official, name
        config = json.loads(json.dumps(diffusers_config(name, configs[name])))
        assert {k: config.get(k) for k in entry["config_used"]} == entry["config_used"], name
        assert f"{name}/{saving.diffusers_weight_name(name)}" == entry["file"]
        assert f"{name}/{saving.diffusers_weight_name(name, 'fp16')}" == entry["fp16_variant_file"]
        assert tuple(entry["class"].split(".")) == saving.DIFFUSERS_CLASSES[name]


# ---------------------------------------------------------------------------------------------
# Refusals and failures.


def test_refuses_to_overwrite(tmp_path, base):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty; refusing to overwrite") as e:
        save_diffusers(base, folder)
    assert str(folder) in str(e.value)
    assert files_in(folder) == {"keep.txt"} and (folder / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        save_diffusers(base, tmp_path / "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out"]


def test_failure_leaves_no_folder(tmp_path, base, monkeypatch):
    calls = []

    def failing(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(tensors, path, metadata)

    real = saving.save_tensors
    monkeypatch.setattr(saving, "save_tensors", failing)
    with pytest.raises(OSError, match="disk full"):
        save_diffusers(base, tmp_path / "out")
    assert len(calls) == 3 and calls[0].parent.parent.parent == tmp_path  # it did write, elsewhere
    assert list(tmp_path.iterdir()) == []


def test_refuses_unsupported_models_before_writing(tmp_path, base):
    odd = Components(kind="base", unet=base.unet, vae=AutoencoderKL(replace(vae_models.tiny, eps=1e-5)),
                     text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2)
    with pytest.raises(CheckpointError, match="eps"):
        save_diffusers(odd, tmp_path / "out")
    swapped = Components(kind="base", unet=base.unet, vae=base.vae,
                         text_encoder=base.text_encoder_2, text_encoder_2=base.text_encoder)
    with pytest.raises(CheckpointError, match="text_encoder has text projection"):
        save_diffusers(swapped, tmp_path / "out")
    partial = Components(kind="base", unet=base.unet, vae=base.vae, text_encoder_2=base.text_encoder_2)
    with pytest.raises(ValueError, match="needs text_encoder"):
        save_diffusers(partial, tmp_path / "out")
    refiner_with_l = Components(kind="refiner", unet=base.unet, vae=base.vae,
                                text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2)
    with pytest.raises(ValueError, match="refiner folder has no text_encoder"):
        save_diffusers(refiner_with_l, tmp_path / "out")
    with pytest.raises(ValueError, match="variant"):
        save_diffusers(base, tmp_path / "out", variant="../x")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# diffusers and transformers load the folder and compute what our models compute.

def unet_inputs(config, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, config.in_channels, 16, 16, generator=g)
    t = torch.tensor([999.0, 261.0])
    context = torch.randn(2, 77, config.context_dim, generator=g)
    pooled = torch.randn(2, config.adm_in_channels - 6 * config.addition_time_embed_dim, generator=g)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768.0, 1344.0, 16.0, 32.0, 1024.0, 1024.0]])
    return x, t, context, pooled, time_ids


def run_unets(ours: UNet, theirs, x, t, context, pooled, time_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Our U-Net and diffusers' on the same inputs (diffusers takes the micro-conditioning as time_ids)."""
    cond = {"text_embeds": pooled, "time_ids": time_ids}
    reference = theirs(x, t, encoder_hidden_states=context, added_cond_kwargs=cond).sample
    y = micro_conditioning(pooled, time_ids, dim=ours.config.addition_time_embed_dim)
    return ours(x, t, context, y), reference


def diffusers_tokenizer_2() -> Tokenizer:
    """diffusers' tokenizer_2 exactly: our clip_g_tokenizer but for "!", which diffusers reads as its pad token."""
    return Tokenizer(max_length=77, pad_token_id=0)


def hf_ids(tokenizer, prompts) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


@needs_reference
@torch.no_grad()
def test_diffusers_and_transformers_load_each_component(base, base_folder):
    unet = diffusers.UNet2DConditionModel.from_pretrained(base_folder / "unet").eval()
    assert_close(*run_unets(base.unet, unet, *unet_inputs(base.unet.config)), "unet")

    vae = diffusers.AutoencoderKL.from_pretrained(base_folder / "vae").eval()
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert_close(base.vae.encode(images), vae.encode(images).latent_dist.mean, "vae encode")
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    assert_close(base.vae.decode(latents), vae.decode(latents).sample, "vae decode")
    assert vae.config.scaling_factor == base.vae.config.scaling_factor

    for name, cls, tokenizer in (
        ("text_encoder", transformers.CLIPTextModel, clip_l_tokenizer()),
        ("text_encoder_2", transformers.CLIPTextModelWithProjection, clip_g_tokenizer()),
    ):
        model = cls.from_pretrained(base_folder / name).eval()
        assert model.dtype == torch.float32
        tokens = tokenizer(PROMPTS)
        out = model(input_ids=tokens, output_hidden_states=True)
        hidden, pool = getattr(base, name)(tokens)
        assert_close(hidden, out.hidden_states[-2], f"{name} hidden")
        assert_close(pool, out.text_embeds if name == "text_encoder_2" else out.pooler_output, f"{name} pooled")


@needs_reference
@torch.no_grad()
def test_diffusers_pipeline_loads_folder(base, base_folder):
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(base_folder, local_files_only=True)
    assert isinstance(pipe.scheduler, diffusers.EulerDiscreteScheduler)
    assert pipe.scheduler.config.timestep_spacing == "leading" and pipe.scheduler.config.steps_offset == 1
    assert pipe.config.force_zeros_for_empty_prompt is True
    # the tokenizers we wrote tokenize as ours
    for hf, ours in ((pipe.tokenizer, clip_l_tokenizer()), (pipe.tokenizer_2, diffusers_tokenizer_2())):
        assert torch.equal(hf_ids(hf, PROMPTS), ours(PROMPTS))
    assert (pipe.tokenizer.pad_token, pipe.tokenizer_2.pad_token) == ("<|endoftext|>", "!")
    # the pipeline's text conditioning: both encoders' penultimate layers, bigG's projected pool
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS[:2], device="cpu", do_classifier_free_guidance=False)
    h1, _ = base.text_encoder(clip_l_tokenizer()(PROMPTS[:2]), pooled=False)
    h2, p2 = base.text_encoder_2(diffusers_tokenizer_2()(PROMPTS[:2]))
    assert_close(torch.cat([h1, h2], dim=-1), embeds, "prompt embeds")
    assert_close(p2, pooled, "pooled prompt embeds")
    # and its U-Net and VAE are ours
    assert_close(*run_unets(base.unet, pipe.unet, *unet_inputs(base.unet.config, seed=5)), "pipeline unet")
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(6))
    assert_close(base.vae.decode(latents), pipe.vae.decode(latents).sample, "pipeline vae decode")


@needs_reference
@torch.no_grad()
def test_diffusers_loads_refiner_folder(refiner, refiner_folder):
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_folder, local_files_only=True)
    assert pipe.text_encoder is None and pipe.tokenizer is None
    assert pipe.config.requires_aesthetics_score is True
    tokens = diffusers_tokenizer_2()(PROMPTS)
    assert torch.equal(hf_ids(pipe.tokenizer_2, PROMPTS), tokens)
    out = pipe.text_encoder_2(input_ids=tokens, output_hidden_states=True)
    hidden, pool = refiner.text_encoder_2(tokens)
    assert_close(hidden, out.hidden_states[-2], "refiner text_encoder_2 hidden")
    assert_close(pool, out.text_embeds, "refiner text_encoder_2 pooled")
    c = refiner.unet.config
    g = torch.Generator().manual_seed(8)
    x, context = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, c.context_dim, generator=g)
    pooled, time_ids = torch.randn(1, 64, generator=g), torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 6.0]])
    outputs = run_unets(refiner.unet, pipe.unet, x, torch.tensor([500.0]), context, pooled, time_ids)
    assert_close(*outputs, "refiner unet")


def test_a_diffusers_folder_keeps_the_models_recommended_settings(tmp_path):
    from sdxl.checkpoints.paths import resolve_path

    parts = load_single_file(resolve_path("builtin"))
    assert parts.recommended == {"cfg": 3.0}  # the built-in base recommends cfg 3
    save_diffusers(parts, tmp_path / "folder")
    assert load_diffusers(tmp_path / "folder").recommended == {"cfg": 3.0}
    index = read_json(tmp_path / "folder" / "model_index.json")
    index["_sdxl.recommended"] = {"cfg": "loud"}
    (tmp_path / "folder" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model_index.json: unreadable _sdxl.recommended"):
        load_diffusers(tmp_path / "folder")


def test_integer_weights_are_refused(tmp_path, base):
    from safetensors.torch import load_file, save_file

    save_single_file(base, tmp_path / "m.safetensors", dtype=torch.float32)
    tensors = load_file(str(tmp_path / "m.safetensors"))
    # (the file reader refuses integer *.weight / *.bias tensors by name; the loader any weight of the model)
    key = next(k for k in tensors if k.endswith("model.positional_embedding"))
    tensors[key] = tensors[key].to(torch.int32)
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        metadata = f.metadata()
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError, match="stored as int32; weights must be floating-point"):
        load_single_file(tmp_path / "bad.safetensors")
