"""`sdxl serve` on a Ray cluster (Ray Serve): the same routes, queue and translators, each job run on a GPU replica.

    serve run sdxl.interfaces.ray_app:app                    # the built-in model, one replica
    serve run sdxl.interfaces.ray_app:build_app model=M models_dir=DIR min_replicas=1 max_replicas=8
    sdxl serve --ray auto --max-replicas 8 ...               # `serve_on_ray`

Two deployments (docs/scaling.md has the picture and the capacity model):
- `Ingress`, one replica on a CPU: the single-machine server's FastAPI app (`server.app.create_app`) over a
  `ClusterServer`, which is `state.Server` with its worker threads replaced by dispatchers. A dispatcher takes a job
  from the same `JobQueue` and sends its `Spec` to a replica through a streaming deployment handle, keyed by the
  job's models (`model_key`: Ray Serve's model multiplexing routes it to a replica that has them loaded, when one
  exists). It copies the replica's progress, previews and outputs into the ingress's `Job`, so every route reads
  progress, previews and interrupts exactly as on one machine.
- `SdxlReplica`, one per GPU (`num_gpus=1`), autoscaled on its running plus queued jobs: a `state.Server` of one
  (never started) worker whose loop body, `work.Runner.run`, is driven by Ray requests instead of the queue.
The ingress's flags for a running job (cancel, interrupt, skip, "a preview, please") reach its replica through a
`JobBoard` actor that the replica reads between steps. A replica lost mid-job (`RayActorError`) costs a retry: the
dispatcher sends the same Spec (same seeds: the same images) again, and the client sees one answer. The ingress is
one process, as `sdxl serve` is: losing it loses its queue (Serve starts a new one).

Model files (--model, --models-dir, LoRA and embedding folders) must be at the same paths on every node, and sdxl
installed on each (the same environment, or a Ray runtime_env).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import ray
    from ray import serve
except ImportError as e:  # the optional extra: everything else in sdxl works without it
    raise ImportError("sdxl's Ray Serve application needs Ray: pip install 'sdxl[ray]'") from e

from ..prompts import extract_networks
from . import errors
from .server.a1111_api import RequestError
from .server.config import ServerConfig
from .server.jobs import CANCELLED, FAILED, QUEUED, RUNNING, Job, Spec, Worker
from .server.state import Server

log = logging.getLogger("sdxl.server")

FLAGS = ("cancel", "interrupt", "skip")  # Job.<name>_flag, relayed to the job's replica
ON_REPLICA = "on the replica"  # Job.latest's prediction on the ingress: the tensor stays where it was made
TICK = 0.05  # seconds between the replica's progress reports (a GPU step of 1024x1024 is ~0.05 s)
POLL_TICKS = 2  # the job board is read every 2 ticks: an interrupt lands within ~0.1 s plus one step
RETRY_SECONDS = 1.0  # before a job goes out again: Serve's router takes a moment to drop a dead replica
INGRESS_REQUESTS = 1000  # open HTTP requests on the ingress: each waits (or streams) for its whole job
# a replica's process or node gone mid-job (ObjectLostError: an event it made went down with its node)
LOST = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)
KEEP_RECENT = 256  # finished jobs listed by /sdxl/v1/cluster (their replica and times: the capacity model's input)


@dataclass
class ClusterConfig:
    """How many GPU replicas, and how they scale. Import-light: Ray reads it only in `application`."""

    min_replicas: int = 1  # kept up when idle (0: scale to zero, and the first request waits for a model load)
    max_replicas: int = 1  # GPUs used at most
    target_ongoing_requests: float = 1.0  # jobs per replica (running + waiting) the autoscaler aims at: 1 GPU, 1 job
    gpus_per_replica: float = 1.0  # one pipeline per GPU (0.5: two replicas share one, if its memory holds both)
    cpus_per_replica: float = 1.0
    ingress_cpus: float = 1.0
    retries: int = 3  # times a job goes out again after losing its replica
    upscale_delay_s: float = 10.0  # a burst shorter than this is absorbed by the queue, not by a cold replica
    downscale_delay_s: float = 600.0  # Ray Serve's default: an idle GPU is given back after 10 minutes
    look_back_period_s: float = 30.0  # Ray Serve's default: the load is averaged over this window
    # how often the load is reported (None: Ray Serve's 10 s). Ray marks the field deprecated in favour of the
    # environment variables RAY_SERVE_{HANDLE,REPLICA}_AUTOSCALING_METRIC_PUSH_INTERVAL_S of the cluster's processes;
    # in Ray 2.60 reacting within seconds takes both
    metrics_interval_s: float | None = None
    app_name: str = "sdxl"

    def __post_init__(self):
        if self.max_replicas < 1 or not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"replicas: expected 0 <= min ({self.min_replicas}) <= max ({self.max_replicas}), max >= 1")

    @property
    def dispatchers(self) -> int:
        """Jobs handed to Ray at once: enough for every replica at its target, so that the autoscaler sees the
        load up to max_replicas; the rest wait in the server's own queue (and show their position there)."""
        return max(1, round(self.max_replicas * self.target_ongoing_requests))

    def autoscaling(self) -> dict[str, Any]:
        config = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                  "initial_replicas": max(self.min_replicas, 1), "target_ongoing_requests": self.target_ongoing_requests,
                  "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
                  "look_back_period_s": self.look_back_period_s}
        if self.metrics_interval_s is not None:
            config["metrics_interval_s"] = self.metrics_interval_s
        return config


