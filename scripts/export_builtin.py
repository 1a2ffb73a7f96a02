"""Write a trained base (or refiner) checkpoint as float16, optionally with another VAE of the same latents.

    python scripts/export_builtin.py CKPT.safetensors OUT.safetensors [--vae runs/builtin/vae3/vae.safetensors]
        [--text-encoder-2-from BASE.safetensors] [--dtype fp16|fp32] [--recommend-cfg 3]

--text-encoder-2-from takes the bigG-architecture text encoder from another checkpoint: the refiner starts from
(and keeps, frozen) the base's trained encoder, so both models read prompts the same way.
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
    p.add_argument("--text-encoder-2-from", help="a checkpoint whose text_encoder_2 (bigG architecture) to use")
    p.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    p.add_argument("--recommend-cfg", type=float, help="the guidance scale generation uses unless told otherwise")
    args = p.parse_args(argv)
    from sdxl.checkpoints.load import load, load_vae_file
    from sdxl.checkpoints.save import save_single_file

    parts = load(args.checkpoint, dtype=torch.float32)
    if args.vae:
        vae = load_vae_file(args.vae, dtype=torch.float32)
        if vae.config != parts.vae.config:
            raise SystemExit(f"{args.vae}: its config differs from the checkpoint's VAE; latents would not match")
        parts.vae = vae
    if args.text_encoder_2_from:
        other = load(args.text_encoder_2_from, dtype=torch.float32).text_encoder_2
        if other.config != parts.text_encoder_2.config:
            raise SystemExit(f"{args.text_encoder_2_from}: its text_encoder_2 config differs from the checkpoint's")
        parts.text_encoder_2 = other
    if args.recommend_cfg is not None:
        parts.recommended = {**parts.recommended, "cfg": args.recommend_cfg}
    save_single_file(parts, args.out, dtype=torch.float16 if args.dtype == "fp16" else torch.float32)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
