"""Decoding on the CPU, whole at 1024x1024 and in tiles at 2048x2048: our VAE against diffusers' AutoencoderKL.

    python benchmarks/cpu_vae_decode.py             # full-size SDXL VAE, float32
    python benchmarks/cpu_vae_decode.py --tiny      # the tiny VAE at 256x256 (a dry run, seconds)
    python benchmarks/cpu_vae_decode.py --dtype bf16   # weights and activations in bfloat16 (CPUs with AMX)

A whole 2048x2048 decode in float32 does not fit this 23 GiB machine (ours was killed by the kernel
at 24 GB: a 256-channel feature map at 2048x2048 is 4 GiB, and a ResBlock holds several), which is
what tiling is for. Each of the four decodes runs in its own fresh process, so its peak RSS is its
own; the weights are filled in place from seeded generators in our names (diffusers'
tensors reached through our diffusers key table), so both hold the same numbers. Tiled: ours
`decode_tiled` (tiles of at most 128 latents overlapping by at least 16, cross-faded), diffusers'
`enable_tiling()` (its own tile size and blending). Peak RSS is printed beyond the process's RSS once
the weights are in (the decode's own memory: activations and the output).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from cpu_unet_step import DTYPES, fill_, memory_mib  # noqa: E402  (the same weights recipe as the U-Net benchmark)

RUNS = ("sdxl", "diffusers", "sdxl-tiled", "diffusers-tiled")  # whole at --whole pixels, tiled at --tiled


def child(run: str, tiny: bool, pixels: int, out: str, dtype: torch.dtype) -> dict:
    from safetensors.torch import save_file

    from sdxl.checkpoints.keymap import convert
    from sdxl.checkpoints.vae_keys import diffusers_vae_keys, vae_config_to_diffusers
    from sdxl.models import vae as vaes
    from sdxl.models.vae import AutoencoderKL

    config = vaes.tiny if tiny else vaes.base
    with torch.device("meta"):
        ours = AutoencoderKL(config)
    if run.startswith("sdxl"):
        model = ours.to_empty(device="cpu")
        fill_(model.state_dict())
        decode = model.decode_tiled if run.endswith("tiled") else model.decode
    else:
        import diffusers

        with torch.device("meta"):
            model = diffusers.AutoencoderKL(**vae_config_to_diffusers(config))
        model.to_empty(device="cpu")
        tensors = convert(model.state_dict(), diffusers_vae_keys(config), where="diffusers vae", allow_unused=True)
        fill_({name: tensors[name] for name in ours.state_dict()})
        if run.endswith("tiled"):
            model.enable_tiling()

        def decode(z):
            return model.decode(z).sample
    model.to(dtype).eval().requires_grad_(False)  # float32 filled, then rounded: the same numbers in both
    latent = pixels // config.downscale_factor
    latents = torch.randn(1, config.latent_channels, latent, latent, generator=torch.Generator().manual_seed(0))
    latents = latents.to(dtype)
    rss = memory_mib("VmRSS")
    with torch.inference_mode():
        t = time.perf_counter()
        image = decode(latents)
        seconds = time.perf_counter() - t
    save_file({"image": image.float().contiguous()}, out)
    return {"seconds": seconds, "decode_peak_mib": memory_mib("VmHWM") - rss, "threads": torch.get_num_threads(),
            "size": tuple(image.shape[-2:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--whole", type=int, default=None, help="pixels of the whole decodes (default 1024; tiny 128)")
    parser.add_argument("--tiled", type=int, default=None, help="pixels of the tiled decodes (default 2048; tiny 256)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--child", choices=RUNS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--pixels", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tiny, args.pixels, args.out, DTYPES[args.dtype])))
        return
    whole = args.whole or (128 if args.tiny else 1024)
    tiled = args.tiled or (256 if args.tiny else 2048)

    import diffusers
    from safetensors.torch import load_file

    results, images = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in RUNS:
            out = f"{tmp}/{run}.safetensors"
            pixels = tiled if run.endswith("tiled") else whole
            proc = subprocess.run([sys.executable, __file__, "--child", run, "--out", out, "--pixels", str(pixels),
                                   "--dtype", args.dtype] + (["--tiny"] if args.tiny else []), capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{run} failed:\n{proc.stderr[-3000:]}")
            results[run] = json.loads(proc.stdout.strip().splitlines()[-1])
            images[run] = load_file(out)["image"]
            print(f"{run:<16} {pixels}x{pixels} {results[run]['seconds']:7.2f} s   decode's peak RSS {results[run]['decode_peak_mib']:8,.0f} MiB",
                  flush=True)
    print(f"\ntorch {torch.__version__}, diffusers {diffusers.__version__}, {results['sdxl']['threads']} thread(s), "
          f"{DTYPES[args.dtype]}, {'tiny' if args.tiny else 'SDXL'} VAE, batch 1")
    for a, b in (("sdxl", "diffusers"), ("sdxl-tiled", "diffusers-tiled")):
        ra, rb = results[a], results[b]
        print(f"{a} / {b}: time {ra['seconds'] / rb['seconds']:.2f}, decode's peak RSS "
              f"{ra['decode_peak_mib'] / rb['decode_peak_mib']:.2f}")
    for a, b in (("sdxl", "diffusers"), ("sdxl-tiled", "diffusers-tiled")):
        diff = (images[a] - images[b]).abs()
        print(f"images: |{a} - {b}| max {diff.max():.2e}, mean {diff.mean():.2e} (image std {images[b].std():.3f})")


if __name__ == "__main__":
    main()
