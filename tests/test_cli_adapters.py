"""`sdxl generate` with LoRAs and embeddings, and `sdxl info` on an adapter: run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import tiny_components
from sdxl.adapters.keys import KOHYA
from sdxl.checkpoints.save import save_single_file
from sdxl.interfaces import hashes
from test_adapters import kohya_file, lora_tensors

ARGS = ["--width", "64", "--height", "48", "--steps", "3", "--seed", "7"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters_cli")
    parts = tiny_components("base", randomized=True)
    save_single_file(parts, root / "tiny.safetensors", dtype=torch.float32)
    (root / "loras").mkdir()
    kohya_file(root / "loras" / "style.safetensors", lora_tensors(parts, {KOHYA}, seed=2, scale=0.2))
    (root / "emb").mkdir()
    g = torch.Generator().manual_seed(4)
    save_file({"clip_l": torch.randn(2, 32, generator=g) * 3, "clip_g": torch.randn(2, 64, generator=g) * 3},
              str(root / "emb" / "glowy.safetensors"))
    return root


def sdxl(*argv, cwd=None):
    return subprocess.run([sys.executable, "-m", "sdxl", *map(str, argv)], capture_output=True, text=True, cwd=cwd)


def pixels(path):
    return list(Image.open(path).convert("RGB").getdata())


def test_a_lora_tag_and_an_embedding_from_their_folders_and_back_from_the_png(files, tmp_path):
    common = ["--model", files / "tiny.safetensors", "--lora-dir", files / "loras", "--embedding-dir", files / "emb",
              *ARGS]
    r = sdxl("generate", "a glowy fox <lora:style:0.8>", *common, "--out", tmp_path / "a.png")
    assert r.returncode == 0, r.stderr
    plain = sdxl("generate", "a glowy fox", "--model", files / "tiny.safetensors", *ARGS, "--out", tmp_path / "p.png")
    assert plain.returncode == 0, plain.stderr
    assert pixels(tmp_path / "a.png") != pixels(tmp_path / "p.png")
    info = Image.open(tmp_path / "a.png").info
    want_hash = hashes.sha256(files / "loras" / "style.safetensors")[:12]
    assert info["parameters"].startswith("a glowy fox <lora:style:0.8>\n")
    assert f'Lora hashes: "style: {want_hash}"' in info["parameters"]
    again = sdxl("generate", "--from-image", tmp_path / "a.png", "--model", files / "tiny.safetensors",
                 "--lora-dir", files / "loras", "--embedding-dir", files / "emb", "--out", tmp_path / "b.png")
    assert again.returncode == 0, again.stderr
    assert pixels(tmp_path / "b.png") == pixels(tmp_path / "a.png")


def test_lora_flags_and_their_infotext_tags(files, tmp_path):
    r = sdxl("generate", "a fox", "--model", files / "tiny.safetensors", "--lora",
             f"{files / 'loras' / 'style.safetensors'}:0.5:0.25", *ARGS, "--out", tmp_path / "f.png")
    assert r.returncode == 0, r.stderr
    info = Image.open(tmp_path / "f.png").info
    assert info["parameters"].startswith("a fox <lora:style:0.25:0.5>\n")  # A1111's order: text encoder, U-Net
    stored = json.loads(info["sdxl"])
    assert stored["loras"] == [["style", 0.5, 0.25]] and str(files) not in info["sdxl"]  # by name, no paths


@pytest.mark.parametrize("prompt, flags, message", [
    ("a <lora:nothere:1>", ["--lora-dir", "LORAS"], "LoRA 'nothere': not found in"),
    ("a <lora:../loras/style:1>", ["--lora-dir", "LORAS"], "a name from the LoRA folders, not a path"),
    ("a fox", ["--lora", "missing.safetensors"], "--lora missing.safetensors: no such file"),
    ("a fox", ["--lora", "style:strong:x:y"], "--lora must be FILE[:WEIGHT[:TEXT_ENCODER_WEIGHT]]"),
    ("a fox", ["--lora-dir", "NOWHERE"], "no such lora folder"),
])
def test_bad_lora_input_is_one_line_before_loading(files, tmp_path, prompt, flags, message):
    flags = [str(files / "loras") if f == "LORAS" else str(tmp_path / "nowhere") if f == "NOWHERE" else f
             for f in flags]
    r = sdxl("generate", prompt, "--model", files / "tiny.safetensors", *flags, *ARGS, "--out", tmp_path / "x.png")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    [line] = r.stderr.splitlines()
    assert message in line and not (tmp_path / "x.png").exists()


def test_info_describes_an_adapter(files, tmp_path):
    # A rank-1 LoRA of two modules of the official SDXL base (what `info` checks a file against) and its metadata
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for stem, width in (("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 640),
                        ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768)):
        tensors[f"{stem}.lora_down.weight"] = torch.randn(1, width, generator=g)
        tensors[f"{stem}.lora_up.weight"] = torch.randn(width, 1, generator=g)
        tensors[f"{stem}.alpha"] = torch.tensor(1.0)
    metadata = {"ss_base_model_version": "sdxl_base_v1-0", "ss_output_name": "inkwash",
                "ss_tag_frequency": json.dumps({"10_inkwash": {"inkwash": 12, "mountain": 3}})}
    save_file(tensors, str(tmp_path / "ink.safetensors"), metadata=metadata)
    r = sdxl("info", tmp_path / "ink.safetensors")
    assert r.returncode == 0, r.stderr
    assert "adapter 'inkwash' (kohya names)" in r.stdout and "lora x 2" in r.stdout, r.stdout
    assert "base model  sdxl_base_v1-0" in r.stdout and "tags        inkwash, mountain" in r.stdout
    # one made for another model is refused in one line
    r = sdxl("info", files / "loras" / "style.safetensors")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "not an adapter for this model" in r.stderr
