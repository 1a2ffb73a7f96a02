"""`sdxl serve` under load: many clients at once (AUTOMATIC1111's `webuiapi` and the `openai` library side by side),
cancelling a job mid-run, clients that go away, and a soak of 1,000 small requests with the server's memory flat.
The server runs in this process (uvicorn in a thread, the built-in model), so its RSS is ours."""

from __future__ import annotations

import base64
import io
import os
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from sdxl.interfaces.server.config import ServerConfig
from sdxl.interfaces.server.jobs import CANCELLED, QUEUED, RUNNING
from sdxl.interfaces.server.serve import background

requests = pytest.importorskip("requests")
webuiapi = pytest.importorskip("webuiapi")
openai = pytest.importorskip("openai")
pytestmark = pytest.mark.filterwarnings("ignore::sdxl.options.ResolutionWarning")

CLIENTS = 16
SAMPLERS = ["Euler", "Euler a", "DPM++ 2M", "UniPC"]  # an ancestral one too: its noise must follow the seed alone


@pytest.fixture(scope="module")
def served(one_thread):
    with background(ServerConfig(port=0, outputs=None, max_steps=2000)) as (url, server):
        yield url, server


def pixels(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def a1111_body(i: int) -> dict:
    return dict(prompt=f"a red circle number {i}", seed=1000 + i, width=64, height=64, steps=3 + i % 2,
                cfg_scale=3.0, sampler_name=SAMPLERS[i % len(SAMPLERS)], negative_prompt="blue" if i % 3 else "")


def webui(url: str) -> webuiapi.WebUIApi:
    host, port = url.split("//")[1].split(":")
    return webuiapi.WebUIApi(host=host, port=int(port))


def webui_txt2img(url: str, body: dict) -> np.ndarray:
    """One request through AUTOMATIC1111's own client library (a fresh client per thread, as each user has one)."""
    result = webui(url).txt2img(**body)
    assert len(result.images) == 1 and result.info["all_seeds"] == [body["seed"]]
    return np.asarray(result.images[0].convert("RGB"))


def openai_generate(url: str, i: int) -> np.ndarray:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    r = client.images.generate(prompt=f"a blue square number {i}", size="64x64",
                               extra_body={"seed": 2000 + i, "steps": 3, "sampler": "euler", "cfg_scale": 3.0})
    assert len(r.data) == 1
    return pixels(r.data[0].b64_json)


def concurrently(calls: list) -> list:
    """Every call in its own thread, all started together; their results in order (a failure raises)."""
    start = threading.Barrier(len(calls))

    def run(call):
        start.wait(60)
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result(timeout=600) for f in [pool.submit(run, call) for call in calls]]


def test_16_concurrent_clients_get_the_images_they_get_alone(served):
    url, server = served
    bodies = [a1111_body(i) for i in range(CLIENTS)]
    alone = [webui_txt2img(url, body) for body in bodies]
    assert len({a.tobytes() for a in alone}) == CLIENTS  # distinct requests, distinct images
    deepest = []
    watching = threading.Event()

    def watch():  # how many jobs waited at once: the clients did overlap
        while not watching.is_set():
            deepest.append(len(server.queue.queued()))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        together = concurrently([lambda body=body: webui_txt2img(url, body) for body in bodies])
    finally:
        watching.set()
        watcher.join()
    assert max(deepest) >= CLIENTS // 2
    for i, (a, b) in enumerate(zip(alone, together, strict=True)):
        assert np.array_equal(a, b), f"request {i} ({bodies[i]}) differs when sent with {CLIENTS - 1} others"


def test_openai_and_a1111_clients_at_once_get_the_images_they_get_alone(served):
    url, _ = served
    calls = []
    for i in range(8):
        calls.append(lambda i=i: openai_generate(url, i))
        calls.append(lambda i=i: webui_txt2img(url, a1111_body(100 + i)))
    alone = [call() for call in calls]
    together = concurrently(calls)
    for i, (a, b) in enumerate(zip(alone, together, strict=True)):
        assert np.array_equal(a, b), f"call {i} ({'openai' if i % 2 == 0 else 'a1111'}) differs under load"


# -- stopping jobs


LONG = dict(prompt="a long job", seed=7, width=32, height=32, steps=2000, cfg_scale=1.0)
SMALL = dict(prompt="a small job", seed=8, width=32, height=32, steps=2, cfg_scale=1.0)


