"""The running server's state: configuration, catalog, queue, workers, A1111's options, metrics."""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import time
from typing import Any

from .catalog import Catalog, Model, UnknownModel
from .config import ServerConfig
from .jobs import CANCELLED, FAILED, Job, JobQueue, QueueFull, Spec, Worker
from .work import Runner

log = logging.getLogger("sdxl.server")
LATENCY_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)  # seconds, for /metrics


class ModelError(ValueError):
    """A request names a model that is not listed (a 400 naming the field)."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.requests = 0
        self.started = time.time()

    def observe(self, seconds: float) -> None:
        with self.lock:
            self.requests += 1
            self.latency_sum += seconds
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    self.latency[i] += 1
                    break
            else:
                self.latency[-1] += 1


class Server:
    def __init__(self, config: ServerConfig, given: list[tuple[str, Any]]):
        """given: the command line's (model, path) and (refiner, path), resolved."""
        self.config = config
        self.catalog = Catalog(config.models_dirs, given)
        self.default_model = self.catalog.given_model(0) if given else self.catalog.find("builtin")
        self.default_refiner = self.catalog.given_model(1) if len(given) > 1 else None
        self.queue = JobQueue(config.max_queue)
        self.runner = Runner(config)
        warm_spec = Spec("warm-up", self.default_model, [], self.default_refiner)
        self.workers = [Worker(str(i), device, self.queue, self.runner.run, lambda w: self.runner.warm(w, warm_spec))
                        for i, device in enumerate(config.devices)]
        self.options: dict[str, Any] = {
            "sd_model_checkpoint": self.default_model.title(), "sd_checkpoint_hash": self.default_model.sha256(),
            "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1, "samples_format": "png",
            "sdxl_refiner": self.default_refiner.title() if self.default_refiner else None,
        }
        self.metrics = Metrics()
        self._previewers: dict[tuple, Any] = {}

    def start(self) -> None:
        for w in self.workers:
            w.start()

    def stop(self, timeout: float = 5.0) -> None:
        """No new jobs; queued ones cancelled; running ones asked to stop between steps."""
        self.queue.close()
        for w in self.workers:
            w.stop()
        for w in self.workers:
            w.join(timeout)

    def find_model(self, name: str, field: str) -> Model:
        try:
            return self.catalog.find(name)
        except UnknownModel as e:
            raise ModelError(f"{field}: {e}", field) from None

    def submit(self, spec: Spec) -> Job:
        return self.queue.submit(Job(spec))  # QueueFull when full

    async def run(self, spec: Spec, is_disconnected=None) -> Job:
        """Submit a job and wait for it; a client that goes away cancels it."""
        job = self.submit(spec)
        waiter = asyncio.ensure_future(job.wait_async())
        try:
            while not waiter.done():
                done, _ = await asyncio.wait({waiter}, timeout=0.25)
                if not done and is_disconnected is not None and await is_disconnected():
                    self.queue.cancel(job)
        finally:
            if not waiter.done():
                waiter.cancel()
                self.queue.cancel(job)
        self.metrics.observe(time.time() - job.created)
        return job

    # -- previews

    def preview_png(self, job: Job) -> bytes | None:
        """A PNG of the job's latest prediction (None before its first step); made when asked, once per step."""
        latest = job.latest
        if latest is None:
            return None
        cached = getattr(job, "_preview", None)
        if cached is not None and cached[0] == latest[:2]:
            return cached[1]
        try:
            image = self.previewer(job).image(latest[2], 0)
        except Exception:  # a preview is a nicety: its failure must not fail /progress or the event stream
            log.warning("no preview for job %s", job.id, exc_info=True)
            return None
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        job._preview = (latest[:2], buffer.getvalue())
        return job._preview[1]

    def previewer(self, job: Job):
        from ...previews import Previewer

        worker = next((w for w in self.workers if w.name == job.worker), None)
        key = (job.worker, worker.loaded if worker else None)
        if key not in self._previewers:
            pipe = worker.pipe if worker else None
            if pipe is None:
                raise ValueError("no model is loaded for this job yet")
            self._previewers[key] = Previewer.for_model(pipe.base, name=job.spec.model.name,
                                                        taesd=self.config.taesd)
        return self._previewers[key]


__all__ = ["CANCELLED", "FAILED", "ModelError", "QueueFull", "Server"]
