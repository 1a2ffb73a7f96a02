"""The command line under bad input: every case of the CLI's error table, run as a user runs it.

Each case is `python -m sdxl ARGS` in a process of its own, in an empty working folder: it must exit with
status 2, print nothing on stdout and exactly one line on stderr ("sdxl COMMAND: error: ..." naming the file,
flag or field at fault), no traceback, and leave nothing behind (its working folder, where every output goes,
empty again; the shared input files unchanged).

Speed: a fresh interpreter costs about 1.3 s of CPU (torch's import), so the cases run in one driver process
that imports sdxl and torch once and forks a child per case (no torch op runs before the fork); each child
runs the `sdxl` module exactly as `python -m sdxl` does (`runpy`), with its own argv, environment, working
folder and stdout / stderr files, and its real exit status is collected. Where os.fork is missing, each case
is a plain `python -m sdxl` subprocess. Signals and pipes (Ctrl-C, a closed stdout) are tested with real
subprocesses in test_cli.py and test_outputs.py.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import load_file, save_file

from sdxl import builtin
from sdxl.interfaces import errors, metadata

FX = "{fx}"  # the shared input files' folder, in argv and env
GEN = ["generate", "a red circle", "--steps", "1"]

# id -> (argv after `python -m sdxl`, command, what the one line must say). Outputs go to the working folder.
CASES: dict[str, tuple[list[str], str, str]] = {
    # Output paths: refused before anything loads, or created and probed for writing
    "out empty": ([*GEN, "--out", ""], "generate", "--out is empty"),
    "out jpg": ([*GEN, "--out", "photo.jpg"], "generate", "--out photo.jpg: sdxl writes PNG files"),
    "out JPEG upper case": ([*GEN, "--out", "PHOTO.JPEG"], "generate", "sdxl writes PNG files"),
    "out png for a batch": ([*GEN, "--batch", "2", "--out", "x.png"], "generate", "names one file, but this run makes 2"),
    "out png exists": ([*GEN, "--out", f"{FX}/plain.png"], "generate", "plain.png already exists"),
    "out is a file": ([*GEN, "--out", f"{FX}/notes.txt"], "generate", "notes.txt: exists and is not a folder"),
    "out under a file": ([*GEN, "--out", f"{FX}/notes.txt/sub"], "generate", "notes.txt exists and is not a folder"),
    "out unwritable": ([*GEN, "--out", "/proc/sdxl-test/o"], "generate", "cannot create the folder /proc/sdxl-test"),
    "convert to ckpt": (["convert", "builtin", "out.ckpt"], "convert", "out.ckpt: sdxl convert writes NAME.safetensors"),
    "convert to BIN": (["convert", "builtin", "out.BIN"], "convert", "not a .bin file"),
    "convert empty": (["convert", "builtin", ""], "convert", "DST is empty"),
    "convert exists": (["convert", "builtin", f"{FX}/int.safetensors"], "convert", "int.safetensors already exists"),
    "convert into a non-empty folder": (["convert", "builtin", f"{FX}/full"], "convert", "full already exists"),
    "convert unwritable": (["convert", "builtin", "/proc/x.safetensors"], "convert", "DST /proc/x.safetensors: cannot write"),
    "convert into a full disk": (["convert", "builtin", "x.safetensors"], "convert", "x.safetensors: file too large"),
    # Devices
    "device unknown": ([*GEN, "--device", "foo"], "generate", "--device foo: not a device torch knows"),
    "device cuda:7": ([*GEN, "--device", "cuda:7"], "generate", "--device cuda:7: "),
    "device meta": ([*GEN, "--device", "meta"], "generate", "--device meta: holds no data"),
    # Numbers out of range or not finite
    "seed 2**32": ([*GEN, "--seed", "4294967296"], "generate", "--seed 4294967296: seeds are 0..4294967295"),
    "seed -2": ([*GEN, "--seed", "-2"], "generate", "or -1 for a random one"),
    "seed + batch past 2**32": ([*GEN, "--seed", "4294967295", "--batch", "2"], "generate",
                                "seed + batch - 1 must be at most 4294967295"),
    "cfg 1e308": ([*GEN, "--cfg", "1e308"], "generate", "cfg must be a finite number >= 0 and <= 100"),
    "cfg nan": ([*GEN, "--cfg", "nan"], "generate", "cfg must be a finite number"),
    "aesthetic score nan": ([*GEN, "--aesthetic-score", "nan"], "generate", "aesthetic_score must be a finite number"),
    "negative aesthetic inf": ([*GEN, "--negative-aesthetic-score", "inf"], "generate",
                               "negative_aesthetic_score must be a finite number"),
    "mask blur nan": ([*GEN, "--init-image", f"{FX}/plain.png", "--mask", f"{FX}/mask.png", "--mask-blur", "nan"],
                      "generate", "mask_blur must be a finite number"),
    "guidance rescale nan": ([*GEN, "--guidance-rescale", "nan"], "generate", "guidance_rescale must be in [0, 1]"),
    "strength nan": ([*GEN, "--init-image", f"{FX}/plain.png", "--strength", "nan"], "generate", "strength must be in"),
    "refiner switch nan": ([*GEN, "--refiner-switch", "nan"], "generate", "refiner_switch must be in (0, 1)"),
    "steps 100000": ([*GEN, "--steps", "100000"], "generate", "steps must be an integer >= 1 and <= 10000"),
    "size too large": ([*GEN, "--width", "100000", "--height", "100000"], "generate", "--max-pixels N allows more"),
    "one side too large": ([*GEN, "--width", "8", "--height", "99999992"], "generate", "more than the 16,777,216"),
    "batch too large": ([*GEN, "--width", "1024", "--height", "1024", "--batch", "100"], "generate",
                        "1024x1024 x batch 100 = 104,857,600 pixels"),
    "outpaint margins too large": ([*GEN, "--init-image", f"{FX}/plain.png", "--outpaint", "0,0,100000,100000"],
                                   "generate", "--max-pixels N allows more"),
    "max pixels 0": ([*GEN, "--max-pixels", "0"], "generate", "argument --max-pixels: expected a positive whole number"),
    "clip skip beyond the model": ([*GEN, "--clip-skip", "5"], "generate",
                                   ("clip_skip 5 is out of range for this model: its text encoders have 3 and 3 "
                                    "layers, so clip_skip is 0..1")),
    # Input images
    "decompression bomb": ([*GEN, "--init-image", f"{FX}/bomb.png"], "generate",
                           "--init-image {fx}/bomb.png: 30000x30000 = 900,000,000 pixels"),
    "image over --max-image-pixels": ([*GEN, "--init-image", f"{FX}/plain.png", "--max-image-pixels", "100"],
                                      "generate", "--max-image-pixels N reads larger ones"),
    "truncated init image": ([*GEN, "--init-image", f"{FX}/truncated.png"], "generate",
                             "--init-image {fx}/truncated.png: cannot read this image: truncated or corrupt"),
    "truncated mask": ([*GEN, "--init-image", f"{FX}/noise.png", "--mask", f"{FX}/truncated.png"], "generate",
                       "--mask {fx}/truncated.png: cannot read this image"),
    "not an image": ([*GEN, "--init-image", f"{FX}/notes.txt"], "generate", "notes.txt: not an image file"),
    "init image is a folder": ([*GEN, "--init-image", FX], "generate", "--init-image {fx}: a folder, not an image file"),
    # Text that is not UTF-8; prompt files
    "prompt not utf-8": (["generate", "a \udcff circle", "--out", "o"], "generate", "prompt is not valid UTF-8 text"),
    "negative not utf-8": ([*GEN, "--negative", "\udcfe"], "generate", "negative_prompt is not valid UTF-8 text"),
    "prompts file not utf-8": (["generate", "--prompts-file", f"{FX}/bad.txt"], "generate",
                               "--prompts-file {fx}/bad.txt: line 2 is not valid UTF-8 (byte 0xff)"),
    "prompt and prompts file": ([*GEN, "--prompts-file", f"{FX}/bom.txt"], "generate",
                                "give a PROMPT or --prompts-file, not both"),
    "config not utf-8": ([*GEN], "generate", "config_bad.toml: not valid UTF-8 text"),
    "config allow_download type": ([*GEN], "generate", "'allow_download' must be true or false, got 'yes'"),
    # Stored settings of --from-image, named as the image's
    "stored seed a string": (["generate", "--from-image", f"{FX}/seed_text.png"], "generate",
                             "seed_text.png: its stored setting 'seed' must be an integer, got '42'"),
    "stored fp8 a string": (["generate", "--from-image", f"{FX}/fp8_text.png"], "generate",
                            "fp8_text.png: its stored setting 'fp8' must be true or false, got 'no'"),
    "stored crop a string": (["generate", "--from-image", f"{FX}/crop_text.png"], "generate",
                             "its stored setting 'crop_top_left' must be a pair of integers"),
    "stored steps out of range": (["generate", "--from-image", f"{FX}/steps_zero.png"], "generate",
                                  "steps_zero.png: its stored settings: steps must be an integer >= 1"),
    "a1111 seed out of range": (["generate", "--from-image", f"{FX}/a1111_seed.png"], "generate",
                                "a1111_seed.png: its stored settings: seed must be an integer in 0..4294967295"),
    # Checkpoints
    "random bytes .ckpt": ([*GEN, "--model", f"{FX}/random.ckpt"], "generate", "not a PyTorch checkpoint at all"),
    "info random bytes .ckpt": (["info", f"{FX}/random.ckpt"], "info", "neither a zip archive nor a pickle"),
    "int weights": ([*GEN, "--model", f"{FX}/int.safetensors"], "generate",
                    "is stored as int32, but weights are floating-point numbers"),
    "convert int weights": (["convert", f"{FX}/int.safetensors", "x.safetensors"], "convert",
                            "is stored as int32, but weights are floating-point numbers"),
    "safetensors refused by the library": ([*GEN, "--model", f"{FX}/badview.safetensors"], "generate",
                                           "badview.safetensors: not a readable safetensors file"),
    "non-finite weights": ([*GEN, "--model", f"{FX}/nan.safetensors", "--steps", "2"], "generate",
                           "the latents are NaN or infinite after the last of 2 steps, so no image of this prompt was written"),
}
ENV = {  # id -> extra environment ({fx} replaced)
    "config not utf-8": {"SDXL_CONFIG": f"{FX}/config_bad.toml"},
    "config allow_download type": {"SDXL_CONFIG": f"{FX}/config_type.toml"},
}
FILE_SIZE_LIMIT = {"convert into a full disk": 100_000}  # bytes a file may grow to (RLIMIT_FSIZE): a full disk


def _png(path: Path, image: Image.Image | None = None, **chunks: str) -> None:
    info = PngImagePlugin.PngInfo()
    for key, text in chunks.items():
        info.add_text(key, text)
    (image or Image.new("RGB", (64, 48), (90, 120, 150))).save(path, pnginfo=info)


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header for a huge grey image, with a token of pixel data (what a decompression bomb looks like
    to a reader before it decodes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


def _stored(**settings) -> str:
    return json.dumps({"format": metadata.FORMAT_VERSION, "prompt": "a red circle", "model": "builtin", **settings})


def _checkpoints(fx: Path) -> None:
    """Damaged copies of the built-in model: an int32 weight, a NaN weight; a header safetensors refuses."""
    from safetensors import safe_open

    source = builtin.path("builtin")
    with safe_open(str(source), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(source))
    name = "model.diffusion_model.input_blocks.0.0.weight"
    save_file({**tensors, name: tensors[name].to(torch.int32)}, str(fx / "int.safetensors"), metadata=meta)
    out = "model.diffusion_model.out.2.weight"
    save_file({**tensors, out: torch.full_like(tensors[out], float("nan"))}, str(fx / "nan.safetensors"), metadata=meta)
    header = json.dumps({"w.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    (fx / "badview.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    (fx / "random.ckpt").write_bytes(np.random.default_rng(0).bytes(4096))


def make_fixtures(fx: Path) -> None:
    fx.mkdir()
    _png(fx / "plain.png")
    Image.new("L", (64, 48), 255).save(fx / "mask.png")
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    noise.save(fx / "noise.png")
    data = io.BytesIO()
    noise.save(data, format="PNG")
    (fx / "truncated.png").write_bytes(data.getvalue()[: len(data.getvalue()) * 3 // 5])
    (fx / "bomb.png").write_bytes(_bomb_png(30000, 30000))
    (fx / "notes.txt").write_text("not an image\n")
    (fx / "full").mkdir()
    (fx / "full" / "something").write_text("x")
    (fx / "bad.txt").write_bytes(b"a red circle\na \xff blue square\n")
    (fx / "bom.txt").write_bytes(b"\xef\xbb\xbfa red circle\n")
    (fx / "config_bad.toml").write_bytes(b'model = "\xff"\n')
    (fx / "config_type.toml").write_text('allow_download = "yes"\n')
    _png(fx / "seed_text.png", sdxl=_stored(seed="42"))
    _png(fx / "fp8_text.png", sdxl=_stored(fp8="no"))
    _png(fx / "crop_text.png", sdxl=_stored(crop_top_left="0,0"))
    _png(fx / "steps_zero.png", sdxl=_stored(steps=0))
    _png(fx / "a1111_seed.png", parameters="a red circle\nSteps: 2, Sampler: Euler, CFG scale: 3, Seed: 99999999999, "
                                           "Size: 64x64, Model: builtin")
    _checkpoints(fx)


DRIVER = r"""
import json, os, resource, runpy, signal, sys
import torch, sdxl.interfaces.cli, sdxl.pipeline, sdxl.checkpoints.load  # imported once, before the forks

