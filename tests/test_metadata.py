"""AUTOMATIC1111's vocabulary (`interfaces/a1111.py`), settings <-> infotext / Fooocus JSON (`metadata.py`) and the
model hash cache (`hashes.py`): plain functions, no model, no torch."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

from sdxl import sampling
from sdxl.interfaces import a1111, hashes, metadata

PAIRS = [(sampler, schedule) for sampler in sampling.SAMPLERS for schedule in sampling.SCHEDULES]


def test_every_sampler_and_schedule_has_a_row():
    assert set(a1111.SAMPLERS) == set(sampling.SAMPLERS)
    assert set(a1111.SCHEDULES) == set(sampling.SCHEDULES)
    for table in (a1111.SAMPLERS, a1111.SCHEDULES):  # no label names two samplers or two schedules (A1111 itself
        labels = [row.label for row in table.values()]  # calls both a sampler and a schedule "DDIM")
        assert len(set(map(str.lower, labels))) == len(labels)


@pytest.mark.parametrize("sampler, schedule", PAIRS)
def test_names_round_trip_through_a1111s_words_and_the_infotext(sampler, schedule):
    words = a1111.to_a1111(sampler, schedule)
    assert a1111.from_a1111(*words) == (sampler, schedule)
    text = metadata.infotext({"prompt": "p", "steps": 4, "sampler": sampler, "schedule": schedule, "cfg": 5.0, "seed": 1})
    assert f"Sampler: {words[0]}, Schedule type: {words[1]}" in text
    settings, ignored = metadata.settings_from_infotext(text)
    assert (settings["sampler"], settings["schedule"], ignored) == (sampler, schedule, [])


def test_a1111_1_10_words():
    assert a1111.to_a1111("dpmpp_2m", "karras") == ("DPM++ 2M", "Karras")
    assert a1111.to_a1111("euler_ancestral", "sgm_uniform") == ("Euler a", "SGM Uniform")
    assert a1111.to_a1111("dpmpp_2m_sde", "exponential") == ("DPM++ 2M SDE", "Exponential")
    # our "default" (diffusers' leading spacing) and "trailing" have no A1111 equivalent: our own words
    assert a1111.to_a1111("euler", "default") == ("Euler", "Default")
    assert a1111.to_a1111("ddim", "trailing") == ("DDIM", "Trailing")


@pytest.mark.parametrize("sampler, schedule_type, expected", [
    # A1111 < 1.9 combined the schedule into the sampler's name
    ("Euler a", None, ("euler_ancestral", "default")),
    ("DPM++ 2M Karras", None, ("dpmpp_2m", "karras")),
    ("DPM++ SDE Karras", None, ("dpmpp_sde", "karras")),
    ("DPM++ 2M SDE Karras", None, ("dpmpp_2m_sde", "karras")),
    ("DPM++ 2M SDE Exponential", None, ("dpmpp_2m_sde", "exponential")),
    ("DPM++ 2M", None, ("dpmpp_2m", "default")),  # before 1.9: the model's own sigmas
    ("DPM++ 2M Karras", "Automatic", ("dpmpp_2m", "karras")),  # the name wins, as in A1111
    # A1111 1.9+: "Automatic" is the schedule A1111 runs the sampler on
    ("DPM++ 2M", "Automatic", ("dpmpp_2m", "karras")),
    ("DPM++ SDE", "Automatic", ("dpmpp_sde", "karras")),
    ("DPM++ 2M SDE", "Automatic", ("dpmpp_2m_sde", "exponential")),
    ("Euler a", "Automatic", ("euler_ancestral", "default")),
    ("Euler", "SGM Uniform", ("euler", "sgm_uniform")),
    ("Euler", "SGMUniform", ("euler", "sgm_uniform")),
    # A1111's API aliases, ComfyUI's ids, Fooocus' ids; any case
    ("k_euler_a", None, ("euler_ancestral", "default")),
    ("k_dpmpp_2m", "karras", ("dpmpp_2m", "karras")),
    ("dpmpp_2m_sde_gpu", "karras", ("dpmpp_2m_sde", "karras")),
    ("dpmpp_sde_gpu", "exponential", ("dpmpp_sde", "exponential")),
    ("euler_ancestral", "sgm_uniform", ("euler_ancestral", "sgm_uniform")),
    ("lcm", None, ("lcm", "default")),
    ("dpm++ 2m karras", None, ("dpmpp_2m", "karras")),
    ("LMS Karras", None, ("lms", "karras")), ("DPM2 a", None, ("dpm_2_ancestral", "default")),
    ("UniPC", "Align Your Steps", ("uni_pc", "align_your_steps")), ("DPM++ 2M SDE Heun Exponential", None,
                                                                     ("dpmpp_2m_sde_heun", "exponential")),
    ("Restart", "Automatic", ("restart", "karras")), ("DPM++ 3M SDE", "Automatic", ("dpmpp_3m_sde", "exponential")),
    ("DPMSolverMultistepScheduler", "Karras", ("dpmpp_2m", "karras")), ("Euler", "DDIM", ("euler", "ddim_uniform")),
])
def test_old_combined_names_aliases_and_comfyui_ids_are_read(sampler, schedule_type, expected):
    assert a1111.from_a1111(sampler, schedule_type) == expected


@pytest.mark.parametrize("sampler, schedule_type, kind", [
    ("DPM fast Karras", None, "sampler"), ("PLMS", None, "sampler"), ("DPM++ 2M", "Uniform", "schedule"),
    ("Euler", "Turbo", "schedule"),
])
def test_unknown_names_say_which_and_list_ours(sampler, schedule_type, kind):
    with pytest.raises(a1111.UnknownName) as e:
        a1111.from_a1111(sampler, schedule_type)
    assert e.value.kind == kind
    message = str(e.value)
    assert message.startswith(f"unknown {kind} {sampler if kind == 'sampler' else schedule_type!r}; sdxl has ")
    assert "\n" not in message
    ours = sampling.SAMPLERS if kind == "sampler" else sampling.SCHEDULES
    table = a1111.SAMPLERS if kind == "sampler" else a1111.SCHEDULES
    assert all(f"{table[name].label} ({name})" in message for name in ours)


@pytest.mark.parametrize("value", ["a, b", "key: value", "two\nlines", 'say "hi", then: go', "plain", "ü, ß"])
def test_values_are_quoted_as_a1111_quotes_them_and_read_back(value):
    text = a1111.format_infotext("prompt", "", [("Steps", 3), ("Odd", value), ("Seed", 1), ("Last", value)])
    needs_quotes = any(c in value for c in ",:\n")
    assert (f"Odd: {json.dumps(value, ensure_ascii=False)}," in text) == needs_quotes
    assert len(text.splitlines()) == 2  # a newline in a value is written as \n: the fields stay one line
    info = a1111.parse_infotext(text)
    assert info.prompt == "prompt" and info.fields == {"Steps": "3", "Odd": value, "Seed": "1", "Last": value}


def test_settings_with_commas_colons_and_newlines_round_trip_through_the_infotext():
    s = {"prompt": "a (cat:1.2), [dog]\nsecond line", "negative_prompt": "blurry, low quality", "steps": 3,
         "sampler": "heun", "schedule": "karras", "cfg": 4.5, "seed": 9, "width": 64, "height": 48,
         "model": "my, model: v2.safetensors", "model_hash": "0123456789", "refiner": "ref:1.safetensors",
         "refiner_hash": "abcdef0123", "refiner_switch": 0.7, "clip_skip": 1, "guidance_rescale": 0.5}
    text = metadata.infotext(s)
    assert 'Model: "my, model: v2"' in text and 'Refiner: "ref:1 [abcdef0123]"' in text
    back, ignored = metadata.settings_from_infotext(text)
    assert ignored == []
    assert back == {**{k: v for k, v in s.items() if k not in ("model", "refiner")},
                    "model": "my, model: v2", "refiner": "ref:1"}  # A1111 writes models' stems


def test_clip_skip_in_a1111s_count():
    # A1111 counts from the last layer; SDXL's own is the penultimate (its 2), our 0
    assert [a1111.clip_skip_to_a1111(k) for k in (None, 0, 1, 2)] == [None, None, 3, 4]
    assert [a1111.clip_skip_from_a1111(n) for n in (1, 2, 3, 4)] == [None, None, 1, 2]
    text = "x\nSteps: 20, Sampler: Euler, CFG scale: 7, Clip skip: 2"
    assert "clip_skip" not in metadata.settings_from_infotext(text)[0]


A1111_TEXT = """\
masterpiece, (a red fox:1.2), [snow], forest
Negative prompt: (worst quality:1.4), blurry
Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 64x48, Model hash: 31e35c80fc, \
Model: sd_xl_base_1.0, Clip skip: 2, ADetailer model: face_yolov8n.pt, Lora hashes: "fox: 0a1b2c3d4e5f, snow: 9f8e7d", \
Hashes: {"model": "31e35c80fc"}, Version: v1.10.1"""


def test_an_a1111_infotext_becomes_our_settings():
    settings, ignored = metadata.settings_from_infotext(A1111_TEXT)
    assert settings == {
        "prompt": "masterpiece, (a red fox:1.2), [snow], forest", "negative_prompt": "(worst quality:1.4), blurry",
        "steps": 20, "sampler": "dpmpp_2m", "schedule": "karras", "cfg": 7.0, "seed": 1234, "width": 64, "height": 48,
        "model": "sd_xl_base_1.0", "model_hash": "31e35c80fc"}
    # Version, Hashes and Lora hashes are bookkeeping (the prompt's <lora:...> tags bring the LoRAs back)
    assert ignored == ["ADetailer model"]
    # What the command line gives is not read: an unknown sampler does not matter then
    odd = A1111_TEXT.replace("DPM++ 2M", "DPM fast")
    with pytest.raises(a1111.UnknownName):
        metadata.settings_from_infotext(odd)
    assert "sampler" not in metadata.settings_from_infotext(odd, frozenset({"sampler"}))[0]
    assert metadata.settings_from_infotext(odd, frozenset({"sampler"}))[0]["schedule"] == "karras"


@pytest.mark.parametrize("text, message", [
    ("just a prompt", "no settings line"),
    ("p\nSteps: twenty, Sampler: Euler, CFG scale: 7", "'Steps' is not an integer: 'twenty'"),
    ("p\nSteps: 20, Sampler: Euler, Size: big", "'Size' is not a WIDTHxHEIGHT size: 'big'"),
])
def test_malformed_infotexts_are_one_line_errors(text, message):
    with pytest.raises(ValueError, match=message):
        metadata.settings_from_infotext(text)


FOOOCUS = {
    "adaptive_cfg": 7, "adm_guidance": "(1.5, 0.8, 0.3)", "base_model": "juggernautXL_v8Rundiffusion",
    "base_model_hash": "aeb7e9e689", "clip_skip": 2, "full_negative_prompt": ["(worst quality, low quality:1.4)"],
    "full_prompt": ["a fox in the snow", "cinematic still, highly detailed"], "guidance_scale": 4,
    "loras": [["sd_xl_offset_example-lora_1.0", 0.1, "4852686128"]], "metadata_scheme": "fooocus",
    "negative_prompt": "", "performance": "Speed", "prompt": "a fox in the snow", "prompt_expansion": "a fox, snow",
    "refiner_model": "None", "refiner_switch": 0.5, "resolution": "(64, 48)", "sampler": "dpmpp_2m_sde_gpu",
    "scheduler": "karras", "seed": "9876", "sharpness": 2, "steps": 30, "styles": "['Fooocus V2', 'Fooocus Sharp']",
    "vae": "Default (model)", "version": "Fooocus v2.5.5",
}


def test_fooocus_json_becomes_our_settings():
    settings, ignored = metadata.settings_from_fooocus(FOOOCUS)
    assert settings == {
        "prompt": "a fox in the snow, cinematic still, highly detailed",
        "negative_prompt": "(worst quality, low quality:1.4)", "steps": 30, "cfg": 4.0, "seed": 9876,
        "refiner_switch": 0.5, "width": 64, "height": 48, "sampler": "dpmpp_2m_sde", "schedule": "karras",
        "model": "juggernautXL_v8Rundiffusion", "model_hash": "aeb7e9e689"}
    assert sorted(ignored) == ["adaptive_cfg", "adm_guidance", "loras", "sharpness"]
    with pytest.raises(ValueError, match="Fooocus' 'resolution' is not a WIDTHxHEIGHT size"):
        metadata.settings_from_fooocus({**FOOOCUS, "resolution": "__import__('os').system('x')"})


def test_models_are_named_as_a1111_names_them():
    assert metadata.model_label("/home/me/models/sd_xl_base_1.0.safetensors") == "sd_xl_base_1.0"
    assert metadata.model_label("sd_xl_base_1.0.safetensors") == "sd_xl_base_1.0"
    assert metadata.model_label("stabilityai/stable-diffusion-xl-base-1.0") == "stabilityai/stable-diffusion-xl-base-1.0"
    assert metadata.model_label("builtin") == "builtin"


def test_stored_names_leave_out_the_users_folders(tmp_path):
    (tmp_path / "in.png").write_bytes(b"")
    path = str(tmp_path / "in.png")
    assert metadata.stored_name(path) == "in.png"
    assert metadata.stored_name(path, keep_path=True) == path
    assert metadata.stored_name("builtin") == "builtin" and metadata.stored_name("org/repo") == "org/repo"
    s = metadata.image_settings({"init_image": path, "mask": None, "store_paths": False, "model": "/m/x"},
                                {"model": "x.safetensors"}, prompt="p", seed=1, batch_index=0, size=(8, 8))
    assert s["init_image"] == "in.png" and s["model"] == "x.safetensors" and "store_paths" in s


def test_flags_take_a1111s_words_too():
    base = {"outpaint_fill": "edge", "clip_skip": 0}
    s = metadata.settings_from_flags({**base, "sampler": "DPM++ 2M SDE", "schedule": "SGM Uniform"})
    assert (s["sampler"], s["schedule"]) == ("dpmpp_2m_sde", "sgm_uniform")
    s = metadata.settings_from_flags({**base, "sampler": "nope", "schedule": "karras"})
    assert s["sampler"] == "nope"  # left for GenerationOptions to refuse, with the list of ours


# -- the model hash cache


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(hashes, "_memory", {})
    reads = []
    real = hashes._file_sha256
    monkeypatch.setattr(hashes, "_file_sha256", lambda path: reads.append(path) or real(path))
    return reads


def test_model_hash_is_a1111s_short_sha256_and_cached(tmp_path, cache, monkeypatch):
    model = tmp_path / "model.safetensors"
    model.write_bytes(os.urandom(3 * hashes._CHUNK + 17))
    expected = hashlib.sha256(model.read_bytes()).hexdigest()
    assert hashes.short_hash(model) == expected[:10] and len(cache) == 1
    entry = json.loads(hashes.cache_path().read_text())[str(model.resolve())]
    assert entry == {"size": model.stat().st_size, "mtime_ns": model.stat().st_mtime_ns, "sha256": expected}
    monkeypatch.setattr(hashes, "_memory", {})  # a new process: only the file remembers
    assert hashes.short_hash(model) == expected[:10] and len(cache) == 1  # not read again
    assert not list(hashes.cache_path().parent.glob(".hashes-*"))  # no temporary file left behind

    model.write_bytes(b"changed")  # new size and mtime: hashed again
    assert hashes.short_hash(model) == hashlib.sha256(b"changed").hexdigest()[:10] and len(cache) == 2


def test_folders_have_no_hash_and_an_unwritable_cache_only_costs_time(tmp_path, cache, monkeypatch):
    assert hashes.short_hash(tmp_path) is None  # a diffusers folder or Hub snapshot: no A1111 hash
    (tmp_path / "m.safetensors").write_bytes(b"weights")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # its "sdxl" folder cannot be made
    assert hashes.sha256(tmp_path / "m.safetensors") == hashlib.sha256(b"weights").hexdigest()


def test_models_used_before_are_found_by_name_or_hash(tmp_path, cache):
    a, b = tmp_path / "a" / "sd_xl_base_1.0.safetensors", tmp_path / "b" / "other.safetensors"
    for path, data in ((a, b"base"), (b, b"other")):
        path.parent.mkdir()
        path.write_bytes(data)
        hashes.short_hash(path)
    assert hashes.find("sd_xl_base_1.0") == a.resolve() == hashes.find("sd_xl_base_1.0.safetensors")
    assert hashes.find("renamed", hashlib.sha256(b"other").hexdigest()[:10]) == b.resolve()
    assert hashes.find("nothing") is None and hashes.find(None, "0000000000") is None
    b.unlink()
    assert hashes.find("other") is None  # gone files are not offered


def test_metadata_stays_torch_free():
    code = "import sys; import sdxl.interfaces.metadata, sdxl.interfaces.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_json_chunk_reads_older_ids_and_a1111s_words(tmp_path):
    from PIL import Image

    for sampler, schedule in (("euler_ancestral", "karras"), ("Euler a", "Karras"), ("k_euler_a", "karras")):
        path = tmp_path / f"{sampler}.png"
        metadata.write_png(Image.new("RGB", (8, 8)), path, {"prompt": "p", "sampler": sampler, "schedule": schedule})
        s = metadata.read_settings(path)
        assert (s["sampler"], s["schedule"]) == ("euler_ancestral", "karras")
    metadata.write_png(Image.new("RGB", (8, 8)), tmp_path / "new.png", {"prompt": "p", "sampler": "res_multistep"})
    with pytest.raises(a1111.UnknownName, match="^" + re.escape(f"{tmp_path / 'new.png'}: unknown sampler 'res_multistep'; ")):
        metadata.read_settings(tmp_path / "new.png")
    # given on the command line instead: not read, so no error
    assert metadata.read_image(tmp_path / "new.png", skip={"sampler"}).settings["sampler"] == "res_multistep"


def test_combined_names_on_the_command_line_set_both_and_emphasis_round_trips():
    s = metadata.settings_from_flags({"sampler": "DPM++ 2M Karras", "schedule": "default"})
    assert (s["sampler"], s["schedule"]) == ("dpmpp_2m", "karras")
    s = metadata.settings_from_flags({"sampler": "Euler a", "schedule": "Align Your Steps"})
    assert (s["sampler"], s["schedule"]) == ("euler_ancestral", "align_your_steps")
    text = metadata.infotext({"prompt": "p", "steps": 4, "sampler": "euler", "schedule": "karras", "cfg": 5.0,
                              "seed": 1, "emphasis": "no_norm"})
    assert "Emphasis: No norm" in text
    assert metadata.settings_from_infotext(text)[0]["emphasis"] == "no_norm"
    assert "Emphasis" not in metadata.infotext({"prompt": "p", "steps": 4, "emphasis": "original"})
    with pytest.raises(ValueError, match="'Emphasis: Loud' is none of Original, No norm"):
        metadata.settings_from_infotext(text.replace("No norm", "Loud"))
