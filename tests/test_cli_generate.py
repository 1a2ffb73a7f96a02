"""`sdxl generate` and `sdxl samplers`, driven as a user would, on a tiny model saved by the test."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_components

from sdxl.checkpoints.save import save_single_file


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    parts = tiny_components("base", randomized=True)  # (default init leaves outputs near zero: images with content)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_single_file(parts, path, dtype=torch.float32)
    return path


@pytest.fixture(scope="module", autouse=True)
def hash_cache(tmp_path_factory):
    """Model hashes go to a cache of this module's own (the commands' too), not the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield


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
    assert "--dtype bf16" not in r.stderr  # a tiny model: no hint, whatever the CPU
    first = Image.open(files[0])
    params = first.info["parameters"]
    assert params.startswith("a red circle\n")
    assert "Steps: 3, Sampler: Euler, Schedule type: Default" in params and "Seed: 7" in params and "Size: 64x48" in params
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


def test_bf16_hint_only_where_it_pays():
    from sdxl.acceleration import cpu_bf16_speedup, cpu_has_bf16_matrix_units
    from sdxl.interfaces.cli import bf16_hint

    assert isinstance(cpu_has_bf16_matrix_units(), bool)
    assert cpu_bf16_speedup() > 0  # measured: a ratio of two timings

    full = 2_567_463_684  # SDXL base U-Net
    asked = []

    def fast() -> float:
        asked.append(1)
        return 3.0

    assert "--dtype bf16" in bf16_hint("cpu", "fp32", False, full, fast) and "3.0x" in bf16_hint("cpu", "fp32", False, full, fast)
    assert bf16_hint("cpu", "fp32", False, full, lambda: 1.2) is None  # measured too small a gain (emulated bf16)
    asked.clear()
    assert bf16_hint("cpu", "fp32", True, full, fast) is None  # float32 asked for
    assert bf16_hint("cuda", "fp32", False, full, fast) is None
    assert bf16_hint("cpu", "bf16", False, full, fast) is None
    assert bf16_hint("cpu", "fp32", False, 3_000_000, fast) is None  # a tiny model
    assert not asked  # the measurement runs only where the note could be printed


def test_memory_hint_suggests_low_memory_when_the_weights_do_not_fit(tmp_path):
    from sdxl.interfaces.cli import memory_hint

    f = tmp_path / "model.safetensors"
    f.write_bytes(b"\0" * 1000)
    assert "--low-memory" in memory_hint([f, None], None, False, 1500)  # float32: twice the float16 file
    assert memory_hint([f], "bf16", False, 1500) is None
    assert memory_hint([f], None, True, 1500) is None  # already asked for
    assert memory_hint([f], None, False, None) is None  # unknown


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


def test_a_missing_model_says_how_to_point_at_one(tmp_path):
    r = sdxl("generate", "x", "--model", tmp_path / "none.safetensors", "--out", tmp_path / "o")
    assert r.returncode == 2 and "none.safetensors: no such file" in r.stderr and "Traceback" not in r.stderr


def test_samplers_lists_every_sampler_and_schedule():
    from sdxl import sampling

    r = sdxl("samplers")
    assert r.returncode == 0
    for name in (*sampling.SAMPLERS, *sampling.SCHEDULES):
        assert name in r.stdout


# ---------------------------------------------------------------------------------------------
# Every GenerationOptions setting on the command line; settings stored in (and re-run from) PNGs;
# prompt files; --json; the default model; one-line errors.

import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import warnings  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from sdxl.interfaces import cli, metadata, settings  # noqa: E402
from sdxl.options import GenerationOptions  # noqa: E402

ALL_FLAGS = [
    "--prompt-2", "p two", "--negative", "n one", "--negative-2", "n two", "--width", "64", "--height", "48",
    "--steps", "3", "--cfg", "4.5", "--guidance-rescale", "0.5", "--sampler", "dpmpp_2m", "--schedule", "karras",
    "--seed", "11", "--batch", "2", "--init-image", "IMG", "--strength", "0.6", "--mask-blur", "2.5",
    "--outpaint", "8,0,16,0", "--outpaint-fill", "1,2,3", "--refiner-switch", "0.7",
    "--original-size", "128x96", "--crop-top-left", "4,8", "--target-size", "200x100",
    "--negative-original-size", "32x16", "--negative-crop-top-left", "1,2", "--negative-target-size", "40x24",
    "--aesthetic-score", "7.5", "--negative-aesthetic-score", "1.5", "--clip-skip", "1", "--vae-tiling",
    "--variant", "fp16", "--dtype", "bf16", "--device", "meta", "--inpaint-fill", "noise", "--hires", "128x96",
    "--hires-strength", "0.5", "--hires-steps", "2", "--hires-upscaler", "Latent (bicubic)",
]


