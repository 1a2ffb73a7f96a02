"""Starting and stopping the server: `sdxl serve`, and a server in a background thread (tests, notebooks)."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from .config import ServerConfig

log = logging.getLogger("sdxl.server")


def resolve(config: ServerConfig) -> list[tuple[str, Path]]:
    """The command line's (model, path) and (refiner, path), resolved, and its folders checked (nothing loaded)."""
    from ...checkpoints.paths import resolve_path

    given = []
    for name in (config.model or "builtin", config.refiner):
        if name:
            given.append((str(name), resolve_path(name, allow_download=config.allow_download)))
    for folder in (*config.models_dirs, *config.lora_dirs, *config.embedding_dirs):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder")
    if config.outputs is not None:
        config.outputs.mkdir(parents=True, exist_ok=True)
    return given


def build(config: ServerConfig):
    """(Server, FastAPI app) for a configuration: the command line's models resolved, nothing loaded yet."""
    from .app import create_app
    from .state import Server

    server = Server(config, resolve(config))
    return server, create_app(server)


def _uvicorn(app, host: str, port: int, **extra):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                         timeout_graceful_shutdown=5, **extra))


def warn_if_open(config: ServerConfig) -> None:
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.protected:
        print(f"sdxl serve: warning: listening on {config.host} with no --api-auth or --api-key: anyone who can "
              "reach this port can use it", file=sys.stderr)


def serve_forever(config: ServerConfig) -> int:
    """Run until Ctrl-C / SIGTERM: then no new jobs, the running ones stopped between steps, a clean exit."""
    server, app = build(config)
    warn_if_open(config)
    server.start()
    web = _uvicorn(app, config.host, config.port)
    host = f"[{config.host}]" if ":" in config.host else config.host
    print(f"sdxl serve: http://{host}:{config.port}/ (API docs at /docs; {config.limits()}; "
          f"{len(server.workers)} worker(s) on {', '.join(config.devices)})", file=sys.stderr, flush=True)
    web.capture_signals = contextlib.nullcontext  # ours below: uvicorn's would re-raise the signal after shutdown

    def stop(signum, frame) -> None:
        if web.should_exit:  # a second Ctrl-C: now
            web.force_exit = True
        server.stop(timeout=0)  # no new jobs; the running ones stop between steps, so open requests end
        web.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        web.run()  # stops accepting, waits (at most timeout_graceful_shutdown) for the open requests
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("sdxl serve: stopped", file=sys.stderr)
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def background(config: ServerConfig) -> Iterator[tuple[str, object]]:
    """A server on config.port (0: a free one) in a thread: yields (base URL, Server); stopped on exit."""
    if not config.port:
        config.port = free_port()
    server, app = build(config)
    server.start()
    web = _uvicorn(app, config.host, config.port)
    web.install_signal_handlers = lambda: None  # not the main thread
    thread = threading.Thread(target=web.run, name="sdxl-http", daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not web.started and time.time() < deadline and thread.is_alive():
        time.sleep(0.02)
    if not web.started:
        raise RuntimeError("the server did not start")
    try:
        yield f"http://{config.host}:{config.port}", server
    finally:
        server.stop()
        web.should_exit = True
        thread.join(10)