def wait_for(condition, seconds: float, what: str) -> float:
    """Seconds until condition() held; fails after `seconds`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < seconds, f"{what}: not within {seconds} s"
        time.sleep(0.02)
    return time.monotonic() - start


def job_status(url: str, job_id: str) -> dict:
    return requests.get(f"{url}/sdxl/v1/jobs/{job_id}", timeout=30).json()


def submit_long(url: str) -> str:
    job_id = requests.post(f"{url}/sdxl/v1/jobs/txt2img", json=LONG, timeout=30).json()["id"]
    wait_for(lambda: job_status(url, job_id)["step"] >= 3, 60, "the long job's first steps")
    return job_id


def metric(url: str, name: str) -> float:
    text = requests.get(f"{url}/metrics", timeout=30).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_cancel_mid_run_stops_the_job_between_steps_and_the_next_request_is_served(served):
    url, _ = served
    job_id = submit_long(url)
    answer = requests.post(f"{url}/sdxl/v1/jobs/{job_id}/cancel", timeout=30).json()
    assert answer["id"] == job_id
    took = wait_for(lambda: job_status(url, job_id)["state"] == CANCELLED, 5, "the cancelled job's end")
    status = job_status(url, job_id)
    assert 3 <= status["step"] < LONG["steps"] and status["images"] == 0, status
    assert took < 5
    r = requests.post(f"{url}/sdapi/v1/txt2img", json=SMALL, timeout=120)
    assert r.status_code == 200 and len(r.json()["images"]) == 1
    assert metric(url, "sdxl_running_jobs") == 0 and metric(url, "sdxl_queue_length") == 0


def go_away_after(url: str, body: dict, seconds: float) -> None:
    """POST body to /sdapi/v1/txt2img on a raw socket and close it, unanswered, after `seconds`."""
    import json

    host, port = url.split("//")[1].split(":")
    payload = json.dumps(body).encode()
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        time.sleep(seconds)


@pytest.mark.parametrize("where", ["queued", "running"])
def test_a_client_that_goes_away_has_its_job_cancelled(served, where):
    url, server = served

    def live() -> list:
        return server.queue.queued() + server.queue.running()

    before = {job.id for job in live()}
    try:
        long_id = submit_long(url) if where == "queued" else None  # keeps the worker busy: the client's job waits
        client = threading.Thread(target=go_away_after, args=(url, dict(LONG, seed=9), 1.5))
        client.start()
        state = QUEUED if where == "queued" else RUNNING
        wait_for(lambda: any(j.id != long_id and j.id not in before and j.state == state for j in live()), 10,
                 f"the client's job {state}")
        job = next(j for j in live() if j.id != long_id and j.id not in before)
        client.join()
        took = wait_for(lambda: job.state == CANCELLED, 5, "the job of the client that went away cancelled")
        assert took < 5 and not job.outputs
        if long_id is not None:  # the other job ran on, untouched
            assert job_status(url, long_id)["state"] == RUNNING
    finally:  # whatever happened, no 2000-step job is left for the next test to wait behind
        for job in live():
            if job.id not in before:
                server.queue.cancel(job)
        wait_for(lambda: not any(j.id not in before for j in live()), 10, "this test's jobs cancelled")
    assert metric(url, "sdxl_queue_length") == 0
    r = requests.post(f"{url}/sdapi/v1/txt2img", json=SMALL, timeout=120)
    assert r.status_code == 200


# -- a soak


SOAK = 1000
WARM_UP = 100
SOAK_CLIENTS = 4


def rss_kib() -> int:
    """This process's resident set (the server runs in it): VmRSS from /proc/self/status."""
    with open("/proc/self/status") as f:
        return int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M).group(1))


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def soak_request(session: requests.Session, url: str, i: int) -> None:
    """A small request, by turns through each route that makes images (A1111, OpenAI, sdxl's jobs)."""
    kind = i % 4
    if kind in (0, 1):
        r = session.post(f"{url}/sdapi/v1/txt2img", json=dict(prompt=f"soak {i}", seed=i, width=32, height=32,
                                                               steps=1, cfg_scale=1.0), timeout=120)
        assert r.status_code == 200 and len(r.json()["images"]) == 1, r.text[:300]
    elif kind == 2:
        r = session.post(f"{url}/v1/images/generations", json=dict(prompt=f"soak {i}", size="32x32", seed=i, steps=1,
                                                                   cfg_scale=1.0), timeout=120)
        assert r.status_code == 200 and len(r.json()["data"]) == 1, r.text[:300]
    else:
        job = session.post(f"{url}/sdxl/v1/jobs/txt2img", json=dict(prompt=f"soak {i}", seed=i, width=32, height=32,
                                                                     steps=1, cfg_scale=1.0), timeout=120).json()
        r = session.get(f"{url}/sdxl/v1/jobs/{job['id']}/result", timeout=120)
        assert r.status_code == 200 and len(r.json()["images"]) == 1, r.text[:300]


@pytest.mark.slow  # 29-63 s on the 2-core development machine, depending on its other load
def test_a_soak_of_1000_small_requests_keeps_memory_flat(served):
    """1,000 requests of one 32x32 image at 1 step, from 4 keep-alive clients: after a warm-up of 100 the
    server's RSS stays within 5%, and its threads and open files stay where they were (no leaked connections)."""
    url, _ = served
    sessions = [requests.Session() for _ in range(SOAK_CLIENTS)]

    def run(first: int, last: int) -> None:
        def client(k: int) -> None:
            for i in range(first + k, last, SOAK_CLIENTS):
                soak_request(sessions[k], url, i)

        with ThreadPoolExecutor(SOAK_CLIENTS) as pool:
            for f in [pool.submit(client, k) for k in range(SOAK_CLIENTS)]:
                f.result(timeout=600)

    start = time.monotonic()
    run(0, WARM_UP)
    base_rss, base_threads, base_files = rss_kib(), threading.active_count(), open_files()
    samples = []
    for first in range(WARM_UP, SOAK, 100):
        run(first, first + 100)
        samples.append(rss_kib())
    for s in sessions:
        s.close()
    took = time.monotonic() - start
    worst = max(samples, key=lambda kib: abs(kib - base_rss))
    assert abs(worst - base_rss) <= 0.05 * base_rss, \
        f"RSS after warm-up {base_rss} KiB, then every 100 requests {samples} KiB ({took:.0f} s)"
    assert threading.active_count() <= base_threads and open_files() <= base_files + 2
    assert metric(url, "sdxl_queue_length") == 0 and metric(url, "sdxl_running_jobs") == 0
    print(f"soak: {SOAK} requests in {took:.1f} s; RSS {base_rss} KiB after {WARM_UP}, then {samples}")
