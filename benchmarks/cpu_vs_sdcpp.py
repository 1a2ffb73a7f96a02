"""sdxl against stable-diffusion.cpp on the CPU: the same SDXL file, size, steps, sampler, cfg and threads.

    OMP_NUM_THREADS=2 python benchmarks/cpu_vs_sdcpp.py --file base.safetensors --sd-cli PATH/TO/sd-cli

Each configuration runs in its own process, one at a time (measure on an otherwise idle machine), at two step
counts, `--repeats` times each. Per-step time is the difference of the two runs' sampling times over the
difference of their step counts (so prompt encoding, the first step's warm-up and decoding drop out); peak RSS is
the process's (`wait4`'s ru_maxrss); load and VAE-decode times are what each engine reports of itself (sd.cpp's
log lines, sdxl's timings around `sdxl.load` and the decode).

stable-diffusion.cpp is not built by this script: build its `sd-cli` yourself (its README: CMake, Release; for
the CPU no backend option is needed, and ggml builds with native CPU flags by default) and pass its path.
The file is an official-layout SDXL single file; `benchmarks/load_memory.py` writes a full-size one with zero
weights (timing does not depend on the values) if you have none.

Configurations: sdcpp-f16, sdcpp-q8_0 (sd.cpp's `--type`), sdxl-fp32, sdxl-bf16, sdxl-low-memory (`--low-memory`:
float8 U-Net, text encoders released, bfloat16 where the CPU is fast at it); `--configs` picks some.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a photograph of an astronaut riding a horse"
SDCPP_TYPES = {"sdcpp-f16": "f16", "sdcpp-q8_0": "q8_0"}
SDXL_MODES = {"sdxl-fp32": {"dtype": "fp32"}, "sdxl-bf16": {"dtype": "bf16"}, "sdxl-low-memory": {"low_memory": True},
              # what each part of --low-memory does on its own: the int8 U-Net alone (text encoders kept), float8
              # instead of int8, and bfloat16 U-Net weights with the text encoders released
              "sdxl-int8": {"dtype": "bf16", "quantise": "int8"},
              "sdxl-low-memory-fp8": {"low_memory": True, "quantise": "fp8"}}
SDCPP_TIMES = {"load_s": r"loading tensors completed, taking ([\d.]+)s", "sampling_s": r"sampling completed, taking ([\d.]+)s",
               "decode_s": r"decode_first_stage completed, taking ([\d.]+)s"}


def run_child(argv: list[str], env: dict[str, str] | None = None) -> tuple[str, float, float]:
    """(output, wall seconds, peak RSS MiB) of one process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{argv[0]} failed ({proc.returncode}):\n{out[-3000:]}")
    return out, wall, usage.ru_maxrss / 1024  # Linux: KiB


def sdcpp(args: argparse.Namespace, config: str, steps: int, out_dir: Path) -> dict:
    argv = [args.sd_cli, "-m", str(args.file), "--type", SDCPP_TYPES[config], "-p", PROMPT, "-W", str(args.size),
            "-H", str(args.size), "--steps", str(steps), "--cfg-scale", "5", "--sampling-method", "euler",
            "-t", str(args.threads), "-s", "0", "-o", str(out_dir / f"{config}-{steps}.png"),
            *(["--vae-tiling"] if args.vae_tiling else [])]
    out, wall, rss = run_child(argv)
    found = {k: re.search(p, out) for k, p in SDCPP_TIMES.items()}
    return {"wall_s": wall, "peak_rss_mib": rss, **{k: float(m.group(1)) if m else None for k, m in found.items()}}


def sdxl(args: argparse.Namespace, config: str, steps: int, out_dir: Path) -> dict:
    argv = [sys.executable, __file__, "--child", config, "--file", str(args.file), "--size", str(args.size),
            "--steps-child", str(steps), "--threads", str(args.threads), *(["--vae-tiling"] if args.vae_tiling else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out, wall, rss = run_child(argv, env)
    return {"wall_s": wall, "peak_rss_mib": rss, **json.loads(out.strip().splitlines()[-1])}




def child(config: str, file: str, size: int, steps: int, threads: int, tiled: bool = False) -> None:
    """One sdxl generation, timed by phase; the last line printed is JSON."""
    import torch

    import sdxl
    from sdxl.latents import decode_latents

    torch.set_num_threads(threads)
    start = time.perf_counter()
    pipe = sdxl.load(file, **SDXL_MODES[config])
    load_s = time.perf_counter() - start
    marks: list[float] = []
    start = time.perf_counter()
    latents = pipe.generate(PROMPT, width=size, height=size, steps=steps, cfg=5.0, sampler="euler", seed=0,
                            output="latent", callback=lambda *a: marks.append(time.perf_counter()))
    first = marks[0] - start if marks else None  # prompt encoding and the first step
    sampling_s = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        decode_latents(pipe.base.vae, latents, tiled=tiled)
    decode_s = time.perf_counter() - start
    print(json.dumps({"load_s": load_s, "sampling_s": sampling_s, "first_step_s": first, "decode_s": decode_s,
                      "dtype": str(pipe.dtype).removeprefix("torch.")}))


def per_step(runs: dict[int, dict], key: str) -> float | None:
    (n1, a), (n2, b) = sorted(runs.items())
    return (b[key] - a[key]) / (n2 - n1) if a.get(key) is not None and b.get(key) is not None else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", type=Path, required=True)
    parser.add_argument("--sd-cli", help="stable-diffusion.cpp's sd-cli binary (needed for the sdcpp-* configs)")
    parser.add_argument("--configs", default="sdcpp-f16,sdcpp-q8_0,sdxl-bf16,sdxl-low-memory")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", default="2,4", help="the two step counts whose difference gives a step's time")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    parser.add_argument("--vae-tiling", action="store_true", help="sdxl decodes in tiles (sd.cpp: --vae-tiling)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--steps-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, str(args.file), args.size, args.steps_child, args.threads, args.vae_tiling)
    counts = [int(n) for n in args.steps.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for config in args.configs.split(","):
                engine = sdcpp if config in SDCPP_TYPES else sdxl
                runs = {n: engine(args, config, n, Path(tmp)) for n in counts}
                row = {"config": config, "repeat": repeat + 1, "size": args.size, "threads": args.threads,
                       "step_s": per_step(runs, "sampling_s"), "step_s_wall": per_step(runs, "wall_s"),
                       "peak_rss_gib": max(r["peak_rss_mib"] for r in runs.values()) / 1024,
                       "load_s": runs[counts[0]]["load_s"], "decode_s": runs[counts[0]]["decode_s"], "runs": runs}
                results.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
    print("\n| config | size | s / step | s / step (wall) | peak RSS GiB | load s | VAE decode s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        cells = [r["step_s"], r["step_s_wall"], r["peak_rss_gib"], r["load_s"], r["decode_s"]]
        print(f"| {r['config']} ({r['repeat']}) | {r['size']} | " + " | ".join(
            "-" if c is None else f"{c:.2f}" for c in cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
