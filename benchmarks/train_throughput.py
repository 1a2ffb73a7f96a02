"""Diffusion-training throughput on the CPU: images/s and peak RSS of `sdxl train`'s optimizer step, LoRA and full
fine-tuning (and Diffusion-DPO), at a small size.

    OMP_NUM_THREADS=2 python benchmarks/train_throughput.py                         # the tiny model, 64x64, batch 4
    OMP_NUM_THREADS=2 python benchmarks/train_throughput.py --model base.safetensors --size 256 --batch 1 \
        --modes lora --mixed-precision bf16                                         # full-size SDXL, LoRA rank 8

Each mode runs in its own fresh process (its peak RSS is its own): the trainer's `_start` on a folder of shape
images at one bucket, `--warmup` steps untimed, then `--steps` timed optimizer steps (`_accumulate` + `_commit`'s
optimizer step: text encoding, VAE encoding, U-Net forward and backward, AdamW, EMA where set). Modes: lora (rank
8, the attention projections), full (the whole U-Net), dpo (LoRA-DPO on pairs of the same images: 2 images a
pair, counted as 2).
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

MODES = {"lora": {"lora_rank": 8, "lr": 1e-4}, "full": {"lora_rank": 0, "lr": 1e-5},
         "dpo": {"lora_rank": 8, "lr": 1e-4, "objective": "dpo"}}


def _pairs(folder: Path) -> None:
    """pairs.jsonl over the shape images: each image preferred to the next one (a timing needs no real preference)."""
    images = sorted(p.name for p in folder.glob("*.png"))
    rows = [{"prompt": "a shape", "chosen": a, "rejected": b} for a, b in zip(images, images[1:] + images[:1])]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def child(args: argparse.Namespace, folder: Path) -> dict:
    import torch

    from sdxl.training import train as tr
    from sdxl.training.config import TrainConfig
    from sdxl.training.shapes import write_dataset

    torch.manual_seed(0)
    write_dataset(folder / "data", max(8, args.batch * 2), resolution=args.size, seed=0)
    if args.mode == "dpo":
        _pairs(folder / "data")
    model = {"model": args.model} if args.model else {"init": "tiny"}
    cfg = TrainConfig(**model, data=str(folder / "data"), resolution=args.size, bucket_multiple=args.size,
                      batch_size=args.batch, steps=10**6, mixed_precision=args.mixed_precision,
                      gradient_checkpointing=args.gradient_checkpointing, output_dir=str(folder / "out"),
                      **MODES[args.mode])
    run = tr._start(cfg, tr.setup_distributed(), None)
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            start = time.perf_counter()
        run.opt.zero_grad(set_to_none=True)
        float(tr._accumulate(run)[0])  # (waits for the step, as logging the loss does)
        tr._optimizer_step(run)
    seconds = time.perf_counter() - start
    images = args.steps * args.batch * (2 if args.mode == "dpo" else 1)
    trained = sum(p.numel() for p in run.params.values())
    return {"mode": args.mode, "model": args.model or "tiny", "size": args.size, "batch": args.batch,
            "mixed_precision": args.mixed_precision, "threads": torch.get_num_threads(), "trained_params": trained,
            "s_per_step": round(seconds / args.steps, 3), "images_per_s": round(images / seconds, 3),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="an SDXL file to train (default: the tiny model, init = \"tiny\")")
    parser.add_argument("--modes", default="lora,full,dpo")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(child(args, Path(tmp))))
        return
    passed = [f"--size={args.size}", f"--batch={args.batch}", f"--steps={args.steps}", f"--warmup={args.warmup}",
              f"--mixed-precision={args.mixed_precision}", *([f"--model={args.model}"] if args.model else []),
              *(["--gradient-checkpointing"] if args.gradient_checkpointing else [])]
    for mode in args.modes.split(","):
        out = subprocess.run([sys.executable, __file__, *passed, "--mode", mode], capture_output=True, text=True,
                             check=False)
        if out.returncode != 0:
            sys.exit(f"{mode}: failed\n{out.stderr[-3000:]}")
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
