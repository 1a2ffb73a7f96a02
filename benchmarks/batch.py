"""Batch generation on 1 and N processes: images per second of `sdxl generate --prompts-file` (torchrun for N).

    python benchmarks/batch.py                          # built-in model on the CPU: 40 prompts, 64x64, 8 steps
    python benchmarks/batch.py --device cuda --processes 1,2 --size 1024 --steps 30 --prompts 16

Each row is a fresh command into an empty folder, timed from its launch to its exit (interpreters, imports,
torchrun's rendezvous, loading, sampling, writing, merging the manifest); "sampling" is the slowest process's own
figure for its images (the `N image(s) in S s` line each process prints), the part that more processes divide.
On the CPU the point is the ratio: N processes split the cores (cores // N threads each), so the rows are
1 process on all cores, 1 process on one core's share, and N processes. On GPUs each process has its own.
The runs' images are checked equal, name for name, to the first row's where the thread counts match.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "white", "black")
SHAPES = ("circle", "square", "triangle")


def prompts_file(folder: Path, count: int) -> Path:
    lines = [f"a {COLOURS[i % 8]} {SHAPES[i % 3]} on a {COLOURS[(3 * i + 1 + i // 8) % 8]} background"
             for i in range(count)]
    path = folder / "prompts.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(processes: int, threads: int, args: argparse.Namespace, prompts: Path, out: Path) -> dict:
    """One command's figures: wall seconds, the slowest process's sampling seconds, images written."""
    generate = ["-m", "sdxl", "generate", "--prompts-file", str(prompts), "--out", str(out), "--steps",
                str(args.steps), "--width", str(args.size), "--height", str(args.size), "--seed", "1",
                "--device", args.device]
    launcher = [sys.executable] if processes == 1 else [str(TORCHRUN), "--standalone", "--nproc-per-node",
                                                         str(processes)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    proc = subprocess.run([*launcher, *generate], check=False, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(launcher)} failed:\n{proc.stderr[-2000:]}")
    sampling = [float(seconds) for seconds in re.findall(r"\d+ image\(s\) in ([\d.]+) s", proc.stderr)]
    return {"wall": wall, "sampling": max(sampling), "images": len(list(out.glob("*.png")))}


def same_images(a: Path, b: Path) -> bool:
    import numpy as np
    from PIL import Image

    names = sorted(p.name for p in a.glob("*.png"))
    return names == sorted(p.name for p in b.glob("*.png")) and all(
        np.array_equal(np.asarray(Image.open(a / n)), np.asarray(Image.open(b / n))) for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--processes", default="2", help="the process counts of the torchrun rows, e.g. 2,4")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    counts = [int(n) for n in args.processes.split(",") if int(n) > 1]
    rows = [("1 process, all cores", 1, cores), *[(f"{n} processes (torchrun)", n, max(1, cores // n))
                                                  for n in counts]]
    if args.device == "cpu":
        rows.insert(1, (f"1 process, {max(1, cores // max(counts, default=1))} thread(s)", 1,
                        max(1, cores // max(counts, default=1))))
    print(f"{args.prompts} prompts, {args.size}x{args.size}, {args.steps} steps, {args.device}; {cores} cores; "
          f"load average {os.getloadavg()[0]:.2f} before", flush=True)
    print("| run | threads each | wall s | images/s (wall) | sampling s | images/s (sampling) |\n"
          "| --- | --- | --- | --- | --- | --- |", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        prompts, done = prompts_file(Path(tmp), args.prompts), []
        for label, processes, threads in rows:
            out = Path(tmp) / f"out{len(done)}"
            r = run(processes, threads, args, prompts, out)
            print(f"| {label} | {threads} | {r['wall']:.1f} | {r['images'] / r['wall']:.2f} | {r['sampling']:.1f} | "
                  f"{r['images'] / r['sampling']:.2f} |", flush=True)
            alike = [(l, o) for l, t, o in done if t == threads]  # the same thread count: the same pixels
            if alike:
                print(f"  (images equal to those of '{alike[0][0]}': {same_images(out, alike[0][1])})", flush=True)
            done.append((label, threads, out))
    print(f"load average {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
