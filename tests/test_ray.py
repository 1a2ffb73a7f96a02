"""`sdxl.interfaces.ray_app` on a local Ray cluster: two GPU replicas (Ray is told of two GPUs; they run on the CPU with
the built-in model), driven by AUTOMATIC1111's and OpenAI's own client libraries, against the single-machine server
(`serve.background`) for the images. Slow (~75 s on 2 cores): starting Ray, Serve and their actors is ~20 s of it,
the autoscaling test (a second app, a replica started and stopped) ~30 s."""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from sdxl import builtin
from sdxl.interfaces.server.config import ServerConfig
from sdxl.interfaces.server.serve import background, free_port

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
webuiapi = pytest.importorskip("webuiapi")
openai = pytest.importorskip("openai")
requests = pytest.importorskip("requests")

from sdxl.interfaces import ray_app  # after the skips: it needs Ray

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::sdxl.options.ResolutionWarning"),
              pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning")]

PROMPT = "a red circle on a blue background"
SMALL = {"width": 64, "height": 64, "steps": 6, "cfg_scale": 3.0}
LONG = 400  # steps: a job that runs for many seconds (~0.05 s a step), so it can be watched and stopped


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    (root / "models").mkdir()
    shutil.copy(builtin.FILES["builtin"], root / "models" / "mybase.safetensors")  # a second model to route
    return root


FAST_METRICS = {f"RAY_SERVE_{side}_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.25" for side in ("HANDLE", "REPLICA")}


@pytest.fixture(scope="module")
def config(folders) -> ServerConfig:
    return ServerConfig(models_dirs=[folders / "models"], outputs=folders / "outputs", max_steps=LONG)


@pytest.fixture(scope="module")
def cluster(config):
    with pytest.MonkeyPatch.context() as env:  # the local cluster's processes inherit this process's environment
        for name, value in FAST_METRICS.items():
            env.setenv(name, value)  # load reported every 0.25 s, so that the autoscaling test takes seconds
        ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(ray_app.application(config, ray_app.ClusterConfig(min_replicas=2, max_replicas=2)), name="sdxl",
              route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def single(folders, one_thread):
    # one thread, as each replica (Ray sets OMP_NUM_THREADS to a replica's one CPU): CPU kernels may sum in another
    # order on another number of threads, which can move a pixel by one level
    with background(ServerConfig(port=0, models_dirs=[folders / "models"], outputs=None, max_steps=LONG)) as (url, _):
        yield url


def a1111(url: str) -> webuiapi.WebUIApi:
    host, port = url.split("//")[1].split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=SMALL["steps"])


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def status(url: str) -> dict:
    return requests.get(f"{url}/sdxl/v1/cluster", timeout=30).json()


def wait_for(predicate, seconds: float = 60, what: str = "the condition"):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {seconds} s")


def test_model_key_names_models_and_loras_in_any_order():
    from sdxl.interfaces.server.catalog import Model
    from sdxl.interfaces.server.jobs import Call, Spec
    from sdxl.options import GenerationOptions

    base = Model("base", builtin.FILES["builtin"], "builtin")
    one = GenerationOptions(prompt="a cat <lora:shiny:0.5> <lora:dull>", loras=(("x", 1.0, 0.5),))
    two = GenerationOptions(prompt="<lora:dull> a dog <lora:shiny:0.5>", loras=(("x", 1.0, 0.5),))
    key = ray_app.model_key(Spec("txt2img", base, [Call({}, one)]))
    assert key == ray_app.model_key(Spec("txt2img", base, [Call({}, two)])) == "base|||dull:1:1,shiny:0.5:0.5,x:1:0.5"
    assert ray_app.model_key(Spec("warm-up", base, [])) == "base|||"


def test_build_app_reads_serve_run_arguments():
    assert ray_app.build_app({"min_replicas": "0", "max_replicas": "3", "metrics_interval_s": "2", "model": "builtin"})
    with pytest.raises(ValueError, match="unknown arguments: colour"):
        ray_app.build_app({"colour": "red"})
    with pytest.raises(ValueError, match="min"):
        ray_app.ClusterConfig(min_replicas=3, max_replicas=2)
    assert ray_app.ClusterConfig(max_replicas=4, target_ongoing_requests=2).dispatchers == 8


