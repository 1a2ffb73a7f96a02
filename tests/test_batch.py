"""Batch runs of `sdxl generate` on many processes (torchrun), run as a user would, on the built-in model.

The reference is a one-process run into an empty folder. Processes compute alike only with equal thread counts
(on the CPU a matrix product's sums depend on them), so every command here runs with the thread count a
2-process batch run gives each process: the cores // 2.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from sdxl.interfaces import batch
from sdxl.training.shapes import COLOURS, SHAPES, caption

TORCHRUN = Path(sys.executable).parent / "torchrun"
THREADS = max(1, len(os.sched_getaffinity(0)) // 2)
PROMPTS = 40
ARGS = ["--steps", "4", "--seed", "11"]
LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return {**env, "OMP_NUM_THREADS": str(THREADS), "XDG_CACHE_HOME": str(tmp / "cache"), **extra}


def _argv(prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "sdxl", "generate", "--prompts-file", str(prompts), "--out", str(out), *ARGS, *extra]


def one_process(tmp: Path, prompts: Path, out: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *_argv(prompts, out, *extra)], check=False, capture_output=True,
                          text=True, env=_env(tmp, **env), timeout=300)


def torchrun(tmp: Path, prompts: Path, out: Path, *extra: str, popen: bool = False):
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", *_argv(prompts, out, *extra)]
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                env=_env(tmp), start_new_session=True)
    return subprocess.run(cmd, check=False, capture_output=True, text=True, env=_env(tmp), timeout=300)


def pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png"))


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("batch")


@pytest.fixture(scope="module")
def prompts(work) -> Path:
    colours = list(COLOURS)
    lines = [caption(SHAPES[i % 3], colours[i % 8], colours[(3 * i + 1 + i // 8) % 8]) for i in range(PROMPTS)]
    assert len(set(lines)) == PROMPTS
    path = work / "prompts.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def reference(work, prompts) -> Path:
    """A one-process run's images (no torchrun: numbered from 00000.png in an empty folder, as always)."""
    out = work / "reference"
    r = one_process(work, prompts, out)
    assert r.returncode == 0, r.stderr
    assert len(pngs(out)) == PROMPTS and not (out / "manifest.jsonl").exists()  # an ordinary run: as today
    return out


@pytest.fixture(scope="module")
def two(work, prompts) -> tuple[Path, subprocess.CompletedProcess]:
    out = work / "two"
    return out, torchrun(work, prompts, out)


def assert_equal_images(folder: Path, reference: Path) -> None:
    assert pngs(folder) == pngs(reference)
    for name in pngs(reference):
        assert np.array_equal(pixels(folder / name), pixels(reference / name)), name


def assert_manifest(folder: Path, prompts: Path) -> None:
    lines, texts = manifest(folder), prompts.read_text().splitlines()
    assert [r["index"] for r in lines] == list(range(PROMPTS))  # each image once, in order
    for r in lines:
        assert r["file"] == f"{r['index']:05d}.png" and r["prompt"] == texts[r["index"]] == r["settings"]["prompt"]
        assert r["seed"] == 11 and r["settings"]["steps"] == 4 and r["prompt_index"] == r["index"]
    assert not list(folder.glob("manifest.rank*")) and not list(folder.glob(".*.partial"))


def test_two_processes_write_a_one_process_runs_images_and_one_manifest(two, reference, prompts):
    out, r = two
    assert r.returncode == 0, r.stderr
    assert_equal_images(out, reference)
    assert_manifest(out, prompts)
    assert sorted(r.stdout.split()) == sorted(str(out / n) for n in pngs(out))  # every image written once
    assert "process 0 of 2: 20 image(s)" in r.stderr and "process 1 of 2: 20 image(s)" in r.stderr
    assert "Traceback" not in r.stderr
    assert json.loads((out / "run.json").read_text())["prompts"] == PROMPTS


