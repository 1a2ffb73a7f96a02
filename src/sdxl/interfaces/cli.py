"""The `sdxl` command line.

Heavy imports (torch, the models) happen inside the commands, so `sdxl --help` is instant.
A user mistake (a wrong path, a file that is not SDXL) ends with a one-line message and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys


def cmd_info(args: argparse.Namespace) -> int:
    from ..checkpoints.formats import describe

    desc = describe(args.path)
    if args.json:
        import json

        print(json.dumps({
            "path": str(desc.path),
            "layout": desc.layout,
            "kind": desc.kind,
            "components": {
                c.name: {"parameters": c.parameters, "dtypes": c.dtypes} for c in desc.components.values()
            },
            "notes": desc.notes,
        }, indent=2))
    else:
        print(desc.summary())
    return 0


DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def cmd_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from ..checkpoints.load import load, load_vae_file
    from ..checkpoints.save import save_diffusers, save_single_file

    src, dst = Path(args.src), Path(args.dst)
    if dst.exists() and not (dst.is_dir() and not any(dst.iterdir())):
        raise ValueError(f"{dst} already exists; choose a new path (nothing is overwritten)")
    dtype = getattr(torch, DTYPES[args.dtype])
    parts = load(src, dtype=dtype)  # converted on load, so nothing is held twice in another dtype
    if args.vae:
        parts.vae = load_vae_file(args.vae, dtype=dtype)
    if dst.suffix == ".safetensors":
        save_single_file(parts, dst, dtype=dtype)
        layout = "official single file"
    else:
        save_diffusers(parts, dst, dtype=dtype)
        layout = "diffusers folder"
    print(f"wrote {dst} ({layout}, SDXL {parts.kind}, {args.dtype})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdxl",
        description="Stable Diffusion XL: inspect, convert and (soon) generate with SDXL checkpoints.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser(
        "info",
        help="say what a checkpoint file or diffusers folder is",
        description="Print what PATH is (SDXL base / refiner / inpainting / VAE; single file or diffusers "
        "folder), its components, their storage dtypes and parameter counts. Exits with status 2 and a "
        "one-line reason for anything that is not SDXL.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    info.add_argument("path", help="a .safetensors (or .ckpt) file, or a diffusers folder")
    info.add_argument("--json", action="store_true", help="print a machine-readable description")
    info.set_defaults(run=cmd_info)

    convert = sub.add_parser(
        "convert",
        help="convert between an official single file and a diffusers folder",
        description="Read SRC (an official-layout .safetensors file or a diffusers folder) and write DST: "
        "a .safetensors path gets the official single-file layout, any other path a diffusers folder. "
        "Optionally change the storage dtype and swap in another VAE. Never overwrites.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    convert.add_argument("src", help="an SDXL .safetensors file or diffusers folder")
    convert.add_argument("dst", help="output: NAME.safetensors for a single file, else a (new) folder")
    convert.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="storage dtype of the output")
    convert.add_argument("--vae", help="a VAE .safetensors file to put in place of the checkpoint's own")
    convert.set_defaults(run=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..checkpoints.keymap import CheckpointError

    try:
        return args.run(args)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"sdxl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sdxl {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
