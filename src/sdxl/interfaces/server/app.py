"""The FastAPI application: both APIs, sdxl's own job routes (asynchronous jobs, server-sent progress and
previews), /metrics, auth, request limits and errors in each API's shape (never a traceback)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import errors
from . import a1111_api, openai_api, web
from .jobs import DONE, FAILED, QueueFull
from .responses import OPENAI_PREFIX, _status, _validation_line, error_response
from .state import ModelError, Server

log = logging.getLogger("sdxl.server")


def install_errors(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        message, where = _validation_line(e)
        status = 400 if request.url.path.startswith(OPENAI_PREFIX) else 422
        return error_response(request, status, message, where)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return error_response(request, e.status_code, str(e.detail))

    async def failed(request: Request, e: Exception):
        status, message = _status(e)
        if status == 500:
            log.error("request %s failed", request.url.path, exc_info=e)
        param = getattr(e, "field", None)
        return error_response(request, status, errors.one_line(message), param)

    # The expected failures by class: Starlette re-raises what only the catch-all `Exception` handler took (after
    # answering), which makes uvicorn drop the connection; handlers for the classes themselves do not.
    for kind in (a1111_api.RequestError, ModelError, QueueFull, ValueError, OSError, UnicodeError, MemoryError,
                 Exception):
        app.add_exception_handler(kind, failed)


# -- auth and request size, before anything else


def authorized(header: str | None, server: Server) -> bool:
    """HTTP Basic for the --api-auth users, Bearer for the --api-key keys; constant-time comparisons."""
    c = server.config
    if not header:
        return False
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return any(hmac.compare_digest(value.strip().encode(), key.encode()) for key in c.api_keys)
    if scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return False
        ok = False
        for name, secret in c.users.items():  # every entry compared: the time does not tell which user exists
            ok |= hmac.compare_digest(user.encode(), name.encode()) & hmac.compare_digest(password.encode(),
                                                                                          secret.encode())
        return ok
    return False


class Guard:
    """ASGI middleware: auth on every route (docs and UI too), and the declared body size. Plain ASGI rather than
    @app.middleware("http"), which would hide a client's disconnect from the routes (so its job ran on)."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        refusal = None
        if self.server.config.protected and not authorized(request.headers.get("authorization"), self.server):
            refusal = error_response(request, 401, "authentication required: HTTP Basic (--api-auth users) or "
                                                   "Authorization: Bearer (--api-key)")
        else:
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > self.server.config.max_body):
                refusal = error_response(request, 413, _too_large(self.server))
        if refusal is not None:
            return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)


def _too_large(server: Server) -> str:
    return f"the request body is larger than the server's limit of {server.config.max_body:,} bytes"


