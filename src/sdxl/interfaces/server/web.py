"""The web UI: static files (src/sdxl/interfaces/web/) served at `/`, behind the same auth as the APIs. The page
talks to the server's public routes only (/sdapi/v1/..., /sdxl/v1/jobs/...), as any other client does."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

WEB = Path(__file__).resolve().parents[1] / "web"


def install(app: FastAPI) -> None:
    if (WEB / "index.html").is_file():
        app.mount("/", StaticFiles(directory=WEB, html=True), name="web")
