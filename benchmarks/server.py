"""`sdxl serve` under load: requests per second and p50 / p95 latency at 1, 4 and 16 concurrent clients, and the
server's overhead per request against calling the pipeline directly for the same settings, in the same run.

    OMP_NUM_THREADS=1 python benchmarks/server.py                   # built-in model, CPU, 64x64, 8 euler steps
    OMP_NUM_THREADS=1 python benchmarks/server.py --requests 60 --levels 1,4,16 --size 64 --steps 8

The server is `python -m sdxl serve --no-save` in its own process (one worker, the built-in model), as a user runs
it; the clients are threads of this process, one keep-alive `requests.Session` each, posting AUTOMATIC1111
txt2img requests (distinct seeds). The direct figure is `sdxl.load("builtin").generate(...)` in this process with
the same settings (the server's idle meanwhile); both processes get the same OMP_NUM_THREADS (required: on a
shared 2-core machine one torch thread each is the fastest). Direct calls and the server at concurrency 1
alternate in rounds, so that other load on the machine falls on both alike;
overhead = (server p50 at concurrency 1 - direct p50) / direct p50, and in ms per request. The first request's
image is checked against the direct call's pixel for pixel (the same work is being timed).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a lighthouse on a cliff at dusk"


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the two nearest ranks."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    low = int(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def start_server(port: int, args) -> subprocess.Popen:
    import requests

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "sdxl", "serve", "--port", str(port), "--no-save", "--max-queue", "256",
               "--max-steps", str(max(args.steps, 150))]
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/sdapi/v1/options", timeout=2).ok:
                return server
        except requests.ConnectionError:
            pass
        if server.poll() is not None:
            raise SystemExit(f"sdxl serve exited: {server.stderr.read()}")
        time.sleep(0.2)
    server.kill()
    raise SystemExit("sdxl serve did not start within 120 s")


def body(args, seed: int) -> dict:
    return dict(prompt=PROMPT, seed=seed, width=args.size, height=args.size, steps=args.steps, cfg_scale=args.cfg,
                sampler_name="Euler")


def direct_call(pipe, args, seed: int):
    return pipe.generate(PROMPT, width=args.size, height=args.size, steps=args.steps, cfg=args.cfg, seed=seed,
                         sampler="euler", schedule="default")


def timed_direct(pipe, args, seeds: list[int]) -> list[float]:
    times = []
    for seed in seeds:
        t = time.perf_counter()
        direct_call(pipe, args, seed)
        times.append(time.perf_counter() - t)
    return times


def timed_server(url: str, args, seeds: list[int], clients: int) -> tuple[list[float], float]:
    """Each request's latency (send to the whole answer received) and the wall time of them all, `clients` at once."""
    import requests

    latencies: list[float] = []
    lock = threading.Lock()
    todo = list(seeds)
    errors: list[str] = []

    def client() -> None:
        with requests.Session() as session:
            while True:
                with lock:
                    if not todo or errors:
                        return
                    seed = todo.pop(0)
                t = time.perf_counter()
                r = session.post(f"{url}/sdapi/v1/txt2img", json=body(args, seed), timeout=600)
                took = time.perf_counter() - t
                if r.status_code != 200 or len(r.json()["images"]) != 1:
                    with lock:
                        errors.append(f"{r.status_code}: {r.text[:300]}")
                    return
                with lock:
                    latencies.append(took)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise SystemExit(f"a request failed: {errors[0]}")
    return latencies, wall


