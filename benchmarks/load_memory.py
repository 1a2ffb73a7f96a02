"""Peak memory and time of loading a full-size SDXL base single file, against reading the file.

    python benchmarks/load_memory.py [--file PATH] [--device cpu|cuda]

Without --file it writes a full-size base in the official layout (float16, 6.9 GB, zero weights:
the loader's cost does not depend on the values) to a temporary folder first. Each measurement runs
in a fresh process, which reports its own peak resident memory (VmHWM), so numbers don't mix.
The file is read once before measuring, so every figure is with the file in the page cache. A load
to another device is then checked, outside the timing, against a CPU load of the same file: every
weight equal.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def peak_rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_file(path: Path, device: str = "cpu", tiny: bool = False) -> None:
    """A base in the official layout, float16. On the CPU with zero weights (random init of 3.5 B numbers takes
    minutes there; the loader's cost does not depend on the values); elsewhere (a GPU) with PyTorch's default
    random init, which is fast there and what timing images needs."""
    from sdxl.checkpoints.load import Components
    from sdxl.checkpoints.save import save_single_file
    from sdxl.models import clip, unet, vae
    from sdxl.models.clip import CLIPTextEncoder
    from sdxl.models.unet import UNet
    from sdxl.models.vae import AutoencoderKL

    def zeros(model: torch.nn.Module) -> torch.nn.Module:
        return model.to_empty(device="cpu").half().apply(lambda m: [p.data.zero_() for p in m.parameters(recurse=False)])

    u, v, l, g = (unet.tiny, vae.tiny, clip.clip_l_tiny, clip.clip_g_tiny) if tiny else \
        (unet.base, vae.base, clip.clip_l, clip.clip_g)
    torch.manual_seed(0)
    with torch.device("meta" if device == "cpu" else device):
        parts = Components(kind="base", unet=UNet(u), vae=AutoencoderKL(v), text_encoder=CLIPTextEncoder(l),
                           text_encoder_2=CLIPTextEncoder(g))
    if device == "cpu":
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            setattr(parts, name, zeros(getattr(parts, name)))
    save_single_file(parts, path, dtype=torch.float16)


def measure(mode: str, path: str, device: str, dtype: str) -> dict:
    imported = 0.0
    if mode == "load":  # importing the package is not loading the file: timed apart
        t = time.perf_counter()
        from sdxl.checkpoints.load import load_single_file

        imported = time.perf_counter() - t
        if device == "cuda":  # starting CUDA is not loading the file either (timed in with the import)
            t = time.perf_counter()
            torch.zeros(1, device=device)
            imported += time.perf_counter() - t
    start = time.perf_counter()
    if mode == "read":  # the floor: read every byte of the file once
        with open(path, "rb", buffering=0) as f:
            buf = bytearray(64 << 20)
            while f.readinto(buf):
                pass
    else:
        parts = load_single_file(path, dtype=dtype, device=device)
        if device == "cuda":
            torch.cuda.synchronize()  # the last copies to the GPU are asynchronous
        loaded = time.perf_counter() - start
        # Touch every weight, so lazily mapped pages count as they would in use.
        total = sum(float(p.float().abs().sum()) for m in (parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2)
                    for p in m.parameters())
        assert total == total
    seconds = time.perf_counter() - start
    peak = peak_rss_mib()
    if mode == "load" and device != "cpu":  # after the clock: every weight as a plain CPU load (mapped file) gives it
        reference = load_single_file(path, dtype=dtype, device="cpu")
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            theirs = getattr(reference, name).state_dict()
            for k, v in getattr(parts, name).state_dict().items():
                if not torch.equal(v.cpu(), theirs[k]):
                    raise SystemExit(f"{device} load differs from the CPU load at {name}.{k}")
    return {"mode": mode, "dtype": dtype, "device": device, "seconds": seconds, "peak_rss_mib": peak,
            "load_seconds": loaded if mode == "load" else seconds, "import_seconds": imported}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", type=Path, help="an official-layout SDXL base file (made if omitted)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", default="fp16,fp32")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    tmp = None
    if args.file is not None and not args.file.exists():
        make_file(args.file)
    if args.file is None:
        tmp = tempfile.TemporaryDirectory(dir=os.environ.get("SDXL_BENCH_TMP"))
        args.file = Path(tmp.name) / "sd_xl_base_random.safetensors"
        t = time.perf_counter()
        make_file(args.file)
        print(f"wrote {args.file} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    size_mib = args.file.stat().st_size / 2**20

    def child(*argv: str) -> dict:
        out = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    child("read", str(args.file), "cpu", "-")  # warm the page cache
    baseline = child("read", str(args.file), "cpu", "-")
    python_only = child("read", os.devnull, "cpu", "-")["peak_rss_mib"]
    print(f"file: {args.file.name}, {size_mib:,.0f} MiB (float16); torch {torch.__version__}; device {args.device}")
    print(f"reading the file: {baseline['seconds']:.2f} s")
    print("| load into | load s | x read time | import sdxl (and start CUDA) s, apart | load + touch every weight s | peak RSS MiB | "
          "weights MiB | peak RSS / weights |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for dtype in args.dtypes.split(","):
        r = child("load", str(args.file), args.device, dtype)
        weights = size_mib * (2 if dtype == "fp32" else 1)
        if args.device != "cpu":
            weights = size_mib  # the host side only maps the file
        rss = r["peak_rss_mib"] - python_only
        print(f"| {dtype} on {args.device} | {r['load_seconds']:.2f} | {r['load_seconds'] / baseline['seconds']:.2f} | "
              f"{r['import_seconds']:.2f} | {r['seconds']:.2f} | "
              f"{rss:,.0f} | {weights:,.0f} | {rss / weights:.2f} |")
    print(f"(peak RSS is the process's VmHWM minus {python_only:,.0f} MiB of an interpreter with torch imported)")


if __name__ == "__main__":
    main()
