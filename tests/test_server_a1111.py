"""`sdxl serve`'s AUTOMATIC1111 API, driven by AUTOMATIC1111's own client library (`webuiapi`) and by plain HTTP
for what a client library hides (status codes, error shapes), against a server on a free port with the
built-in model."""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import time

import numpy as np
import pytest
from PIL import Image
from test_adapters import kohya_file, lora_tensors

import sdxl
from sdxl import builtin
from sdxl.interfaces.server.config import ServerConfig
from sdxl.interfaces.server.serve import background

webuiapi = pytest.importorskip("webuiapi")
requests = pytest.importorskip("requests")
pytestmark = pytest.mark.filterwarnings("ignore::sdxl.options.ResolutionWarning")

PROMPT = "a red circle on a blue background"
SMALL = dict(width=64, height=64, steps=4, cfg_scale=3.0)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    (root / "models").mkdir()
    shutil.copy(builtin.FILES["builtin"], root / "models" / "mybase.safetensors")
    (root / "loras").mkdir()
    from sdxl.adapters.keys import KOHYA

    parts = sdxl.load("builtin").base
    kohya_file(root / "loras" / "shiny.safetensors", lora_tensors(parts, {KOHYA}, seed=2, scale=0.3))
    (root / "outside.safetensors").write_bytes((root / "loras" / "shiny.safetensors").read_bytes())
    (root / "loras" / "escape.safetensors").symlink_to(root / "outside.safetensors")
    return root


@pytest.fixture(scope="module")
def served(folders):
    config = ServerConfig(port=0, models_dirs=[folders / "models"], lora_dirs=[folders / "loras"],
                          outputs=folders / "outputs", max_steps=400)
    with background(config) as (url, server):
        yield url, server


@pytest.fixture()
def api(served):
    url, _ = served
    host, port = url.split("//")[1].split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=4)


def post(served, route: str, body) -> requests.Response:
    return requests.post(f"{served[0]}/sdapi/v1/{route}", json=body, timeout=120)


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def test_txt2img_batches_seeds_info_and_the_cli_image(api, served, folders):
    r = api.txt2img(prompt=PROMPT, seed=11, batch_size=2, n_iter=2, **SMALL)
    assert len(r.images) == 4 and all(im.size == (64, 64) for im in r.images)
    assert r.info["all_seeds"] == [11, 12, 13, 14] and r.info["seed"] == 11
    assert r.info["index_of_first_image"] == 0 and r.info["sd_model_name"] == "builtin"
    assert len(r.info["sd_model_hash"]) == 10 and r.info["sampler_name"] == "Euler"
    assert r.parameters["prompt"] == PROMPT and r.parameters["n_iter"] == 2
    texts = r.info["infotexts"]
    assert texts[2].startswith(PROMPT + "\n") and "Seed: 13" in texts[2] and "Sampler: Euler" in texts[2]
    assert [im.info["parameters"] for im in r.images] == texts  # each PNG carries its infotext
    # the same image as the Python API (and so the CLI) makes for these settings
    ours = sdxl.load("builtin").generate(PROMPT, width=64, height=64, steps=4, cfg=3.0, sampler="euler", seed=13,
                                         batch=2)
    assert np.array_equal(pixels(r.images[2]), pixels(ours[0]))
    assert not np.array_equal(pixels(r.images[0]), pixels(r.images[1]))
    saved = sorted((folders / "outputs").glob("*.png"))
    assert len(saved) >= 4 and all(p.stat().st_size > 0 for p in saved)


def test_a_lora_tag_by_name_changes_the_image_and_is_hashed(api):
    plain = api.txt2img(prompt=PROMPT, seed=5, **SMALL)
    styled = api.txt2img(prompt=PROMPT + " <lora:shiny:1>", seed=5, **SMALL)
    assert not np.array_equal(pixels(plain.image), pixels(styled.image))
    assert "Lora hashes: " in styled.info["infotexts"][0] and "shiny: " in styled.info["infotexts"][0]
    names = [entry["name"] for entry in api.get_loras()]
    assert names == ["shiny"]  # escape.safetensors leaves the folder through a symlink: not listed, not usable