def test_every_generation_option_has_a_flag_that_reaches_the_pipeline(tmp_path):
    img = tmp_path / "img.png"
    Image.new("RGB", (40, 32), (200, 30, 30)).save(img)
    argv = ["generate", "a prompt", *[str(img) if a == "IMG" else a for a in ALL_FLAGS]]
    args = cli.build_parser().parse_args(argv)
    s = metadata.settings_from_flags(vars(args))
    fields = {f.name for f in dataclasses.fields(GenerationOptions)}
    # every option but the return type and init_latents (a tensor: the API's, for a hires fix's second pass)
    assert fields - {"output", "init_latents"} <= set(s), fields - set(s)
    o = metadata.generation_options(s, s["prompt"])
    assert (o.prompt, o.prompt_2, o.negative_prompt, o.negative_prompt_2) == ("a prompt", "p two", "n one", "n two")
    assert (o.width, o.height, o.steps, o.cfg, o.guidance_rescale) == (64, 48, 3, 4.5, 0.5)
    assert (o.sampler, o.schedule, o.seed, o.batch, o.strength, o.mask_blur) == ("dpmpp_2m", "karras", 11, 2, 0.6, 2.5)
    assert o.inpaint_fill == "noise" and (o.hires.width, o.hires.height, o.hires.strength, o.hires.steps,
                                          o.hires.upscaler) == (128, 96, 0.5, 2, "Latent (bicubic)")
    assert o.init_image.size == (40, 32) and o.mask is None
    assert (o.outpaint, o.outpaint_fill, o.refiner_switch) == ((8, 0, 16, 0), (1, 2, 3), 0.7)
    # WxH on the command line -> (height, width) in the API; crops are TOP,LEFT in both.
    assert (o.original_size, o.crop_top_left, o.target_size) == ((96, 128), (4, 8), (100, 200))
    assert (o.negative_original_size, o.negative_crop_top_left, o.negative_target_size) == ((16, 32), (1, 2), (24, 40))
    assert (o.aesthetic_score, o.negative_aesthetic_score, o.clip_skip, o.vae_tiling) == (7.5, 1.5, 1, True)
    assert (s["variant"], s["dtype"], s["device"]) == ("fp16", "bf16", "meta")
    # The defaults are the API's.
    d = metadata.generation_options(metadata.settings_from_flags(vars(cli.build_parser().parse_args(["generate", "x"]))), "x")
    assert d == GenerationOptions(prompt="x")
    # (resize_latents is for img2img without outpainting: apart from ALL_FLAGS)
    latent = cli.build_parser().parse_args(["generate", "x", "--init-image", str(img), "--resize-latents"])
    assert metadata.generation_options(metadata.settings_from_flags(vars(latent)), "x").resize_latents is True


def test_generate_help_lists_the_new_flags_with_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--negative-2", "--guidance-rescale", "--original-size WxH", "--crop-top-left TOP,LEFT",
                 "--target-size WxH", "--negative-original-size", "--negative-crop-top-left", "--negative-target-size",
                 "--aesthetic-score", "--negative-aesthetic-score", "--clip-skip", "--mask-blur", "--outpaint L,T,R,B",
                 "--vae-tiling", "--variant", "--from-image", "--prompts-file", "--json", "--allow-download"):
        assert flag in out, flag
    assert "(default: 0.0)" in out and "(default: 6.0)" in out and "(default: 0,0)" in out and "(default: 0)" in out


def test_png_settings_round_trip_and_clear_errors(tmp_path):
    image = Image.new("RGB", (16, 8), (1, 2, 3))
    s = {"prompt": "p\nq ü", "negative_prompt": "n", "steps": 3, "sampler": "euler", "schedule": "default", "cfg": 5.0,
         "seed": 9, "width": 16, "height": 8, "model": "/m/base.safetensors", "original_size": [8, 16]}
    metadata.write_png(image, tmp_path / "a.png", s)
    assert metadata.read_settings(tmp_path / "a.png") == s
    text = Image.open(tmp_path / "a.png").info["parameters"]
    assert text.startswith("p\nq ü\nNegative prompt: n\nSteps: 3, Sampler: Euler")
    assert "Seed: 9, Size: 16x8, Model: base" in text
    image.save(tmp_path / "plain.png")
    with pytest.raises(ValueError, match="no sdxl generation settings in this PNG"):
        metadata.read_settings(tmp_path / "plain.png")
    image.save(tmp_path / "a.jpg")
    with pytest.raises(ValueError, match="JPEG image, not a PNG"):
        metadata.read_settings(tmp_path / "a.jpg")
    with pytest.raises(FileNotFoundError, match="no such file"):
        metadata.read_settings(tmp_path / "none.png")


