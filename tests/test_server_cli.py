"""`sdxl serve` as a user starts it: it says where it listens and its limits, answers, and stops cleanly on
SIGTERM and Ctrl-C, also mid-job; flags it cannot use are one line and exit status 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from sdxl.interfaces.server.serve import free_port

requests = pytest.importorskip("requests")
PROMPT = "a red circle on a blue background"


def start(*flags: str) -> tuple[subprocess.Popen, str, list[str]]:
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "sdxl", "serve", "--port", str(port), "--no-save", *flags],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    lines: list[str] = []
    deadline = time.time() + 60
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if "http://" in line:
            threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
            return proc, f"http://127.0.0.1:{port}", lines
    proc.kill()
    raise AssertionError("sdxl serve did not start: " + "".join(lines))


def wait_until_up(url: str) -> None:
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            if requests.get(url + "/sdapi/v1/progress", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            time.sleep(0.1)
    raise AssertionError("no answer")


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_serve_prints_its_url_and_limits_and_stops_cleanly_mid_job(stop):
    proc, url, lines = start("--max-steps", "5000")
    try:
        assert f"{url}/" in lines[-1] and "limits:" in lines[-1] and "127.0.0.1" in lines[-1]
        wait_until_up(url)
        job = requests.post(url + "/sdxl/v1/jobs/txt2img", json=dict(prompt=PROMPT, width=64, height=64, steps=5000),
                            timeout=30).json()
        deadline = time.time() + 60
        while requests.get(f"{url}/sdxl/v1/jobs/{job['id']}", timeout=5).json()["step"] < 2:
            assert time.time() < deadline
            time.sleep(0.05)
        started = time.time()
        proc.send_signal(stop)
        assert proc.wait(30) == 0
        assert time.time() - started < 15  # the running job is cancelled between steps, not finished
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in "".join(lines)


def test_listening_beyond_localhost_without_auth_warns():
    proc, url, lines = start("--host", "0.0.0.0")
    try:
        assert any("warning: listening on 0.0.0.0 with no --api-auth or --api-key" in line for line in lines)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


@pytest.mark.parametrize("flags, message", [
    (["--api-auth", "nopassword"], "--api-auth 'nopassword': expected USER:PASSWORD"),
    (["--devices", "gpu7"], "--devices 'gpu7'"),
    (["--models-dir", "/nonexistent/models"], "/nonexistent/models: no such folder"),
    (["--model", "/nonexistent/m.safetensors"], "/nonexistent/m.safetensors"),
    (["--taesd", "/nonexistent/taesd.safetensors"], "--taesd"),
])
def test_bad_flags_are_one_line(flags, message):
    r = subprocess.run([sys.executable, "-m", "sdxl", "serve", "--port", str(free_port()), "--no-save", *flags],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
