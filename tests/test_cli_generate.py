"""`sdxl generate` and `sdxl samplers`, driven as a user would, on a tiny model saved by the test."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl.checkpoints.load import Components
from sdxl.checkpoints.save import save_single_file
from sdxl.models import clip, unet, vae
from sdxl.models.clip import CLIPTextEncoder
from sdxl.models.unet import UNet
from sdxl.models.vae import AutoencoderKL


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    parts = Components(kind="base", unet=UNet(unet.tiny), vae=AutoencoderKL(vae.tiny),
                       text_encoder=CLIPTextEncoder(clip.clip_l_tiny), text_encoder_2=CLIPTextEncoder(clip.clip_g_tiny))
    with torch.no_grad():
        for model in (parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2):
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)  # no exact zeros anywhere: images with content
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_single_file(parts, path, dtype=torch.float32)
    return path


def sdxl(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "sdxl", *map(str, argv)], capture_output=True, text=True, env=env)


ARGS = ["--width", "64", "--height", "48", "--steps", "3", "--seed", "7"]


def test_generate_writes_pngs_with_parameters_equal_to_the_python_api(tiny_model, tmp_path):
    import sdxl as api

    r = sdxl("generate", "a red circle", "--model", tiny_model, *ARGS, "--out", tmp_path / "out", "--batch", "2")
    assert r.returncode == 0, r.stderr
    files = sorted((tmp_path / "out").glob("*.png"))
    assert [f.name for f in files] == ["00000.png", "00001.png"]
    assert "steps/s" in r.stderr and "Traceback" not in r.stderr
    first = Image.open(files[0])
    params = first.info["parameters"]
    assert params.startswith("a red circle\n")
    assert "Steps: 3, Sampler: euler" in params and "Seed: 7" in params and "Size: 64x48" in params
    assert "Seed: 8" in Image.open(files[1]).info["parameters"]
    expected = api.load(tiny_model).generate("a red circle", width=64, height=48, steps=3, seed=7, batch=2)
    for f, e in zip(files, expected):
        got = np.asarray(Image.open(f).convert("RGB"))
        assert got.shape == (48, 64, 3)
        assert np.array_equal(got, np.asarray(e))
    assert np.asarray(expected[0]).std() > 1  # not a flat image

    # A second run never overwrites: numbering continues.
    r = sdxl("generate", "a red circle", "--model", tiny_model, *ARGS, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert sorted(f.name for f in (tmp_path / "out").glob("*.png"))[-1] == "00002.png"


def test_generate_to_a_named_file_and_from_the_environment(tiny_model, tmp_path):
    import os

    env = dict(os.environ, SDXL_MODEL=str(tiny_model))
    r = sdxl("generate", "a blue square", *ARGS, "--out", tmp_path / "one.png", env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "one.png").is_file()
    r = sdxl("generate", "a blue square", *ARGS, "--out", tmp_path / "one.png", env=env)
    assert r.returncode == 2 and "already exists" in r.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sampler", "nope"], "unknown sampler 'nope'; choose one of euler"),
        (["--width", "100"], "width must be a positive multiple of 8"),
        (["--strength", "1.5", "--init-image", "IMG"], "strength must be in (0, 1]"),
        (["--model", "missing.safetensors"], "missing.safetensors: no such file"),
    ],
)
def test_generate_bad_arguments_exit_2_with_one_line(tiny_model, tmp_path, argv, message):
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "img.png")
    argv = [str(tmp_path / "img.png") if a == "IMG" else a for a in argv]
    if "--model" not in argv:
        argv = ["--model", str(tiny_model), *argv]
    r = sdxl("generate", "x", *argv, "--steps", "2", "--out", tmp_path / "o")
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0], r.stderr
    assert "Traceback" not in r.stderr


def test_generate_without_a_model_says_how_to_point_at_one(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if k != "SDXL_MODEL"}
    r = sdxl("generate", "x", "--out", tmp_path / "o", env=env)
    assert r.returncode == 2 and "--model" in r.stderr and "SDXL_MODEL" in r.stderr


def test_samplers_lists_every_sampler_and_schedule():
    from sdxl import sampling

    r = sdxl("samplers")
    assert r.returncode == 0
    for name in (*sampling.SAMPLERS, *sampling.SCHEDULES):
        assert name in r.stdout
