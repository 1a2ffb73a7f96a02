"""`sdxl serve`'s web UI at `/`, driven as a person drives it: Playwright clicking, typing and dragging in a real
Chromium (Debian's /usr/bin/chromium; Playwright's own browser download is not used) against a server on a free
port with the built-in model. Every test also fails on a console error or an uncaught exception in the page.

SDXL_UI_SCREENSHOTS=1 also writes docs/images/ui-desktop.png (1280x800) and docs/images/ui-phone.png (390x844).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import sdxl
from sdxl.interfaces import a1111
from sdxl.interfaces.server.config import ServerConfig
from sdxl.interfaces.server.serve import background

playwright_sync = pytest.importorskip("playwright.sync_api", reason="the web UI tests need `pip install playwright`")
CHROMIUM = Path(os.environ.get("SDXL_CHROMIUM", "/usr/bin/chromium"))
if not CHROMIUM.exists():
    pytest.skip(f"the web UI tests need Chromium at {CHROMIUM} (Debian: apt-get install chromium)",
                allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore::sdxl.options.ResolutionWarning")
expect = playwright_sync.expect

ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage"]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
PROMPT = "a red circle on a blue background"
SHOTS = Path(__file__).resolve().parents[1] / "docs" / "images"
TIMEOUT = 60_000  # ms: a generation on a busy 2-core machine
# What Chromium logs for a response the page expected (the error tests' 400 / 422): not a page error.
HTTP_ERROR = re.compile(r"Failed to load resource: the server responded with a status of 4\d\d")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    (root / "loras").mkdir()
    (root / "loras" / "pixel_style.safetensors").write_bytes(b"")  # listed by name; never loaded here
    (root / "embeddings").mkdir()
    (root / "embeddings" / "goodvibes.safetensors").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def served(folders):
    config = ServerConfig(port=0, outputs=None, max_steps=5000, lora_dirs=[folders / "loras"],
                          embedding_dirs=[folders / "embeddings"])
    with background(config) as (url, server):
        yield url, server


@pytest.fixture(scope="module")
def browser():
    with playwright_sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


class Page:
    """A fresh browser context on the UI, collecting console errors and page errors."""

    def __init__(self, browser, url, viewport, **options):
        self.context = browser.new_context(viewport=viewport, **options)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.url = url
        self.open()

    def open(self):
        self.page.goto(self.url + "/")
        self.page.wait_for_selector("body[data-ready=true]", timeout=20_000)

    def close(self, allow_http_errors: bool = False):
        errors = [e for e in self.errors if not (allow_http_errors and HTTP_ERROR.search(e))]
        self.context.close()
        assert not errors, f"console errors: {errors}"


@pytest.fixture
def ui(browser, served, request):
    p = Page(browser, served[0], DESKTOP)
    yield p
    p.close(allow_http_errors=getattr(request, "param", False))


# -- helpers


def label(page, text):
    return page.get_by_label(text, exact=True)


def set_fields(page, **values):
    for name, value in values.items():
        label(page, name.replace("_", " ")).fill(str(value))


def choose(page, name, value):
    label(page, name).select_option(value)


def generate(page):
    """Click Generate and wait for one more image in the gallery; its <img>."""
    gallery = page.locator("#gallery img")
    before = gallery.count()
    page.get_by_role("button", name="Generate", exact=False).first.click()
    # a new image, or a message saying why not (failing at once, with the server's words)
    page.wait_for_function("""n => document.querySelectorAll('#gallery img').length > n ||
                                  [...document.querySelectorAll('.error')].some(e => !e.hidden)""", arg=before,
                           timeout=TIMEOUT)
    shown = [t for t in page.locator(".error:visible").all_inner_texts() if t.strip()]
    assert not shown, f"the page shows errors: {shown}"
    expect(gallery).to_have_count(before + 1)
    return gallery.first


def pixels_of(src: str) -> np.ndarray:
    assert src.startswith("data:image/png;base64,"), src[:40]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))


def png_with(chunks: dict[str, str], size=(16, 16)) -> bytes:
    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.new("RGB", size, (20, 40, 60)).save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


def http_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def drop_file(page, selector: str, name: str, data: bytes):
    """Drag-and-drop a file onto an element, as a file manager does."""
    transfer = page.evaluate_handle("""([name, b64]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const t = new DataTransfer();
        t.items.add(new File([bytes], name, { type: "image/png" }));
        return t;
    }""", [name, base64.b64encode(data).decode()])
    for kind in ("dragenter", "dragover", "drop"):
        page.dispatch_event(selector, kind, {"dataTransfer": transfer})


def shoot(page, name: str):
    if os.environ.get("SDXL_UI_SCREENSHOTS") == "1":
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.mouse.move(0, 0)  # no hover effect in the picture
        page.screenshot(path=str(SHOTS / name))


# -- tests


def test_generate_finds_the_image_by_its_prompt_and_it_is_the_python_apis(ui):
    page = ui.page
    expect(page.get_by_role("tab", name="Text to image")).to_have_attribute("aria-selected", "true")
    label(page, "Prompt").fill(PROMPT)
    label(page, "Negative prompt").fill("blurry")
    set_fields(page, Seed=1234, Steps=12, CFG_scale=6)
    choose(page, "Sampler", "Euler a")
    choose(page, "Schedule", "karras")
    expect(label(page, "Width")).to_have_value("64")  # the built-in model's own size
    generate(page)
    image = page.get_by_alt_text(PROMPT).first
    expect(image).to_be_visible()
    assert image.get_attribute("alt").startswith(PROMPT)
    sampler, schedule = a1111.from_a1111("Euler a", "karras")
    ours = sdxl.load("builtin").generate(PROMPT, negative_prompt="blurry", width=64, height=64, steps=12, cfg=6.0,
                                         sampler=sampler, schedule=schedule, seed=1234)[0]
    assert np.array_equal(pixels_of(image.get_attribute("src")), np.asarray(ours.convert("RGB")))
    # its parameters beside it, a download of the same PNG, and its seed to reuse
    info = page.locator("#viewer-info")
    expect(info).to_contain_text("Seed: 1234")
    expect(info).to_contain_text("Sampler: Euler a")
    download = page.get_by_role("link", name="Download")
    assert download.get_attribute("download") == "sdxl-1234.png"
    expect(download).to_have_attribute("href", re.compile("^blob:"))
    downloaded = page.evaluate("""async (url) => { const b = new Uint8Array(await (await fetch(url)).arrayBuffer());
                                                   return btoa(String.fromCharCode(...b)); }""",
                               download.get_attribute("href"))
    assert np.array_equal(pixels_of("data:image/png;base64," + downloaded), np.asarray(ours.convert("RGB")))
    page.get_by_role("button", name="Random seed").click()
    expect(label(page, "Seed")).to_have_value("-1")
    page.get_by_role("button", name="Reuse the last image's seed").click()
    expect(label(page, "Seed")).to_have_value("1234")
    shoot(page, "ui-desktop.png")
    # click to enlarge
    page.locator("#viewer-open").click()
    expect(page.get_by_alt_text(f"Enlarged: {PROMPT}")).to_be_visible()
    page.keyboard.press("Escape")
    expect(page.locator("#lightbox")).not_to_be_visible()
    # the image's own parameters load back into the fields (sdxl's PNG chunks)
    label(page, "Seed").fill("-1")
    label(page, "Steps").fill("30")
    png = base64.b64decode(image.get_attribute("src").split(",", 1)[1])
    label(page, "Load parameters from image").set_input_files(
        files=[{"name": "mine.png", "mimeType": "image/png", "buffer": png}])
    expect(label(page, "Seed")).to_have_value("1234")
    expect(label(page, "Steps")).to_have_value("12")
    expect(page.locator("#load-params-note")).to_contain_text("(sdxl)")
    label(page, "Seed").fill("-1")
    page.get_by_role("button", name="Use these parameters").click()
    expect(label(page, "Seed")).to_have_value("1234")


def test_progress_live_previews_queue_place_and_cancel(ui, served):
    page = ui.page
    label(page, "Prompt").fill(PROMPT)
    set_fields(page, Steps=3000, Seed=3)
    with page.expect_response("**/sdxl/v1/jobs/txt2img") as first:
        page.get_by_role("button", name="Generate").click()
    job = first.value.json()["id"]
    bar = page.get_by_role("progressbar")
    expect(page.locator("#status")).to_contain_text("Step", timeout=TIMEOUT)
    previews, deadline = set(), time.time() + TIMEOUT / 1000
    while len(previews) < 3 and time.time() < deadline:
        preview = page.get_by_alt_text("preview", exact=False)
        if preview.is_visible():
            previews.add(preview.get_attribute("src"))
        time.sleep(0.05)
    assert len(previews) >= 3, "fewer than three distinct live previews"
    assert all(src.startswith("data:image/png;base64,") for src in previews)
    page.wait_for_function("() => Number(document.querySelector('[role=progressbar]').ariaValueNow) > 0")
    now = float(bar.get_attribute("aria-valuenow"))
    step = int(re.search(r"Step (\d+)/3000", page.locator("#status").inner_text()).group(1))
    assert 0 < now < 50 and step >= 3
    expect(page.locator("#status")).to_contain_text("ETA")
    # a second job waits behind the first: its place is shown, and it can be taken out of the queue
    with page.expect_response("**/sdxl/v1/jobs/txt2img") as second:
        page.get_by_role("button", name="Generate").click()
    waiting = second.value.json()["id"]
    expect(page.locator("#queue li")).to_contain_text("yours is next")
    page.get_by_role("button", name="Remove the queued job").click()
    expect(page.locator("#queue li")).to_have_count(0)
    assert http_json(f"{served[0]}/sdxl/v1/jobs/{waiting}")["state"] == "cancelled"
    # cancel the running one
    page.get_by_role("button", name="Cancel", exact=True).click()
    expect(page.locator("#status")).to_have_text("Cancelled.", timeout=TIMEOUT)
    assert http_json(f"{served[0]}/sdxl/v1/jobs/{job}")["state"] == "cancelled"
    expect(page.get_by_role("button", name="Cancel", exact=True)).to_be_disabled()
    expect(page.locator("#gallery img")).to_have_count(0)


def test_a_reload_follows_the_tabs_running_and_queued_jobs_again(ui, served):
    page = ui.page
    label(page, "Prompt").fill(PROMPT)
    set_fields(page, Steps=3000, Seed=5)
    ids = []
    for _ in range(2):
        with page.expect_response("**/sdxl/v1/jobs/txt2img") as sent:
            page.get_by_role("button", name="Generate", exact=False).first.click()
        ids.append(sent.value.json()["id"])
    expect(page.locator("#status")).to_contain_text("Step", timeout=TIMEOUT)
    page.reload()
    page.wait_for_selector("body[data-ready=true]", timeout=20_000)
    # the running job's progress moves on in the reloaded page, and the queued one is listed behind it
    expect(page.locator("#status")).to_contain_text("Step", timeout=TIMEOUT)
    first = int(re.search(r"Step (\d+)/3000", page.locator("#status").inner_text()).group(1))
    page.wait_for_function("""n => { const m = /Step (\\d+)\\/3000/.exec(document.getElementById('status')
                                                                    .textContent); return m && Number(m[1]) > n; }""",
                           arg=first, timeout=TIMEOUT)
    expect(page.locator("#queue li")).to_have_count(1)
    expect(page.locator("#queue li")).to_contain_text("yours is next")
    page.get_by_role("button", name="Remove the queued job").click()
    expect(page.locator("#queue li")).to_have_count(0)
    page.get_by_role("button", name="Cancel", exact=True).click()
    expect(page.locator("#status")).to_have_text("Cancelled.", timeout=TIMEOUT)
    assert [http_json(f"{served[0]}/sdxl/v1/jobs/{i}")["state"] for i in ids] == ["cancelled", "cancelled"]
    page.reload()  # nothing left to follow
    page.wait_for_selector("body[data-ready=true]", timeout=20_000)
    expect(page.get_by_role("button", name="Cancel", exact=True)).to_be_disabled()
    expect(page.locator("#status")).not_to_have_text("Cancelled.")


def test_a_job_that_ends_while_the_page_is_away_shows_its_image_on_return(ui, served):
    page = ui.page
    label(page, "Prompt").fill(PROMPT)
    set_fields(page, Steps=6, Seed=77, CFG_scale=5)
    choose(page, "Sampler", "Euler a")
    choose(page, "Schedule", "karras")
    with page.expect_response("**/sdxl/v1/jobs/txt2img") as sent:
        page.get_by_role("button", name="Generate").click()
    job = sent.value.json()["id"]
    page.goto("about:blank")  # away, in the same tab, before the job ends
    deadline = time.time() + TIMEOUT / 1000
    while http_json(f"{served[0]}/sdxl/v1/jobs/{job}")["state"] != "done" and time.time() < deadline:
        time.sleep(0.1)
    ui.open()
    image = page.locator("#gallery").get_by_alt_text(f"{PROMPT} (seed 77)")
    expect(image).to_have_count(1, timeout=TIMEOUT)  # shown once, not once per poll
    expect(page.locator("#gallery img")).to_have_count(1)
    sampler, schedule = a1111.from_a1111("Euler a", "karras")
    ours = sdxl.load("builtin").generate(PROMPT, width=64, height=64, steps=6, cfg=5.0, sampler=sampler,
                                         schedule=schedule, seed=77)[0]
    assert np.array_equal(pixels_of(image.get_attribute("src")), np.asarray(ours.convert("RGB")))
    ui.open()  # shown once: a second reload does not show it again
    expect(page.locator("#gallery img")).to_have_count(0)


def test_load_parameters_from_an_automatic1111_png_and_a_dropped_fooocus_png(ui):
    page = ui.page
    text = ("a fox <lora:pixel_style:0.6>\nNegative prompt: blurry\nSteps: 12, Sampler: DPM++ 2M, "
            "Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 64x48, Model: x")
    label(page, "Load parameters from image").set_input_files(
        files=[{"name": "a1111.png", "mimeType": "image/png", "buffer": png_with({"parameters": text})}])
    expect(label(page, "Prompt")).to_have_value("a fox <lora:pixel_style:0.6>")
    expect(label(page, "Negative prompt")).to_have_value("blurry")
    expect(label(page, "Steps")).to_have_value("12")
    expect(label(page, "Sampler")).to_have_value("DPM++ 2M")
    expect(label(page, "Schedule")).to_have_value("karras")
    expect(label(page, "CFG scale")).to_have_value("6.5")
    expect(label(page, "Seed")).to_have_value("1234")
    expect(label(page, "Width")).to_have_value("64")
    expect(label(page, "Height")).to_have_value("48")
    note = page.locator("#load-params-note")
    expect(note).to_contain_text("AUTOMATIC1111")
    expect(note).to_contain_text("model “x” is not on this server")
    # Fooocus' JSON scheme, dropped onto the page
    fooocus = {"prompt": "a cat", "negative_prompt": "ugly", "steps": 9, "guidance_scale": 4.5, "seed": "777",
               "resolution": "(72, 56)", "sampler": "dpmpp_2m_sde_gpu", "scheduler": "exponential",
               "base_model": "builtin", "lora_combined_1": "pixel_style.safetensors : 0.5",
               "metadata_scheme": "fooocus"}
    drop_file(page, "main", "fooocus.png", png_with({"parameters": json.dumps(fooocus), "fooocus_scheme": "fooocus"}))
    expect(label(page, "Prompt")).to_have_value("a cat <lora:pixel_style:0.5>")
    expect(label(page, "Negative prompt")).to_have_value("ugly")
    expect(label(page, "Steps")).to_have_value("9")
    expect(label(page, "Sampler")).to_have_value("DPM++ 2M SDE")
    expect(label(page, "Schedule")).to_have_value("exponential")
    expect(label(page, "CFG scale")).to_have_value("4.5")
    expect(label(page, "Seed")).to_have_value("777")
    expect(label(page, "Width")).to_have_value("72")
    expect(label(page, "Height")).to_have_value("56")
    expect(note).to_contain_text("Fooocus")
    # an image without parameters says so
    label(page, "Load parameters from image").set_input_files(
        files=[{"name": "plain.png", "mimeType": "image/png", "buffer": png_with({})}])
    expect(page.locator("#load-params-error")).to_have_text("plain.png holds no generation parameters")


def test_paint_a_mask_and_inpaint_only_there(ui):
    page = ui.page
    label(page, "Prompt").fill(PROMPT)
    set_fields(page, Seed=21, Steps=4)
    original = pixels_of(generate(page).get_attribute("src"))
    page.get_by_role("button", name="Send to Inpaint").click()
    expect(page.get_by_role("tab", name="Inpaint")).to_have_attribute("aria-selected", "true")
    canvas = page.get_by_label("Mask: paint over the area to repaint")
    expect(canvas).to_be_visible()
    page.get_by_label("Brush size").fill("40")
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    for fy in (0.15, 0.25, 0.35):  # three strokes over the top-left part
        page.mouse.move(box["x"] + 0.1 * box["width"], box["y"] + fy * box["height"])
        page.mouse.down()
        for fx in (0.2, 0.3, 0.4):
            page.mouse.move(box["x"] + fx * box["width"], box["y"] + fy * box["height"], steps=4)
        page.mouse.up()
    label(page, "Prompt").fill("a green square on a yellow background")
    set_fields(page, Mask_blur=2, Denoising_strength=1)
    with page.expect_request("**/sdxl/v1/jobs/img2img") as sent:
        result = generate(page)
    body = sent.value.post_data_json
    assert body["mask_blur"] == 2 and body["denoising_strength"] == 1 and body["init_images"]
    mask = pixels_of(body["mask"])[..., 0]
    assert mask.shape == (64, 64)
    painted = mask > 200
    assert 0.05 < painted.mean() < 0.5 and painted[:, 40:].sum() == 0 and painted[36:].sum() == 0
    inpainted = pixels_of(result.get_attribute("src")).astype(int)
    diff = np.abs(inpainted - original.astype(int)).sum(-1)
    ys, xs = np.nonzero(mask > 0)
    far = np.ones_like(painted)  # more than 3 blur radii from any painted pixel
    far[max(ys.min() - 6, 0):ys.max() + 7, max(xs.min() - 6, 0):xs.max() + 7] = False
    assert diff[painted].mean() > 20, "the painted region was not repainted"
    assert np.array_equal(inpainted[far], original.astype(int)[far]), "pixels outside the mask changed"
    # the mask tools
    page.get_by_role("button", name="Clear mask").click()
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#mask-error")).to_contain_text("paint over the part of the image to repaint")
    page.get_by_role("button", name="Invert mask").click()  # all of it
    label(page, "Only masked").check()
    label(page, "Padding, pixels").fill("16")
    with page.expect_request("**/sdxl/v1/jobs/img2img") as sent:
        page.get_by_role("button", name="Generate").click()
    body = sent.value.post_data_json
    assert pixels_of(body["mask"]).min() == 255
    assert body["inpaint_full_res"] is True and body["inpaint_full_res_padding"] == 16
    expect(page.locator("#gallery img")).to_have_count(3, timeout=TIMEOUT)


def test_refiner_and_image_to_image(ui):
    page = ui.page
    label(page, "Prompt").fill(PROMPT)
    set_fields(page, Seed=5, Steps=4)
    _pick_refiner(page)
    set_fields(page, Switch_at=0.5)
    with page.expect_request("**/sdxl/v1/jobs/txt2img") as sent:
        generate(page)
    assert sent.value.post_data_json["refiner_checkpoint"].startswith("builtin-refiner")
    expect(page.locator("#viewer-info")).to_contain_text("Refiner: builtin-refiner")
    page.get_by_role("button", name="Send to Image to image").click()
    expect(page.get_by_role("tab", name="Image to image")).to_have_attribute("aria-selected", "true")
    expect(page.get_by_alt_text("The init image")).to_be_visible()
    expect(page.get_by_label("Mask: paint over the area to repaint")).to_be_hidden()  # img2img paints no mask
    set_fields(page, Denoising_strength=0.6, Switch_at=0.8, Steps=5)  # the base runs 0.4 .. 0.8 of the schedule
    with page.expect_request("**/sdxl/v1/jobs/img2img") as sent:
        generate(page)
    assert "mask" not in sent.value.post_data_json and sent.value.post_data_json["init_images"]
    expect(page.locator("#viewer-info")).to_contain_text("Denoising strength: 0.6")
    # a photo dropped on the init image's place: the size becomes the model's bucket of its aspect ratio
    drop_file(page, "#init-drop", "photo.png", png_with({}, size=(500, 300)))
    expect(label(page, "Width")).to_have_value("80")
    expect(label(page, "Height")).to_have_value("48")
    page.wait_for_function("document.getElementById('init-preview').naturalWidth === 500")


def _pick_refiner(page):
    select = label(page, "Refiner")
    title = next(t for t in select.locator("option").all_text_contents() if t.startswith("builtin-refiner"))
    select.select_option(title)


def test_a_phone_screen_scrolls_only_down_and_a_finger_paints_the_mask(browser, served):
    p = Page(browser, served[0], PHONE, has_touch=True, is_mobile=True)
    page = p.page
    try:
        for tab in ("Text to image", "Image to image", "Inpaint"):
            page.get_by_role("tab", name=tab).click()
            assert page.evaluate("document.scrollingElement.scrollWidth") <= PHONE["width"]
        page.get_by_role("tab", name="Text to image").click()
        generate_button = page.get_by_role("button", name="Generate")
        expect(generate_button).to_be_in_viewport()
        box = generate_button.bounding_box()
        assert box["y"] + box["height"] <= PHONE["height"] and box["x"] >= 0
        label(page, "Prompt").fill(PROMPT)
        label(page, "Negative prompt").fill("blurry")
        set_fields(page, Seed=1234, Steps=12, CFG_scale=6)
        choose(page, "Sampler", "Euler a")
        choose(page, "Schedule", "karras")
        generate(page)
        assert page.evaluate("document.scrollingElement.scrollWidth") <= PHONE["width"]
        # one column: the page went down to the progress, then on to the image
        expect(page.get_by_role("progressbar")).to_be_in_viewport()
        page.wait_for_function("Math.abs(document.getElementById('run').getBoundingClientRect().top) < 2")
        expect(page.locator("#viewer-img")).to_be_in_viewport(ratio=1)
        shoot(page, "ui-phone.png")
        page.get_by_role("button", name="Send to Inpaint").click()
        canvas = page.get_by_label("Mask: paint over the area to repaint")
        canvas.scroll_into_view_if_needed()
        assert page.evaluate("document.scrollingElement.scrollWidth") <= PHONE["width"]
        box = canvas.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
        page.touchscreen.tap(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        with page.expect_request("**/sdxl/v1/jobs/img2img") as sent:
            generate(page)
        mask = pixels_of(sent.value.post_data_json["mask"])[..., 0]
        assert mask[32, 32] == 255 and mask[0, 0] == 0
    finally:
        p.close()


def test_keyboard_only_tab_to_the_prompt_and_ctrl_enter(ui):
    page = ui.page
    for _ in range(20):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "prompt":
            break
    else:
        pytest.fail("Tab never reached the prompt")
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("", "none"), "the focused field shows no focus ring"
    page.keyboard.type("a blue square on a red background")
    page.keyboard.press("Tab")  # on to the negative prompt, then to the steps by their label
    label(page, "Steps").focus()
    page.keyboard.press("Control+a")
    page.keyboard.type("4")
    page.keyboard.press("Control+Enter")
    expect(page.get_by_alt_text("a blue square on a red background")).to_have_count(2, timeout=TIMEOUT)  # +viewer
    # the tabs follow the arrow keys
    page.get_by_role("tab", name="Text to image").focus()
    page.keyboard.press("ArrowRight")
    expect(page.get_by_role("tab", name="Image to image")).to_be_focused()
    expect(page.get_by_role("tab", name="Image to image")).to_have_attribute("aria-selected", "true")


@pytest.mark.parametrize("ui", [True], ids=["4xx responses expected"], indirect=True)
def test_server_errors_appear_next_to_their_field(ui):
    page = ui.page
    label(page, "Prompt").fill(PROMPT)
    cases = [("Steps", "0", "steps must be an integer in 1..5000, got 0"),
             ("Steps", "1.5", "steps: Input should be a valid integer"),  # a 422 from request validation
             ("Width", "65", "width must be a multiple of 8 (pixels), got 65")]
    for field, value, words in cases:
        set_fields(page, Steps=4, Width=64)
        label(page, field).fill(value)
        page.get_by_role("button", name="Generate").click()
        control = label(page, field)
        expect(control).to_have_attribute("aria-invalid", "true")
        error = page.locator(f"#{control.get_attribute('aria-describedby')}")
        expect(error).to_be_visible()
        expect(error).to_contain_text(words)
        below, above = error.bounding_box(), control.bounding_box()
        assert 0 <= below["y"] - (above["y"] + above["height"]) < 20, "the message is not next to its field"
        assert page.locator("#general-error").is_hidden()
    label(page, "Width").fill("64")  # typing clears the field's message
    expect(page.locator("#width-error")).to_be_hidden()
    # a model that is not listed: named in the model's own place
    page.evaluate("""() => { const o = document.createElement('option'); o.value = o.textContent = 'nope';
                             document.getElementById('model').append(o); }""")
    label(page, "Model").select_option("nope")
    set_fields(page, Steps=4)
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#model-error")).to_contain_text("'nope' is not one of the listed models")


def test_settings_persist_and_pickers_insert_into_the_prompt(ui):
    page = ui.page
    label(page, "Prompt").fill("a fox")
    label(page, "LoRA").select_option("pixel_style")
    expect(label(page, "Prompt")).to_have_value("a fox <lora:pixel_style:0.8>")
    label(page, "Embedding").select_option("goodvibes")
    expect(label(page, "Prompt")).to_have_value("a fox <lora:pixel_style:0.8> goodvibes")
    set_fields(page, Steps=33, CFG_scale=4.5)
    page.get_by_role("button", name="Swap width and height").click()
    label(page, "Size preset").select_option("72x56")
    page.get_by_role("button", name="Swap width and height").click()
    expect(label(page, "Width")).to_have_value("56")
    expect(label(page, "Height")).to_have_value("72")
    page.get_by_role("tab", name="Inpaint").click()
    ui.open()  # a later visit
    expect(label(page, "Prompt")).to_have_value("a fox <lora:pixel_style:0.8> goodvibes")
    expect(label(page, "Steps")).to_have_value("33")
    expect(label(page, "CFG scale")).to_have_value("4.5")
    expect(label(page, "Width")).to_have_value("56")
    expect(label(page, "Size preset")).to_have_value("56x72")
    expect(page.get_by_role("tab", name="Inpaint")).to_have_attribute("aria-selected", "true")


def test_size_presets_are_sdxls_buckets_scaled_as_the_trainer_scales_them(ui):
    from sdxl.training.data import buckets

    page = ui.page
    ours = page.evaluate("""async () => { const m = await import('/sizes.js');
                                          return [m.buckets(64, 8), m.buckets(1024, 64), m.buckets(512, 8)]; }""")
    assert [[tuple(b) for b in bs] for bs in ours] == [buckets(64, 8), buckets(1024, 64), buckets(512, 8)]
    presets = label(page, "Size preset").locator("option")
    assert presets.evaluate_all("os => os.map(o => o.value)")[1:] == [f"{w}x{h}" for w, h in buckets(64, 8)]
    # a full-size model: SDXL's own buckets, the size scaled to the same aspect ratio
    page.get_by_role("button", name="Swap width and height").click()
    label(page, "Size preset").select_option("56x72")
    page.evaluate("""() => { const o = document.createElement('option'); o.value = o.textContent = 'sd_xl_base_1.0';
                             document.getElementById('model').append(o); }""")
    label(page, "Model").select_option("sd_xl_base_1.0")
    expect(label(page, "Width")).to_have_value("896")
    expect(label(page, "Height")).to_have_value("1152")
    assert presets.evaluate_all("os => os.map(o => o.value)")[1:] == [f"{w}x{h}" for w, h in buckets(1024, 64)]


def test_size_presets_follow_the_native_size_the_server_lists_not_the_model_title(ui):
    from sdxl.training.data import buckets

    page = ui.page
    # a full-size fine-tune whose name starts with "builtin", listed as the server would list it
    def listing(route):
        models = route.fetch().json()
        models.append({**models[0], "title": "builtin_finetune [0123456789]", "model_name": "builtin_finetune",
                       "native_size": 1024})
        route.fulfill(json=models)

    page.route("**/sdapi/v1/sd-models", listing)
    ui.open()
    presets = label(page, "Size preset").locator("option")
    assert presets.evaluate_all("os => os.map(o => o.value)")[1:] == [f"{w}x{h}" for w, h in buckets(64, 8)]
    label(page, "Model").select_option("builtin_finetune [0123456789]")
    expect(label(page, "Width")).to_have_value("1024")
    assert presets.evaluate_all("os => os.map(o => o.value)")[1:] == [f"{w}x{h}" for w, h in buckets(1024, 64)]


def test_behind_the_servers_auth_the_page_and_its_event_stream_work_with_the_browsers_login(browser):
    config = ServerConfig(port=0, outputs=None, users={"ann": "s3cret"})
    with background(config) as (url, _):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url + "/", timeout=10)
        assert refused.value.code == 401
        p = Page(browser, url, DESKTOP, http_credentials={"username": "ann", "password": "s3cret"})
        try:
            label(p.page, "Prompt").fill(PROMPT)
            set_fields(p.page, Seed=2, Steps=3)
            with p.page.expect_response("**/sdxl/v1/jobs/txt2img") as submitted:
                generate(p.page)
            assert submitted.value.status == 200
            expect(p.page.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "100")
        finally:
            p.close()