def test_default_model_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv(settings.MODEL_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(settings.CONFIG_ENV, raising=False)
    assert settings.resolve_model(None) == ("builtin", "built-in")  # nothing configured: the packaged model
    monkeypatch.setattr(settings, "BUILTIN_MODEL", None)  # (an installation without one)
    with pytest.raises(ValueError) as e:
        settings.resolve_model(None)
    assert all(w in str(e.value) for w in ("--model", "SDXL_MODEL", str(tmp_path / "xdg" / "sdxl" / "config.toml")))
    (tmp_path / "xdg" / "sdxl").mkdir(parents=True)
    (tmp_path / "xdg" / "sdxl" / "m.safetensors").touch()
    (tmp_path / "xdg" / "sdxl" / "config.toml").write_text('model = "m.safetensors"\nallow_download = true\n')
    assert settings.resolve_model(None)[0] == str(tmp_path / "xdg" / "sdxl" / "m.safetensors")  # relative to the file
    assert settings.allow_download(False)
    monkeypatch.setenv(settings.CONFIG_ENV, str(tmp_path / "c.toml"))
    (tmp_path / "c.toml").write_text('model = "org/repo"\n')
    assert settings.resolve_model(None) == ("org/repo", str(tmp_path / "c.toml"))
    assert not settings.allow_download(False) and settings.allow_download(True)
    monkeypatch.setenv(settings.ALLOW_DOWNLOAD_ENV, "1")
    assert settings.allow_download(False)
    monkeypatch.setenv(settings.MODEL_ENV, "from-env")
    assert settings.resolve_model(None)[0] == "from-env"
    assert settings.resolve_model("from-flag")[0] == "from-flag"
    monkeypatch.delenv(settings.MODEL_ENV)
    (tmp_path / "c.toml").write_text('model = [1]\n')
    with pytest.raises(ValueError, match="'model' must be a non-empty string"):
        settings.resolve_model(None)
    monkeypatch.setitem(sys.modules, "tomllib", None)  # Python 3.10 without tomli
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(ValueError, match="needs Python 3.11\\+ or the tomli package"):
        settings.resolve_model(None)


def test_hub_ids_are_downloaded_only_when_allowed(monkeypatch):
    import huggingface_hub

    from sdxl import pipeline

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: calls.append((repo, kw)) or "/tmp")
    pipeline.resolve_path("org/repo")
    pipeline.resolve_path("org/repo", allow_download=True)
    assert calls == [("org/repo", {"local_files_only": True}), ("org/repo", {"local_files_only": False})]