def same_image(url: str, pipe, args) -> bool:
    import numpy as np
    import requests
    from PIL import Image

    r = requests.post(f"{url}/sdapi/v1/txt2img", json=body(args, 12345), timeout=600)
    with Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))) as im:
        served = np.asarray(im.convert("RGB"))
    return bool(np.array_equal(served, np.asarray(direct_call(pipe, args, 12345)[0].convert("RGB"))))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level (default 64)")
    p.add_argument("--levels", default="1,4,16", help="client counts (default 1,4,16)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64, the built-in's)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--cfg", type=float, default=7.0, help="guidance scale (default 7: both CFG branches run)")
    p.add_argument("--rounds", type=int, default=4, help="rounds, each running every level in turn (default 4)")
    p.add_argument("--warm-up", type=int, default=5, help="untimed requests and direct calls first (default 5)")
    p.add_argument("--port", type=int, default=0, help="the server's port (default: a free one)")
    p.add_argument("--out", type=Path, help="also write the figures as JSON")
    args = p.parse_args()
    threads = os.environ.get("OMP_NUM_THREADS")
    if not threads:
        raise SystemExit("set OMP_NUM_THREADS (the server process and the direct calls use the same; 1 on 2 cores)")

    import torch

    import sdxl
    from sdxl.interfaces.server.serve import free_port

    torch.set_num_threads(int(threads))
    levels = [int(c) for c in args.levels.split(",")]
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    print(f"torch {torch.__version__}, OMP_NUM_THREADS={threads}, {os.cpu_count()} CPUs; {args.size}x{args.size}, "
          f"{args.steps} euler steps, cfg {args.cfg}, {args.requests} requests per level in {args.rounds} rounds",
          flush=True)
    server = start_server(port, args)
    direct: list[float] = []
    direct_cpu = 0.0
    latencies: dict[int, list[float]] = {c: [] for c in levels}
    walls = dict.fromkeys(levels, 0.0)
    server_cpu = dict.fromkeys(levels, 0.0)
    try:
        pipe = sdxl.load("builtin")
        timed_direct(pipe, args, list(range(args.warm_up)))
        timed_server(url, args, list(range(args.warm_up)), 1)
        print(f"the served image equals the direct call's: {same_image(url, pipe, args)}", flush=True)
        seed = 1000
        for r in range(args.rounds):  # every round runs the direct calls and each level, so load falls on all alike
            print(f"round {r + 1}/{args.rounds} (load average {load_average()})", flush=True)
            count = max(1, args.requests // args.rounds)
            cpu = time.thread_time()  # the direct calls run in this thread (torch's intra-op threads: OMP_NUM_THREADS)
            direct += timed_direct(pipe, args, list(range(seed, seed + count)))
            direct_cpu += time.thread_time() - cpu
            for clients in levels:
                cpu = cpu_seconds(server.pid)
                got, wall = timed_server(url, args, list(range(seed, seed + max(count, clients))), clients)
                server_cpu[clients] += cpu_seconds(server.pid) - cpu
                latencies[clients] += got
                walls[clients] += wall
            seed += 10_000
    finally:
        server.terminate()
        server.wait(30)

    d50 = statistics.median(direct)
    d_cpu = direct_cpu / len(direct)
    print(f"\nload average after: {load_average()}")
    print("| clients | requests | requests/s | p50 latency s | p95 latency s | CPU s per request |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| direct `generate` | {len(direct)} | {len(direct) / sum(direct):.2f} | {d50:.3f} | "
          f"{percentile(direct, 95):.3f} | {d_cpu:.3f} |")
    rows = {}
    for clients in levels:
        got = latencies[clients]
        rows[clients] = dict(requests=len(got), rps=len(got) / walls[clients], p50=statistics.median(got),
                             p95=percentile(got, 95), cpu=server_cpu[clients] / len(got))
        row = rows[clients]
        print(f"| {clients} | {row['requests']} | {row['rps']:.2f} | {row['p50']:.3f} | {row['p95']:.3f} | "
              f"{row['cpu']:.3f} |")
    if 1 in rows:
        s50, s_cpu = rows[1]["p50"], rows[1]["cpu"]
        print(f"\nserver overhead at concurrency 1: {(s50 - d50) * 1e3:+.1f} ms per request "
              f"({(s50 - d50) / d50:+.1%} of the direct call's {d50 * 1e3:.1f} ms p50); in CPU time "
              f"{(s_cpu - d_cpu) * 1e3:+.1f} ms ({(s_cpu - d_cpu) / d_cpu:+.1%}: the whole server process against "
              "the direct call's thread)")
    if args.out:
        args.out.write_text(json.dumps(dict(direct=direct, direct_cpu=direct_cpu, latencies=latencies, walls=walls,
                                            server_cpu=server_cpu, omp_threads=threads,
                                            args={k: str(v) for k, v in vars(args).items()}), indent=1))


if __name__ == "__main__":
    main()