def test_both_apis_under_concurrent_load_use_both_replicas_for_the_single_machine_images(cluster, single, folders):
    client = openai.OpenAI(base_url=cluster + "/v1", api_key="unused", max_retries=0)
    with ThreadPoolExecutor(8) as pool:
        a1111_jobs = [pool.submit(a1111(cluster).txt2img, prompt=PROMPT, seed=100 + i, **SMALL) for i in range(6)]
        openai_jobs = [pool.submit(client.images.generate, prompt=PROMPT, size="64x64", n=1, response_format="b64_json",
                                   extra_body={"seed": 200 + i, "steps": SMALL["steps"]}) for i in range(2)]
        results = [j.result() for j in a1111_jobs]
        generated = [j.result() for j in openai_jobs]
    assert [r.info["all_seeds"] for r in results] == [[100 + i] for i in range(6)]
    now = status(cluster)
    assert len(now["replicas"]) == 2 and all(r["jobs"] >= 1 for r in now["replicas"])  # both did work
    assert sum(r["images"] for r in now["replicas"]) >= 8 and now["retried"] == 0
    assert len(list((folders / "outputs").rglob("*.png"))) >= 8  # saved once each, by the ingress
    # the single machine's images for the same seeds, whichever replica made them
    for i in (0, 5):
        alone = a1111(single).txt2img(prompt=PROMPT, seed=100 + i, **SMALL).image
        assert np.array_equal(pixels(results[i].image), pixels(alone))
    alone = openai.OpenAI(base_url=single + "/v1", api_key="unused", max_retries=0).images.generate(
        prompt=PROMPT, size="64x64", n=1, response_format="b64_json", extra_body={"seed": 201, "steps": SMALL["steps"]})
    assert np.array_equal(pixels(Image.open(io.BytesIO(base64.b64decode(generated[1].data[0].b64_json)))),
                          pixels(Image.open(io.BytesIO(base64.b64decode(alone.data[0].b64_json)))))


def test_progress_previews_and_interrupt_reach_jobs_on_either_replica(cluster):
    body = {"prompt": PROMPT, "seed": 7, "width": 64, "height": 64, "steps": LONG, "cfg_scale": 3.0}
    ids = [requests.post(f"{cluster}/sdxl/v1/jobs/txt2img", json=dict(body, seed=7 + i), timeout=30).json()["id"]
           for i in range(2)]

    def job(job_id: str) -> dict:
        return requests.get(f"{cluster}/sdxl/v1/jobs/{job_id}", timeout=30).json()

    wait_for(lambda: all(job(i)["step"] >= 3 for i in ids), what="both jobs running")
    running = status(cluster)["running"]
    assert set(running) == set(ids) and len(set(running.values())) == 2  # one job on each replica
    progress = a1111(cluster).get_progress()
    assert progress["state"]["sampling_steps"] == LONG and progress["state"]["sampling_step"] >= 3
    assert 0 < progress["progress"] < 1 and progress["current_task"] in ids
    # previews are made on the replica when asked for: one comes within a few polls, for either job
    wait_for(lambda: a1111(cluster).get_progress()["current_image"], 10, "a preview in /progress")
    wait_for(lambda: requests.get(f"{cluster}/sdxl/v1/jobs/{ids[1]}/preview", timeout=30).status_code == 200, 10,
             "a preview of the second job")
    requests.post(f"{cluster}/sdxl/v1/jobs/{ids[1]}/interrupt", timeout=30)  # one job, on its own replica
    second = requests.get(f"{cluster}/sdxl/v1/jobs/{ids[1]}/result", timeout=60).json()
    assert len(second["images"]) == 1 and json.loads(second["info"])["interrupted"] is True
    first = job(ids[0])
    assert first["state"] == "running" and first["step"] < LONG and not first["interrupted"]
    a1111(cluster).interrupt()  # A1111's: every running job
    result = requests.get(f"{cluster}/sdxl/v1/jobs/{ids[0]}/result", timeout=60).json()
    assert json.loads(result["info"])["interrupted"] is True and len(result["images"]) == 1
    assert job(ids[0])["step"] < LONG
    idle = a1111(cluster).get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0