@pytest.mark.parametrize("tag", ["<lora:escape:1>", "<lora:../outside:1>", "<lora:/etc/passwd:1>"])
def test_loras_outside_the_folders_are_refused(served, tag):
    r = post(served, "txt2img", dict(prompt=f"{PROMPT} {tag}", **SMALL))
    assert r.status_code == 400 and "LoRA" in r.json()["detail"] and "Traceback" not in r.text


def test_img2img_and_inpainting_keep_the_pixels_outside_the_mask(api):
    init = api.txt2img(prompt=PROMPT, seed=2, **SMALL).image
    changed = api.img2img(images=[init], prompt="a green square on a yellow background", seed=1,
                          denoising_strength=0.7, **SMALL).image
    assert changed.size == (64, 64) and np.abs(pixels(changed) - pixels(init)).mean() > 5
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (24, 24, 44, 44))
    for full_res in (True, False):
        out = api.img2img(images=[init], mask_image=mask, prompt="a green square on a yellow background", seed=1,
                          denoising_strength=0.9, mask_blur=0, inpaint_full_res=full_res,
                          inpaint_full_res_padding=8, inpainting_fill=1, **SMALL).image
        diff = np.abs(pixels(out) - pixels(init)).max(axis=-1)
        assert diff[np.asarray(mask) == 0].max() == 0  # the init image's own pixels outside the mask
        assert diff[26:42, 26:42].mean() > 5  # repainted inside


def test_img2img_latent_upscale_resize_mode_is_the_librarys_resize_latents(api, served):
    """resize_mode 3 ("Just resize (latent upscale)"): the 32x32 init image encoded at its size, its latents
    resized to 64x64: the library's resize_latents image, not the pixel-resized one (mode 0)."""
    init = api.txt2img(prompt=PROMPT, seed=3, **dict(SMALL, width=32, height=32)).image
    latent, plain = (api.img2img(images=[init], prompt=PROMPT, seed=1, denoising_strength=0.6, resize_mode=mode,
                                 **SMALL).image for mode in (3, 0))
    ours = sdxl.load("builtin").generate(PROMPT, init_image=init, resize_latents=True, strength=0.6, width=64,
                                         height=64, steps=4, cfg=3.0, sampler="euler", seed=1)[0]
    assert latent.size == (64, 64) and np.array_equal(pixels(latent), pixels(ours))
    assert np.abs(pixels(latent) - pixels(plain)).mean() > 1
    mask = Image.new("L", (32, 32), 255)
    r = post(served, "img2img", dict(init_images=[b64(init)], mask=b64(mask), resize_mode=3, prompt=PROMPT, **SMALL))
    assert r.status_code == 400 and "resize_mode 3" in r.json()["detail"], r.text


def test_png_info_reads_the_infotext(api):
    image = api.txt2img(prompt=PROMPT, seed=4, **SMALL).image
    r = api.png_info(image)
    assert r.info.startswith(PROMPT + "\n") and "Seed: 4" in r.info
    assert r.parameters["Seed"] in (4, "4") and r.parameters["Prompt"] == PROMPT


def test_progress_while_running_then_interrupt_returns_what_is_done(api, served):
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=post(served, "txt2img", dict(
        prompt=PROMPT, seed=9, width=64, height=64, steps=400, cfg_scale=3.0))))
    thread.start()
    deadline, progress = time.time() + 60, None
    while time.time() < deadline:
        progress = api.get_progress()
        if progress["state"]["sampling_step"] >= 3:
            break
        time.sleep(0.05)
    assert progress["state"]["job_count"] == 1 and progress["state"]["sampling_steps"] == 400
    assert 0 < progress["progress"] < 1 and progress["state"]["job"] == "txt2img"
    api.interrupt()
    thread.join(60)
    r = result["r"]
    assert r.status_code == 200 and len(r.json()["images"]) == 1
    assert json.loads(r.json()["info"])["interrupted"] is True
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0


