"""OpenAI's Images API (`sdxl.interfaces.server.openai_api`), through the real `openai` client against a server
on the built-in model (64x64, a few steps), plus its translation functions called without HTTP."""

from __future__ import annotations

import base64
import io
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import ExifTags, Image

from sdxl.interfaces.server import openai_api
from sdxl.interfaces.server.a1111_api import RequestError
from sdxl.interfaces.server.config import ServerConfig
from sdxl.interfaces.server.serve import background

PROMPT = "a red circle on a blue background"
KEY = "k"
FAST = {"steps": 4}  # sdxl's extra field: 4 steps of the built-in model take well under a second


@pytest.fixture(scope="module")
def served(one_thread, tmp_path_factory):
    outputs = tmp_path_factory.mktemp("outputs")
    with background(ServerConfig(port=0, api_keys=[KEY], outputs=outputs)) as (url, server):
        yield url, server


@pytest.fixture(scope="module")
def client(served):
    # no retries: a request that fails (a reset connection too) must fail the test, not be repeated
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0)


def pixels(b64: str, fmt: str = "PNG") -> np.ndarray:
    raw = base64.b64decode(b64)
    with Image.open(io.BytesIO(raw)) as im:
        assert im.format == fmt
        return np.asarray(im.convert("RGB"))


def png_file(image: Image.Image) -> tuple[str, bytes, str]:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return ("image.png", buffer.getvalue(), "image/png")


def noise_image(seed: int = 0, size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def hole_mask(size: int = 64, box: tuple[int, int, int, int] = (16, 16, 48, 48)) -> Image.Image:
    """OpenAI's mask: opaque everywhere, fully transparent (alpha 0) in `box`, where the image is to change."""
    mask = Image.new("RGBA", (size, size), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), box)
    return mask


# -- through the openai client


def test_models_lists_the_catalog(client):
    ids = [m.id for m in client.models.list()]
    assert "builtin" in ids
    model = client.models.retrieve("builtin")
    assert (model.id, model.object, model.owned_by) == ("builtin", "model", "sdxl")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_generations_make_n_different_pngs(client):
    r = client.images.generate(prompt=PROMPT, n=2, size="64x64", extra_body=FAST)
    assert len(r.data) == 2 and (r.size, r.output_format, r.background) == ("64x64", "png", "opaque")
    a, b = (pixels(d.b64_json) for d in r.data)
    assert a.shape == b.shape == (64, 64, 3)
    assert not np.array_equal(a, b)  # image 1 has seed + 1
    with Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))) as im:
        assert "Steps: 4" in im.text["parameters"]  # the infotext `sdxl generate` writes


def test_quality_sets_the_steps_and_auto_size_is_native(client):
    r = client.images.generate(prompt=PROMPT, quality="low")
    assert r.size == "64x64" and r.quality == "low"
    with Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))) as im:
        assert f"Steps: {openai_api.QUALITY_STEPS['low']}," in im.text["parameters"]


def test_a_seed_repeats_and_equals_the_library(client):
    import sdxl

    extra = {"seed": 1234, "steps": 4, "negative_prompt": "green", "sampler": "DPM++ 2M", "schedule": "karras"}
    first, again = (client.images.generate(prompt=PROMPT, size="64x64", extra_body=extra) for _ in range(2))
    a, b = pixels(first.data[0].b64_json), pixels(again.data[0].b64_json)
    assert np.array_equal(a, b)
    mine = sdxl.load("builtin").generate(PROMPT, negative_prompt="green", width=64, height=64, steps=4, seed=1234,
                                         sampler="dpmpp_2m", schedule="karras")[0]
    assert np.array_equal(a, np.asarray(mine.convert("RGB")))


def test_openai_model_names_are_the_current_model(client):
    """Apps written for OpenAI send its model names (often fixed): they get the server's current model."""
    extra = {"seed": 7, "steps": 4}
    plain = client.images.generate(prompt=PROMPT, size="64x64", extra_body=extra)
    for name in ("dall-e-3", "gpt-image-1"):
        r = client.images.generate(prompt=PROMPT, model=name, size="64x64", style="vivid", extra_body=extra)
        assert np.array_equal(pixels(r.data[0].b64_json), pixels(plain.data[0].b64_json)), name
    assert client.models.retrieve("dall-e-2").id == "builtin"


