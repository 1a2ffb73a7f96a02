"""PNG metadata through `sdxl generate`: A1111's words in our PNGs (read back by a third-party reader, sd-parsers),
names instead of paths, and `--from-image` on PNGs written by AUTOMATIC1111, Forge and Fooocus."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import tiny_components
from PIL import Image, PngImagePlugin

from sdxl.checkpoints.save import save_single_file
from sdxl.interfaces import cli, hashes, metadata

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def hash_cache(tmp_path_factory):
    """Model hashes go to a cache of this module's own, not the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        mp.setattr(hashes, "_memory", {})
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    parts = tiny_components("base", seed=3)
    with torch.no_grad():
        for model in parts.models().values():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)  # no exact zeros anywhere: images with content
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    save_single_file(parts, path, dtype=torch.float32)
    return path


@pytest.fixture
def run(monkeypatch, capsys):
    """`sdxl ARGS...` in this process (torch is imported once): (exit status, stdout, stderr)."""
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # cli.main changes it

    def run(*argv):
        rc = cli.main(["generate", *map(str, argv)])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def png_with(path, **chunks):
    """A PNG carrying the given text chunks, as another tool would write it."""
    info = PngImagePlugin.PngInfo()
    for key, text in chunks.items():
        info.add_text(key, text)
    Image.new("RGB", (64, 48), (90, 120, 150)).save(path, pnginfo=info)
    return path


def chunk(path, key):
    with Image.open(path) as image:
        return image.info[key]


def test_pngs_say_a1111s_words_and_a_third_party_reader_reads_them(tiny, tmp_path, run):
    from sd_parsers import ParserManager

    prompt, negative = "a red fox, (snow:1.2), [forest]", "blurry, dark"
    rc, _, err = run(prompt, "--negative", negative, "--model", tiny, "--sampler", "dpmpp_2m", "--schedule", "karras",
                     "--steps", "3", "--cfg", "6.5", "--seed", "42", "--width", "64", "--height", "48",
                     "--out", tmp_path / "fox.png")
    assert rc == 0, err
    text = chunk(tmp_path / "fox.png", "parameters")
    short = hashlib.sha256(tiny.read_bytes()).hexdigest()[:10]
    assert text == (f"{prompt}\nNegative prompt: {negative}\nSteps: 3, Sampler: DPM++ 2M, Schedule type: Karras, "
                    f"CFG scale: 6.5, Seed: 42, Size: 64x48, Model hash: {short}, Model: tiny, Version: sdxl 0.1.0")

    info = ParserManager().parse(tmp_path / "fox.png")
    assert info.generator.name == "AUTOMATIC1111"
    [sampler] = info.samplers
    assert [p.value for p in info.prompts] == [prompt] and [p.value for p in info.negative_prompts] == [negative]
    assert sampler.name == "DPM++ 2M" and sampler.parameters["scheduler"] == "Karras"
    assert (sampler.parameters["steps"], sampler.parameters["cfg_scale"], sampler.parameters["seed"]) == ("3", "6.5", "42")
    assert info.metadata["Size"] == "64x48"
    assert (sampler.model.name, sampler.model.hash) == ("tiny", short)


def test_no_absolute_paths_in_the_png_unless_asked(tiny, tmp_path, run):
    init = tmp_path / "photos" / "holiday.png"
    init.parent.mkdir()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(init)
    common = ["a boat", "--model", tiny, "--init-image", init, "--strength", "0.5", "--steps", "2"]
    assert run(*common, "--out", tmp_path / "named.png")[0] == 0
    assert run(*common, "--store-paths", "--out", tmp_path / "paths.png")[0] == 0

    named = chunk(tmp_path / "named.png", "sdxl")
    assert str(tmp_path) not in named and str(tiny.parent) not in named
    stored = json.loads(named)
    assert (stored["model"], stored["init_image"], stored["store_paths"]) == ("tiny.safetensors", "holiday.png", False)
    kept = json.loads(chunk(tmp_path / "paths.png", "sdxl"))
    assert (kept["model"], kept["init_image"], kept["store_paths"]) == (str(tiny), str(init), True)
    for name in ("named", "paths"):
        text = chunk(tmp_path / f"{name}.png", "parameters")
        assert str(tmp_path) not in text and "Model: tiny," in text and "Denoising strength: 0.5" in text