def test_options_switch_the_model_by_listed_title_only(api, served):
    titles = api.util_get_model_names()
    assert {"builtin", "builtin-refiner", "mybase"} <= {t.split(" [")[0] for t in titles}
    mybase = next(t for t in titles if t.startswith("mybase ["))
    api.set_options({"sd_model_checkpoint": mybase})
    try:
        assert api.util_get_current_model() == mybase
        r = api.txt2img(prompt=PROMPT, seed=1, **SMALL)
        assert r.info["sd_model_name"] == "mybase"
        for name in ("../models/mybase.safetensors", str(served[1].config.models_dirs[0] / "mybase.safetensors"),
                     "nothere"):
            bad = requests.post(f"{served[0]}/sdapi/v1/options", json={"sd_model_checkpoint": name}, timeout=30)
            assert bad.status_code == 400 and "not one of the listed models" in bad.json()["detail"]
        assert api.util_get_current_model() == mybase
    finally:
        api.set_options({"sd_model_checkpoint": "builtin"})


def test_override_settings_and_the_refiner_and_hires_fix(api, served):
    r = api.txt2img(prompt=PROMPT, seed=3, override_settings={"CLIP_stop_at_last_layers": 3}, **SMALL)
    assert "Clip skip: 3" in r.info["infotexts"][0]
    refined = post(served, "txt2img", dict(prompt=PROMPT, seed=3, refiner_checkpoint="builtin-refiner",
                                           refiner_switch_at=0.5, **SMALL))  # webuiapi has no refiner argument
    text = json.loads(refined.json()["info"])["infotexts"][0]
    assert "Refiner: builtin-refiner [" in text and "Refiner switch at: 0.5" in text
    hires = api.txt2img(prompt=PROMPT, seed=3, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent",
                        denoising_strength=0.5, **SMALL)
    assert hires.image.size == (96, 96)


def test_lists(api, served):
    samplers = {s["name"] for s in api.get_samplers()}
    assert {"Euler", "Euler a", "DPM++ 2M", "DPM++ 2M SDE", "DDIM", "UniPC"} <= samplers
    schedulers = {s["name"] for s in api.get_schedulers()}
    assert {"automatic", "karras", "exponential"} <= schedulers
    models = api.get_sd_models()
    assert all(m["title"] == f"{m['model_name']} [{m['hash']}]" and len(m["sha256"]) == 64 for m in models)
    assert all("/" not in m["filename"] for m in models)  # file names, never where the server keeps them
    sizes = {m["model_name"]: m["native_size"] for m in models}
    assert sizes["builtin"] == sizes["mybase"] == builtin.NATIVE_SIZE  # mybase: a copy, known by its configs
    assert [u["name"] for u in api.get_latent_upscale_modes()][0] == "Latent"
    for route in ("memory", "cmd-flags", "scripts", "embeddings", "upscalers", "sd-vae"):
        assert requests.get(f"{served[0]}/sdapi/v1/{route}", timeout=10).status_code == 200


