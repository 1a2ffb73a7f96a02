"""Write a trained base (or refiner) checkpoint as float16, optionally with another VAE of the same latents.

    python scripts/export_builtin.py CKPT.safetensors OUT.safetensors [--vae runs/builtin/vae3/vae.safetensors]
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--vae", help="a VAE written by sdxl.training.train_vae (e.g. a decoder-only fine-tune)")
    args = p.parse_args(argv)
    from sdxl.checkpoints.load import load
    from sdxl.checkpoints.save import save_single_file
    from sdxl.training.train_vae import load_vae

    parts = load(args.checkpoint, dtype=torch.float32)
    if args.vae:
        vae = load_vae(args.vae, dtype=torch.float32)
        if vae.config != parts.vae.config:
            raise SystemExit(f"{args.vae}: its config differs from the checkpoint's VAE; latents would not match")
        parts.vae = vae
    save_single_file(parts, args.out, dtype=torch.float16)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
