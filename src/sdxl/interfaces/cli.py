"""The `sdxl` command line.

Heavy imports (torch, the models) happen inside the commands, so `sdxl --help` is instant.
`generate` turns its flags into settings, options and PNG metadata with `metadata.py` (in AUTOMATIC1111's words,
`a1111.py`), hashes models with `hashes.py` and takes its default model from `settings.py`.
A user mistake (a wrong path, a file that is not SDXL, a value out of range) ends with a one-line message and
exit status 2, never a traceback: `errors.py` is the one place that turns failures into that line (Ctrl-C: 130).
Outputs never overwrite anything and never appear half-written (`outputs.py`); everything that can be checked is
checked before the model loads.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..dtypes import NAMES as DTYPE_NAMES
from .settings import ALLOW_DOWNLOAD_ENV, MODEL_ENV

MAX_PIXELS = 4096 * 4096  # sdxl.options.MAX_PIXELS (repeated so that --help does not import torch)
MAX_IMAGE_PIXELS = 89_478_485  # sdxl.images.MAX_IMAGE_PIXELS: PIL's decompression-bomb limit


def _adapter_file(path: Path) -> bool:
    """A LoRA / LyCORIS / PEFT file (told from its tensor names, read from the header only)."""
    from ..checkpoints.files import open_tensors
    from ..checkpoints.formats import identify_keys

    return path.is_file() and "LoRA" in (identify_keys(set(open_tensors(path))) or "")


def cmd_info(args: argparse.Namespace) -> int:
    from ..checkpoints.formats import describe
    from ..checkpoints.paths import resolve_path

    path = resolve_path(args.path)  # a path, "builtin", or a Hub repo in the local cache
    if not args.json and _adapter_file(path):
        from ..adapters import describe_adapter

        print(describe_adapter(path))
        return 0
    desc = describe(path)
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


def _explicit_settings(argv: list[str]) -> set[str]:
    """The settings the command line gives explicitly (they override an image's stored settings)."""
    args = build_parser(suppress_defaults=True).parse_args(argv)
    return set(vars(args))


def _read_prompts(path: str) -> list[str]:
    """One prompt a line (blank lines skipped) from a UTF-8 file; a byte-order mark is not part of the first."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"--prompts-file {path}: no such file")
    data = file.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"--prompts-file {path}: line {line} is not valid UTF-8 (byte 0x{data[e.start]:02x}); "
                         "save the file as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts-file {path}: no prompts in it (one prompt a line; blank lines are skipped)")
    return prompts


def _prompts(args: argparse.Namespace, settings: dict[str, Any]) -> list[str]:
    if args.prompts_file:
        if args.prompt is not None:
            raise ValueError(f"give a PROMPT or --prompts-file, not both ({args.prompt!r} would not be used)")
        return _read_prompts(args.prompts_file)
    if settings["prompt"] is not None:
        return [settings["prompt"]]
    raise ValueError("no prompt: give PROMPT, --prompts-file FILE or --from-image IMAGE.png")


def _check_device(device: str | None, stored: bool) -> None:
    """--device names a device torch knows and this machine has (checked before the model loads)."""
    if not device:
        return
    import torch

    where = " (the device stored in the image; pass --device cpu)" if stored else ""
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device}: not a device torch knows (cpu, cuda, cuda:N, mps, xpu, ...)"
                         f"{where}") from None
    if d.type == "cpu":
        return
    if d.type == "meta":
        raise ValueError(f"--device {device}: holds no data (cpu, cuda, cuda:N, mps, xpu, ...){where}")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine{where}")
        if d.index is not None and d.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise ValueError(f"--device {device}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}{where}")
        return
    try:
        torch.empty(1, device=d)
    except Exception as e:  # noqa: BLE001 (torch's errors for unbuilt or absent backends vary by type)
        raise ValueError(f"--device {device}: not available on this machine ({' '.join(str(e).split())[:120]})"
                         f"{where}") from None


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


def bf16_hint(device_type: str, dtype_name: str, chosen: bool, unet_params: int,
              speedup: Callable[[], float]) -> str | None:
    """The line that points a CPU user at --dtype bf16, where it pays: float32 by default (not asked for), a
    full-size model, and a bfloat16 matrix product measured `BF16_WORTH` times faster than a float32 one on this
    CPU (`acceleration.cpu_bf16_speedup`: AMX and AVX512-BF16 both qualify; asked only when the rest holds)."""
    from ..acceleration import BF16_WORTH

    if chosen or device_type != "cpu" or dtype_name != "fp32" or unet_params < BF16_HINT_MIN_PARAMS:
        return None
    measured = speedup()
    if measured < BF16_WORTH:
        return None
    return (f"note: a bfloat16 matrix product ran {measured:.1f}x as fast as float32 on this CPU just now: "
            "--dtype bf16 (or auto) makes a U-Net step several times faster in half the memory (images differ "
            "slightly); --low-memory also keeps a full-size SDXL under 5 GiB")


LOW_MEMORY_MARGIN = 1.15  # weights x this against the memory available: activations, decoding, the interpreter


def memory_hint(paths: Sequence[Path | None], dtype_name: str | None, low_memory: bool,
                available: int | None) -> str | None:
    """The line that suggests --low-memory when the weights would not fit the memory available (estimated from
    the files' sizes: SDXL files are float16, half of float32)."""
    if low_memory or available is None:
        return None
    stored = sum(_weights_bytes(p) for p in paths if p is not None)
    need = stored * (2.0 if dtype_name in (None, "fp32") else 1.0) * LOW_MEMORY_MARGIN
    if need <= available:
        return None
    return (f"note: the weights need about {need / 2**30:.1f} GiB and {available / 2**30:.1f} GiB are available: "
            "--low-memory (int8 U-Net, text encoders freed after encoding) needs under 5 GiB for SDXL at 512x512")


def _weights_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*.safetensors")) if path.is_dir() else 0


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (Linux): what can be allocated without swapping; None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


# -- sdxl generate, in steps: plan (every setting checked), load, describe the models, generate, report


@dataclass
class _Model:
    """A model of the run: its name as given (or as stored in --from-image's image) and where it is."""

    name: str | None = None
    path: Path | None = None
    local: bool = False  # a file or folder of the user's (stored by file name), not "builtin" or a Hub repo id

    def stored(self, keep_path: bool) -> str | None:
        if not self.local or self.path is None:
            return self.name
        return str(self.path.absolute()) if keep_path else self.path.name


@dataclass
class _Run:
    settings: dict[str, Any]
    prompts: list[str]
    options: list
    models: dict[str, _Model]
    target: Any  # outputs.Target: where the images go
    keep: int | None = None  # with --from-image: the index, in its batch, of the image to make again
    lora_dirs: list[Path] = field(default_factory=list)
    embedding_dirs: list[Path] = field(default_factory=list)
    image: dict[str, Any] = field(default_factory=dict)  # the settings stored in --from-image's image
    batch: Any = None  # batch.Batch: this process's part of a run of many (torchrun), or of a resumed batch folder


def cmd_generate(args: argparse.Namespace) -> int:
    run = _plan(args)  # every setting, prompt, model and output path checked before the (slow) model load
    try:
        if run.batch is None or run.batch.todo:  # a batch process with nothing left loads no model
            pipe, load_seconds = _load_pipeline(args, run)
            _check_with_model(args, run, pipe)
            models = _describe_models(run, pipe)
            written, seconds, image_steps = _generate_images(args, run, pipe, models)
            _report(args, pipe, written, seconds, image_steps, load_seconds, models,
                    who=run.batch.label if run.batch else "")
        if run.batch is not None:
            run.batch.finish()  # the processes meet; the first merges the manifest
    finally:
        if run.batch is not None:
            run.batch.close()
        if not run.target.written:
            run.target.discard()  # the output folder this run created, if it stayed empty
    return 0


def _plan(args: argparse.Namespace) -> _Run:
    from . import batch as batches
    from . import metadata, outputs
    from . import settings as config

    settings = metadata.settings_from_flags(vars(args))
    explicit = _explicit_settings(args.argv) if args.from_image else set()
    image = _from_image(args.from_image, settings, explicit) if args.from_image else {}
    keep = _batch_index(settings, image, explicit) if args.from_image else None
    prompts = _prompts(args, settings)
    _random_seed(settings, given=not image or "seed" in explicit)
    options = _options(args, settings, prompts, image, explicit)
    lora_dirs, embedding_dirs = config.folders("lora", args.lora_dirs), config.folders("embedding", args.embedding_dirs)
    _check_loras(options, lora_dirs)
    launch = batches.launch_for(args.out, args.prompts_file)  # torchrun's processes, or a batch folder resumed
    if launch is not None:
        settings["device"] = batches.device_for(settings["device"], launch)  # cuda: cuda:LOCAL_RANK
    _check_device(settings["device"], stored=bool(image) and "device" not in explicit)
    models = _resolve_models(args, settings, image, explicit)
    kept = settings["batch"] if keep is None else 1
    target = outputs.plan_images(args.out, len(prompts) * kept)  # last: nothing is created for a refused run
    run = _Run(settings, prompts, options, models, target, keep=keep, image=image, lora_dirs=lora_dirs,
               embedding_dirs=embedding_dirs)
    if launch is not None:
        batches.split_threads(settings["device"], launch)
        kept_indices = list(range(kept)) if keep is None else [keep]
        description = batches.describe(prompts, settings, {k: m.name for k, m in models.items()}, kept_indices)
        run.batch = batches.plan(target, launch, description, random_seed=args.seed == -1)
        run.options = run.batch.agree(settings, options) if run.batch else options
    return run


def _random_seed(settings: dict[str, Any], given: bool) -> None:
    """--seed -1: a random seed, as in AUTOMATIC1111 (stored in the PNGs like any other). given: the seed is the
    command line's (not an image's), so the message may name --seed."""
    from ..options import SEEDS

    seed = settings["seed"]
    if seed == -1 and given:
        import random

        batch = settings["batch"] if isinstance(settings["batch"], int) and settings["batch"] > 0 else 1
        settings["seed"] = random.SystemRandom().randrange(max(1, SEEDS - batch + 1))
        _note(f"--seed -1: seed {settings['seed']}")
    elif given and isinstance(seed, int) and not 0 <= seed < SEEDS:
        raise ValueError(f"--seed {seed}: seeds are 0..{SEEDS - 1} (AUTOMATIC1111's range), or -1 for a random one")


def _options(args: argparse.Namespace, settings: dict[str, Any], prompts: list[str], image: dict[str, Any],
             explicit: set[str]) -> list:
    """Each prompt's GenerationOptions, with the input images read once and the run's size bounded; a value
    that came from --from-image's image is named as that image's."""
    from ..options import OptionError, check_pixels
    from . import metadata

    try:
        images = metadata.input_images(settings, args.max_image_pixels)
        options = [metadata.generation_options(settings, p, images) for p in prompts]
        check_pixels(options[0], args.max_pixels, override="--max-pixels")
    except OptionError as e:
        if image and e.field in image and e.field not in explicit:
            raise ValueError(f"{args.from_image}: its stored settings: {e} (--{e.field.replace('_', '-')} "
                             "overrides it)") from None
        raise
    return options


def _check_with_model(args: argparse.Namespace, run: _Run, pipe) -> None:
    """What needs the model: --clip-skip against its text encoders, the size against its native one."""
    from ..options import check_clip_skip, check_pixels

    stages = [parts for parts in (pipe.base, pipe.refiner) if parts is not None]
    layers = [e.config.layers for parts in stages for e in (parts.text_encoder, parts.text_encoder_2) if e is not None]
    for o in run.options:
        check_clip_skip(o.clip_skip, layers)
    check_pixels(run.options[0], args.max_pixels, native=pipe.base.unet.config.sample_size * 8,
                 override="--max-pixels")


def _check_loras(options: list, lora_dirs: list[Path]) -> None:
    """Every LoRA a run asks for exists, before the (slow) model load: --lora files, and the prompts' tags."""
    from ..adapters.library import LORA_SUFFIXES, Library
    from ..prompts import extract_networks

    library = Library(lora_dirs, LORA_SUFFIXES, kind="LoRA", aliases=True)
    for o in options:
        for name, _, _ in o.loras:
            path = Path(name).expanduser()
            if path.suffix.lower() in LORA_SUFFIXES or path.is_file():
                if not path.is_file():
                    raise FileNotFoundError(f"--lora {name}: no such file")
            else:
                library.find(name)
        for text in (o.prompt, o.prompt_2, o.negative_prompt, o.negative_prompt_2):
            for tag in extract_networks(text or "")[1]:
                if tag.kind == "lora":
                    library.find(tag.name)


def _from_image(path: str, settings: dict[str, Any], explicit: set[str]) -> dict[str, Any]:
    """Put the settings stored in `path` (ours, or A1111's / Forge's / Fooocus') under the explicit flags."""
    from . import a1111, metadata

    try:
        stored = metadata.read_image(path, skip=explicit)
    except a1111.UnknownName as e:
        raise ValueError(f"{e}; pass --{e.kind} to choose one") from None
    if stored.ignored:
        _note(f"{path}: ignored {stored.source} settings that sdxl does not use: {', '.join(stored.ignored)}")
    metadata.apply_stored(settings, stored.settings, explicit)
    for key in metadata.FILE_KEYS:
        if key not in explicit and settings.get(key):
            settings[key] = str(_stored_file(path, key, settings[key]))
    return stored.settings


def _stored_file(image: str, key: str, name: str) -> Path:
    """An input file an image names: as stored (a path, or a name in the working folder), else beside the image."""
    for candidate in (Path(name).expanduser(), Path(image).parent / name):
        if candidate.is_file():
            return candidate
    flag = "--" + key.replace("_", "-")
    raise FileNotFoundError(f"{image}: its {flag[2:].replace('-', ' ')} {name!r} is not here; pass {flag} PATH")


def _batch_index(settings: dict[str, Any], image: dict[str, Any], explicit: set[str]) -> int | None:
    index = image.get("batch_index", 0)
    if not {"seed", "batch"} & explicit and isinstance(index, int) and 0 <= index < settings["batch"]:
        # Image i of a batch is, up to rounding, the single image of seed + i; exactly, it is image i
        # of the same batch: run that batch again and keep image i.
        settings["seed"] -= index
        return index
    return None


def _resolve_models(args: argparse.Namespace, settings: dict[str, Any], image: dict[str, Any],
                    explicit: set[str]) -> dict[str, _Model]:
    from . import settings as config

    allow_download = config.allow_download(args.allow_download)
    model, _ = config.resolve_model(settings["model"])
    models = {}
    for kind, name in (("model", model), ("refiner", settings["refiner"]), ("vae", settings["vae"])):
        if not name:
            models[kind] = _Model()
        elif image.get(kind) == name and kind not in explicit:
            models[kind] = _stored_model(args.from_image, kind, name, image, allow_download)
        else:
            models[kind] = _given_model(name, allow_download)
    return models


def _given_model(name: str, allow_download: bool) -> _Model:
    from .. import builtin
    from ..checkpoints.paths import resolve_path

    try:
        path = resolve_path(name, allow_download=allow_download)
    except FileNotFoundError as e:
        if "Hugging Face cache" in str(e):
            raise FileNotFoundError(f"{e}, or let sdxl download it: --allow-download or {ALLOW_DOWNLOAD_ENV}=1") from None
        raise
    local = builtin.path(name) is None and Path(name).expanduser().exists()
    return _Model(name, path, local)


def _stored_model(image: str, kind: str, name: str, stored: dict[str, Any], allow_download: bool) -> _Model:
    """A model an image names: a path, "builtin" or a cached Hub repo; else a file or folder of that name or
    hash that this machine has used (the hash cache); else the configured model, if it has that name."""
    from . import hashes, metadata

    for candidate in (name, name if name.endswith(hashes.WEIGHT_SUFFIXES) else f"{name}.safetensors"):
        try:
            return _given_model(candidate, allow_download)
        except (FileNotFoundError, ValueError):
            pass
    found = hashes.find(name, stored.get(metadata.HASH_KEYS[kind]))
    if found is None and kind == "model" and (default := _configured_model()) is not None:
        found = default if name in (default.name, hashes.stem(default.name)) else None
    if found is None:
        raise FileNotFoundError(f"{image}: its {kind} {name!r} is not here (not a file, built-in model, cached "
                                f"Hub repo or model this machine has used); pass --{kind} PATH")
    return _Model(name, found, local=True)


def _configured_model() -> Path | None:
    """$SDXL_MODEL's or the config file's model, when it is a local file or folder (not the built-in default)."""
    from . import settings as config

    try:
        model, where = config.resolve_model(None)
    except ValueError:
        return None
    path = Path(model).expanduser()
    return path if where != "built-in" and path.exists() else None


def _load_pipeline(args: argparse.Namespace, run: _Run):
    import time

    from tqdm import tqdm

    import sdxl

    s, models = run.settings, run.models
    device = s["device"]  # checked in _plan
    low_memory = bool(s.get("low_memory"))  # stored in the image, so --from-image makes the same pixels
    if not low_memory and device in (None, "cpu"):
        hint = memory_hint([m.path for m in models.values() if m is not None], s["dtype"], low_memory,
                           available_memory())
        if hint:
            print(hint, file=sys.stderr)
    start = time.perf_counter()
    # One tick per model (unet, vae, text encoders; the refiner's too): a full-size file takes seconds per model.
    loading = tqdm(desc=f"loading {models['model'].name}", unit="model", leave=False, file=sys.stderr,
                   disable=None)  # None: no bar when stderr is not a terminal (logs, pipes)

    def loaded_one(name: str) -> None:
        loading.set_postfix_str(name, refresh=False)
        loading.update(1)

    try:
        pipe = sdxl.load(models["model"].path, refiner=models["refiner"].path, device=device, dtype=s["dtype"],
                         vae=models["vae"].path, variant=s["variant"], compile=args.compile, offload=args.offload,
                         fp8=s["fp8"], progress=loaded_one, lora_dirs=run.lora_dirs,
                         embedding_dirs=run.embedding_dirs, low_memory=low_memory)
    finally:
        loading.close()
    return pipe, time.perf_counter() - start


HASH_NOTE_BYTES = 256 * 2**20  # files this large take a noticeable time to hash: say so


def _describe_models(run: _Run, pipe) -> dict[str, Any]:
    """What every image of the run stores about its models: stored names, A1111 hashes, dtype, device, version."""
    import sdxl

    from ..acceleration import cpu_bf16_speedup
    from ..dtypes import short_name
    from . import hashes, metadata

    s = run.settings
    if s["cfg"] is None:  # the model's recommended scale: stored in the PNG, so --from-image repeats it
        s["cfg"] = pipe.recommended_cfg()
    dtype = short_name(pipe.dtype)
    hint = bf16_hint(pipe.device.type, dtype, s["dtype"] is not None,
                     sum(t.numel() for t in pipe.base.unet.state_dict().values()), cpu_bf16_speedup)
    if hint:
        print(hint, file=sys.stderr)

    def hashing(path: Path) -> None:
        if path.stat().st_size >= HASH_NOTE_BYTES:
            _note(f"hashing {path.name} for its A1111 model hash (once: kept in {hashes.cache_path()})")

    described = {"variant": s["variant"], "dtype": dtype, "device": str(pipe.device), "fp8": s["fp8"],
                 "low_memory": bool(s.get("low_memory")),
                 "sdxl_version": sdxl.__version__}
    for kind, model in run.models.items():
        key = metadata.HASH_KEYS[kind]
        described[kind] = model.stored(s["store_paths"])
        described[key] = hashes.short_hash(model.path, on_compute=hashing) if model.path else None
        if run.image.get(key) and described[key] and not described[key].startswith(str(run.image[key]).lower()):
            _note(f"the image was made with a {kind} of hash {run.image[key]}; {model.path.name} has "
                  f"{described[key]}, so the new image will differ")
    return described


NON_FINITE_HINT = ("a damaged model file, or settings too extreme for it; in float16, --dtype bf16 or fp32 "
                   "may help")


def _generate_images(args: argparse.Namespace, run: _Run, pipe, models: dict[str, Any]):
    """Sample every prompt's batch and write the kept images; (written, seconds, image-steps)."""
    import time

    from . import hashes, metadata

    batch = run.settings["batch"]
    kept = range(batch) if run.keep is None else [run.keep]
    steps_done = [0]
    written = []
    start = time.perf_counter()
    for n in range(len(run.prompts)) if run.batch is None else run.batch.todo:
        prompt, opts = run.prompts[n], run.options[n]
        desc = "sampling" if len(run.prompts) == 1 else f"prompt {n + 1}/{len(run.prompts)}"
        images = _sample(pipe, opts, desc, steps_done)
        # A1111's "Lora hashes": each LoRA by name (a file given by path: its stem), the first 12 hex of its sha256
        lora_hashes = {hashes.stem(Path(name).name): hashes.sha256(path)[:12] for name, path, _, _ in pipe.last_loras}
        for k, i in enumerate(kept):
            index = n * len(kept) + k  # in a batch run, the image's number: its name
            if run.batch is not None and run.batch.path(index).exists():
                continue  # made by an earlier run of this batch: kept as it is
            image = images[i]
            stored = metadata.image_settings(run.settings, models, prompt=prompt, seed=opts.seed + i,
                                             batch_index=i, size=image.size)
            stored["lora_hashes"] = lora_hashes
            data = metadata.png_bytes(image, stored)
            path = run.target.write(data) if run.batch is None else run.batch.write(index, data, n, stored)
            if path is None:
                continue  # appeared meanwhile (another run into this folder): not made twice
            written.append({"path": str(path), "prompt": prompt, "seed": opts.seed + i})
            if not args.json:  # one write a line: processes sharing a stdout (torchrun runs python -u) never mix lines
                sys.stdout.write(f"{path}\n")
                sys.stdout.flush()
    return written, time.perf_counter() - start, steps_done[0]


def _sample(pipe, opts, desc: str, steps_done: list[int]) -> list:
    """One call's images (PIL), with a progress bar on a terminal; ValueError, and nothing to write, when the
    latents or the decoded images are not finite (NaN or infinite: a black or broken picture otherwise)."""
    import numpy as np
    import torch
    from tqdm import tqdm

    from ..images import unit_to_pil

    bar = tqdm(desc=desc, unit="step", leave=False, disable=None)  # None: no bar when stderr is not a terminal

    def progress(step: int, total: int, latents) -> None:
        bar.total = total
        bar.update(1)
        steps_done[0] += opts.batch  # image-steps
        # Looked at once, after the last step: a check every step would wait for the device every step
        if step == total and not bool(torch.isfinite(latents).all()):
            raise ValueError(f"the latents are NaN or infinite after the last of {total} steps, so no image of this "
                             f"prompt was written ({NON_FINITE_HINT})")

    try:
        unit = pipe.generate(options=opts.replace(output="np"), callback=progress)
    finally:
        bar.close()
    bad = [i for i, u in enumerate(unit) if not np.isfinite(u).all()]
    if bad:
        raise ValueError(f"the VAE decoded image(s) {bad} to NaN or infinite values, so no image of this prompt "
                         f"was written ({NON_FINITE_HINT})")
    return unit_to_pil(unit)


def _report(args: argparse.Namespace, pipe, written: list, seconds: float, image_steps: int, load_seconds: float,
            models: dict[str, Any], who: str = "") -> None:
    import json

    peak, peak_what = _peak_memory(pipe.device)
    memory = f"; {peak_what} {peak / 2**30:.2f} GiB" if peak is not None else ""
    print(f"{who}{len(written)} image(s) in {seconds:.1f} s ({image_steps / seconds:.2f} steps/s) on {pipe.device}; "
          f"model loaded in {load_seconds:.1f} s{memory}", file=sys.stderr)
    if args.json:
        print(json.dumps({
            "files": written, "seconds": round(seconds, 3), "load_seconds": round(load_seconds, 3),
            "image_steps": image_steps, "steps_per_second": round(image_steps / seconds, 3),
            "device": str(pipe.device), "dtype": models["dtype"], "model": models["model"],
            "peak_memory_bytes": peak, "peak_memory_kind": peak_what or None,
        }, indent=2))


def cmd_convert(args: argparse.Namespace) -> int:
    from ..checkpoints.load import load, load_vae_file
    from ..checkpoints.paths import resolve_path
    from ..checkpoints.save import save_diffusers, save_single_file
    from ..dtypes import torch_dtype
    from . import outputs

    src = resolve_path(args.src)  # the loaders take real paths; "builtin" is a name
    vae = resolve_path(args.vae) if args.vae else None
    layout, target = outputs.plan_checkpoint(args.dst)  # refused, or created and probed, before the slow load
    dst = target.folder / target.name
    try:
        dtype = torch_dtype(args.dtype)
        parts = load(src, dtype=dtype)  # converted on load, so nothing is held twice in another dtype
        if vae is not None:
            parts.vae = load_vae_file(vae, dtype=dtype)
        if layout == "single-file":
            outputs.create_new(dst, lambda tmp: save_single_file(parts, tmp, dtype=dtype))
        else:
            try:
                save_diffusers(parts, dst, dtype=dtype)  # into a temporary folder, renamed when complete
            except OSError as e:  # named as the folder asked for, not a file in the temporary one
                if e.errno is None or e.filename is None:
                    raise
                raise OSError(e.errno, e.strerror, str(dst)) from None
        target.written.append(dst)
    finally:
        if not target.written:
            target.discard()
    name = "official single file" if layout == "single-file" else "diffusers folder"
    print(f"wrote {args.dst} ({name}, SDXL {parts.kind}, {args.dtype})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ..training.train import main as train_main  # imports torch: only when training

    return train_main(args.args)


def cmd_train_vae(args: argparse.Namespace) -> int:
    from ..training.train_vae import main_config  # imports torch: only when training

    return main_config(args.args)


def cmd_fix_vae_fp16(args: argparse.Namespace) -> int:
    from ..training.vae_fp16 import main as fix_main  # imports torch: only when fixing
    from .outputs import create_new

    return fix_main(args.args, publish=create_new)


def cmd_samplers(args: argparse.Namespace) -> int:
    from .. import sampling
    from . import a1111

    for kind, ids, table in (("samplers", sampling.SAMPLERS, a1111.SAMPLERS),
                             ("schedules", sampling.SCHEDULES, a1111.SCHEDULES)):
        print(f"{kind} (id, the words PNGs say as AUTOMATIC1111 does, also read):")
        for name in ids:
            row = table[name]
            print(f"  {name:<22} {row.label:<18} {row.note}")
            if row.aliases:
                print(f"  {'':<22} {'':<18} also: {', '.join(row.aliases)}")
    print("--sampler and --schedule take any of these words, in any case; A1111's combined names such as "
          '"DPM++ 2M Karras" set both. Every sampler runs on every schedule.')
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

Each PNG carries its settings: AUTOMATIC1111's 'parameters' text (its words: "Sampler: DPM++ 2M,
Schedule type: Karras", the model's name and A1111 hash) and a JSON 'sdxl' chunk with every setting;
models and input images are stored by name, not path, unless --store-paths. --from-image IMAGE.png
makes that image again (with its own seed), also from PNGs of AUTOMATIC1111, Forge and Fooocus, and
flags given with it override the stored values. --prompts-file makes --batch images for every prompt
in a file (the same seeds for each prompt).

Outputs are never overwritten: --out x.png must be new, and a folder gets the next free numbers, also
when several runs write into it at once; a file appears under its name only when complete. Everything
that can be checked (values, files, devices, the output folder) is checked before the model loads.
Input images are read upright (EXIF), with transparency over white, 16-bit images at their real range.
Exit status: 0 done; 2 an error, said in one line; 130 interrupted (Ctrl-C).
"""


def _add_prompt_arguments(gen: argparse.ArgumentParser) -> None:
    add = gen.add_argument
    add("prompt", nargs="?", help="what to draw (or --prompts-file / --from-image)")
    add("--prompt-2", dest="prompt_2", metavar="TEXT", help="prompt for the OpenCLIP bigG encoder (default: the prompt)")
    add("--negative", dest="negative_prompt", metavar="TEXT", default="", help="negative prompt (default: none)")
    add("--negative-2", dest="negative_prompt_2", metavar="TEXT", help="negative prompt for OpenCLIP bigG (default: --negative)")
    add("--prompts-file", metavar="FILE", help="one prompt a line (blank lines skipped); --batch images for each")
    add("--from-image", metavar="PNG", help="re-run the settings stored in a PNG written by sdxl generate, "
        "AUTOMATIC1111, Forge or Fooocus")


def _add_model_arguments(gen: argparse.ArgumentParser) -> None:
    m = gen.add_argument_group("model")
    m.add_argument("--model", help=f"SDXL .safetensors file, diffusers folder, Hub repo id or builtin (default: "
                   f"${MODEL_ENV}, then the config file, then builtin)")
    m.add_argument("--refiner", help="an SDXL refiner to finish the base's images (e.g. builtin-refiner)")
    m.add_argument("--refiner-switch", dest="refiner_switch", metavar="FRACTION", type=float, default=0.8,
                   help="fraction of the schedule the base runs before the refiner")
    m.add_argument("--vae", help="a VAE file or folder to use instead of the checkpoint's (e.g. an fp16-fixed VAE)")
    m.add_argument("--variant", help="diffusers weight variant to load, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors)")
    m.add_argument("--allow-download", action="store_true",
                   help="download Hub repo ids that are not in the local cache (also SDXL_ALLOW_DOWNLOAD=1)")
    m.add_argument("--device", help="cpu, cuda, cuda:1, mps ... (default: cpu)")
    m.add_argument("--dtype", choices=[*sorted(DTYPE_NAMES), "auto"],
                   help="weights' dtype (default: fp32, exact; fp16 suits GPUs; bf16 suits CPUs with AMX or "
                   "AVX512-BF16: 3 to 5 times faster than fp32 there; auto: fp16 on a GPU, bf16 on a CPU where a "
                   "quick measurement finds it faster, else fp32)")
    m.add_argument("--low-memory", dest="low_memory", action="store_true",
                   help="for machines with 8 GB or less: the U-Net's linear weights in int8, the text encoders "
                   "freed after each prompt is encoded, bf16 where the CPU is fast at it (--dtype auto); a "
                   "full-size SDXL at 512x512 in under 5 GiB, images close to the plain ones")
    m.add_argument("--compile", action="store_true",
                   help="torch.compile the U-Net: the first image of each size compiles (minutes; cached on disk "
                   "for later runs), the next ones are faster on a GPU (on the CPU it measured no faster)")
    m.add_argument("--fp8", action="store_true",
                   help="keep the U-Net's linear-layer weights in float8 (87%% of its weights): about half the "
                   "memory of float16, images close to but not equal to the plain ones")
    m.add_argument("--lora", dest="loras", action="append", metavar="FILE[:WEIGHT]",
                   help="a LoRA / LyCORIS file (or a name from the LoRA folders) merged into the model, weight 1 "
                   "unless given (FILE:UNET:TEXT_ENCODER for two); repeatable. Prompts add <lora:NAME:WEIGHT>")
    m.add_argument("--lora-dir", dest="lora_dirs", action="append", metavar="DIR",
                   help="a folder where <lora:NAME:...> tags find NAME.safetensors (repeatable; also "
                   "$SDXL_LORA_DIRS and lora_dirs in the config file)")
    m.add_argument("--embedding-dir", dest="embedding_dirs", action="append", metavar="DIR",
                   help="a folder of textual-inversion embeddings, used by their file names in prompts "
                   "(repeatable; also $SDXL_EMBEDDING_DIRS and embedding_dirs in the config file)")
    m.add_argument("--offload", choices=("model", "sequential"),
                   help="keep the weights in CPU memory and copy them to --device only while they run: one model "
                   "at a time (model), or one layer at a time (sequential: least GPU memory, slowest)")


def _add_sampling_arguments(gen: argparse.ArgumentParser) -> None:
    s = gen.add_argument_group("sampling")
    s.add_argument("--width", type=int, help="pixels, a multiple of 8 (default: the init image's width, else the model's native size: 1024 for SDXL)")
    s.add_argument("--height", type=int, help="pixels, a multiple of 8 (default: the init image's height, else the model's native size)")
    s.add_argument("--steps", type=int, default=30, help="sampling steps (img2img runs strength * steps)")
    s.add_argument("--cfg", type=float, help="classifier-free guidance scale (<= 1: no negative branch; default: what "
                   "the model's file recommends, else 5; the built-in model's is 3)")
    s.add_argument("--guidance-rescale", dest="guidance_rescale", type=float, default=0.0,
                   help="0..1, rescale the guided prediction's std (Lin et al. 2023)")
    s.add_argument("--sampler", default="euler", help="see `sdxl samplers` (A1111's names work too, e.g. 'DPM++ 2M')")
    s.add_argument("--schedule", default="default", help="default, trailing, karras, exponential or sgm_uniform")
    s.add_argument("--seed", type=int, default=0, help="0..4294967295 (AUTOMATIC1111's range), or -1 for a random "
                   "one (as in AUTOMATIC1111; the PNG stores the seed used); image i of a batch uses seed + i")
    s.add_argument("--batch", type=int, default=1, help="images to make (for each prompt)")
    s.add_argument("--emphasis", choices=("original", "no_norm", "comfy", "none"), default="original",
                   help="how (word:1.2) weights apply: original (AUTOMATIC1111's: scale, keep the mean), no_norm, "
                   "comfy (ComfyUI's), none (brackets taken literally)")
    s.add_argument("--clip-skip", dest="clip_skip", type=int, default=0,
                   help="text encoder layers to skip beyond SDXL's penultimate one (A1111's 'Clip skip' minus 2)")
    s.add_argument("--vae-tiling", dest="vae_tiling", action="store_true", help="encode/decode in tiles (large images)")


def _add_image_arguments(gen: argparse.ArgumentParser) -> None:
    i = gen.add_argument_group("image-to-image, inpainting, outpainting")
    i.add_argument("--init-image", dest="init_image", help="start from this image (image-to-image)")
    i.add_argument("--strength", type=float, default=0.8, help="how much of the init image to repaint (0..1]")
    i.add_argument("--resize-latents", dest="resize_latents", action="store_true",
                   help="encode --init-image at its own size and resize its latents to --width x --height, not the "
                        "image (AUTOMATIC1111's 'Just resize (latent upscale)')")
    i.add_argument("--mask", help="inpainting mask: white = repaint (needs --init-image)")
    i.add_argument("--mask-blur", dest="mask_blur", type=float, default=0.0, help="blur radius of the mask's edge (pixels)")
    i.add_argument("--outpaint", metavar="L,T,R,B", help="pixels to add left,top,right,bottom of --init-image")
    i.add_argument("--outpaint-fill", dest="outpaint_fill", default="edge",
                   help="what the new border starts as: edge, reflect or R,G,B")
    i.add_argument("--inpaint-fill", dest="inpaint_fill", choices=("original", "fill", "noise", "zeros"),
                   default="original", help="what the masked region starts from below strength 1 (AUTOMATIC1111's "
                   "masked content: original, fill, latent noise, latent nothing)")
    h = gen.add_argument_group("hires fix (a second pass at a larger size, as AUTOMATIC1111's)")
    h.add_argument("--hires", metavar="WxH", help="the second pass's size (the first pass is --width x --height)")
    h.add_argument("--hires-strength", dest="hires_strength", type=float, default=0.7,
                   help="denoising strength of the second pass")
    h.add_argument("--hires-steps", dest="hires_steps", type=int, help="its steps (default: --steps)")
    h.add_argument("--hires-upscaler", dest="hires_upscaler", default="Latent",
                   help="Latent, Latent (antialiased), Latent (bicubic), Latent (bicubic antialiased), "
                   "Latent (nearest) or Latent (nearest-exact)")


def _add_conditioning_arguments(gen: argparse.ArgumentParser) -> None:
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


def _add_output_arguments(gen: argparse.ArgumentParser) -> None:
    o = gen.add_argument_group("output")
    o.add_argument("--out", default="outputs", help="a new .png file (one image) or a folder for numbered files "
                   "(00000.png, 00001.png, ...: the next free numbers; nothing is ever overwritten). Under torchrun, "
                   "and with --prompts-file into a folder holding a run.json, it is a batch run: the processes share "
                   "the prompts, image j of the run (prompt by prompt) is numbered j, images already there are "
                   "skipped (the same command again resumes), and DIR/manifest.jsonl lists them all")
    o.add_argument("--max-pixels", dest="max_pixels", type=_positive_int, default=MAX_PIXELS, metavar="N",
                   help="the most pixels one call may make, width x height x batch (an outpainting canvas counts "
                   "too): a bound checked before anything is allocated; raise it where memory allows")
    o.add_argument("--max-image-pixels", dest="max_image_pixels", type=_positive_int, default=MAX_IMAGE_PIXELS,
                   metavar="N", help="the largest input image read (--init-image, --mask), in pixels: PIL's "
                   "decompression-bomb limit")
    o.add_argument("--json", action="store_true", help="print a JSON summary of what was written to stdout")
    o.add_argument("--store-paths", dest="store_paths", action=argparse.BooleanOptionalAction, default=False,
                   help="store the absolute paths of the model and input files in the PNG's settings, not just "
                   "their names (paths tell whoever gets the image where your files are)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def _add_generate_arguments(gen: argparse.ArgumentParser) -> None:
    for add in (_add_prompt_arguments, _add_model_arguments, _add_sampling_arguments, _add_image_arguments,
                _add_conditioning_arguments, _add_output_arguments):
        add(gen)


def _add_info(sub) -> None:
    info = sub.add_parser(
        "info",
        help="say what a checkpoint file or diffusers folder is",
        description="Print what PATH is (SDXL base / refiner / inpainting / VAE; single file or diffusers "
        "folder), its components, their storage dtypes and parameter counts. Exits with status 2 and a "
        "one-line reason for anything that is not SDXL.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    info.add_argument("path", help="a .safetensors (or .ckpt) file, a diffusers folder, builtin or a cached Hub repo id")
    info.add_argument("--json", action="store_true", help="print a machine-readable description")
    info.set_defaults(run=cmd_info)


def _add_convert(sub) -> None:
    convert = sub.add_parser(
        "convert",
        help="convert between an official single file and a diffusers folder",
        description="Read SRC (an official-layout .safetensors file or a diffusers folder) and write DST: "
        "a .safetensors path gets the official single-file layout, any other path a diffusers folder. "
        "Optionally change the storage dtype and swap in another VAE. Never overwrites.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    convert.add_argument("src", help="an SDXL .safetensors file or diffusers folder (or builtin, builtin-refiner)")
    convert.add_argument("dst", help="output: NAME.safetensors for a single file, else a (new) folder")
    convert.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="fp16", help="storage dtype of the output")
    convert.add_argument("--vae", help="a VAE .safetensors file to put in place of the checkpoint's own")
    convert.set_defaults(run=cmd_convert)


def cmd_serve(args: argparse.Namespace) -> int:
    from . import settings as config
    from .server import config as server_config
    from .server.serve import serve_forever

    model, _ = config.resolve_model(args.model)
    c = server_config.ServerConfig(
        host=args.host, port=args.port, model=model, refiner=args.refiner,
        models_dirs=[Path(d).expanduser() for d in args.models_dirs],
        lora_dirs=config.folders("lora", args.lora_dirs), embedding_dirs=config.folders("embedding", args.embedding_dirs),
        devices=server_config.parse_devices(args.devices), dtype=args.dtype, low_memory=args.low_memory,
        users=server_config.parse_users(args.api_auth), api_keys=list(args.api_key),
        outputs=None if args.no_save else Path(args.outputs).expanduser(), max_queue=args.max_queue,
        max_pixels=args.max_pixels, max_steps=args.max_steps, max_batch=args.max_batch,
        taesd=Path(args.taesd).expanduser() if args.taesd else None,
        allow_download=config.allow_download(args.allow_download))
    if c.taesd is not None and not c.taesd.is_file():
        raise FileNotFoundError(f"--taesd {c.taesd}: no such file")
    if args.ray:
        try:
            from .ray_app import ClusterConfig, serve_on_ray
        except ImportError:
            raise ValueError("--ray needs Ray Serve: pip install 'sdxl[ray]'") from None
        return serve_on_ray(c, args.ray, ClusterConfig(min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                                                       gpus_per_replica=args.gpus_per_replica))
    return serve_forever(c)


def _add_serve(sub) -> None:
    from .server import config as c

    serve = sub.add_parser(
        "serve", help="serve AUTOMATIC1111's and OpenAI's image APIs (and a web UI) over HTTP",
        description="Serve AUTOMATIC1111's /sdapi/v1 API and OpenAI's Images API (/v1/images/...) on one port, "
        "with a job queue, one worker per device, live previews and Prometheus /metrics. Listens on localhost "
        "only unless --host says otherwise; --api-auth / --api-key protect every route. Ctrl-C stops it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    serve.add_argument("--host", default=c.DEFAULT_HOST, help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=c.DEFAULT_PORT)
    serve.add_argument("--model", help="the model served first (default: $SDXL_MODEL, the config file, else builtin)")
    serve.add_argument("--models-dir", dest="models_dirs", action="append", default=[], metavar="DIR",
                       help="a folder of .safetensors models (and diffusers folders) requests may choose by name")
    serve.add_argument("--refiner", help="a refiner requests get by default")
    serve.add_argument("--lora-dir", dest="lora_dirs", action="append", metavar="DIR", help="a folder of LoRAs")
    serve.add_argument("--embedding-dir", dest="embedding_dirs", action="append", metavar="DIR",
                       help="a folder of textual-inversion embeddings")
    serve.add_argument("--devices", default="cpu", help="cpu | cuda:0,cuda:1 | all | cpu,cpu: one worker each")
    serve.add_argument("--dtype", choices=[*sorted(DTYPE_NAMES), "auto"],
                       help="weights dtype (default: float32; auto: fp16 on a GPU, bf16 on a CPU that is fast at it)")
    serve.add_argument("--low-memory", dest="low_memory", action="store_true",
                       help="as sdxl generate --low-memory: a full-size SDXL in under 5 GiB on the CPU")
    serve.add_argument("--api-auth", action="append", default=[], metavar="USER:PASS[,USER:PASS]",
                       help="HTTP Basic users (what AUTOMATIC1111 clients send)")
    serve.add_argument("--api-key", action="append", default=[], metavar="KEY",
                       help="a Bearer key (what OpenAI clients send)")
    out = serve.add_mutually_exclusive_group()
    out.add_argument("--outputs", default="outputs", metavar="DIR", help="where generated images are saved")
    out.add_argument("--no-save", action="store_true", help="keep no images on disk")
    serve.add_argument("--max-queue", type=_positive_int, default=c.DEFAULT_MAX_QUEUE, help="jobs waiting at most")
    serve.add_argument("--max-pixels", type=_positive_int, default=c.DEFAULT_MAX_PIXELS,
                       help="width x height x batch of one call")
    serve.add_argument("--max-steps", type=_positive_int, default=c.DEFAULT_MAX_STEPS)
    serve.add_argument("--max-batch", type=_positive_int, default=c.DEFAULT_MAX_BATCH)
    serve.add_argument("--taesd", metavar="FILE", help="a TAESD/TAESDXL decoder file for sharper live previews")
    serve.add_argument("--allow-download", action="store_true", help="let --model download a Hub repo")
    ray = serve.add_argument_group("a Ray cluster (pip install 'sdxl[ray]')")
    ray.add_argument("--ray", metavar="ADDRESS", help="serve on a Ray cluster: auto, ray://HOST:10001, or local; one "
                     "model replica per GPU")
    ray.add_argument("--min-replicas", type=int, default=1, help="GPU replicas kept up when idle (0: scale to zero)")
    ray.add_argument("--max-replicas", type=_positive_int, default=1, help="GPU replicas at most, autoscaled on "
                     "queued jobs")
    ray.add_argument("--gpus-per-replica", type=float, default=1.0, help="GPUs per replica (0: CPU replicas)")
    serve.set_defaults(run=cmd_serve)


def build_parser(*, suppress_defaults: bool = False) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sdxl",
        description="Stable Diffusion XL: generate images, inspect and convert SDXL checkpoints.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_info(sub)
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
        description="sdxl train CONFIG [--resume PATH|latest] [--overwrite] [--steps N] [--output-dir DIR]",
    )
    train.add_argument("args", nargs=argparse.REMAINDER)
    train.set_defaults(run=cmd_train)
    train_vae = sub.add_parser(
        "train-vae", add_help=False, help="train or fine-tune the VAE from a TOML config (docs/training-vae.md)",
        description="sdxl train-vae CONFIG [--resume PATH|latest] [--overwrite] [--steps N] [--output-dir DIR]",
    )
    train_vae.add_argument("args", nargs=argparse.REMAINDER)
    train_vae.set_defaults(run=cmd_train_vae)
    fix = sub.add_parser(
        "fix-vae-fp16", add_help=False, help="make a VAE decode in float16 without overflowing (or --report-only)",
        description="sdxl fix-vae-fp16 --vae IN.safetensors --out OUT.safetensors [--data DIR] [--steps N] "
                    "[--report-only] (docs/vae-fp16.md)",
    )
    fix.add_argument("args", nargs=argparse.REMAINDER)
    fix.set_defaults(run=cmd_fix_vae_fp16)
    _add_convert(sub)
    _add_serve(sub)
    return parser


COMMANDS = ("info", "generate", "samplers", "train", "train-vae", "fix-vae-fp16", "convert", "serve")


def main(argv: list[str] | None = None) -> int:
    from . import errors

    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv[:1] and argv[0] in COMMANDS else None
    return errors.run(f"sdxl {command}" if command else "sdxl", lambda: _main(argv))


def _main(argv: list[str]) -> int:
    if argv[:1] == ["train"]:  # the trainer parses its own arguments (--help included)
        return cmd_train(argparse.Namespace(args=argv[1:]))
    if argv[:1] == ["train-vae"]:  # the VAE trainer parses its own arguments too
        return cmd_train_vae(argparse.Namespace(args=argv[1:]))
    if argv[:1] == ["fix-vae-fp16"]:  # parses its own arguments too (--help included)
        return cmd_fix_vae_fp16(argparse.Namespace(args=argv[1:]))
    args = build_parser().parse_args(argv)
    args.argv = argv  # `generate --from-image` tells the flags given from the defaults
    import warnings

    warnings.formatwarning = lambda message, category, *rest, **kw: f"sdxl: warning: {message}\n"
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