def model_key(spec: Spec) -> str:
    """What a replica must have loaded for the job: its models and LoRA set (the multiplexed model id)."""
    o = spec.calls[0].options if spec.calls else None
    loras = [f"{name}:{u:g}:{t:g}" for name, u, t in (o.loras if o else ())]
    for text in (o.prompt, o.prompt_2, o.negative_prompt, o.negative_prompt_2) if o else ():
        try:
            loras += [f"{n.name}:{n.unet:g}:{n.te:g}" for n in extract_networks(text or "")[1] if n.kind == "lora"]
        except ValueError:
            pass  # a malformed tag: the replica reports it, as on one machine
    parts = (spec.model.name, spec.refiner.name if spec.refiner else "", spec.vae.name if spec.vae else "")
    return "|".join((*parts, ",".join(sorted(loras))))


def portable(error: BaseException | None) -> BaseException | None:
    """The job's error as it can travel back to the ingress (the API statuses are decided there from its class)."""
    if error is None:
        return None
    try:
        ray.cloudpickle.loads(ray.cloudpickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 (an error that cannot be pickled keeps its message and broad class)
        return (ValueError if isinstance(error, ValueError) else RuntimeError)(errors.one_line(error))


# -- the job board: the ingress's flags for running jobs, read by the replicas


@ray.remote(num_cpus=0)
class JobBoard:
    """Flags per job id. cancel and interrupt hold until the job ends; skip and preview are taken once each."""

    STICKY = frozenset({"cancel", "interrupt"})

    def __init__(self):
        self.flags: dict[str, set[str]] = {}

    def set(self, job_id: str, flag: str) -> None:
        self.flags.setdefault(job_id, set()).add(flag)

    def take(self, job_id: str) -> set[str]:
        flags = self.flags.pop(job_id, set())
        if flags & self.STICKY:
            self.flags[job_id] = set(flags & self.STICKY)
        return flags

    def forget(self, job_id: str) -> None:
        self.flags.pop(job_id, None)


class Relayed(threading.Event):
    """A job's flag on the ingress that also tells the job board, where the job's replica reads it."""

    def __init__(self, board, job_id: str, name: str):
        super().__init__()
        self.board, self.job_id, self.name = board, job_id, name

    def set(self) -> None:
        super().set()
        self.board.set.remote(self.job_id, self.name)


# -- the ingress: the single-machine server, its workers dispatching to replicas


class ClusterServer(Server):
    """`state.Server` whose workers are dispatchers: each job runs on a replica, its state copied back here."""

    def __init__(self, config: ServerConfig, given: list, cluster: ClusterConfig, replicas, board):
        super().__init__(config, given)
        self.cluster, self.replicas, self.board = cluster, replicas, board
        self.workers = [Worker(f"dispatch-{i}", "ray", self.queue, self.dispatch) for i in range(cluster.dispatchers)]
        self._lock = threading.Lock()
        self.jobs_by: Counter = Counter()  # replica -> jobs finished there
        self.images_by: Counter = Counter()
        self.running: dict[str, str] = {}  # job id -> the replica running it
        self.recent: deque[dict[str, Any]] = deque(maxlen=KEEP_RECENT)
        self.retried = 0

    def submit(self, spec: Spec) -> Job:
        job = Job(spec)
        for name in FLAGS:
            setattr(job, f"{name}_flag", Relayed(self.board, job.id, name))
        return self.queue.submit(job)

    def preview_png(self, job: Job) -> bytes | None:
        """The replica's last preview of the job; a newer one asked for when the job has moved on since."""
        latest, shown = job.latest, getattr(job, "remote_preview", None)
        if latest is None:
            return None
        if shown is None or shown[0] != latest[:2]:
            self.board.set.remote(job.id, "preview")
        return shown[1] if shown else None

    def dispatch(self, worker: Worker, job: Job) -> None:
        """A dispatcher's loop body: run the job on a replica; if the replica is lost, send the same Spec again."""
        handle = self.replicas.options(stream=True, multiplexed_model_id=model_key(job.spec))
        try:
            for attempt in range(self.cluster.retries + 1):
                try:
                    self._follow(job, handle.run.remote(job.id, job.spec, self.board))
                    return
                except LOST as e:
                    log.warning("job %s lost its replica %s (%s); attempt %d of %d", job.id, job.worker,
                                errors.one_line(e), attempt + 1, self.cluster.retries + 1)
                    with self._lock:
                        self.retried += 1
                    if job.cancel_flag.is_set():
                        return _end(job, CANCELLED)
                    time.sleep(RETRY_SECONDS)
            _end(job, FAILED, RequestError(f"the replicas running this job were lost {self.cluster.retries + 1} "
                                           "times; the cluster's log says why", 503))
        except Exception as e:  # a job's failure ends the job, never the dispatcher
            log.exception("job %s failed on the cluster", job.id)
            _end(job, FAILED, e)
        finally:
            self.board.forget.remote(job.id)
            with self._lock:
                self.running.pop(job.id, None)

    def _follow(self, job: Job, stream) -> None:
        """Copy a replica's events into the job; it starts over each time (a retry makes the same images)."""
        job.outputs, job.call_no, job.step, job.steps, job.latest = [], 0, 0, 0, None
        started = None
        for event in stream:
            kind, *data = event
            if kind == "started":
                job.worker, started = data[0], time.time()
                with self._lock:
                    self.running[job.id] = data[0]
            elif kind == "progress":
                call_no, job.step, job.steps, latest = data
                if call_no != job.call_no:
                    job.skip_flag.clear()  # a skip is for the call it was asked in (work.Runner does the same)
                job.call_no = call_no
                job.latest = (*latest, ON_REPLICA) if latest else None
            elif kind == "preview":
                job.remote_preview = (data[0], data[1])
            elif kind == "output":
                job.outputs.append(data[0])
            elif kind == "done":
                state, error = data
                for output in job.outputs:  # saved once the job is done: a retried job writes each file once
                    output.path = self.runner.save(output.png)
                now = time.time()
                with self._lock:
                    self.jobs_by[job.worker] += 1
                    self.images_by[job.worker] += len(job.outputs)
                    self.recent.append({"id": job.id, "replica": job.worker, "model": model_key(job.spec),
                                        "state": state, "images": len(job.outputs),
                                        "waited_s": round(started - job.created, 4), "ran_s": round(now - started, 4)})
                return _end(job, state, error)
        _end(job, FAILED, RequestError("the replica ended the job without an answer", 503))

    def cluster_status(self) -> dict[str, Any]:
        with self._lock:
            replicas = [{"replica": name, "jobs": n, "images": self.images_by[name]} for name, n in
                        sorted(self.jobs_by.items())]
            return {"replicas": replicas, "running": dict(self.running), "recent": list(self.recent),
                    "retried": self.retried, "dispatchers": len(self.workers), "min_replicas": self.cluster.min_replicas,
                    "max_replicas": self.cluster.max_replicas}


def _end(job: Job, state: str, error: BaseException | None = None) -> None:
    if job.state in (QUEUED, RUNNING):
        job.finish(state, error)


def install_cluster_route(app, server: ClusterServer) -> None:
    """GET /sdxl/v1/cluster: jobs and images per replica, which replica runs which job, retries."""

    async def cluster() -> dict[str, Any]:
        return server.cluster_status()

    app.add_api_route("/sdxl/v1/cluster", cluster, methods=["GET"], tags=["sdxl"])
    app.router.routes.insert(0, app.router.routes.pop())  # ahead of the web UI, which takes every other path


@serve.deployment(num_replicas=1, max_ongoing_requests=INGRESS_REQUESTS)
@serve.ingress()
class Ingress:
    """The HTTP side: the single-machine server's app over a `ClusterServer`."""

    def __init__(self, config: ServerConfig, given: list, cluster: ClusterConfig, replicas):
        if config.outputs is not None:
            config.outputs.mkdir(parents=True, exist_ok=True)  # on this node (the driver may be another)
        self.server = ClusterServer(config, given, cluster, replicas, JobBoard.remote())
        self.server.start()

    def __serve_build_asgi_app__(self):
        from .server.app import create_app

        app = create_app(self.server)
        install_cluster_route(app, self.server)
        return app

    def __del__(self):
        self.server.stop(timeout=0)


# -- a GPU replica: one pipeline, run by the project's own Runner


@serve.deployment(max_ongoing_requests=1)  # one job at a time on a GPU: the others wait in Serve's queue (autoscaling)
class SdxlReplica:
    """One pipeline on one device. Its `run` streams ("started", replica), ("progress", call, step, steps, latest),
    ("preview", latest, png), ("output", Output) and finally ("done", state, error)."""

    async def __init__(self, config: ServerConfig, given: list):
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"  # Ray's CUDA_VISIBLE_DEVICES: this replica's GPU
        self.server = Server(dataclasses.replace(config, outputs=None, devices=[device]), given)  # ingress saves
        self.worker = self.server.workers[0]  # never started: Ray requests drive it
        self.name = ray.get_runtime_context().get_actor_name()
        self._lock = threading.Lock()
        warm = Spec("warm-up", self.server.default_model, [], self.server.default_refiner)
        self.server.runner.warm(self.worker, warm)  # the replica counts as up once the default model is loaded
        await self.serves(model_key(warm))  # and requests for it may come here first

    @serve.multiplexed(max_num_models_per_replica=1)
    async def serves(self, key: str) -> str:
        """Tells Serve's router what this replica has loaded (`model_key`): requests for it come here first. The
        loading itself is the job's, by `Runner.pipeline`, which keeps the model when only the LoRAs change."""
        return key

    async def run(self, job_id: str, spec: Spec, board) -> AsyncIterator[tuple]:
        key = serve.get_multiplexed_model_id()
        if key:
            await self.serves(key)
        job = Job(spec, id=job_id)
        job.state, job.started, job.worker = RUNNING, time.time(), self.worker.name
        wanted = await self._mirror(job, board)  # a flag set while the job waited counts from the start
        yield ("started", self.name)
        task = asyncio.ensure_future(asyncio.to_thread(self._run, job))
        try:
            async for event in self._events(job, task, board, wanted):
                yield event
        finally:
            if not task.done():
                job.cancel_flag.set()  # the ingress went away: stop between steps (the lock holds the next job)

    def _run(self, job: Job) -> None:
        with self._lock:  # one job on the pipeline, even while a cancelled one is still stopping
            self.server.runner.run(self.worker, job)

    async def _events(self, job: Job, task, board, wanted: bool) -> AsyncIterator[tuple]:
        last, shown, sent, ticks = None, None, 0, 0
        while True:
            ended = task.done()
            latest = job.latest[:2] if job.latest else None
            progress = (job.call_no, job.step, job.steps, latest)
            if progress != last:
                yield ("progress", *progress)
                last = progress
            if wanted and latest is not None and latest != shown and not ended:
                png = await asyncio.to_thread(self.server.preview_png, job)  # the single-machine previewer
                shown, wanted = latest, False
                if png:
                    yield ("preview", latest, png)
            while sent < len(job.outputs):
                yield ("output", job.outputs[sent])
                sent += 1
            if ended:
                break
            await asyncio.wait({task}, timeout=TICK)
            ticks += 1
            if ticks % POLL_TICKS == 0:
                wanted = await self._mirror(job, board) or wanted
        yield ("done", job.state, portable(job.error))

    @staticmethod
    async def _mirror(job: Job, board) -> bool:
        """The board's flags for the job set on the local job; True when the ingress asked for a preview."""
        flags = await board.take.remote(job.id)
        for name in FLAGS:
            if name in flags:
                getattr(job, f"{name}_flag").set()
        return "preview" in flags


# -- building and running the application


def resolved_models(config: ServerConfig) -> list:
    """The command line's (model, path) and (refiner, path), resolved once, as `sdxl serve` resolves them."""
    from .server.serve import resolve

    return [(name, path.resolve()) for name, path in resolve(config)]  # the same file seen from every node


def absolute(config: ServerConfig) -> ServerConfig:
    """The configuration with its folders and files made absolute here: Ray's processes do not start in this folder."""
    def full(path: Path | None) -> Path | None:
        return path.expanduser().resolve() if path is not None else None

    return dataclasses.replace(config, models_dirs=[full(p) for p in config.models_dirs],
                               lora_dirs=[full(p) for p in config.lora_dirs],
                               embedding_dirs=[full(p) for p in config.embedding_dirs], outputs=full(config.outputs),
                               taesd=full(config.taesd))


def application(config: ServerConfig, cluster: ClusterConfig | None = None):
    """The Ray Serve application: the ingress bound to the GPU replicas (a `serve.run` argument)."""
    cluster, config = cluster or ClusterConfig(), absolute(config)
    given = resolved_models(config)
    replicas = SdxlReplica.options(
        ray_actor_options={"num_gpus": cluster.gpus_per_replica, "num_cpus": cluster.cpus_per_replica},
        autoscaling_config=cluster.autoscaling())
    ingress = Ingress.options(ray_actor_options={"num_cpus": cluster.ingress_cpus})
    return ingress.bind(config, given, cluster, replicas.bind(config, given))


def _paths(value: str) -> list[Path]:
    return [Path(p).expanduser() for p in value.split(",") if p]


def build_app(args: dict[str, str]):
    """`serve run sdxl.interfaces.ray_app:build_app model=M refiner=R models_dir=A,B lora_dir=D embedding_dir=D
    outputs=DIR api_key=K1,K2 dtype=fp16 max_queue=N taesd=FILE min_replicas=1 max_replicas=4 gpus_per_replica=1
    ...` (every ClusterConfig field). Images are saved only with outputs=DIR (on the ingress's node)."""
    args = dict(args)
    cluster = ClusterConfig(**{f.name: (float if f.default is None else type(f.default))(args.pop(f.name))
                               for f in dataclasses.fields(ClusterConfig) if f.name in args})
    config = ServerConfig(
        model=args.pop("model", None), refiner=args.pop("refiner", None),
        models_dirs=_paths(args.pop("models_dir", "")), lora_dirs=_paths(args.pop("lora_dir", "")),
        embedding_dirs=_paths(args.pop("embedding_dir", "")),
        outputs=Path(args.pop("outputs")).expanduser() if "outputs" in args else None,
        api_keys=[k for k in args.pop("api_key", "").split(",") if k], dtype=args.pop("dtype", None),
        max_queue=int(args.pop("max_queue", ServerConfig.max_queue)),
        taesd=Path(args.pop("taesd")).expanduser() if "taesd" in args else None)
    if args:
        raise ValueError(f"unknown arguments: {', '.join(sorted(args))} (see sdxl.interfaces.ray_app.build_app)")
    return application(config, cluster)


def __getattr__(name: str):
    if name == "app":  # `serve run sdxl.interfaces.ray_app:app`: built when asked for, nothing at import
        return build_app({})
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def serve_on_ray(config: ServerConfig, address: str, cluster: ClusterConfig | None = None) -> int:
    """`sdxl serve --ray ADDRESS`: the application on a Ray cluster ("auto", "ray://HOST:10001", or "local" for a
    new one on this machine), HTTP on config.host:config.port, until Ctrl-C / SIGTERM (then the app is deleted)."""
    from .server.serve import warn_if_open

    cluster = cluster or ClusterConfig()
    ray.init(address=None if address == "local" else address)
    gpus, wanted = ray.cluster_resources().get("GPU", 0), cluster.gpus_per_replica * cluster.min_replicas
    if gpus < wanted:  # serve.run waits for them: an autoscaling cluster may add GPU nodes, a fixed one never will
        print(f"sdxl serve: warning: the Ray cluster has {gpus:g} GPU(s), {cluster.min_replicas} replica(s) need "
              f"{wanted:g}; they wait until GPUs join (--gpus-per-replica 0 runs replicas on CPUs)", file=sys.stderr,
              flush=True)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(application(config, cluster), name=cluster.app_name, route_prefix="/")
    warn_if_open(config)
    host = f"[{config.host}]" if ":" in config.host else config.host
    print(f"sdxl serve: http://{host}:{config.port}/ on Ray at {address} ({config.limits()}; "
          f"{cluster.min_replicas}-{cluster.max_replicas} replica(s), {cluster.gpus_per_replica:g} GPU each)",
          file=sys.stderr, flush=True)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(1.0):
            pass
    finally:
        serve.delete(cluster.app_name)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        ray.shutdown()
    print("sdxl serve: stopped", file=sys.stderr)
    return 0


__all__ = ["ClusterConfig", "ClusterServer", "Ingress", "JobBoard", "SdxlReplica", "application", "build_app",
           "model_key", "serve_on_ray"]
