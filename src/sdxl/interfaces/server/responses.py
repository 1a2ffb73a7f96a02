"""Errors in each API's shape: OpenAI's `{"error": {"message", "type", "param", "code"}}` under /v1/, AUTOMATIC1111's
`{"error", "detail", "body", "errors"}` elsewhere; the status for what a request or its job raised."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .. import errors
from . import a1111_api
from .jobs import QueueFull

OPENAI_PREFIX = "/v1/"
RETRY_AFTER = "5"  # seconds a client waits after a 429 (queue full)


def _status(e: BaseException) -> tuple[int, str]:
    """(HTTP status, one line) for what a request or its job raised; 500 only for a bug, without its text."""
    if isinstance(e, a1111_api.RequestError):
        return e.status, str(e)
    if isinstance(e, QueueFull):
        return 429, str(e)
    described = errors.describe(e)
    if described is not None and described[1]:
        if errors._out_of_memory(e):
            return 503, described[1]
        return 400, described[1]  # our ValueErrors name the field and what is allowed
    return 500, "internal error (the server's log has the details)"


def redact(message: str, request: Request) -> str:
    """The message without the server's own paths: model files by file name, its folders left out."""
    server = getattr(request.app.state, "server", None)
    if server is None:
        return message
    from ... import builtin

    c = server.config
    for model in sorted(server.catalog.models(), key=lambda m: -len(str(m.path))):
        message = message.replace(str(model.path), model.filename)
    for folder in (*c.models_dirs, *c.lora_dirs, *c.embedding_dirs, c.outputs, builtin.DATA):
        if folder is not None:
            message = message.replace(str(folder.resolve()) + "/", "").replace(str(folder) + "/", "")
    return message


def error_response(request: Request, status: int, message: str, param: str | None = None,
                   kind: str | None = None) -> JSONResponse:
    message = redact(message, request)
    headers = {"Retry-After": RETRY_AFTER} if status == 429 else {}
    if request.url.path.startswith(OPENAI_PREFIX):
        kind = kind or {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error")
        code = {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(status)
        headers["x-should-retry"] = "true" if status in (429, 503) else "false"
        body: dict[str, Any] = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    else:
        name = {400: "BadRequest", 401: "Unauthorized", 404: "NotFound", 413: "PayloadTooLarge",
                422: "RequestValidationError", 429: "TooManyRequests"}.get(status, "HTTPException")
        body = {"error": name, "detail": message, "body": "", "errors": message}
        if param:
            body["field"] = param  # which request field it is about (the web UI shows the message beside it)
    if status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="sdxl", charset="UTF-8"'
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_line(e: RequestValidationError) -> tuple[str, str | None]:
    first = e.errors()[0] if e.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    return f"{where}: {first.get('msg', 'invalid value')}", where
