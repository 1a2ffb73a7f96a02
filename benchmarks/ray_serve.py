"""The Ray Serve application (`sdxl.interfaces.ray_app`) on a local cluster, on the CPU with the built-in model:

1. images per second with 1 and 2 replicas, kept busy (the ratio is the point; absolute figures only on a GPU),
   in alternating rounds (this machine is shared: the load average before each run is printed);
2. a run with Poisson arrivals at 70% of 2 replicas' measured images/s, its latencies against benchmarks/capacity.py's
   simulation over the same arrival times and measured service times (docs/scaling.md);
3. the cluster path's cost per job: the same job, one at a time, through the cluster and through the
   single-machine server (`serve.background`).

    python benchmarks/ray_serve.py [--images 24 --rounds 2 --steps 20 --size 64 --requests 60 --out F.json]

Ray is told of 2 GPUs, so the replicas ask for a GPU each as on a real cluster; each gets one CPU core (one torch
thread). On a 2-core machine the ingress, Ray's own processes and this client share those cores with the replicas.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import capacity
import requests
import torch

from sdxl.interfaces.server.config import ServerConfig
from sdxl.interfaces.server.serve import background, free_port


def txt2img(url: str, body: dict) -> float:
    """One request's latency (s), from sending it to its answer."""
    start = time.perf_counter()
    r = requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - start


def recent(url: str) -> list[dict]:
    return requests.get(f"{url}/sdxl/v1/cluster", timeout=30).json()["recent"]


def deploy(replicas: int, config: ServerConfig) -> None:
    from ray import serve

    from sdxl.interfaces.ray_app import ClusterConfig, application

    serve.run(application(config, ClusterConfig(min_replicas=replicas, max_replicas=replicas)), name="sdxl",
              route_prefix="/")


def saturated(url: str, body: dict, images: int, replicas: int) -> dict:
    """`images` requests kept 2 per replica in flight: images per second, and each job's time on its replica."""
    with ThreadPoolExecutor(replicas) as pool:  # warm: every replica has run a job of this size
        list(pool.map(lambda i: txt2img(url, dict(body, seed=i)), range(2 * replicas)))
    seen = {r["id"] for r in recent(url)}
    start = time.perf_counter()
    with ThreadPoolExecutor(2 * replicas) as pool:
        list(pool.map(lambda i: txt2img(url, dict(body, seed=1000 + i)), range(images)))
    wall = time.perf_counter() - start
    jobs = [r for r in recent(url) if r["id"] not in seen]
    return {"replicas": replicas, "images": images, "wall_s": round(wall, 3), "images_per_s": round(images / wall, 3),
            "service_s": [r["ran_s"] for r in jobs], "per_replica": sorted(
                sum(1 for r in jobs if r["replica"] == name) for name in {r["replica"] for r in jobs})}


def one_at_a_time(url: str, body: dict, count: int) -> list[float]:
    txt2img(url, body)  # warm
    return [txt2img(url, dict(body, seed=i)) for i in range(count)]


def poisson_run(url: str, body: dict, rate: float, count: int, seed: int) -> tuple[list[float], list[float]]:
    """Requests sent at Poisson arrival times (each from its own thread): (arrival times, client latencies)."""
    arrivals = capacity.poisson(rate, count, random.Random(seed))
    latencies = [0.0] * count
    threads = []
    start = time.perf_counter()
    for i, at in enumerate(arrivals):
        time.sleep(max(0.0, start + at - time.perf_counter()))
        t = threading.Thread(target=lambda i=i: latencies.__setitem__(i, txt2img(url, dict(body, seed=2000 + i))))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    return arrivals, latencies


def predicted(arrivals: list[float], samples: list[float], replicas: int, repeats: int = 500) -> dict:
    """The simulation over the same arrival times, service times drawn from `samples`: for p50 and p95 latency,
    (median, 5%, 95%) over `repeats` draws."""
    rng = random.Random(0)
    runs = [capacity.simulate(arrivals, capacity.draw(samples, len(arrivals), rng), replicas) for _ in range(repeats)]
    out = {}
    for q in (50, 95):
        values = sorted(capacity.percentile(r, q) for r in runs)
        out[q] = tuple(round(capacity.percentile(values, k), 3) for k in (50, 5, 95))
    return out