def test_prompts_file_json_summary_and_from_image_remakes_the_same_pixels(tiny_model, tmp_path, capsys, monkeypatch):
    import sdxl as api

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # cli.main changes it
    (tmp_path / "prompts.txt").write_text("a cat\n\n   \n  a dog \n")
    flags = ["--width", "64", "--height", "48", "--steps", "3", "--seed", "7", "--batch", "2", "--negative", "bad",
             "--negative-2", "worse", "--guidance-rescale", "0.5", "--original-size", "128x96",
             "--crop-top-left", "4,8", "--clip-skip", "1", "--sampler", "dpmpp_2m", "--store-paths"]
    rc = cli.main(["generate", "--model", str(tiny_model), "--prompts-file", str(tmp_path / "prompts.txt"), *flags,
                   "--out", str(tmp_path / "out"), "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    summary = json.loads(out)  # stdout is only the JSON
    assert [(f["prompt"], f["seed"]) for f in summary["files"]] == [("a cat", 7), ("a cat", 8), ("a dog", 7), ("a dog", 8)]
    files = [tmp_path / "out" / f"{i:05d}.png" for i in range(4)]
    assert [f["path"] for f in summary["files"]] == [str(f) for f in files] and all(f.is_file() for f in files)
    assert summary["device"] == "cpu" and summary["seconds"] > 0 and summary["image_steps"] == 12
    assert summary["peak_memory_bytes"] > 50e6
    assert "peak process RSS" in err and "steps/s" in err
    stored = metadata.read_settings(files[3])
    assert stored["prompt"] == "a dog" and stored["seed"] == 8 and stored["original_size"] == [96, 128]
    assert stored["model"] == str(tiny_model) and stored["dtype"] == "fp32" and stored["device"] == "cpu"
    assert stored["sdxl_version"] == api.__version__ and stored["negative_prompt_2"] == "worse"

    # The flags reached the pipeline: the same images as the Python API with the same options.
    expected = api.load(tiny_model).generate(
        "a dog", width=64, height=48, steps=3, seed=7, batch=2, negative_prompt="bad", negative_prompt_2="worse",
        guidance_rescale=0.5, original_size=(96, 128), crop_top_left=(4, 8), clip_skip=1, sampler="dpmpp_2m")
    pixels = [np.asarray(Image.open(f)) for f in files]
    assert np.array_equal(pixels[2], np.asarray(expected[0])) and np.array_equal(pixels[3], np.asarray(expected[1]))
    assert not np.array_equal(pixels[0], pixels[2])  # the prompts differ

    # --from-image: the same pixels, from the file alone.
    rc = cli.main(["generate", "--from-image", str(files[3]), "--out", str(tmp_path / "again.png")])
    assert rc == 0, capsys.readouterr().err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), pixels[3])
    # Flags given with it override the stored settings, and nothing else changes.
    rc = cli.main(["generate", "--from-image", str(files[3]), "--steps", "2", "--out", str(tmp_path / "two.png")])
    assert rc == 0, capsys.readouterr().err
    two = metadata.read_settings(tmp_path / "two.png")
    assert two["steps"] == 2 and {k: v for k, v in two.items() if k != "steps"} == {
        k: v for k, v in stored.items() if k != "steps"}
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "two.png")), pixels[3])


# name -> (argv after `generate`, message of the one error line).
ERROR_CASES = {
    "unknown_sampler": (["x", "--model", "MODEL", "--sampler", "nope"], "unknown sampler 'nope'"),
    "size_not_multiple_of_8": (["x", "--model", "MODEL", "--height", "50"], "height must be a positive multiple of 8"),
    "missing_model": (["x", "--model", "gone.safetensors"], "gone.safetensors: no such file"),
    "missing_init_image": (["x", "--model", "MODEL", "--init-image", "gone.png"], "gone.png: no such file"),
    "not_sdxl": (["x", "--model", "sd15.safetensors"], "not an SDXL checkpoint"),
    "from_image_without_settings": (["--from-image", "plain.png", "--model", "MODEL"],
                                    "plain.png: no sdxl generation settings in this PNG"),
    "from_image_missing": (["--from-image", "gone.png"], "gone.png: no such file"),
    "bad_size_format": (["x", "--model", "MODEL", "--original-size", "1024"], "--original-size must be WIDTHxHEIGHT"),
    "no_prompt": (["--model", "MODEL"], "no prompt: give PROMPT, --prompts-file FILE or --from-image"),
    "empty_prompts_file": (["--prompts-file", "empty.txt", "--model", "MODEL"], "empty.txt: no prompts in it"),
    "bad_config": (["x"], "not a valid TOML config file"),
    "hub_not_cached": (["x", "--model", "nobody/not-cached"], "--allow-download"),
    "bad_int": (["x", "--steps", "many"], "argument --steps: invalid int value"),
}
# Run as a user would, in fresh processes started all at once (~2 s of torch import each); the others
# (same code, same messages) run in the test process. test_generate_bad_arguments_exit_2_with_one_line
# above covers an unknown sampler, a bad size and a missing model in subprocesses.
IN_SUBPROCESS = ("not_sdxl", "from_image_without_settings", "missing_init_image", "hub_not_cached")


