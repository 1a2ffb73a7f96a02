"""A job's images, made the way `sdxl generate` makes them: the same GenerationOptions, the same check of the
latents and the decoded pixels, the same PNG chunks (`interfaces.metadata`)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from .. import errors, hashes, metadata, outputs
from .config import ServerConfig
from .jobs import CANCELLED, DONE, FAILED, Call, Job, Output, Spec, Worker

log = logging.getLogger("sdxl.server")
NON_FINITE = "the latents or the decoded image are NaN or infinite (a damaged model, or settings too extreme for it)"


def default_settings() -> dict[str, Any]:
    """Settings (`interfaces.metadata`) with every field at its `GenerationOptions` default, as a request's
    translation starts from them."""
    from dataclasses import fields

    from ...options import GenerationOptions

    s: dict[str, Any] = {f.name: f.default for f in fields(GenerationOptions) if f.name in metadata.OPTION_KEYS}
    s.update({key: None for key in metadata.RUN_KEYS}, store_paths=False, loras=[], outpaint_fill="edge")
    return s


def make_calls(settings: dict[str, Any], n_iter: int, server, images: dict | None = None, **extra) -> list[Call]:
    """n_iter calls of settings["batch"] images each, seeds following on (image j of the request has seed + j),
    each validated (`OptionError`) and bounded by the server's --max-pixels before it is queued. extra:
    GenerationOptions fields the settings do not hold (hires, inpaint_fill)."""
    from ...options import check_pixels

    calls = []
    for k in range(n_iter):
        s = dict(settings, seed=settings["seed"] + k * settings["batch"])
        options = metadata.generation_options(s, images=images or {"init_image": None, "mask": None})
        options = options.replace(**extra) if extra else options
        check_pixels(options, server.config.max_pixels, override="--max-pixels (the server's)")
        calls.append(Call(s, options))
    return calls


def check_with_model(pipe, job: Job) -> None:
    """What needs the model, as `sdxl generate` checks it: clip skip against its text encoders."""
    from ...options import check_clip_skip

    stages = [parts for parts in (pipe.base, pipe.refiner) if parts is not None]
    layers = [e.config.layers for parts in stages for e in (parts.text_encoder, parts.text_encoder_2) if e is not None]
    for call in job.spec.calls:
        check_clip_skip(call.options.clip_skip, layers)


class Runner:
    """What every worker shares: the server's settings, and where images are saved."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self._save_lock = threading.Lock()
        self.target = outputs.Target(config.outputs) if config.outputs is not None else None

    # -- the worker's pipeline

    def pipeline(self, worker: Worker, job: Job):
        """The worker's pipeline for the job's models, loaded (and the last one dropped) when they change."""
        import sdxl

        spec = job.spec
        wanted = (spec.model.path, spec.refiner.path if spec.refiner else None, spec.vae.path if spec.vae else None)
        if worker.loaded != wanted:
            worker.pipe, worker.loaded = None, None  # free the old weights before loading the new ones
            c = self.config
            pipe = sdxl.load(wanted[0], refiner=wanted[1], vae=wanted[2], device=worker.device, dtype=c.dtype,
                             lora_dirs=c.lora_dirs, embedding_dirs=c.embedding_dirs, low_memory=c.low_memory)
            pipe.allow_adapter_paths = False  # requests name LoRAs from the folders only
            pipe.lora_library.confined = pipe.embedding_library.confined = True
            pipe.max_pixels = c.max_pixels
            worker.pipe, worker.loaded = pipe, wanted
        return worker.pipe

    def warm(self, worker: Worker, spec: Spec) -> None:
        """Load `spec`'s models on the worker ahead of the first job (a failure is the first job's to report)."""
        try:
            self.pipeline(worker, Job(spec))
        except Exception:
            log.warning("could not load %s ahead of the first request", spec.model.name, exc_info=True)

    def describe(self, job: Job, pipe) -> dict[str, Any]:
        """What every image of the job stores about its models (as `sdxl generate` does; models by listed name)."""
        import sdxl

        from ...dtypes import short_name

        spec = job.spec
        described: dict[str, Any] = {"variant": None, "dtype": short_name(pipe.dtype), "device": str(pipe.device),
                                     "fp8": False, "low_memory": self.config.low_memory, "sdxl_version": sdxl.__version__}
        for kind, model in (("model", spec.model), ("refiner", spec.refiner), ("vae", spec.vae)):
            described[kind] = model.name if model else None
            described[metadata.HASH_KEYS[kind]] = model.short_hash() if model else None
        return described

    # -- running a job

    def run(self, worker: Worker, job: Job) -> None:
        """The worker's loop body: the job's calls, its outputs, its final state (never raises)."""
        from ...sampling import Cancelled

        try:
            if job.cancel_flag.is_set():
                raise Cancelled()
            pipe = self.pipeline(worker, job)
            check_with_model(pipe, job)
            described = self.describe(job, pipe)
            for n, call in enumerate(job.spec.calls):
                if job.interrupt_flag.is_set():
                    break  # A1111: an interrupted job returns what it has made so far
                job.call_no, job.step = n, 0
                self._call(pipe, job, call, described)
            job.finish(DONE)
        except Cancelled:
            job.finish(CANCELLED)
        except Exception as e:  # a request's failure ends its job, never the worker
            if errors.describe(e) is None:
                log.exception("job %s failed", job.id)
            job.finish(FAILED, e)

    def _call(self, pipe, job: Job, call: Call, described: dict[str, Any]) -> None:
        import numpy as np

        from ...images import unit_to_pil

        def progress(step: int, total: int, latents) -> None:
            job.step, job.steps = step, total

        def preview(step: int, total: int, denoised) -> None:
            job.latest = (job.call_no, step, denoised)

        def stop() -> bool:  # interrupt: the whole job; skip: this call only
            return job.interrupt_flag.is_set() or job.skip_flag.is_set()

        unit = pipe.generate(options=call.options.replace(output="np"), callback=progress, preview=preview,
                             cancel=job.cancel_flag.is_set, interrupt=stop)
        job.skip_flag.clear()
        if not np.isfinite(unit).all():
            raise ValueError(NON_FINITE)
        images = unit_to_pil(unit)
        if call.finish is not None:
            images = call.finish(images)
        lora_hashes = {hashes.stem(Path(name).name): hashes.sha256(path)[:12] for name, path, _, _ in pipe.last_loras}
        for i, image in enumerate(images):
            stored = metadata.image_settings(call.settings, described, prompt=call.options.prompt,
                                             seed=call.options.seed + i, batch_index=i, size=image.size)
            stored["lora_hashes"] = lora_hashes
            png = metadata.png_bytes(image, stored)
            job.outputs.append(Output(image, png, stored, metadata.infotext(stored), self.save(png)))

    def save(self, png: bytes) -> str | None:
        if self.target is None:
            return None
        with self._save_lock:
            return self.target.write(png).name