def test_url_format_serves_the_saved_image(served, client):
    url, server = served
    r = client.images.generate(prompt=PROMPT, size="64x64", response_format="url", extra_body=FAST)
    link = r.data[0].url
    assert link.startswith(url + "/v1/files/images/") and r.data[0].b64_json is None
    got = httpx.get(link, headers={"Authorization": f"Bearer {KEY}"})
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert got.content == (server.config.outputs / link.rsplit("/", 1)[1]).read_bytes()
    assert httpx.get(link).status_code == 401
    jpeg = client.images.generate(prompt=PROMPT, size="64x64", response_format="url", output_format="jpeg",
                                  extra_body=FAST)
    got = httpx.get(jpeg.data[0].url, headers={"Authorization": f"Bearer {KEY}"})
    assert got.headers["content-type"] == "image/jpeg" and got.content[:2] == b"\xff\xd8"
    for name in ("../x.png", "secret.png", "00000.gif"):
        assert httpx.get(f"{url}/v1/files/images/{name}", headers={"Authorization": f"Bearer {KEY}"}
                         ).status_code == 404


def test_jpeg_output_keeps_the_infotext(client):
    small = client.images.generate(prompt=PROMPT, size="64x64", output_format="jpeg", output_compression=20,
                                   extra_body={"seed": 5, "steps": 4})
    best = client.images.generate(prompt=PROMPT, size="64x64", output_format="jpeg",
                                  extra_body={"seed": 5, "steps": 4})
    assert small.output_format == "jpeg" and pixels(small.data[0].b64_json, "JPEG").shape == (64, 64, 3)
    assert len(base64.b64decode(small.data[0].b64_json)) < len(base64.b64decode(best.data[0].b64_json))
    with Image.open(io.BytesIO(base64.b64decode(best.data[0].b64_json))) as im:
        comment = im.getexif().get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment]
    assert comment.startswith(b"UNICODE\0") and "Seed: 5," in comment[8:].decode("utf-16-be")


def test_edit_with_a_mask_repaints_only_the_transparent_pixels(client):
    original = noise_image()
    r = client.images.edit(image=png_file(original), mask=png_file(hole_mask()), prompt=PROMPT,
                           extra_body={"steps": 4, "seed": 3})
    out, before = pixels(r.data[0].b64_json), np.asarray(original)
    inside = np.zeros((64, 64), bool)
    inside[16:48, 16:48] = True
    assert out.shape == (64, 64, 3) and r.size == "64x64"
    assert np.array_equal(out[~inside], before[~inside])
    assert np.abs(out[inside].astype(int) - before[inside]).mean() > 20  # noise became a picture


def test_edit_without_a_mask_redraws_the_image(client):
    original = noise_image(1)
    r = client.images.edit(image=png_file(original), prompt=PROMPT, size="64x64",
                           extra_body={"steps": 4, "strength": 0.9})
    out = pixels(r.data[0].b64_json)
    assert out.shape == (64, 64, 3) and np.abs(out.astype(int) - np.asarray(original)).mean() > 20


def test_edit_refusals(client):
    image = png_file(noise_image())
    with pytest.raises(openai.BadRequestError, match="alpha"):
        client.images.edit(image=image, mask=png_file(noise_image(2)), prompt=PROMPT)  # RGB: no alpha
    with pytest.raises(openai.BadRequestError, match="one image"):
        client.images.edit(image=[image, image], prompt=PROMPT)
    with pytest.raises(openai.BadRequestError, match="size"):
        client.images.edit(image=image, mask=png_file(hole_mask(32, (0, 0, 8, 8))), prompt=PROMPT)


def test_stream_sends_partial_images_then_the_final_one(client):
    events = list(client.images.generate(prompt=PROMPT, size="64x64", stream=True, partial_images=2,
                                         extra_body={"steps": 8, "seed": 9}))
    kinds = [e.type for e in events]
    partials = [e for e in events if e.type == "image_generation.partial_image"]
    assert kinds[-1] == "image_generation.completed" and kinds.count("image_generation.completed") == 1
    assert 1 <= len(partials) <= 2 and kinds[: len(partials)] == ["image_generation.partial_image"] * len(partials)
    assert [e.partial_image_index for e in partials] == list(range(len(partials)))
    assert all(pixels(e.b64_json).shape == (64, 64, 3) for e in events)
    plain = client.images.generate(prompt=PROMPT, size="64x64", extra_body={"steps": 8, "seed": 9})
    assert np.array_equal(pixels(events[-1].b64_json), pixels(plain.data[0].b64_json))
    assert events[-1].usage.total_tokens == 0 and events[-1].size == "64x64"


def test_stream_of_an_edit_sends_one_completed_event_per_image(client):
    events = list(client.images.edit(image=png_file(noise_image()), prompt=PROMPT, n=2, stream=True,
                                     extra_body=FAST))
    assert [e.type for e in events] == ["image_edit.completed"] * 2
    assert not np.array_equal(pixels(events[0].b64_json), pixels(events[1].b64_json))