def listing(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, ds, fs in os.walk(folder) for f in fs + ds)

def child(case):
    os.chdir(case["cwd"])
    os.environ.update(case["env"])
    for fd, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(os.path.join(case["logs"], name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    if case["fsize"]:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (case["fsize"], case["fsize"]))
    torch.set_num_threads(1)
    sys.argv = ["sdxl", *case["argv"]]
    try:
        runpy.run_module("sdxl", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(code)

results = {}
cases = json.load(sys.stdin)
fx = cases.pop("__fx__")
for name, case in cases.items():
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        child(case)
    _, status = os.waitpid(pid, 0)
    read = lambda n: open(os.path.join(case["logs"], n), encoding="utf-8", errors="replace").read()
    results[name] = {"rc": os.waitstatus_to_exitcode(status), "out": read("stdout"), "err": read("stderr"),
                     "left": listing(case["cwd"]), "fx": listing(fx)}
print(json.dumps(results))
"""


def _run_plainly(cases: dict, fx: str) -> dict:
    """Without os.fork: each case a `python -m sdxl` subprocess."""
    results = {}
    for name, case in cases.items():
        r = subprocess.run([sys.executable, "-m", "sdxl", *case["argv"]], cwd=case["cwd"], capture_output=True,
                           text=True, env={**os.environ, **case["env"]}, timeout=300, check=False)
        results[name] = {"rc": r.returncode, "out": r.stdout, "err": r.stderr, "left": _walk(case["cwd"]),
                         "fx": _walk(fx)}
    return results


def _walk(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    fx = root / "fx"
    make_fixtures(fx)
    before = _walk(fx)
    cases = {}
    for i, (name, (argv, _, _)) in enumerate(CASES.items()):
        cwd, logs = root / f"case{i}", root / f"logs{i}"
        cwd.mkdir()
        logs.mkdir()
        env = {"OMP_NUM_THREADS": "1", **ENV.get(name, {})}
        cases[name] = {"argv": [a.replace(FX, str(fx)) for a in argv], "cwd": str(cwd), "logs": str(logs),
                       "env": {k: v.replace(FX, str(fx)) for k, v in env.items()},
                       "fsize": FILE_SIZE_LIMIT.get(name)}
    if hasattr(os, "fork") and sys.platform.startswith("linux"):
        r = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps({**cases, "__fx__": str(fx)}),
                           capture_output=True, text=True, timeout=600, check=False)
        assert r.returncode == 0, r.stderr
        results = json.loads(r.stdout)
    else:
        results = _run_plainly({k: v for k, v in cases.items() if not v["fsize"]}, str(fx))
    return fx, before, results


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(matrix, name):
    fx, before, results = matrix
    if name not in results:
        pytest.skip("needs a file size limit (Linux)")
    if name == "device cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    r = results[name]
    _, command, message = CASES[name]
    assert r["rc"] == 2, (r["rc"], r["err"])
    assert r["out"] == "" and "Traceback" not in r["err"], r["err"]
    lines = r["err"].splitlines()
    assert len(lines) == 1, r["err"]
    assert lines[0].startswith(f"sdxl {command}: error: "), lines[0]
    assert message.replace(FX, str(fx)) in lines[0], lines[0]
    assert r["left"] == [], f"left behind: {r['left']}"
    assert r["fx"] == before, "an input folder changed"


def test_every_row_of_the_error_table_gives_one_line():
    """The rows that the matrix cannot reach without harm (out of memory) or that readers pre-empt with their own
    message (raw library errors) map as the table says; a bug keeps its traceback."""
    from PIL import Image as PILImage
    from safetensors import SafetensorError

    rows = {
        KeyboardInterrupt(): (130, "interrupted"),
        BrokenPipeError(32, "Broken pipe"): (141, None),
        MemoryError(): (2, "out of memory: try a smaller --width/--height"),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"): (2, "out of memory (CUDA out of"),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 GB"): (2, "out of memory"),
        SafetensorError("Error while deserializing header: HeaderTooLarge"): (2, "a safetensors file could not be"),
        PILImage.DecompressionBombError("Image size (1 pixels) exceeds limit"): (2, "--max-image-pixels N"),
        UnicodeDecodeError("utf-8", b"a\xff", 1, 2, "invalid start byte"): (2, "not valid UTF-8 (invalid start byte"),
        ValueError("width must be a positive multiple of 8,\nnot 100"): (2, "width must be a positive multiple of 8, not 100"),
        OSError(28, "No space left on device", "/x/out.safetensors"): (2, "/x/out.safetensors: no space left on the device"),
        PermissionError(13, "Permission denied", "/x"): (2, "/x: permission denied"),
        FileNotFoundError("--mask m.png: no such file"): (2, "--mask m.png: no such file"),
    }
    for error, (status, line) in rows.items():
        got = errors.describe(error)
        assert got is not None and got[0] == status, (error, got)
        assert (got[1] is None) if line is None else (line in got[1]), (error, got)
    assert errors.describe(RuntimeError("an unexpected bug")) is None
    assert errors.describe(KeyError("x")) is None


def test_the_matrix_covers_every_kind_of_input():
    """A count for the record, and a guard against the matrix shrinking unnoticed."""
    kinds = {"out": 0, "convert": 0, "device": 0, "image": 0, "stored": 0}
    for argv, _, _ in CASES.values():
        kinds["out"] += "--out" in argv
        kinds["convert"] += argv[0] == "convert"
        kinds["device"] += "--device" in argv
        kinds["image"] += "--init-image" in argv
        kinds["stored"] += "--from-image" in argv
    assert len(CASES) >= 55 and all(n >= 3 for n in kinds.values()), (len(CASES), kinds)
