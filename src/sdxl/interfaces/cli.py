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
MODEL_ENV = "SDXL_MODEL"


def _output_paths(out: str, count: int) -> list:
    """`count` new PNG paths: OUT itself for one image named *.png, else numbered files in folder OUT."""
    from pathlib import Path

    out_path = Path(out)
    if out_path.suffix.lower() == ".png" and count == 1:
        if out_path.exists():
            raise ValueError(f"{out_path} already exists; choose a new name or an output folder")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        return [out_path]
    folder = out_path.with_suffix("") if out_path.suffix.lower() == ".png" else out_path
    folder.mkdir(parents=True, exist_ok=True)
    taken = [int(p.stem) for p in folder.glob("*.png") if p.stem.isdigit()]
    start = max(taken, default=-1) + 1  # numbered names that never overwrite
    return [folder / f"{start + i:05d}.png" for i in range(count)]


def _a1111_parameters(args: argparse.Namespace, seed: int, model: str) -> str:
    """The "parameters" text other SDXL tools and image browsers read (AUTOMATIC1111's format)."""
    lines = [args.prompt]
    if args.negative:
        lines.append(f"Negative prompt: {args.negative}")
    lines.append(f"Steps: {args.steps}, Sampler: {args.sampler}, Schedule type: {args.schedule}, CFG scale: {args.cfg}, "
                 f"Seed: {seed}, Size: {args.width}x{args.height}, Model: {model}")
    return "\n".join(lines)


def cmd_generate(args: argparse.Namespace) -> int:
    import os
    import time
    from pathlib import Path

    model = args.model or os.environ.get(MODEL_ENV)
    if not model:
        raise ValueError(f"no model: pass --model PATH (an SDXL .safetensors file or diffusers folder) or set {MODEL_ENV}")
    from PIL import Image, PngImagePlugin
    from tqdm import tqdm

    import sdxl

    paths = _output_paths(args.out, args.batch)  # checked before the (slow) model load
    start = time.perf_counter()
    pipe = sdxl.load(model, refiner=args.refiner, device=args.device, dtype=args.dtype, vae=args.vae)
    loaded = time.perf_counter() - start
    options = dict(
        prompt=args.prompt, prompt_2=args.prompt_2, negative_prompt=args.negative, width=args.width,
        height=args.height, steps=args.steps, cfg=args.cfg, sampler=args.sampler, schedule=args.schedule,
        seed=args.seed, batch=args.batch, refiner_switch=args.refiner_switch, strength=args.strength,
    )
    if args.init_image:
        options["init_image"] = Image.open(args.init_image).convert("RGB")
    if args.mask:
        options["mask"] = Image.open(args.mask).convert("L")
    bar = tqdm(desc="sampling", unit="step", leave=False)

    def progress(step: int, total: int, latents) -> None:
        bar.total = total
        bar.update(1)

    start = time.perf_counter()
    images = pipe.generate(callback=progress, **options)
    bar.close()
    seconds = time.perf_counter() - start
    for i, (image, path) in enumerate(zip(images, paths)):
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", _a1111_parameters(args, args.seed + i, Path(model).name))
        image.save(path, pnginfo=info)
        print(path)
    device = pipe.device
    print(f"{len(images)} image(s) in {seconds:.1f} s ({args.steps * len(images) / seconds:.2f} steps/s) on {device}; "
          f"model loaded in {loaded:.1f} s", file=sys.stderr)
    return 0


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


SAMPLER_NOTES = {
    "euler": "Euler (Karras et al. 2022, alg. 2, deterministic); diffusers EulerDiscreteScheduler",
    "euler_ancestral": "Euler with fresh noise each step; diffusers EulerAncestralDiscreteScheduler",
    "heun": "Heun's 2nd-order method, 2 U-Net calls a step; diffusers HeunDiscreteScheduler",
    "dpmpp_2m": "DPM-Solver++(2M), multistep; diffusers DPMSolverMultistepScheduler",
    "dpmpp_2m_sde": "DPM-Solver++(2M) SDE; diffusers DPMSolverMultistepScheduler(sde-dpmsolver++)",
    "dpmpp_sde": "DPM-Solver++ SDE, 2 U-Net calls a step (k-diffusion)",
    "ddim": "DDIM (Song et al. 2020), eta 0; diffusers DDIMScheduler",
    "lcm": "Latent Consistency Model sampling (for LCM fine-tunes/LoRAs, 4-8 steps); diffusers LCMScheduler",
}


def cmd_samplers(args: argparse.Namespace) -> int:
    from .. import sampling

    for name in sampling.SAMPLERS:
        print(f"{name:<16} {SAMPLER_NOTES.get(name, '')}")
    print("schedules: " + ", ".join(sampling.SCHEDULES) + " (default: the model's own scheduler config)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdxl",
        description="Stable Diffusion XL: generate images, inspect and convert SDXL checkpoints.",
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

    gen = sub.add_parser(
        "generate",
        help="generate images from a prompt",
        description="Text-to-image, image-to-image (--init-image, --strength) and inpainting (--mask) with an "
        f"SDXL checkpoint (--model, or the {MODEL_ENV} environment variable). Images are written as PNG with "
        "the generation parameters in the 'parameters' text chunk.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    gen.add_argument("prompt", help="what to draw")
    gen.add_argument("--model", help=f"SDXL .safetensors file, diffusers folder or cached hub id (default: ${MODEL_ENV})")
    gen.add_argument("--refiner", help="an SDXL refiner to finish the base's images")
    gen.add_argument("--refiner-switch", type=float, default=0.8, help="fraction of the steps the base runs before the refiner")
    gen.add_argument("--vae", help="a VAE file to use instead of the checkpoint's (e.g. an fp16-fixed VAE)")
    gen.add_argument("--negative", default="", help="negative prompt")
    gen.add_argument("--prompt-2", help="prompt for the OpenCLIP bigG encoder (default: the prompt)")
    gen.add_argument("--width", type=int, default=1024, help="pixels, a multiple of 8")
    gen.add_argument("--height", type=int, default=1024, help="pixels, a multiple of 8")
    gen.add_argument("--steps", type=int, default=30)
    gen.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale")
    gen.add_argument("--sampler", default="euler", help="see `sdxl samplers`")
    gen.add_argument("--schedule", default="default", help="default, trailing, karras, exponential or sgm_uniform")
    gen.add_argument("--seed", type=int, default=0, help="image i of a batch uses seed + i")
    gen.add_argument("--batch", type=int, default=1, help="images to make")
    gen.add_argument("--init-image", help="start from this image (image-to-image)")
    gen.add_argument("--strength", type=float, default=0.8, help="how much of the init image to repaint (0..1]")
    gen.add_argument("--mask", help="inpainting mask: white = repaint (needs --init-image)")
    gen.add_argument("--device", help="cpu, cuda, cuda:1, mps ... (default: cpu)")
    gen.add_argument("--dtype", choices=sorted(DTYPES), help="weights' dtype (default: fp32)")
    gen.add_argument("--out", default="outputs", help="a .png file (one image) or a folder for numbered files")
    gen.set_defaults(run=cmd_generate)

    samplers = sub.add_parser("samplers", help="list the samplers and schedules")
    samplers.set_defaults(run=cmd_samplers)

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
    import warnings

    warnings.formatwarning = lambda message, category, *rest, **kw: f"sdxl: warning: {message}\n"
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
