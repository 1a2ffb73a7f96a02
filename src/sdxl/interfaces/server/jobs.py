"""Jobs, the queue that holds them and the workers (one thread per device) that run them.

A worker owns its pipeline: it loads the model a job asks for (swapping out the last one) and runs the job's
calls one after another (`work.run`). Request handlers only submit jobs and wait for them, so a request's image
depends on nothing but its own settings, whichever worker takes it and whatever else runs.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .catalog import Model

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
KEEP_FINISHED = 256  # finished jobs kept for /progress, event streams and polling
KEEP_IMAGES = 16  # of those, the newest whose images are kept for /sdxl/v1/jobs/{id}/result


class QueueFull(Exception):
    def __init__(self, size: int):
        super().__init__(f"the queue is full ({size} jobs waiting); try again shortly")
        self.size = size


@dataclass
class Call:
    """One pipeline call of a job: `options.batch` images of seeds seed .. seed + batch - 1 (AUTOMATIC1111's
    n_iter makes several), and the settings that go into their PNGs (`interfaces.metadata`)."""

    settings: dict[str, Any]
    options: Any  # GenerationOptions
    finish: Callable[[list], list] | None = None  # images -> images (e.g. an inpainted crop pasted back)


@dataclass
class Spec:
    """What a job makes: its model (and refiner), its calls, and where it came from (for /progress)."""

    kind: str  # "txt2img", "img2img", "generations", "edits"
    model: Model
    calls: list[Call]
    refiner: Model | None = None
    vae: Model | None = None


@dataclass
class Output:
    image: Any  # PIL image
    png: bytes  # with the infotext and sdxl chunks
    settings: dict[str, Any]
    infotext: str
    path: str | None = None  # the file name under --outputs, when saved


@dataclass
class Job:
    spec: Spec
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    number: int = 0
    state: str = QUEUED
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    call_no: int = 0  # the call running now (A1111's job_no)
    step: int = 0  # steps done in the running call
    steps: int = 0  # steps of the running call
    outputs: list[Output] = field(default_factory=list)
    error: BaseException | None = None
    # (call, step, prediction) of the last step (the tensor, not copied; one tuple, so that a reader never pairs a
    # step with another step's prediction): previews are made from it when asked
    latest: tuple | None = None

    @property
    def denoised(self):
        return self.latest[2] if self.latest else None
    worker: str | None = None
    body: Any = None  # the request it came from (sdxl's job routes answer /result in A1111's shape from it)
    cancel_flag: threading.Event = field(default_factory=threading.Event)
    interrupt_flag: threading.Event = field(default_factory=threading.Event)
    skip_flag: threading.Event = field(default_factory=threading.Event)
    _done: threading.Event = field(default_factory=threading.Event)
    _waiters: list = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def finished_ok(self) -> bool:
        return self.state == DONE

    @property
    def interrupted(self) -> bool:
        return self.interrupt_flag.is_set()

    def progress(self) -> float:
        """0..1 over the job's calls."""
        if self.state in (DONE, FAILED, CANCELLED):
            return 1.0
        calls = len(self.spec.calls)
        within = self.step / self.steps if self.steps else 0.0
        return min(1.0, (self.call_no + within) / calls) if calls else 0.0

    def eta(self) -> float:
        """Seconds left, from the time taken so far (0 before the first step)."""
        done = self.progress()
        if self.started is None or done <= 0.0 or done >= 1.0:
            return 0.0
        return (time.time() - self.started) * (1.0 - done) / done

    def finish(self, state: str, error: BaseException | None = None) -> None:
        if error is not None:
            error.__traceback__ = None  # its frames hold the run's tensors
        with self._lock:
            self.state, self.error, self.finished = state, error, time.time()
            self.latest = None  # previews are for running jobs
            self._done.set()
            waiters, self._waiters = self._waiters, []
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    async def wait_async(self) -> None:
        """Wait in the event loop without a thread per waiting request."""
        event = asyncio.Event()
        with self._lock:
            if self._done.is_set():
                return
            self._waiters.append((asyncio.get_running_loop(), event))
        await event.wait()