def test_from_image_finds_a_model_stored_by_name(tiny, tmp_path, run, monkeypatch):
    assert run("a kite", "--model", tiny, "--steps", "2", "--width", "64", "--height", "48",
               "--out", tmp_path / "kite.png")[0] == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # "tiny.safetensors" is not here: the hash cache knows where it is
    rc, _, err = run("--from-image", tmp_path / "kite.png", "--out", tmp_path / "again.png")
    assert rc == 0, err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), np.asarray(Image.open(tmp_path / "kite.png")))

    stored = metadata.read_settings(tmp_path / "kite.png")
    metadata.write_png(Image.new("RGB", (8, 8)), tmp_path / "gone.png",
                       {**stored, "model": "gone.safetensors", "model_hash": "0000000000"})
    rc, _, err = run("--from-image", tmp_path / "gone.png", "--out", tmp_path / "x.png")
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "its model 'gone.safetensors' is not here" in err and "pass --model PATH" in err


A1111_1_10 = """\
masterpiece, best quality, (a red fox:1.2), [snow], forest at dawn
Negative prompt: (worst quality:1.4), lowres, blurry
Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 64x48, \
Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Clip skip: 2, ADetailer model: face_yolov8n.pt, Version: v1.10.1"""


def test_an_a1111_png_re_runs_with_its_settings(tiny, tmp_path, run):
    import sdxl

    png_with(tmp_path / "a1111.png", parameters=A1111_1_10)
    rc, _, err = run("--from-image", tmp_path / "a1111.png", "--model", tiny, "--out", tmp_path / "out.png")
    assert rc == 0, err
    assert (f"note: {tmp_path / 'a1111.png'}: ignored AUTOMATIC1111 settings that sdxl does not use: ADetailer model"
            in err.splitlines())
    assert any("made with a model of hash 31e35c80fc" in line for line in err.splitlines())
    s = metadata.read_settings(tmp_path / "out.png")
    assert s["prompt"] == "masterpiece, best quality, (a red fox:1.2), [snow], forest at dawn"
    assert s["negative_prompt"] == "(worst quality:1.4), lowres, blurry"
    assert (s["steps"], s["sampler"], s["schedule"], s["cfg"], s["seed"]) == (20, "dpmpp_2m", "karras", 7.0, 1234)
    assert (s["width"], s["height"], s["clip_skip"], s["model"]) == (64, 48, None, "tiny.safetensors")
    assert "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: 1234, Size: 64x48" in chunk(
        tmp_path / "out.png", "parameters")
    expected = sdxl.load(tiny).generate(s["prompt"], negative_prompt=s["negative_prompt"], steps=20, sampler="dpmpp_2m",
                                        schedule="karras", cfg=7.0, seed=1234, width=64, height=48)[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), np.asarray(expected))