@pytest.fixture(scope="module")
def error_env(tiny_model, tmp_path_factory):
    from safetensors.torch import save_file

    work = tmp_path_factory.mktemp("errors")
    z = torch.zeros
    save_file({
        "model.diffusion_model.input_blocks.0.0.weight": z(8, 4, 3, 3),
        "model.diffusion_model.out.2.weight": z(4, 8, 3, 3),
        "first_stage_model.encoder.conv_in.weight": z(8, 3, 3, 3),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": z(10, 8),
    }, str(work / "sd15.safetensors"))
    Image.new("RGB", (64, 48)).save(work / "plain.png")
    (work / "empty.txt").write_text("\n  \n")
    (work / "bad.toml").write_text("model = \n")
    env = {k: v for k, v in os.environ.items() if k not in (settings.MODEL_ENV, settings.ALLOW_DOWNLOAD_ENV)}
    env.update(XDG_CONFIG_HOME=str(work / "xdg"), HF_HOME=str(work / "hf"), HF_HUB_OFFLINE="1")

    def case(name):
        argv = [str(tiny_model) if a == "MODEL" else a for a in ERROR_CASES[name][0]]
        return ["generate", *argv, "--out", "o"], dict(env, SDXL_CONFIG=str(work / "bad.toml")) if name == "bad_config" else env

    procs = {}
    for name in IN_SUBPROCESS:
        argv, case_env = case(name)
        procs[name] = subprocess.Popen([sys.executable, "-m", "sdxl", *argv], cwd=work, env=case_env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done = {name: (p.wait(timeout=120), *p.communicate()) for name, p in procs.items()}
    return SimpleNamespace(work=work, case=case, done=done)


@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_user_mistakes_exit_2_with_one_line_and_no_traceback(error_env, name, monkeypatch, capsys):
    if name in error_env.done:
        rc, out, err = error_env.done[name]
    else:
        argv, env = error_env.case(name)
        monkeypatch.chdir(error_env.work)
        for k in set(os.environ) - set(env):
            monkeypatch.delenv(k)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
        try:
            rc = cli.main(argv)
        except SystemExit as e:  # argparse's own errors
            rc = e.code
        out, err = capsys.readouterr()
    assert rc == 2, (rc, err)
    assert "Traceback" not in err and out == ""
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith("sdxl generate: error: "), err
    assert ERROR_CASES[name][1] in lines[0], err


# ---------------------------------------------------------------------------------------------
# Seeds, prompt files and text encodings (the one-line errors are in test_bad_input.py).


def test_seed_minus_one_is_a_random_seed_stored_in_the_png(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # cli.main changes it
    seeds = []
    for name in ("a.png", "b.png"):
        rc = cli.main(["generate", "a red circle", "--steps", "1", "--seed", "-1", "--out", str(tmp_path / name)])
        err = capsys.readouterr().err
        assert rc == 0, err
        seed = metadata.read_settings(tmp_path / name)["seed"]
        assert 0 <= seed < 2**32 and f"note: --seed -1: seed {seed}" in err
        seeds.append(seed)
    assert seeds[0] != seeds[1]  # (equal once in 4 billion runs)
    rc = cli.main(["generate", "--from-image", str(tmp_path / "a.png"), "--out", str(tmp_path / "again.png")])
    assert rc == 0 and metadata.read_settings(tmp_path / "again.png")["seed"] == seeds[0]  # the stored seed, not -1


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    (tmp_path / "prompts.txt").write_bytes("\ufeffa red circle\r\na blue square\r\n".encode("utf-8"))
    rc = cli.main(["generate", "--prompts-file", str(tmp_path / "prompts.txt"), "--steps", "1", "--out",
                   str(tmp_path / "out")])
    assert rc == 0, capsys.readouterr().err
    prompts = [metadata.read_settings(tmp_path / "out" / f"{i:05d}.png")["prompt"] for i in range(2)]
    assert prompts == ["a red circle", "a blue square"]


def test_a_prompt_that_is_not_utf_8_on_a_real_command_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sdxl", "generate", b"a \xff circle", "--out", str(tmp_path / "o")],
                       capture_output=True, check=False)
    err = r.stderr.decode()
    assert r.returncode == 2 and err.splitlines() == [
        "sdxl generate: error: prompt is not valid UTF-8 text (an undecodable byte at character 2)"], err
    assert list(tmp_path.iterdir()) == []


def test_config_keys_sdxl_does_not_read_are_named_with_the_ones_it_does(tmp_path, monkeypatch):
    (tmp_path / "c.toml").write_text('modle = "x.safetensors"\n')
    monkeypatch.setenv(settings.CONFIG_ENV, str(tmp_path / "c.toml"))
    with pytest.warns(UserWarning, match="sdxl does not read 'modle'; its keys are model, allow_download, lora_dirs, "
                                         "embedding_dirs"):
        assert settings.read_config() == {"modle": "x.safetensors"}


def test_the_limits_on_the_command_line_are_the_librarys():
    from sdxl import images, options

    assert cli.MAX_PIXELS == options.MAX_PIXELS  # (repeated in cli.py so that --help does not import torch)
    assert cli.MAX_IMAGE_PIXELS == images.MAX_IMAGE_PIXELS
    args = cli.build_parser().parse_args(["generate", "x"])
    assert (args.max_pixels, args.max_image_pixels) == (options.MAX_PIXELS, images.MAX_IMAGE_PIXELS)