def test_openai_stream_sends_partial_images_made_on_a_replica(cluster):
    client = openai.OpenAI(base_url=cluster + "/v1", api_key="unused", max_retries=0)
    events = list(client.images.generate(prompt=PROMPT, size="64x64", stream=True, partial_images=2,
                                         extra_body={"seed": 3, "steps": 40}))
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]


def test_a_client_that_goes_away_cancels_its_job_on_the_replica(cluster):
    httpx = pytest.importorskip("httpx")
    body = {"prompt": PROMPT, "size": "64x64", "stream": True, "steps": LONG}
    with httpx.stream("POST", f"{cluster}/v1/images/generations", json=body, timeout=60) as r:
        assert r.status_code == 200
        job_id = next(iter(wait_for(lambda: status(cluster)["running"], what="the job running")))
    wait_for(lambda: job_id not in status(cluster)["running"], 30, "the replica stopping the job")
    assert next(r["state"] for r in status(cluster)["recent"] if r["id"] == job_id) == "cancelled"


def test_requests_go_to_the_replica_that_has_their_model(cluster):
    def make(model: str) -> str:
        body = dict(prompt=PROMPT, seed=1, **SMALL, override_settings={"sd_model_checkpoint": model})
        job_id = requests.post(f"{cluster}/sdxl/v1/jobs/txt2img", json=body, timeout=30).json()["id"]
        requests.get(f"{cluster}/sdxl/v1/jobs/{job_id}/result", timeout=60).raise_for_status()
        return next(r["replica"] for r in status(cluster)["recent"] if r["id"] == job_id)

    loaded = make("mybase")  # no replica has it: one loads it (and from then on tells Serve's router so)
    time.sleep(2)  # the replica's model list reaches the router with its next metrics report
    assert [make("mybase") for _ in range(3)] == [loaded] * 3
    assert make("builtin") != loaded  # the other replica still has the built-in model


def test_a_job_whose_replica_dies_is_retried_and_returns_the_single_machine_image(cluster, single):
    settings = {"prompt": PROMPT, "seed": 42, "width": 64, "height": 64, "steps": 60, "cfg_scale": 3.0}
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=a1111(cluster).txt2img(**settings)))
    thread.start()

    def started() -> dict | None:
        running = status(cluster)["running"]
        return running if running and a1111(cluster).get_progress()["state"]["sampling_step"] >= 5 else None

    (job_id, replica), = wait_for(started, what="the job running").items()
    ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=True)
    thread.join(120)
    after = status(cluster)
    assert after["retried"] >= 1
    assert next(r["replica"] for r in after["recent"] if r["id"] == job_id) != replica
    alone = a1111(single).txt2img(**settings).image
    assert result["r"].info["all_seeds"] == [42] and np.array_equal(pixels(result["r"].image), pixels(alone))


def test_replicas_scale_with_queued_jobs_between_min_and_max(cluster, config):
    serve.delete("sdxl")  # its two replicas hold the cluster's two GPUs
    scaling = ray_app.ClusterConfig(min_replicas=1, max_replicas=2, upscale_delay_s=0.5, downscale_delay_s=1,
                                    look_back_period_s=1, metrics_interval_s=0.25)
    serve.run(ray_app.application(config, scaling), name="scaling", route_prefix="/")

    def replicas() -> dict:
        return serve.status().applications["scaling"].deployments["SdxlReplica"].replica_states

    assert replicas() == {"RUNNING": 1}
    # ~6 s each on 2 idle cores: queued work outlasting a new replica's start (with 4 jobs of 150 steps an idle
    # machine drained the queue first, and the replica went again before it was seen running)
    body = {"prompt": PROMPT, "width": 64, "height": 64, "steps": 300, "cfg_scale": 3.0}
    ids = [requests.post(f"{cluster}/sdxl/v1/jobs/txt2img", json=dict(body, seed=i), timeout=30).json()["id"]
           for i in range(6)]
    wait_for(lambda: replicas() == {"RUNNING": 2}, 60, "a second replica for the queued jobs")
    for job_id in ids:
        requests.get(f"{cluster}/sdxl/v1/jobs/{job_id}/result", timeout=120).raise_for_status()
    assert len({r["replica"] for r in status(cluster)["recent"]}) == 2  # the new replica took jobs from the queue
    wait_for(lambda: replicas() == {"RUNNING": 1}, 60, "scaling back down to min_replicas when idle")