FORGE = {
    # Forge before A1111 1.9's schedule types: the schedule is part of the sampler's name
    "forge_1": (("a lighthouse at dusk, (volumetric light:1.1)\nNegative prompt: text, watermark\n"
                "Steps: 3, Sampler: DPM++ 2M SDE Karras, CFG scale: 5.5, Seed: 77, Size: 64x48, Model hash: 1f69731261, "
                "Model: juggernautXL_v9Rdphoto2Lightning, Clip skip: 3, Version: f0.0.17v1.8.0rc-latest-276-g29be1da7"),
                {"sampler": "dpmpp_2m_sde", "schedule": "karras", "cfg": 5.5, "seed": 77, "clip_skip": 1, "steps": 3}),
    "forge_2": (("a lighthouse at dusk\nSteps: 2, Sampler: Euler a, Schedule type: Automatic, CFG scale: 3, "
                "Distilled CFG Scale: 3.5, Seed: 78, Size: 64x48, Model: sdxl_lightning, "
                "Version: f2.0.1v1.10.1-previous-313-g8a042934, Module 1: sdxl_vae"),
                {"sampler": "euler_ancestral", "schedule": "default", "cfg": 3.0, "seed": 78, "steps": 2}),
    # Fooocus' A1111 scheme: "Sampler: DPM++ 2M SDE Karras" and its own "Scheduler"
    "fooocus_a1111": (("a fox in the snow, cinematic still\nNegative prompt: (worst quality, low quality:1.4)\n"
                      'Steps: 2, Sampler: DPM++ 2M SDE Karras, Seed: 555, Size: 64x48, CFG scale: 4, Sharpness: 2, '
                      'ADM Guidance: "(1.5, 0.8, 0.3)", Model: juggernautXL_v8Rundiffusion, Model hash: aeb7e9e689, '
                      'Performance: Speed, Scheduler: karras, VAE: Default (model), Raw prompt: a fox in the snow, '
                      'Raw negative prompt: , Version: Fooocus v2.5.5'),
                      {"sampler": "dpmpp_2m_sde", "schedule": "karras", "cfg": 4.0, "seed": 555, "steps": 2,
                       "prompt": "a fox in the snow, cinematic still"}),
}
FORGE_IGNORED = {"forge_1": [], "forge_2": ["Distilled CFG Scale", "Module 1"], "fooocus_a1111": ["Sharpness", "ADM Guidance"]}


@pytest.mark.parametrize("name", list(FORGE))
def test_forge_and_fooocus_a1111_style_pngs_re_run(tiny, tmp_path, run, name):
    text, expected = FORGE[name]
    png_with(tmp_path / "in.png", parameters=text, **({"fooocus_scheme": "a1111"} if "fooocus" in name else {}))
    rc, _, err = run("--from-image", tmp_path / "in.png", "--model", tiny, "--out", tmp_path / "out.png")
    assert rc == 0, err
    notes = [line for line in err.splitlines() if "ignored" in line]
    assert notes == ([f"note: {tmp_path / 'in.png'}: ignored AUTOMATIC1111 settings that sdxl does not use: "
                      + ", ".join(FORGE_IGNORED[name])] if FORGE_IGNORED[name] else [])
    s = metadata.read_settings(tmp_path / "out.png")
    assert {k: s[k] for k in expected} == expected
    assert (s["width"], s["height"], s["vae"]) == (64, 48, None)


def test_a_fooocus_json_png_re_runs(tiny, tmp_path, run):
    data = {"adm_guidance": "(1.5, 0.8, 0.3)", "base_model": "juggernautXL_v8Rundiffusion", "base_model_hash": "aeb7e9e689",
            "full_negative_prompt": ["(worst quality, low quality:1.4)"], "full_prompt": ["a fox", "snow, cinematic"],
            "guidance_scale": 4, "loras": [], "metadata_scheme": "fooocus", "negative_prompt": "", "performance": "Speed",
            "prompt": "a fox", "refiner_model": "None", "refiner_switch": 0.5, "resolution": "(64, 48)",
            "sampler": "dpmpp_2m_sde_gpu", "scheduler": "karras", "seed": "9876", "sharpness": 2, "steps": 2,
            "styles": "['Fooocus V2']", "vae": "Default (model)", "version": "Fooocus v2.5.5"}
    png_with(tmp_path / "fooocus.png", parameters=json.dumps(data), fooocus_scheme="fooocus")
    rc, _, err = run("--from-image", tmp_path / "fooocus.png", "--model", tiny, "--out", tmp_path / "out.png")
    assert rc == 0, err
    assert f"note: {tmp_path / 'fooocus.png'}: ignored Fooocus settings that sdxl does not use: adm_guidance, sharpness" in err
    s = metadata.read_settings(tmp_path / "out.png")
    assert (s["prompt"], s["negative_prompt"]) == ("a fox, snow, cinematic", "(worst quality, low quality:1.4)")
    assert (s["steps"], s["sampler"], s["schedule"], s["cfg"], s["seed"]) == (2, "dpmpp_2m_sde", "karras", 4.0, 9876)
    assert (s["width"], s["height"], s["refiner"]) == (64, 48, None)


