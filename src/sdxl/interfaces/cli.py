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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdxl",
        description="Stable Diffusion XL: inspect, load and (soon) generate with SDXL checkpoints.",
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