def check_model(url: str, body: dict, saturated_runs: list[dict], count: int, load: float) -> dict:
    """Poisson arrivals at `load` x the 2 busy replicas' images per second; their waiting + service times at the ingress against
    the simulation with service times drawn from (a) this run's own jobs, (b) the busy 1- and 2-replica runs."""
    alone = [t for r in saturated_runs if r["replicas"] == 1 for t in r["service_s"]]
    busy = [t for r in saturated_runs if r["replicas"] == 2 for t in r["service_s"]]
    rate = load * statistics.median(r["images_per_s"] for r in saturated_runs if r["replicas"] == 2)
    seen = {r["id"] for r in recent(url)}
    arrivals, client = poisson_run(url, body, rate, count, seed=1)
    jobs = [r for r in recent(url) if r["id"] not in seen]
    ingress = [r["waited_s"] + r["ran_s"] for r in jobs]
    own = [r["ran_s"] for r in jobs]
    out = {"rate": round(rate, 3), "requests": count, "service_mean_s": round(statistics.mean(own), 3),
           "measured_ingress": {q: round(capacity.percentile(ingress, q), 3) for q in (50, 95)},
           "measured_client": {q: round(capacity.percentile(client, q), 3) for q in (50, 95)},
           "simulated_own": predicted(arrivals, own, 2), "simulated_alone": predicted(arrivals, alone, 2),
           "simulated_busy": predicted(arrivals, busy, 2)}
    print(f"Poisson arrivals at {rate:.2f}/s ({load:.0%} of 2 busy replicas' images/s), {count} "
          f"requests; this run's mean service {out['service_mean_s']:.3f} s")
    for q in (50, 95):
        print(f"  p{q}: measured {out['measured_ingress'][q]:.2f} s at the ingress ({out['measured_client'][q]:.2f} s at"
              f" the client); simulated with this run's service times {out['simulated_own'][q]}, with the busy "
              f"2-replica ones {out['simulated_busy'][q]}, with 1 replica's {out['simulated_alone'][q]}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=24, help="images per saturated run")
    p.add_argument("--rounds", type=int, default=2, help="1-replica and 2-replica runs, alternating")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--requests", type=int, default=60, help="requests in the Poisson run")
    p.add_argument("--load", type=float, default=0.7, help="the Poisson run's rate, as a fraction of capacity")
    p.add_argument("--out", help="write the figures (and the service times, for capacity.py --samples) here")
    a = p.parse_args()

    import os

    import ray
    from ray import serve

    torch.set_num_threads(1)  # the single-machine server in this process: one thread, as each replica
    body = {"prompt": "a red circle on a blue background", "width": a.size, "height": a.size, "steps": a.steps, "cfg_scale": 3.0,
                "sampler_name": "Euler"}
    config = ServerConfig(outputs=None)
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    results: dict = {"settings": vars(a), "threads_per_replica": 1, "cores": os.cpu_count()}
    try:
        runs = []
        for _ in range(a.rounds):
            for replicas in (1, 2):
                deploy(replicas, config)
                load = os.getloadavg()[0]
                runs.append(dict(saturated(url, body, a.images, replicas), load_before=load))
                r = runs[-1]
                print(f"{replicas} replica(s): {r['images_per_s']:.3f} images/s ({r['wall_s']:.1f} s for {a.images};"
                      f" jobs per replica {r['per_replica']}; median service {statistics.median(r['service_s']):.3f}"
                      f" s; load average before {load:.1f})", flush=True)
        ratios = [runs[i + 1]["images_per_s"] / runs[i]["images_per_s"] for i in range(0, len(runs), 2)]
        results.update(saturated=runs, ratios=[round(x, 3) for x in ratios])
        print(f"2 / 1 replicas, per round: {', '.join(f'{x:.2f}x' for x in ratios)}")

        results["poisson"] = check_model(url, body, runs, a.requests, a.load)

        results["one_at_a_time"] = {}
        with background(ServerConfig(port=0, outputs=None)) as (single_url, _):
            for steps in (1, a.steps):  # 1 step: nearly all of it is the way there and back
                cluster = statistics.median(one_at_a_time(url, dict(body, steps=steps), 10))
                single = statistics.median(one_at_a_time(single_url, dict(body, steps=steps), 10))
                results["one_at_a_time"][steps] = {"cluster_s": round(cluster, 4), "single_s": round(single, 4)}
                print(f"one {steps}-step job at a time, median latency: cluster {cluster:.3f} s, single machine "
                      f"{single:.3f} s (+{cluster - single:.3f} s)")
        results["service_s"] = [t for r in runs if r["replicas"] == 1 for t in r["service_s"]]
    finally:
        serve.shutdown()
        ray.shutdown()
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