def _kill_when(p: subprocess.Popen, folder: Path, images: int) -> None:
    """SIGKILL the run (torchrun starts its processes in sessions of their own) once `images` exist."""
    deadline = time.monotonic() + 120
    while len(pngs(folder) if folder.is_dir() else []) < images and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    workers = [int(pid) for task in Path(f"/proc/{p.pid}/task").iterdir()
               for pid in (task / "children").read_text().split()]
    for pid in [p.pid, *workers]:
        os.kill(pid, signal.SIGKILL)
    p.wait()
    for pid in workers:  # a kill lands asynchronously: wait until each worker is gone (or a zombie), so that no
        _wait_dead(pid)  # image it was linking into place appears after the caller looks


def _wait_dead(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not die within {timeout} s of SIGKILL")


def test_a_killed_run_restarted_makes_only_the_missing_images(work, prompts, reference):
    out = work / "killed"
    _kill_when(torchrun(work, prompts, out, popen=True), out, PROMPTS // 2)
    before = {n: (os.stat(out / n).st_ino, os.stat(out / n).st_mtime_ns) for n in pngs(out)}
    assert PROMPTS // 2 <= len(before) < PROMPTS

    r = torchrun(work, prompts, out)
    assert r.returncode == 0, r.stderr
    made = {Path(line).name for line in r.stdout.split()}
    assert made == set(pngs(out)) - set(before)  # only the missing ones: nothing made twice
    assert {n: (os.stat(out / n).st_ino, os.stat(out / n).st_mtime_ns) for n in before} == before  # untouched
    assert_equal_images(out, reference)
    assert_manifest(out, prompts)


def _refusal(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdxl generate: error: "), r.stderr
    return lines[0]


def test_a_folder_with_other_pngs_is_refused_in_one_line(work, prompts, reference):
    out = work / "foreign"
    out.mkdir()
    shutil.copy(reference / "00003.png", out / "00000.png")  # someone else's image, no run.json
    rank0 = {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}  # as torchrun --nproc-per-node 1 sets them
    line = _refusal(one_process(work, prompts, out, **rank0))
    assert f"{out}: holds numbered PNGs that no batch run made here" in line
    assert sorted(os.listdir(out)) == ["00000.png"]  # nothing written

    r = torchrun(work, prompts, out)
    assert r.returncode != 0 and r.stderr.count(line) == 2  # each process says the same one line
    assert sorted(os.listdir(out)) == ["00000.png"]


def test_a_resume_with_other_settings_is_refused_and_the_same_resumes_on_one_process(work, prompts, two, reference):
    out = work / "other-settings"
    out.mkdir()
    shutil.copy(two[0] / "run.json", out)
    for name in pngs(reference)[:-1]:
        shutil.copy(reference / name, out)
    line = _refusal(one_process(work, prompts, out, "--steps", "5", "--negative", "blurry"))  # run.json: a batch folder
    assert "run.json differs in --negative-prompt, --steps" in line

    r = one_process(work, prompts, out)  # without torchrun: one process resumes it
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(out / f"{PROMPTS - 1:05d}.png")]
    assert_equal_images(out, reference)
    assert_manifest(out, prompts)  # the lines of images copied in, read back from their PNGs


def test_seed_minus_one_is_one_seed_for_all_processes_and_kept_on_resume(work, prompts):
    few = work / "four.txt"
    few.write_text("\n".join(prompts.read_text().splitlines()[:4]) + "\n")
    out = work / "random-seed"
    r = torchrun(work, few, out, "--seed", "-1", "--steps", "1")
    assert r.returncode == 0, r.stderr
    seeds = {r["seed"] for r in manifest(out)}
    assert len(seeds) == 1 and seeds == {json.loads((out / "run.json").read_text())["settings"]["seed"]}
    (out / "00002.png").unlink()
    r = one_process(work, few, out, "--seed", "-1", "--steps", "1")
    assert r.returncode == 0, r.stderr
    assert {r["seed"] for r in manifest(out)} == seeds and len(manifest(out)) == 4


# -- the parts, without processes


def _png(path: Path, **settings) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("sdxl", json.dumps({"format": 1, **settings}))
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)


def test_merge_lists_each_image_in_the_folder_once_and_recovers_lost_lines(tmp_path):
    for j in (0, 1, 2, 7):
        _png(tmp_path / f"{j:05d}.png", prompt=f"p{j // 2}", seed=5, batch_index=j % 2)
    line = {"index": 0, "file": "00000.png", "prompt": "p0", "seed": 5, "settings": {"from": "manifest"}}
    (tmp_path / "manifest.jsonl").write_text(json.dumps(line) + "\n" + json.dumps({**line, "index": 5}) + "\n")
    (tmp_path / "manifest.rank0.jsonl").write_text(json.dumps({**line, "settings": {"from": "rank0"}}) + "\n")
    (tmp_path / "manifest.rank1.jsonl").write_text(json.dumps({**line, "index": 1}) + "\n" + '{"index": 2, "fi')
    (tmp_path / ".00001.png.0123abcd.partial").write_bytes(b"killed")
    (tmp_path / ".00003.png.0123abcd.partial").write_bytes(b"maybe someone's")

    assert batch.merge(tmp_path, prompts=2, kept=2) == (3, 1)  # 00003.png is missing; 00007.png not the run's
    lines = manifest(tmp_path)
    assert [r["index"] for r in lines] == [0, 1, 2]  # 5's file does not exist
    assert lines[0]["settings"] == {"from": "rank0"}  # the newer line (an image deleted and made again)
    assert lines[2] == {"index": 2, "file": "00002.png", "prompt_index": 1, "batch_index": 0, "prompt": "p1",
                        "seed": 5, "settings": {"prompt": "p1", "seed": 5, "batch_index": 0}}  # read from its PNG
    assert sorted(os.listdir(tmp_path)) == [".00003.png.0123abcd.partial", "00000.png", "00001.png", "00002.png",
                                            "00007.png", "manifest.jsonl"]


def test_what_is_left_and_who_makes_it():
    assert batch.remaining({0, 1, 2, 5}, prompts=4, kept=2) == [1, 2, 3]
    assert batch.remaining(set(), prompts=2, kept=1) == [0, 1]
    assert batch.launch_from_env({}) is None
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    launch = batch.launch_from_env(env)
    assert launch == batch.Launch(rank=3, world=4, local_rank=1, local_world=2)
    assert batch.device_for("cuda", launch) == "cuda:1" and batch.device_for("cuda:0", launch) == "cuda:0"
    assert batch.device_for(None, launch) is None
    with pytest.raises(ValueError, match="RANK=4, .*: not a process of a run"):
        batch.launch_from_env({**env, "RANK": "4"})
    assert batch.split_threads("cuda:1", launch) is None
    assert batch.split_threads("cpu", launch, env={"OMP_NUM_THREADS": "3"}) is None  # the user's choice


def test_differences_name_the_flags_and_ignore_a_random_seed():
    settings = {"steps": 4, "seed": 1, "device": "cuda:0", "model": None}
    a = batch.describe(["x", "y"], settings, {"model": "builtin"}, [0])
    b = batch.describe(["x", "y"], {**settings, "seed": 2, "device": "cuda:1"}, {"model": "builtin"}, [0])
    assert batch.differences(a, b, random_seed=False) == ["--seed"]
    assert batch.differences(a, b, random_seed=True) == []
    c = batch.describe(["x", "z"], {**settings, "device": "cpu", "steps": 5}, {"model": "other"}, [0])
    assert batch.differences(a, c, random_seed=False) == ["the models", "the prompts", "--device-type", "--steps"]
    assert batch.differences([], a, random_seed=False)[0].startswith("everything")