class JobQueue:
    """First in, first out, bounded; every job ever submitted is findable by id until it is old."""

    def __init__(self, max_queued: int):
        self.max_queued = max_queued
        self._queue: deque[Job] = deque()
        self._jobs: dict[str, Job] = {}
        self._finished: deque[str] = deque()
        self._cond = threading.Condition()
        self._numbers = itertools.count(1)
        self.closed = False
        self.completed = 0  # jobs finished (any state): for /metrics
        self.images = 0

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self.closed:
                raise QueueFull(0)
            if len(self._queue) >= self.max_queued:
                raise QueueFull(len(self._queue))
            job.number = next(self._numbers)
            self._queue.append(job)
            self._jobs[job.id] = job
            self._cond.notify()
        return job

    def take(self, timeout: float = 0.5) -> Job | None:
        """The next queued job (marked running), or None after `timeout` seconds or once closed."""
        with self._cond:
            if not self._queue and not self.closed:
                self._cond.wait(timeout)
            if not self._queue:
                return None
            job = self._queue.popleft()
            job.state, job.started = RUNNING, time.time()
            return job

    def cancel(self, job: Job) -> bool:
        """Cancel a job: taken out of the queue if it waits there, else asked to stop between steps."""
        job.cancel_flag.set()
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                queued = True
            else:
                queued = False
        if queued:
            job.finish(CANCELLED)
            self.retire(job)
        return queued

    def retire(self, job: Job) -> None:
        with self._cond:
            self.completed += 1
            self.images += len(job.outputs)
            self._finished.append(job.id)
            while len(self._finished) > KEEP_FINISHED:
                self._jobs.pop(self._finished.popleft(), None)
            if len(self._finished) > KEEP_IMAGES:
                old = self._jobs.get(self._finished[-KEEP_IMAGES - 1])
                if old is not None:
                    old.outputs = []

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def position(self, job: Job) -> int:
        """Jobs ahead of `job` in the queue (0: next); -1 when it is not queued."""
        with self._cond:
            try:
                return self._queue.index(job)
            except ValueError:
                return -1

    def queued(self) -> list[Job]:
        with self._cond:
            return list(self._queue)

    def running(self) -> list[Job]:
        with self._cond:
            return sorted((j for j in self._jobs.values() if j.state == RUNNING), key=lambda j: j.number)

    def close(self) -> list[Job]:
        """No new jobs; the queued ones are cancelled and returned."""
        with self._cond:
            self.closed = True
            left, self._queue = list(self._queue), deque()
            self._cond.notify_all()
        for job in left:
            job.cancel_flag.set()
            job.finish(CANCELLED)
        return left


class Worker(threading.Thread):
    """Takes jobs from the queue and runs them with `run(worker, job)` on its device, until stopped."""

    def __init__(self, name: str, device: str, queue: JobQueue, run: Callable[[Worker, Job], None],
                 warm: Callable[[Worker], None] | None = None):
        super().__init__(name=f"sdxl-worker-{name}", daemon=True)
        self.device, self.queue, self._run, self._warm = device, queue, run, warm
        self.pipe = None  # the loaded pipeline and what it was loaded from: (model path, refiner path, vae path)
        self.loaded: tuple | None = None
        self.current: Job | None = None
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        if self.current is not None:
            self.current.cancel_flag.set()

    def run(self) -> None:
        if self._warm is not None:
            self._warm(self)  # the default model loaded before the first request waits for it
        while not self._stop_event.is_set():
            job = self.queue.take()
            if job is None:
                continue
            self.current, job.worker = job, self.name
            try:
                self._run(self, job)
            finally:
                self.current = None
                self.queue.retire(job)