def test_a_stream_whose_client_goes_away_cancels_its_job(served):
    url, server = served
    body = {"prompt": PROMPT, "size": "64x64", "stream": True, "steps": server.config.max_steps}  # many seconds
    with httpx.stream("POST", f"{url}/v1/images/generations", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for _ in range(200):
            running = server.queue.running()
            if running and running[0].step > 0:
                break
            time.sleep(0.02)
        job = running[0]
    assert job.wait(10) and job.state == "cancelled"


def test_a_failing_job_is_an_error_with_and_without_streaming(client):
    unknown = {"steps": 2, "loras": ["no-such-lora:0.5"]}  # found missing when the job runs, not before
    with pytest.raises(openai.BadRequestError, match="no-such-lora"):
        client.images.generate(prompt=PROMPT, size="64x64", extra_body=unknown)
    with pytest.raises(openai.APIError, match="no-such-lora"):  # the stream's `error` event
        list(client.images.generate(prompt=PROMPT, size="64x64", stream=True, extra_body=unknown))


def test_errors_in_openai_shape(served, client):
    # one client, no retries: each refusal must also leave the connection usable for the next request
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt=PROMPT, size="100x100")
    assert bad.value.param == "size" and bad.value.type == "invalid_request_error"
    for size in ("big", "0x64", "100000x100000"):
        with pytest.raises(openai.BadRequestError):
            client.images.generate(prompt=PROMPT, size=size)
    with pytest.raises(openai.BadRequestError, match="opaque"):
        client.images.generate(prompt=PROMPT, background="transparent")
    with pytest.raises(openai.BadRequestError, match="n must be"):
        client.images.generate(prompt=PROMPT, n=99)
    with pytest.raises(openai.BadRequestError, match="sed"):
        client.images.generate(prompt=PROMPT, extra_body={"sed": 1})  # a misspelt extra field is not ignored
    with pytest.raises(openai.NotFoundError) as missing:
        client.images.generate(prompt=PROMPT, model="sdxl-turbo-that-is-not-here")
    assert (missing.value.type, missing.value.param, missing.value.code) == ("invalid_request_error", "model",
                                                                             "model_not_found")
    wrong = openai.OpenAI(base_url=served[0] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.images.generate(prompt=PROMPT)


# -- the translation, without HTTP


def test_parse_size():
    assert openai_api.parse_size("1216x832") == (1216, 832)
    assert openai_api.parse_size("auto") is None and openai_api.parse_size(None) is None
    for text in ("1000x1001", "64", "64x64x64", "-64x64"):
        with pytest.raises(RequestError):
            openai_api.parse_size(text)


def test_lora_entries():
    entries = openai_api.lora_entries(["a:0.5", {"name": "b", "weight": 2}, "c"])
    assert entries == [("a", 0.5, 0.5), ("b", 2.0, 2.0), ("c", 1.0, 1.0)]
    for bad in (["x:y"], ["../evil:1"], ["dir/file"]):
        with pytest.raises(RequestError):
            openai_api.lora_entries(bad)


def test_partial_steps_are_spread_before_the_last():
    assert openai_api.partial_steps(2, 9) == [3, 6]
    assert openai_api.partial_steps(3, 40) == [10, 20, 30]
    assert openai_api.partial_steps(3, 2) == [1] and openai_api.partial_steps(1, 1) == []


def test_form_fields_read_the_libraries_encoding():
    items = [("prompt", "p"), ("n", "2"), ("loras[][name]", "a"), ("loras[][weight]", "0.5"),
             ("loras[][name]", "b"), ("loras[][weight]", "1")]
    fields = openai_api.form_fields(items)
    assert fields["loras"] == [{"name": "a", "weight": "0.5"}, {"name": "b", "weight": "1"}]
    body = openai_api.parse_edit(fields)
    assert body.n == 2 and openai_api.lora_entries(body.loras) == [("a", 0.5, 0.5), ("b", 1.0, 1.0)]
    assert openai_api.parse_edit({"prompt": "p", "loras": "a:0.5,b"}).loras == ["a:0.5", "b"]


def test_specs_follow_the_request(served):
    _, server = served
    spec = openai_api.generation_spec(openai_api.Generate(prompt="p", quality="high", n=3, seed=7), server)
    call = spec.calls[0]
    assert (spec.kind, spec.model.name, len(spec.calls)) == ("generations", "builtin", 1)
    assert (call.options.steps, call.options.batch, call.options.seed) == (40, 3, 7)
    assert (call.options.width, call.options.height) == (64, 64)
    edit = openai_api.edit_spec(openai_api.Edit(prompt="p"), png_file(noise_image(size=72))[1], None, server)
    assert edit.calls[0].options.strength == openai_api.EDIT_STRENGTH and edit.calls[0].options.width == 72
    saved, server.config.outputs = server.config.outputs, None
    try:
        with pytest.raises(RequestError, match="no-save"):
            openai_api.generation_spec(openai_api.Generate(prompt="p", response_format="url"), server)
    finally:
        server.config.outputs = saved
