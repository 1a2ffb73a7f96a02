"""The capacity model of docs/scaling.md: a first-come-first-served queue in front of `replicas` servers, one job
each at a time (the server's queue and its GPU replicas), simulated over measured service times.

    python benchmarks/capacity.py --service 1.85 --rate 2 --p95 10      # an H200's measured 1024x1024 image time
    python benchmarks/capacity.py --samples times.json --rate 1 --p95 5  # service times measured by ray_serve.py

Service times are drawn from the measured samples (bootstrap: the simulation adds no distribution of its own);
arrivals are Poisson (independent users) or a burst (everything at once). Nothing here is fitted.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
from collections.abc import Sequence
from pathlib import Path


def poisson(rate: float, count: int, rng: random.Random) -> list[float]:
    """Arrival times of `count` requests at `rate` per second, independent (exponential gaps)."""
    t, times = 0.0, []
    for _ in range(count):
        t += rng.expovariate(rate)
        times.append(t)
    return times


def simulate(arrivals: Sequence[float], services: Sequence[float], replicas: int) -> list[float]:
    """Each request's latency (waiting + service): FIFO, the next job to the first replica that is free."""
    free = [0.0] * replicas  # when each replica is next free
    latencies = []
    for arrived, service in zip(arrivals, services):
        start = max(arrived, heapq.heappop(free))
        heapq.heappush(free, start + service)
        latencies.append(start + service - arrived)
    return latencies


def draw(samples: Sequence[float], count: int, rng: random.Random) -> list[float]:
    return [rng.choice(samples) for _ in range(count)]


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def latency(rate: float, samples: Sequence[float], replicas: int, count: int = 20000, seed: int = 0) -> dict:
    """p50 / p95 / p99 latency at `rate` requests per second (steady state: the first 10% left out)."""
    rng = random.Random(seed)
    lat = simulate(poisson(rate, count, rng), draw(samples, count, rng), replicas)[count // 10:]
    return {q: percentile(lat, q) for q in (50, 95, 99)}


def replicas_needed(rate: float, p95: float, samples: Sequence[float], most: int = 256) -> int | None:
    """The fewest replicas whose simulated p95 latency at `rate` is within `p95` seconds (None: not even `most`)."""
    mean = sum(samples) / len(samples)
    for replicas in range(max(1, int(rate * mean)), most + 1):  # fewer than rate x mean can never keep up
        if rate * mean < replicas and latency(rate, samples, replicas)[95] <= p95:
            return replicas
    return None


def burst(size: int, samples: Sequence[float], replicas: int, seed: int = 0) -> dict:
    """`size` requests at once on idle replicas: when the last is answered, and the median wait."""
    rng = random.Random(seed)
    lat = simulate([0.0] * size, draw(samples, size, rng), replicas)
    return {"last_s": max(lat), "p50_s": percentile(lat, 50)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--service", type=float, help="one measured service time (s per job), for all jobs")
    p.add_argument("--samples", help="a JSON list of measured service times (s), e.g. from ray_serve.py --out")
    p.add_argument("--rate", type=float, nargs="+", default=[0.5, 1, 2, 5, 10], help="requests per second")
    p.add_argument("--p95", type=float, default=10.0, help="latency target (s) at the 95th percentile")
    p.add_argument("--burst", type=int, nargs="+", default=[10, 50, 200], help="burst sizes")
    p.add_argument("--replicas", type=int, default=4, help="replicas for the burst table")
    a = p.parse_args()
    samples = json.loads(Path(a.samples).read_text())["service_s"] if a.samples else [a.service]
    mean = sum(samples) / len(samples)
    print(f"service time: mean {mean:.3f} s over {len(samples)} sample(s): {1 / mean:.3f} images/s per replica")
    print(f"\n| requests/s | replicas for p95 <= {a.p95:g} s | p50 s | p95 s |\n| --- | --- | --- | --- |")
    for rate in a.rate:
        n = replicas_needed(rate, a.p95, samples)
        lat = latency(rate, samples, n) if n else {50: float("nan"), 95: float("nan")}
        print(f"| {rate:g} | {n} | {lat[50]:.2f} | {lat[95]:.2f} |")
    print(f"\n| burst (requests at once) | {a.replicas} replicas: last answered s | median s |\n| --- | --- | --- |")
    for size in a.burst:
        b = burst(size, samples, a.replicas)
        print(f"| {size} | {b['last_s']:.1f} | {b['p50_s']:.1f} |")


if __name__ == "__main__":
    main()
