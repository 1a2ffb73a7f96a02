"""The built-in model that ships in the package (sdxl.builtin), judged from the pixels it makes, fixed seeds.

Every image is measured by `sdxl.training.shapes.measure` (background / shape colour by palette distance, shape by
how much of its bounding box it fills, sharpness, whether it touches the border): the prompt is followed, and the
SDXL micro-conditioning (original size, crop) changes the pictures the way the SDXL paper shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from sdxl import builtin
from sdxl.training.shapes import all_prompts, caption, judge, measure


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def pipe():
    import sdxl

    return sdxl.load("builtin", refiner="builtin-refiner")


def generate(pipe, shape: str, colour: str, background: str, seed: int, **options) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipe.generate(caption(shape, colour, background), seed=seed, **{"refiner_switch": None, **options})[0]


def test_the_files_ship_in_the_package_and_are_small():
    sizes = {name: path.stat().st_size for name, path in builtin.FILES.items()}
    assert sum(sizes.values()) <= 32 * 2**20, sizes
    from safetensors import safe_open

    for path in builtin.FILES.values():
        with safe_open(str(path), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, path


def test_loading_reports_each_model():
    import sdxl

    names = []
    sdxl.load("builtin", refiner="builtin-refiner", progress=names.append)
    assert sorted(names) == sorted(["unet", "vae", "text_encoder", "text_encoder_2",
                                    "refiner unet", "refiner vae", "refiner text_encoder_2"])


def test_the_model_recommends_its_guidance_scale(pipe):
    assert pipe.recommended_cfg() == 3.0  # stored in the file's metadata ("sdxl.recommended")
    p = ("circle", "red", "blue")
    default, three, five = (np.asarray(generate(pipe, *p, seed=0, steps=4, **kw)) for kw in ({}, {"cfg": 3.0}, {"cfg": 5.0}))
    assert np.array_equal(default, three) and not np.array_equal(default, five)


@pytest.mark.slow  # ~90 s on 2 CPU cores: 168 prompts
def test_images_follow_the_prompt(pipe):
    # All 168 prompts at the native 64x64 with the default settings (30 euler steps, the recommended cfg), seed = index.
    results = [judge(generate(pipe, *p, seed=i), *p) for i, p in enumerate(all_prompts())]
    rate = {k: float(np.mean([r[k] for r in results])) for k in ("all", "background", "colour", "shape")}
    print("followed:", rate)
    assert rate["all"] >= 0.90, rate


@pytest.mark.parametrize("size", [(80, 48), (48, 80)])
def test_other_aspect_ratios(pipe, size):
    prompts = all_prompts()[::14]  # 12 prompts
    width, height = size
    images = [generate(pipe, *p, seed=i, width=width, height=height) for i, p in enumerate(prompts)]
    assert all(im.size == size for im in images)
    rate = np.mean([judge(im, *p)["all"] for im, p in zip(images, prompts)])
    print(size, "followed:", rate)
    assert rate >= 0.75, rate


def test_a_small_original_size_gives_a_blurrier_image(pipe):
    # SDXL paper fig. 3: conditioning on a low original resolution makes the model imitate upscaled images.
    prompts = all_prompts()[::14]
    sharp = {o: [measure(generate(pipe, *p, seed=i, original_size=(o, o)))["sharpness"] for i, p in enumerate(prompts)]
             for o in (8, 64)}
    small, large = np.array(sharp[8]), np.array(sharp[64])
    print(f"sharpness: original 8x8 {small.mean():.3f}, original 64x64 {large.mean():.3f}")
    assert small.mean() < 0.75 * large.mean() and np.mean(small < large) >= 0.8, (small, large)


def test_crop_conditioning_zero_gives_uncut_shapes(pipe):
    # SDXL paper fig. 5: crop (0, 0) centres objects; a large offset imitates crops that cut them.
    prompts = all_prompts()[::7]  # 24 prompts
    cut = {}
    for crop in ((0, 0), (32, 32)):
        cut[crop] = np.mean([measure(generate(pipe, *p, seed=i, original_size=(128, 128), crop_top_left=crop))["cut"]
                             for i, p in enumerate(prompts)])
    print("fraction of cut shapes:", cut)  # measured: (0, 0) 0.21, (32, 32) 0.625
    assert cut[(32, 32)] >= cut[(0, 0)] + 0.25 and cut[(0, 0)] <= 0.35, cut


def test_the_refiner_hand_off_keeps_the_prompt(pipe):
    prompts = all_prompts()[::7]
    results = [judge(generate(pipe, *p, seed=i, refiner_switch=0.8), *p) for i, p in enumerate(prompts)]
    colours = np.mean([r["background"] and r["colour"] for r in results])
    print("refined: colours", colours, "all", np.mean([r["all"] for r in results]))
    assert colours >= 0.9 and np.mean([r["all"] for r in results]) >= 0.85, results


def test_the_cli_uses_the_builtin_model_when_none_is_set(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("SDXL_MODEL", "SDXL_CONFIG")}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "xdg"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "sdxl", "generate", "a red circle on a blue background", "--seed", "1",
                        "--out", str(tmp_path / "out.png"), "--json"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    image = Image.open(tmp_path / "out.png")
    assert image.size == (builtin.NATIVE_SIZE, builtin.NATIVE_SIZE)
    assert judge(image, "circle", "red", "blue")["all"], measure(image)
    assert "builtin" in json.dumps(summary)