def test_a_models_native_size_comes_from_its_own_configs_not_its_name(tmp_path):
    import os

    import torch
    from safetensors.torch import save_file

    from sdxl.interfaces.server.catalog import Catalog

    save_file({"w": torch.zeros(2)}, tmp_path / "builtin_lookalike.safetensors")  # no configs: full-size SDXL
    folder = tmp_path / "wide"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "unet" / "config.json").write_text(json.dumps({"sample_size": 96}))
    shutil.copy(builtin.FILES["builtin"], tmp_path / "tiny.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    sizes = {m.name: m.native_size() for m in Catalog([tmp_path], []).models()}
    assert sizes == {"builtin_lookalike": 1024, "wide": 768, "tiny": 64, "broken": 1024, "builtin": 64,
                     "builtin-refiner": 64}
    # a file replaced in place is read again
    shutil.copy(builtin.FILES["builtin"], tmp_path / "builtin_lookalike.safetensors")
    os.utime(tmp_path / "builtin_lookalike.safetensors", ns=(1, 1))
    assert {m.name: m.native_size() for m in Catalog([tmp_path], []).models()}["builtin_lookalike"] == 64


@pytest.mark.parametrize("body, field", [
    (dict(restore_faces=True), "restore_faces"),
    (dict(tiling=True), "tiling"),
    (dict(enable_hr=True, hr_upscaler="R-ESRGAN 4x+"), "hr_upscaler"),
    (dict(script_name="x/y/z plot"), "script_name"),
    (dict(alwayson_scripts={"ADetailer": {"args": [True]}}), "alwayson_scripts"),
    (dict(subseed_strength=0.5), "subseed_strength"),
    (dict(width=65), "width"),
    (dict(steps=100000), "steps"),
    (dict(batch_size=1000), "batch_size"),
    (dict(sampler_name="Nope 3000"), "sampler_name"),
    (dict(width=8192, height=8192), "pixels"),
    (dict(seed=2**40), "seed"),
])
def test_what_sdxl_does_not_do_is_a_400_naming_the_field(served, body, field):
    r = post(served, "txt2img", dict(prompt=PROMPT, **{**SMALL, **body}))
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert (field in detail or (field == "pixels" and "pixels" in detail)) and "Traceback" not in r.text
    assert r.json()["error"] == "BadRequest"


@pytest.mark.parametrize("raw, status", [
    (b"{not json", 422), (b'{"steps": "many"}', 422), (b'{"width": [1]}', 422), (b"[]", 422),
])
def test_malformed_requests_are_4xx_without_tracebacks(served, raw, status):
    r = requests.post(f"{served[0]}/sdapi/v1/txt2img", data=raw, headers={"content-type": "application/json"},
                      timeout=30)
    assert r.status_code == status and "Traceback" not in r.text and r.json()["detail"]


def test_undecodable_images_are_400(served):
    for value in ("not base64 at all!!", base64.b64encode(b"hello").decode(), "data:image/png;base64,AAAA"):
        r = post(served, "img2img", dict(init_images=[value], prompt=PROMPT, **SMALL))
        assert r.status_code == 400 and "init_images[0]" in r.json()["detail"], r.text


def test_unknown_fields_and_nulls_are_accepted(served):
    r = post(served, "txt2img", dict(prompt=PROMPT, seed=None, sampler_name=None, scheduler=None, styles=None,
                                     some_extension_field={"x": 1}, **SMALL))
    assert r.status_code == 200 and len(r.json()["images"]) == 1


def test_a_full_queue_is_429_with_retry_after(served):
    _, server = served
    saved = server.queue.max_queued
    server.queue.max_queued = 0
    try:
        r = post(served, "txt2img", dict(prompt=PROMPT, **SMALL))
    finally:
        server.queue.max_queued = saved
    assert r.status_code == 429 and r.headers["Retry-After"] and "queue is full" in r.json()["detail"]


def test_job_events_stream_progress_and_previews(served):
    url, _ = served
    job = requests.post(f"{url}/sdxl/v1/jobs/txt2img", json=dict(prompt=PROMPT, seed=1, width=64, height=64, steps=60,
                                                                 cfg_scale=3.0), timeout=30).json()
    kinds, previews = [], []
    with requests.get(f"{url}/sdxl/v1/jobs/{job['id']}/events", stream=True, timeout=60) as stream:
        event = None
        for line in stream.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                event = line[7:]
                kinds.append(event)
            elif line.startswith("data: ") and event == "preview":
                previews.append(line[6:])
            if event == "done" and line.startswith("data: "):
                assert json.loads(line[6:])["state"] == "done"
                break
    assert kinds[0] == "progress" and kinds[-1] == "done" and "preview" in kinds
    preview = Image.open(io.BytesIO(base64.b64decode(previews[-1].split(",", 1)[1])))
    assert preview.mode == "RGB" and preview.size[0] >= 8
    result = requests.get(f"{url}/sdxl/v1/jobs/{job['id']}/result", timeout=30).json()
    assert len(result["images"]) == 1 and json.loads(result["info"])["seed"] == 1


def test_metrics_count_jobs(served):
    text = requests.get(f"{served[0]}/metrics", timeout=10).text
    assert "sdxl_queue_length 0" in text and "sdxl_request_seconds_count" in text
    count = int(next(line.split()[1] for line in text.splitlines() if line.startswith("sdxl_jobs_total")))
    assert count >= 1


def test_basic_auth_protects_every_route(folders):
    config = ServerConfig(port=0, users={"ann": "s3cret"}, outputs=None)
    with background(config) as (url, _):
        for route in ("/sdapi/v1/sd-models", "/docs", "/openapi.json", "/metrics"):
            r = requests.get(url + route, timeout=10)
            assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic")
        assert requests.get(url + "/docs", auth=("ann", "wrong"), timeout=10).status_code == 401
        assert requests.get(url + "/docs", auth=("ann", "s3cret"), timeout=10).status_code == 200
        host, port = url.split("//")[1].split(":")
        api = webuiapi.WebUIApi(host=host, port=int(port), username="ann", password="s3cret", sampler="Euler", steps=4)
        assert len(api.txt2img(prompt=PROMPT, seed=1, **SMALL).images) == 1


def test_two_cpu_workers_share_the_queue_and_match_sequential_images(served, folders):
    bodies = [dict(prompt=PROMPT, seed=100 + i, **SMALL) for i in range(6)]
    sequential = [post(served, "txt2img", b).json()["images"][0] for b in bodies]
    config = ServerConfig(port=0, devices=["cpu", "cpu"], outputs=None)
    with background(config) as (url, server):
        results: dict[int, str] = {}

        def one(i):
            r = requests.post(f"{url}/sdapi/v1/txt2img", json=bodies[i], timeout=120)
            results[i] = r.json()["images"][0]

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        used = {w.name for w in server.workers if w.loaded is not None}
    assert len(used) == 2
    for i in range(6):
        a = Image.open(io.BytesIO(base64.b64decode(results[i])))
        b = Image.open(io.BytesIO(base64.b64decode(sequential[i])))
        assert np.array_equal(pixels(a), pixels(b))


def test_saved_images_are_listed_newest_first_and_served_by_generated_name_only(served, folders):
    url, _ = served
    for seed in (75, 76, 77):
        post(served, "txt2img", dict(prompt="a purple square on a white background", seed=seed, **SMALL))
    listed = requests.get(f"{url}/sdxl/v1/outputs?limit=3", timeout=10).json()
    assert len(listed) == 3 and listed[0]["prompt"] == "a purple square on a white background"
    assert listed[0]["seed"] == 77 and listed[0]["parameters"]["steps"] == 4 and "Seed: 77" in listed[0]["infotext"]
    numbers = [int(e["name"][:-4]) for e in listed]
    assert numbers == sorted(numbers, reverse=True)
    png = requests.get(url + listed[0]["url"], timeout=10)
    assert png.status_code == 200 and png.content == (folders / "outputs" / listed[0]["name"]).read_bytes()
    (folders / "outputs" / "notes.txt").write_text("private")
    for name in ("notes.txt", "..%2Fmodels%2Fmybase.safetensors", "99999.png"):
        r = requests.get(f"{url}/sdxl/v1/outputs/{name}", timeout=10)
        assert r.status_code == 404 and "private" not in r.text
