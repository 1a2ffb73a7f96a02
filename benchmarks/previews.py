"""What a live preview costs against a sampler step (the budget: <= 5% of a step), in one run on this CPU.

    python benchmarks/previews.py                   # full size: 1024x1024, float32, U-Net batch 1
    python benchmarks/previews.py --dtype bf16      # weights, activations and latents in bfloat16
    python benchmarks/previews.py --size 512 --unet-runs 3

Measured, each as the median of its runs under torch.inference_mode:
- the linear-map preview (`Previewer.image`, to a PIL image) of a full-size SDXL latent (1, 4, size/8, size/8)
  and of the built-in model's latent at its native 64x64 pixels (1, 4, 8, 8);
- TAESD previews (`Previewer.taesd` with a random-weight decoder) of the full-size latent: at the default
  max_size (512 px: the latents area-downsampled first), at 256 px, and the full-size decode (max_size None);
- one U-Net evaluation of the full SDXL base config with random weights (filled as in `cpu_unet_step.py`), at
  --unet-batch (1: no classifier-free guidance; a guided step is batch 2, about twice as long, so the ratios
  printed are the conservative ones), and one step of the built-in base U-Net as `pipeline.guided_unet` calls
  it (batch 2: guidance).
The previews are timed before and after the slow U-Net steps and the medians taken over both, so drift in the
machine's load falls on both sides.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_unet_step import DTYPES, make_step

from sdxl import builtin
from sdxl.checkpoints.load import load
from sdxl.models import unet as unets
from sdxl.models import vae as vaes
from sdxl.models.specs import Components
from sdxl.models.taesd import TAESDDecoder
from sdxl.previews import TAESD_MAX_SIZE, Previewer


def timed(fn, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def builtin_step(parts: Components, dtype: torch.dtype):
    """One guided step of the built-in U-Net at 64x64 (8x8 latents): batch 2, as `guided_unet` runs it."""
    unet = parts.unet.to(dtype)
    c = unet.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, c.in_channels, 8, 8, generator=g).to(dtype)
    context = torch.randn(2, 77, c.context_dim, generator=g).to(dtype)
    y = torch.randn(2, c.adm_in_channels, generator=g).to(dtype)
    return lambda: unet(x, torch.tensor(500.0), context, y)


def previews(args: argparse.Namespace, dtype: torch.dtype) -> dict[str, callable]:
    """name -> a call making one preview image."""
    g = torch.Generator().manual_seed(0)
    full = torch.randn(1, 4, args.size // 8, args.size // 8, generator=g).to(dtype)
    small = torch.randn(1, 4, 8, 8, generator=g).to(dtype)
    with torch.device("meta"):  # for_model reads only the VAE's config
        sdxl = Components(kind="base", vae=vaes.AutoencoderKL(vaes.base))
    linear_sdxl = Previewer.for_model(sdxl)
    linear_builtin = Previewer.for_model(load(builtin.path("builtin")))
    decoder = TAESDDecoder()  # PyTorch's default init: random weights
    assert linear_sdxl.source.startswith("SDXL") and linear_builtin.source.startswith("builtin")
    calls = {
        f"linear SDXL {tuple(full.shape)}": lambda: linear_sdxl.image(full),
        f"linear builtin {tuple(small.shape)}": lambda: linear_builtin.image(small),
    }
    for max_size in (TAESD_MAX_SIZE, 256, None):
        taesd = Previewer.taesd(decoder, max_size=max_size)
        size = taesd.image(full).size
        name = f"TAESD {tuple(full.shape)} -> {size[0]}x{size[1]} (max_size {max_size})"
        calls[name] = lambda taesd=taesd: taesd.image(full)
    return calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=1024, help="full-size image side in pixels (default 1024)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--unet-batch", type=int, default=1, help="batch of the full-size U-Net call (default 1)")
    p.add_argument("--unet-runs", type=int, default=2, help="timed full-size U-Net steps, after one warm-up")
    p.add_argument("--taesd-runs", type=int, default=3, help="timed TAESD previews per round (2 rounds)")
    p.add_argument("--threads", type=int, help="torch threads (default torch's; 1 on a machine shared with others)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {dtype}", flush=True)
    calls = previews(args, dtype)
    parts = load(builtin.path("builtin"))
    times: dict[str, list[float]] = {name: [] for name in [*calls, "builtin U-Net step (batch 2)"]}
    with torch.inference_mode():
        small_step = builtin_step(parts, dtype)

        def round_of_previews() -> None:
            for name, fn in calls.items():
                fn()  # warm-up
                times[name] += timed(fn, args.taesd_runs if name.startswith("TAESD") else 50)
            small_step()
            times["builtin U-Net step (batch 2)"] += timed(small_step, 20)

        round_of_previews()
        print("first round of previews done; building the full-size U-Net", flush=True)
        step, _ = make_step("sdxl", unets.base, args.unet_batch, args.size, dtype=dtype)
        t0 = time.perf_counter()
        step()
        print(f"full-size U-Net warm-up step {time.perf_counter() - t0:.2f} s", flush=True)
        unet_name = f"SDXL U-Net step {args.size}x{args.size} (batch {args.unet_batch})"
        times[unet_name] = timed(step, args.unet_runs)
        del step
        round_of_previews()

    median = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:<58} median {median[name] * 1e3:10.2f} ms over {len(t)} (min {min(t) * 1e3:.2f})")
    full_step, small_step_s = median[unet_name], median["builtin U-Net step (batch 2)"]
    for name in calls:
        against, what = (small_step_s, "builtin step") if "builtin" in name else (full_step, "SDXL step")
        print(f"ratio {name} / {what}: {median[name] / against:.4%}")


if __name__ == "__main__":
    main()
