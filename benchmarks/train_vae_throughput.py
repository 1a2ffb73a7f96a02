"""VAE training throughput on the CPU: images/s and peak RSS of `sdxl train-vae`'s optimizer step at a small size.

    python benchmarks/train_vae_throughput.py                    # SDXL's VAE (base preset, random), 64x64, batch 2
    python benchmarks/train_vae_throughput.py --preset tiny --size 128 --batch 4
    python benchmarks/train_vae_throughput.py --lpips --gan      # + LPIPS (random VGG16) and the PatchGAN

Each configuration runs in its own fresh process (its peak RSS is its own): the trainer's `_start` on a folder of
shape images at one bucket, `--warmup` steps untimed, then `--steps` timed optimizer steps (`_train_step` +
`_optimizer_step`: forward, backward, Adam, EMA). Decoder-only (the fine-tune recipe) unless --full.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def child(args: argparse.Namespace, folder: Path) -> dict:
    import torch

    from sdxl.models import vae as vaes
    from sdxl.training import train_vae as tv
    from sdxl.training.lpips import LPIPS
    from sdxl.training.shapes import write_dataset
    from sdxl.training.vae_config import VAETrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    write_dataset(folder / "data", max(8, args.batch * 2), resolution=args.size, seed=0)
    tv.save_vae(tv.AutoencoderKL(vaes.PRESETS[args.preset]), folder / "vae.safetensors")
    extra = {}
    if args.lpips:  # random weights in the two files' formats: the cost is the same as the real ones'
        lp = LPIPS()
        torch.save({f"features.{k}": v for k, v in lp.features.state_dict().items()}, folder / "vgg16.pth")
        torch.save({f"lin{i}.model.1.weight": m.weight.abs() for i, m in enumerate(lp.lins)}, folder / "vgg.pth")
        extra = {"lpips_vgg": str(folder / "vgg16.pth"), "lpips_linear": str(folder / "vgg.pth")}
    cfg = VAETrainConfig(model=str(folder / "vae.safetensors"), data=str(folder / "data"), resolution=args.size,
                         bucket_multiple=args.size, batch_size=args.batch, steps=10**6, perceptual_weight=float(args.lpips),
                         decoder_only=not args.full, discriminator=args.gan, disc_start=0,
                         mixed_precision=args.mixed_precision,
                         output_dir=str(folder / "out"), **extra)
    run = tv._start(cfg, tv.Dist())
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            t0 = time.perf_counter()
        values = tv._train_step(run)
        tv._optimizer_step(run, values["lr"])
    seconds = time.perf_counter() - t0
    return {"preset": args.preset, "size": args.size, "batch": args.batch, "lpips": args.lpips, "gan": args.gan,
            "decoder_only": not args.full, "mixed_precision": args.mixed_precision, "threads": torch.get_num_threads(), "steps": args.steps,
            "s_per_step": round(seconds / args.steps, 3), "images_per_s": round(args.steps * args.batch / seconds, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="base", choices=("base", "tiny"), help="VAE size (base: SDXL's)")
    p.add_argument("--size", type=int, default=64, help="square training images of this side")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--lpips", action="store_true")
    p.add_argument("--gan", action="store_true")
    p.add_argument("--full", action="store_true", help="train the encoder too")
    p.add_argument("--mixed-precision", default="no", choices=("no", "bf16"), help="the config's mixed_precision")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 is faster on busy cores)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(child(args, Path(tmp))))
        return
    out = subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]], capture_output=True, text=True,
                         check=False)
    if out.returncode:
        sys.exit(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"child failed ({out.returncode})")
    print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
