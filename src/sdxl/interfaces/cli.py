"""The `sdxl` command line.

Heavy imports (torch, the models) happen inside the commands, so `sdxl --help` is instant.
`generate` keeps its PNG metadata in `metadata.py` and its default-model rules in `settings.py`.
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

# Command-line settings that are not GenerationOptions fields, but are stored with each image.
MODEL_SETTINGS = ("model", "refiner", "vae", "variant", "dtype", "device", "fp8")
PAIR_FIELDS = ("original_size", "crop_top_left", "target_size",
               "negative_original_size", "negative_crop_top_left", "negative_target_size")


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


# -- parsing the command line's formats into GenerationOptions values


def _ints(flag: str, text: str, n: int, sep: str, form: str) -> tuple[int, ...]:
    parts = str(text).lower().replace(" ", "").split(sep)
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != n or any(v < 0 for v in values):
        raise ValueError(f"{flag} must be {form}, got {text!r}")
    return values


def _size(flag: str, text: str | None) -> tuple[int, int] | None:
    """'WxH' (as --width/--height and A1111's Size) -> (height, width), the API's order."""
    if text is None:
        return None
    w, h = _ints(flag, text, 2, "x", "WIDTHxHEIGHT in pixels, e.g. 1024x768")
    return h, w


def _crop(flag: str, text: str | None) -> tuple[int, int] | None:
    return None if text is None else _ints(flag, text, 2, ",", "TOP,LEFT in pixels, e.g. 0,0")


def _outpaint_fill(text: str) -> str | tuple[int, int, int]:
    if text in ("edge", "reflect"):
        return text
    rgb = _ints("--outpaint-fill", text, 3, ",", "edge, reflect or an R,G,B colour such as 128,128,128")
    if max(rgb) > 255:
        raise ValueError(f"--outpaint-fill colour values must be 0..255, got {text!r}")
    return rgb


def _settings_from_args(args: argparse.Namespace) -> dict:
    """Every setting of one run from the command line, as GenerationOptions values (+ model settings, file paths)."""
    from pathlib import Path

    def path(p):
        return str(Path(p).expanduser().absolute()) if p else None

    return {
        "prompt": args.prompt, "prompt_2": args.prompt_2,
        "negative_prompt": args.negative_prompt, "negative_prompt_2": args.negative_prompt_2,
        "width": args.width, "height": args.height, "steps": args.steps, "cfg": args.cfg,
        "guidance_rescale": args.guidance_rescale, "sampler": args.sampler, "schedule": args.schedule,
        "seed": args.seed, "batch": args.batch,
        "init_image": path(args.init_image), "strength": args.strength, "mask": path(args.mask),
        "mask_blur": args.mask_blur,
        "outpaint": _ints("--outpaint", args.outpaint, 4, ",", "LEFT,TOP,RIGHT,BOTTOM pixels, e.g. 0,0,256,0")
        if args.outpaint else None,
        "outpaint_fill": _outpaint_fill(args.outpaint_fill),
        "refiner_switch": args.refiner_switch,
        "original_size": _size("--original-size", args.original_size),
        "crop_top_left": _crop("--crop-top-left", args.crop_top_left),
        "target_size": _size("--target-size", args.target_size),
        "negative_original_size": _size("--negative-original-size", args.negative_original_size),
        "negative_crop_top_left": _crop("--negative-crop-top-left", args.negative_crop_top_left),
        "negative_target_size": _size("--negative-target-size", args.negative_target_size),
        "aesthetic_score": args.aesthetic_score, "negative_aesthetic_score": args.negative_aesthetic_score,
        "clip_skip": args.clip_skip or None, "vae_tiling": args.vae_tiling,
        "model": args.model, "refiner": args.refiner, "vae": args.vae, "variant": args.variant,
        "dtype": args.dtype, "device": args.device, "fp8": args.fp8,
    }


def _from_json(key: str, value):
    """A stored JSON value back into the option's type (lists -> tuples)."""
    if isinstance(value, list) and (key in PAIR_FIELDS or key in ("outpaint", "outpaint_fill")):
        return tuple(value)
    return value


def _explicit_settings(argv: list[str]) -> set[str]:
    """The settings the command line gives explicitly (they override an image's stored settings)."""
    args = build_parser(suppress_defaults=True).parse_args(argv)
    return set(vars(args))


def _open_image(flag: str, path: str | None, mode: str):
    from pathlib import Path

    from PIL import Image, UnidentifiedImageError

    if path is None:
        return None
    if not Path(path).is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file")
    try:
        return Image.open(path).convert(mode)
    except UnidentifiedImageError:
        raise ValueError(f"{flag} {path}: not an image file") from None


def _generation_options(settings: dict, prompt: str):
    from ..options import GenerationOptions

    fields = {k: v for k, v in settings.items() if k not in MODEL_SETTINGS}
    fields["prompt"] = prompt
    fields["init_image"] = _open_image("--init-image", settings["init_image"], "RGB")
    fields["mask"] = _open_image("--mask", settings["mask"], "L")
    if fields["crop_top_left"] is None:
        fields["crop_top_left"] = (0, 0)
    return GenerationOptions(**fields)


def _read_prompts(path: str) -> list[str]:
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--prompts-file {path}: no such file")
    prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts-file {path}: no prompts in it (one prompt a line; blank lines are skipped)")
    return prompts


def _resolve(name: str | None, allow_download: bool):
    from ..checkpoints.paths import resolve_path
    from .settings import ALLOW_DOWNLOAD_ENV

    if name is None:
        return None
    try:
        return resolve_path(name, allow_download=allow_download)
    except FileNotFoundError as e:
        if "Hugging Face cache" in str(e):
            raise FileNotFoundError(f"{e}, or let sdxl download it: --allow-download or {ALLOW_DOWNLOAD_ENV}=1") from None
        raise


def _peak_memory(device) -> tuple[int | None, str]:
    """(bytes, what was measured): the CUDA allocator's peak on CUDA, else the process's peak RSS."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device), "CUDA peak allocated"
    try:
        import resource
    except ImportError:  # Windows
        return None, ""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss if sys.platform == "darwin" else rss * 1024), "peak process RSS"


BF16_HINT_MIN_PARAMS = 500_000_000  # full-size U-Nets (SDXL base: 2.6 billion); small ones gain too little to say


def bf16_hint(device_type: str, dtype_name: str, chosen: bool, unet_params: int, bf16_units: bool) -> str | None:
    """The line that points a CPU user at --dtype bf16, where it pays: float32 by default (not asked
    for), a full-size model, and a CPU with bfloat16 matrix units (`cpu_has_bf16_matrix_units`)."""
    if chosen or device_type != "cpu" or dtype_name != "fp32" or unet_params < BF16_HINT_MIN_PARAMS or not bf16_units:
        return None
    return ("note: this CPU multiplies bfloat16 matrices in hardware (AMX): --dtype bf16 runs a U-Net step 4 to 5 "
            "times faster than float32 here, in half the memory (images differ slightly)")


def cmd_generate(args: argparse.Namespace) -> int:
    import json
    import time
    from pathlib import Path

    from . import metadata, settings as config

    settings = _settings_from_args(args)
    keep = None  # with --from-image: the index, in its batch, of the image to make again
    if args.from_image:
        explicit = _explicit_settings(args.argv)
        saved = metadata.read_settings(args.from_image)
        for key, value in saved.items():
            if key in settings and key not in explicit:
                settings[key] = _from_json(key, value)
        index = saved.get("batch_index", 0)
        if not {"seed", "batch"} & explicit and isinstance(index, int) and 0 <= index < settings["batch"]:
            # Image i of a batch is, up to rounding, the single image of seed + i; exactly, it is image i
            # of the same batch: run that batch again and keep image i.
            settings["seed"] -= index
            keep = index
    if args.prompts_file:
        prompts = _read_prompts(args.prompts_file)
    elif settings["prompt"] is not None:
        prompts = [settings["prompt"]]
    else:
        raise ValueError("no prompt: give PROMPT, --prompts-file FILE or --from-image IMAGE.png")
    options = [_generation_options(settings, p) for p in prompts]  # validated before the (slow) model load
    model, _ = config.resolve_model(settings["model"])
    allow_download = config.allow_download(args.allow_download)
    model_path = _resolve(model, allow_download)
    refiner_path = _resolve(settings["refiner"], allow_download)
    vae_path = _resolve(settings["vae"], allow_download)

    def stored(name):  # an absolute path for local files, the repo id for the Hub
        return str(Path(name).expanduser().absolute()) if name and Path(name).expanduser().exists() else name

    batch = settings["batch"]
    kept = range(batch) if keep is None else [keep]
    paths = iter(_output_paths(args.out, len(prompts) * len(kept)))  # checked before the (slow) model load

    import torch
    from tqdm import tqdm

    import sdxl

    from ..acceleration import cpu_has_bf16_matrix_units

    device = settings["device"]
    if device and str(device).startswith("cuda") and not torch.cuda.is_available():
        where = " (the device stored in the image; pass --device cpu)" if args.from_image else ""
        raise ValueError(f"device {device!r}: CUDA is not available on this machine{where}")
    start = time.perf_counter()
    # One tick per model (unet, vae, text encoders; the refiner's too): a full-size file takes seconds per model.
    loading = tqdm(desc=f"loading {model}", unit="model", leave=False, file=sys.stderr)

    def loaded_one(name: str) -> None:
        loading.set_postfix_str(name, refresh=False)
        loading.update(1)

    try:
        pipe = sdxl.load(model_path, refiner=refiner_path, device=settings["device"], dtype=settings["dtype"],
                         vae=vae_path, variant=settings["variant"], compile=args.compile, offload=args.offload,
                         fp8=settings["fp8"], progress=loaded_one)
    finally:
        loading.close()
    loaded = time.perf_counter() - start
    if settings["cfg"] is None:  # the model's recommended scale: stored in the PNG, so --from-image repeats it
        settings["cfg"] = pipe.recommended_cfg()
    dtype_name = {getattr(torch, v): k for k, v in DTYPES.items()}.get(pipe.dtype, str(pipe.dtype))
    hint = bf16_hint(pipe.device.type, dtype_name, settings["dtype"] is not None,
                     sum(t.numel() for t in pipe.base.unet.state_dict().values()), cpu_has_bf16_matrix_units())
    if hint:
        print(hint, file=sys.stderr)
    common = {
        "model": stored(model), "refiner": stored(settings["refiner"]),
        "vae": stored(settings["vae"]), "variant": settings["variant"], "dtype": dtype_name,
        "device": str(pipe.device), "fp8": settings["fp8"], "sdxl_version": sdxl.__version__,
    }
    steps_done = [0]
    written = []
    start = time.perf_counter()
    for n, (prompt, opts) in enumerate(zip(prompts, options)):
        desc = "sampling" if len(prompts) == 1 else f"prompt {n + 1}/{len(prompts)}"
        bar = tqdm(desc=desc, unit="step", leave=False)

        def progress(step: int, total: int, latents) -> None:
            bar.total = total
            bar.update(1)
            steps_done[0] += batch  # image-steps

        try:
            images = pipe.generate(options=opts, callback=progress)
        finally:
            bar.close()
        for i in kept:
            image, path = images[i], next(paths)
            image_settings = {k: v for k, v in settings.items() if k not in MODEL_SETTINGS}
            image_settings.update(common, prompt=prompt, seed=opts.seed + i, batch=batch, batch_index=i)
            image_settings["size"] = list(image.size)  # what came out (width, height); informational
            metadata.write_png(image, path, image_settings)
            written.append({"path": str(path), "prompt": prompt, "seed": opts.seed + i})
            if not args.json:
                print(path, flush=True)
    seconds = time.perf_counter() - start
    peak, peak_what = _peak_memory(pipe.device)
    memory = f"; {peak_what} {peak / 2**30:.2f} GiB" if peak is not None else ""
    print(f"{len(written)} image(s) in {seconds:.1f} s ({steps_done[0] / seconds:.2f} steps/s) on {pipe.device}; "
          f"model loaded in {loaded:.1f} s{memory}", file=sys.stderr)
    if args.json:
        print(json.dumps({
            "files": written, "seconds": round(seconds, 3), "load_seconds": round(loaded, 3),
            "image_steps": steps_done[0], "steps_per_second": round(steps_done[0] / seconds, 3),
            "device": str(pipe.device), "dtype": dtype_name, "model": common["model"],
            "peak_memory_bytes": peak, "peak_memory_kind": peak_what or None,
        }, indent=2))
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


def cmd_train(args: argparse.Namespace) -> int:
    from ..training.train import main as train_main  # imports torch: only when training

    return train_main(args.args)


def cmd_samplers(args: argparse.Namespace) -> int:
    from .. import sampling

    for name in sampling.SAMPLERS:
        print(f"{name:<16} {SAMPLER_NOTES.get(name, '')}")
    print("schedules: " + ", ".join(sampling.SCHEDULES) + " (default: the model's own scheduler config)")
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones (whose help says what happens instead)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == "":
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Usage mistakes end with one line (and status 2), not the whole usage text."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


GENERATE_DESCRIPTION = f"""\
Text-to-image, image-to-image (--init-image, --strength), inpainting (--mask) and outpainting
(--outpaint) with an SDXL checkpoint, optionally finished by a refiner. Every option of the
Python API's GenerationOptions has a flag here.

Formats: sizes are WIDTHxHEIGHT (like --width/--height), e.g. --original-size 2048x1536; crops are
TOP,LEFT, e.g. --crop-top-left 0,0; outpaint padding is LEFT,TOP,RIGHT,BOTTOM pixels.
The micro-conditioning sizes default to the output size; the --negative-* ones to the positive values.

The model: --model, else ${MODEL_ENV}, else `model = "..."` in the config file ($SDXL_CONFIG, default
~/.config/sdxl/config.toml). Hub repo ids are read from the local Hugging Face cache only, unless
--allow-download or SDXL_ALLOW_DOWNLOAD=1.

Each PNG carries its settings: AUTOMATIC1111's 'parameters' text and a JSON 'sdxl' chunk with every
setting; --from-image IMAGE.png makes that image again (with its own seed), and flags given with it
override the stored values. --prompts-file makes --batch images for every prompt in a file (the same
seeds for each prompt).
"""


def _add_generate_arguments(gen: argparse.ArgumentParser) -> None:
    add = gen.add_argument
    add("prompt", nargs="?", help="what to draw (or --prompts-file / --from-image)")
    add("--prompt-2", dest="prompt_2", metavar="TEXT", help="prompt for the OpenCLIP bigG encoder (default: the prompt)")
    add("--negative", dest="negative_prompt", metavar="TEXT", default="", help="negative prompt (default: none)")
    add("--negative-2", dest="negative_prompt_2", metavar="TEXT", help="negative prompt for OpenCLIP bigG (default: --negative)")
    add("--prompts-file", metavar="FILE", help="one prompt a line (blank lines skipped); --batch images for each")
    add("--from-image", metavar="PNG", help="re-run the settings stored in a PNG written by sdxl generate")

    m = gen.add_argument_group("model")
    m.add_argument("--model", help=f"SDXL .safetensors file, diffusers folder or Hub repo id (default: ${MODEL_ENV}, "
                   "then the config file)")
    m.add_argument("--refiner", help="an SDXL refiner to finish the base's images")
    m.add_argument("--refiner-switch", dest="refiner_switch", metavar="FRACTION", type=float, default=0.8,
                   help="fraction of the schedule the base runs before the refiner")
    m.add_argument("--vae", help="a VAE file or folder to use instead of the checkpoint's (e.g. an fp16-fixed VAE)")
    m.add_argument("--variant", help="diffusers weight variant to load, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors)")
    m.add_argument("--allow-download", action="store_true",
                   help="download Hub repo ids that are not in the local cache (also SDXL_ALLOW_DOWNLOAD=1)")
    m.add_argument("--device", help="cpu, cuda, cuda:1, mps ... (default: cpu)")
    m.add_argument("--dtype", choices=sorted(DTYPES),
                   help="weights' dtype (default: fp32; fp16 suits GPUs, bf16 CPUs with AMX units: 4 to 5 times "
                   "faster than fp32 there)")
    m.add_argument("--compile", action="store_true",
                   help="torch.compile the U-Net: the first image of each size compiles (minutes; cached on disk "
                   "for later runs), the next ones are faster on a GPU (on the CPU it measured no faster)")
    m.add_argument("--fp8", action="store_true",
                   help="keep the U-Net's linear-layer weights in float8 (87%% of its weights): about half the "
                   "memory of float16, images close to but not equal to the plain ones")
    m.add_argument("--offload", choices=("model", "sequential"),
                   help="keep the weights in CPU memory and copy them to --device only while they run: one model "
                   "at a time (model), or one layer at a time (sequential: least GPU memory, slowest)")

    s = gen.add_argument_group("sampling")
    s.add_argument("--width", type=int, help="pixels, a multiple of 8 (default: the init image's width, else the model's native size: 1024 for SDXL)")
    s.add_argument("--height", type=int, help="pixels, a multiple of 8 (default: the init image's height, else the model's native size)")
    s.add_argument("--steps", type=int, default=30, help="sampling steps (img2img runs strength * steps)")
    s.add_argument("--cfg", type=float, help="classifier-free guidance scale (<= 1: no negative branch; default: what "
                   "the model's file recommends, else 5; the built-in model's is 3)")
    s.add_argument("--guidance-rescale", dest="guidance_rescale", type=float, default=0.0,
                   help="0..1, rescale the guided prediction's std (Lin et al. 2023)")
    s.add_argument("--sampler", default="euler", help="see `sdxl samplers`")
    s.add_argument("--schedule", default="default", help="default, trailing, karras, exponential or sgm_uniform")
    s.add_argument("--seed", type=int, default=0, help="image i of a batch uses seed + i")
    s.add_argument("--batch", type=int, default=1, help="images to make (for each prompt)")
    s.add_argument("--clip-skip", dest="clip_skip", type=int, default=0,
                   help="text encoder layers to skip beyond SDXL's penultimate one")
    s.add_argument("--vae-tiling", dest="vae_tiling", action="store_true", help="encode/decode in tiles (large images)")

    i = gen.add_argument_group("image-to-image, inpainting, outpainting")
    i.add_argument("--init-image", dest="init_image", help="start from this image (image-to-image)")
    i.add_argument("--strength", type=float, default=0.8, help="how much of the init image to repaint (0..1]")
    i.add_argument("--mask", help="inpainting mask: white = repaint (needs --init-image)")
    i.add_argument("--mask-blur", dest="mask_blur", type=float, default=0.0, help="blur radius of the mask's edge (pixels)")
    i.add_argument("--outpaint", metavar="L,T,R,B", help="pixels to add left,top,right,bottom of --init-image")
    i.add_argument("--outpaint-fill", dest="outpaint_fill", default="edge",
                   help="what the new border starts as: edge, reflect or R,G,B")

    c = gen.add_argument_group("micro-conditioning (SDXL's size and crop conditioning)")
    c.add_argument("--original-size", dest="original_size", metavar="WxH", help="(default: the output size)")
    c.add_argument("--crop-top-left", dest="crop_top_left", metavar="TOP,LEFT", default="0,0", help="crop offset")
    c.add_argument("--target-size", dest="target_size", metavar="WxH", help="(default: the output size)")
    c.add_argument("--negative-original-size", dest="negative_original_size", metavar="WxH",
                   help="(default: --original-size)")
    c.add_argument("--negative-crop-top-left", dest="negative_crop_top_left", metavar="TOP,LEFT",
                   help="(default: --crop-top-left)")
    c.add_argument("--negative-target-size", dest="negative_target_size", metavar="WxH",
                   help="(default: --target-size)")
    c.add_argument("--aesthetic-score", dest="aesthetic_score", type=float, default=6.0, help="refiner only")
    c.add_argument("--negative-aesthetic-score", dest="negative_aesthetic_score", type=float, default=2.5,
                   help="refiner only")

    o = gen.add_argument_group("output")
    o.add_argument("--out", default="outputs", help="a .png file (one image) or a folder for numbered files")
    o.add_argument("--json", action="store_true", help="print a JSON summary of what was written to stdout")


def build_parser(*, suppress_defaults: bool = False) -> argparse.ArgumentParser:
    parser = _Parser(
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
        description=GENERATE_DESCRIPTION,
        formatter_class=type("Formatter", (_HelpFormatter, argparse.RawDescriptionHelpFormatter), {}),
    )
    _add_generate_arguments(gen)
    if suppress_defaults:  # only what the command line names is set
        for action in gen._actions:
            action.default = argparse.SUPPRESS
    else:
        gen.set_defaults(run=cmd_generate)
    samplers = sub.add_parser("samplers", help="list the samplers and schedules")
    samplers.set_defaults(run=cmd_samplers)

    train = sub.add_parser(
        "train", add_help=False, help="train or fine-tune SDXL from a TOML config (see configs/)",
        description="sdxl train CONFIG [--resume PATH|latest] [--steps N] [--output-dir DIR]",
    )
    train.add_argument("args", nargs=argparse.REMAINDER)
    train.set_defaults(run=cmd_train)

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
    argv = sys.argv[1:] if argv is None else list(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # the trainer parses its own arguments (--help included)
        return cmd_train(argparse.Namespace(args=argv[1:]))
    args = build_parser().parse_args(argv)
    args.argv = argv  # `generate --from-image` tells the flags given from the defaults
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