class BodyLimit:
    """ASGI middleware: a body sent without a length (chunked) is cut off at --max-body bytes too (a 413)."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.server.config.max_body:
                    raise StarletteHTTPException(413, _too_large(self.server))
            return message

        await self.app(scope, limited, send)


# -- sdxl's own job routes: submit now, follow by events, fetch the result


def install_jobs(app: FastAPI, server: Server) -> None:
    @app.post("/sdxl/v1/jobs/txt2img", tags=["sdxl"])
    async def submit_txt2img(body: a1111_api.Txt2Img) -> dict[str, Any]:
        job = server.submit(a1111_api.txt2img_spec(body, server))
        job.body = body
        return {"id": job.id, "position": server.queue.position(job)}

    @app.post("/sdxl/v1/jobs/img2img", tags=["sdxl"])
    async def submit_img2img(body: a1111_api.Img2Img) -> dict[str, Any]:
        job = server.submit(a1111_api.img2img_spec(body, server))
        job.body = body
        return {"id": job.id, "position": server.queue.position(job)}

    def find(job_id: str):
        job = server.queue.get(job_id)
        if job is None:
            raise a1111_api.RequestError(f"job {job_id!r}: no such job (finished jobs are kept for a while)", 404)
        return job

    @app.get("/sdxl/v1/jobs/{job_id}", tags=["sdxl"])
    async def job_status(job_id: str) -> dict[str, Any]:
        return status_of(server, find(job_id))

    @app.get("/sdxl/v1/jobs/{job_id}/result", tags=["sdxl"])
    async def job_result(job_id: str) -> dict[str, Any]:
        job = find(job_id)
        await job.wait_async()
        if job.state == FAILED:
            raise job.error
        return a1111_api.response(job, job.body or a1111_api.Txt2Img())

    @app.post("/sdxl/v1/jobs/{job_id}/cancel", tags=["sdxl"])
    async def job_cancel(job_id: str) -> dict[str, Any]:
        job = find(job_id)
        server.queue.cancel(job)
        return status_of(server, job)

    @app.post("/sdxl/v1/jobs/{job_id}/interrupt", tags=["sdxl"])
    async def job_interrupt(job_id: str) -> dict[str, Any]:
        job = find(job_id)
        job.interrupt_flag.set()
        return status_of(server, job)

    @app.get("/sdxl/v1/jobs/{job_id}/preview", tags=["sdxl"])
    async def job_preview(job_id: str) -> Response:
        png = await asyncio.to_thread(server.preview_png, find(job_id))
        return Response(png, media_type="image/png") if png else Response(status_code=204)

    @app.get("/sdxl/v1/jobs/{job_id}/events", tags=["sdxl"])
    async def job_events(job_id: str, request: Request, previews: bool = True) -> StreamingResponse:
        job = find(job_id)
        return StreamingResponse(events(server, job, request, previews), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def status_of(server: Server, job) -> dict[str, Any]:
    out = {"id": job.id, "state": job.state, "position": server.queue.position(job), "progress": job.progress(),
           "eta": round(job.eta(), 2), "call": job.call_no, "calls": len(job.spec.calls), "step": job.step,
           "steps": job.steps, "images": len(job.outputs), "saved": sum(1 for o in job.outputs if o.path),
           "interrupted": job.interrupted}
    if job.state == FAILED:
        out["error"] = errors.one_line(_status(job.error)[1])
    return out


async def events(server: Server, job, request: Request, previews: bool):
    """Server-sent events: `progress` (status_of) whenever it changes, `preview` (a PNG data URL) once per
    step, then one `done` (the status; the images at /result)."""
    last, shown = None, None
    while True:
        status = status_of(server, job)
        if status != last:
            yield f"event: progress\ndata: {json.dumps(status)}\n\n"
            last = status
        latest = job.latest
        if previews and latest is not None and latest[:2] != shown and job.state == "running":
            shown = latest[:2]
            png = await asyncio.to_thread(server.preview_png, job)
            if png:
                yield f"event: preview\ndata: data:image/png;base64,{base64.b64encode(png).decode()}\n\n"
        if job.state not in ("queued", "running"):  # read once more: it may have ended since `status` was read
            yield f"event: done\ndata: {json.dumps(status_of(server, job))}\n\n"
            return
        if await request.is_disconnected():
            return
        await asyncio.sleep(0.1)


SAVED = re.compile(r"^\d{5,}\.png$")  # the names outputs.Target gives: nothing else under --outputs is served


def saved_images(server: Server, limit: int) -> list[dict[str, Any]]:
    """The newest images under --outputs, with what the web UI needs to show them and reuse their settings."""
    from .. import a1111 as words
    from .. import metadata

    folder = server.config.outputs
    if folder is None or not folder.is_dir():
        return []
    names = sorted((p.name for p in folder.iterdir() if SAVED.match(p.name)), key=lambda n: int(n[:-4]),
                   reverse=True)[:limit]
    out = []
    for name in names:
        try:
            chunks = metadata._png_text(folder / name)
            stored = json.loads(chunks.get(metadata.JSON_KEY, "{}"))
        except (OSError, ValueError):
            continue  # a file being replaced, or not ours after all
        sampler, schedule = words.to_a1111(stored.get("sampler", "euler"), stored.get("schedule", "default"))
        width, height = stored.get("size") or (stored.get("width"), stored.get("height"))
        body = {"prompt": stored.get("prompt", ""), "negative_prompt": stored.get("negative_prompt", ""),
                "steps": stored.get("steps"), "cfg_scale": stored.get("cfg"), "width": width, "height": height,
                "sampler_name": sampler, "scheduler": schedule.lower() if schedule != "Default" else "automatic"}
        out.append({"name": name, "url": f"/sdxl/v1/outputs/{name}", "prompt": body["prompt"],
                    "seed": stored.get("seed"), "infotext": chunks.get(metadata.TEXT_KEY, ""), "parameters": body})
    return out


def install_outputs(app: FastAPI, server: Server) -> None:
    @app.get("/sdxl/v1/outputs", tags=["sdxl"])
    async def outputs(limit: int = 60) -> list[dict[str, Any]]:
        """The images saved under --outputs, newest first (empty with --no-save)."""
        return await asyncio.to_thread(saved_images, server, max(0, min(limit, 1000)))

    @app.get("/sdxl/v1/outputs/{name}", tags=["sdxl"])
    async def output(name: str) -> Response:
        folder = server.config.outputs
        if folder is None or not SAVED.match(name) or not (folder / name).is_file():
            raise a1111_api.RequestError(f"{name!r}: no such saved image", 404)
        return Response((folder / name).read_bytes(), media_type="image/png")


def install_metrics(app: FastAPI, server: Server) -> None:
    from .state import LATENCY_BUCKETS

    @app.get("/metrics", tags=["sdxl"])
    async def metrics() -> Response:
        import time

        m, q = server.metrics, server.queue
        with m.lock:
            counts, total, requests = list(m.latency), m.latency_sum, m.requests
        lines = ["# TYPE sdxl_queue_length gauge", f"sdxl_queue_length {len(q.queued())}",
                 "# TYPE sdxl_running_jobs gauge", f"sdxl_running_jobs {len(q.running())}",
                 "# TYPE sdxl_jobs_total counter", f"sdxl_jobs_total {q.completed}",
                 "# TYPE sdxl_images_total counter", f"sdxl_images_total {q.images}",
                 "# TYPE sdxl_images_per_second gauge",
                 f"sdxl_images_per_second {q.images / max(time.time() - m.started, 1e-9):.6f}",
                 "# TYPE sdxl_request_seconds histogram"]
        running = 0
        for bound, count in zip(LATENCY_BUCKETS, counts):
            running += count
            lines.append(f'sdxl_request_seconds_bucket{{le="{bound}"}} {running}')
        lines += [f'sdxl_request_seconds_bucket{{le="+Inf"}} {requests}', f"sdxl_request_seconds_sum {total:.6f}",
                  f"sdxl_request_seconds_count {requests}"]
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


def create_app(server: Server) -> FastAPI:
    import sdxl

    app = FastAPI(title="sdxl", version=sdxl.__version__,
                  description="Stable Diffusion XL: AUTOMATIC1111's /sdapi/v1 API and OpenAI's Images API.")
    install_errors(app)
    app.add_middleware(BodyLimit, server=server)
    app.add_middleware(Guard, server=server)  # added last: runs first
    app.include_router(a1111_api.router(server))
    app.include_router(openai_api.router(server))
    install_jobs(app, server)
    install_metrics(app, server)
    install_outputs(app, server)
    web.install(app)  # last: it serves every path the routes above do not
    app.state.server = server
    return app


__all__ = ["DONE", "create_app"]
