"""Start-up: from process start to the first image written, `sdxl generate` without compilation.

    python benchmarks/startup.py                  # full-size base, 1024x1024, 30 euler steps, fp16 on cuda
    python benchmarks/startup.py --tiny           # a dry run on the CPU: tiny models, 64x64

A full-size base with random weights (PyTorch's default initialisation, made on the GPU, where that
is fast; zeros in the CPU dry run) is written as an official single file first; its pages stay in the page cache, as they
would for a user who generated before. Each run is a fresh `python -m sdxl generate` process,
timed from its launch to its exit (the whole command: interpreter, imports, starting CUDA, loading
the file, encoding the prompt, 30 steps, decoding, writing the PNG); the process's own --json
report splits off the load and the image. The first run also warms the disk caches of Python's
bytecode, so the figure is the median of the later runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from load_memory import make_file  # noqa: E402  (random weights on a GPU, zeros on the CPU)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (a dry run)")
    parser.add_argument("--file", type=Path, help="an official-layout base file to use (written if missing)")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes; the first warms the caches")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    size = 64 if args.tiny else 1024
    with tempfile.TemporaryDirectory() as tmp:
        path = args.file or Path(tmp) / "sd_xl_base_random.safetensors"
        if not path.exists():
            t = time.perf_counter()
            make_file(path, device.type, args.tiny)
            print(f"wrote {path.name} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t:.0f} s",
                  flush=True)
        command = [sys.executable, "-m", "sdxl", "generate", "a lighthouse on a cliff at dusk", "--model", str(path),
                   "--device", device.type, "--dtype", "fp16" if device.type == "cuda" else "fp32",
                   "--width", str(size), "--height", str(size), "--steps", "30", "--cfg", "5", "--sampler", "euler",
                   "--json"]
        # This checkout's package first, then whatever the caller had (the GPU machine's carried wheels).
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
        walls, reports = [], []
        for run in range(args.runs):
            t = time.perf_counter()
            out = ["--out", str(Path(tmp) / f"startup{run}.png")]
            proc = subprocess.run(command + out, capture_output=True, text=True, cwd=ROOT, env=env)
            wall = time.perf_counter() - t
            if proc.returncode:
                sys.exit(f"sdxl generate failed:\n{proc.stderr[-3000:]}")
            report = json.loads(proc.stdout)
            walls.append(wall)
            reports.append(report)
            print(f"run {run + 1}: process start to exit {wall:.2f} s (model load {report['load_seconds']:.2f} s, "
                  f"image {report['seconds']:.2f} s, peak memory {report['peak_memory_bytes'] / 2**30:.2f} GiB, "
                  f"{report['peak_memory_kind']})", flush=True)
    later = walls[1:] or walls
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {name}, {'tiny' if args.tiny else 'full-size'} base, {size}x{size}, "
          f"30 euler steps, cfg 5, no compilation")
    print(f"start-up (process start to first image written): median {statistics.median(later):.2f} s over runs "
          f"2..{len(walls)} (first run {walls[0]:.2f} s); target <= 10 s")


if __name__ == "__main__":
    main()