def test_flags_override_what_sdxl_does_not_know(tiny, tmp_path, run):
    png_with(tmp_path / "restart.png", parameters=A1111_1_10.replace("Steps: 20, Sampler: DPM++ 2M", "Steps: 2, Sampler: Restart"))
    rc, _, err = run("--from-image", tmp_path / "restart.png", "--model", tiny, "--sampler", "Euler a",
                     "--out", tmp_path / "out.png")
    assert rc == 0, err
    s = metadata.read_settings(tmp_path / "out.png")
    assert (s["sampler"], s["schedule"], s["steps"]) == ("euler_ancestral", "karras", 2)


@pytest.mark.parametrize("chunks, message", [
    ({"parameters": "{not json"}, "'parameters' chunk is Fooocus-style JSON but not valid JSON"),
    ({"parameters": "a cat\nSteps: many, Sampler: Euler, CFG scale: 7"}, "'Steps' is not an integer: 'many'"),
    ({"parameters": "only a prompt"}, "has no settings line"),
    ({"sdxl": "[1, 2]"}, "the 'sdxl' settings chunk is not a JSON object"),
])
def test_malformed_chunks_are_one_line_errors_naming_the_file(tiny, tmp_path, run, chunks, message):
    png_with(tmp_path / "bad.png", **chunks)
    rc, out, err = run("--from-image", tmp_path / "bad.png", "--model", tiny, "--out", tmp_path / "out.png")
    assert rc == 2 and out == "" and len(err.splitlines()) == 1, err
    assert err.startswith(f"sdxl generate: error: {tmp_path / 'bad.png'}: ") and message in err


def test_an_unknown_sampler_exits_2_with_one_line_listing_ours(tiny, tmp_path):
    png_with(tmp_path / "lms.png", parameters=A1111_1_10.replace("Sampler: DPM++ 2M", "Sampler: DPM fast Karras"))
    r = subprocess.run([sys.executable, "-m", "sdxl", "generate", "--from-image", str(tmp_path / "lms.png"),
                        "--model", str(tiny), "--out", str(tmp_path / "out.png")], capture_output=True, text=True, check=False)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    [line] = r.stderr.splitlines()
    assert line.startswith(f"sdxl generate: error: {tmp_path / 'lms.png'}: unknown sampler 'DPM fast Karras'; sdxl has Euler")
    assert all(f"({name})" in line for name in ("euler", "euler_ancestral", "dpmpp_2m", "lcm"))
    assert line.endswith("pass --sampler to choose one")
    assert not (tmp_path / "out.png").exists()


def test_every_setting_a_png_stores_has_a_type_that_reading_checks(tiny, tmp_path, run):
    rc, _, err = run("a kite", "--model", tiny, "--steps", "2", "--width", "64", "--height", "48",
                     "--out", tmp_path / "kite.png")
    assert rc == 0, err
    stored = json.loads(chunk(tmp_path / "kite.png", "sdxl"))
    assert stored.pop("format") == metadata.FORMAT_VERSION
    assert set(stored) <= set(metadata.STORED_TYPES), set(stored) - set(metadata.STORED_TYPES)
    metadata.check_stored(stored)  # what sdxl writes, it reads
    for key in stored:
        with pytest.raises(ValueError, match=f"its stored setting '{key}' must be "):
            metadata.check_stored({**stored, key: [{}]})  # a value of no setting's type
    for key, wrong in (("fp8", "no"), ("seed", "42"), ("steps", 2.0), ("vae_tiling", 0), ("cfg", "3")):
        with pytest.raises(ValueError, match=f"its stored setting '{key}' must be "):
            metadata.check_stored({**stored, key: wrong})  # never coerced: "no" would switch fp8 on
    metadata.check_stored({**stored, "seed": "42"}, skip=frozenset({"seed"}))  # given on the command line instead
