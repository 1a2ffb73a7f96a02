"""Batch generation on many processes: `sdxl generate --prompts-file FILE --out DIR` under torchrun.

`torchrun --nproc-per-node N [--nnodes M ...] -m sdxl generate ...` starts N x M processes with WORLD_SIZE, RANK
and LOCAL_RANK in their environment. Each runs the whole command line; this module gives it its share:

- Image j of the run (prompt p, the k-th kept image of its batch: j = p * kept + k) is DIR/{j:05d}.png, the
  name a one-process run into an empty folder gives it, so an N-process run's images are a one-process run's
  (pixel for pixel where the processes compute alike: one device type, and on the CPU one thread count).
- Process 0 lists DIR once, before anyone writes, and deals out the prompts with an image missing round-robin:
  a restarted run makes only what is missing (balanced again), and no two processes ever own one name.
- Every process appends one line per image it wrote to DIR/manifest.rank{R}.jsonl. At the end the processes
  meet (torch.distributed, gloo) and process 0 merges those files, an earlier manifest.jsonl, and any image
  whose line a kill lost (read back from its PNG's settings) into DIR/manifest.jsonl: one line per image in
  index order, replaced atomically.
- DIR/run.json describes the run (the prompts' digest, settings, models, seed), written before its first
  image. Numbered PNGs beside another run's run.json, or none, are refused: runs never mix. The same command
  again resumes; with --seed -1 it takes the seed run.json stored.

A run without torchrun is a one-process batch run when DIR already holds a run.json (a resume); otherwise
`sdxl generate` numbers from the next free number, as always. Across machines DIR must be a folder they share.
Images are written as ever (`outputs.create_new`): a kill leaves finished images whole and no half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import outputs

RUN_FILE = "run.json"
MANIFEST = "manifest.jsonl"
RANK_MANIFEST = "manifest.rank{}.jsonl"
RUN_FORMAT = 1
# The processes meet once at the end. The work is balanced, but devices may differ in speed, so a finished process
# may wait long for the others; a process that dies ends the whole run through torchrun, not through this timeout.
MEET_TIMEOUT_DAYS = 7
# What run.json's keys are called in an error message (settings are named by their flags).
DESCRIPTION_WORDS = {"format": "its format", "prompts": "the number of prompts", "prompts_sha256": "the prompts",
                     "batch_indices": "the images kept of each batch", "models": "the models"}


class BatchError(ValueError):
    """A batch run that cannot go on (one line: errors.py prints ValueErrors so)."""


@dataclass(frozen=True)
class Launch:
    """This process's place among the run's processes, as torchrun's environment says it."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0  # its place on this machine: its GPU
    local_world: int = 1  # processes on this machine: they share its cores


def launch_from_env(env: Mapping[str, str] = os.environ) -> Launch | None:
    """The launch torchrun (or another launcher setting WORLD_SIZE, RANK, LOCAL_RANK) started; None: none."""
    if "WORLD_SIZE" not in env:
        return None
    names = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    given = ", ".join(f"{k}={env[k]}" for k in names if k in env)
    try:
        world, rank = int(env["WORLD_SIZE"]), int(env.get("RANK", "0"))
        local_rank, local_world = int(env.get("LOCAL_RANK", str(rank))), int(env.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError:
        raise BatchError(f"{given}: not whole numbers (torchrun sets them; start the run with torchrun)") from None
    if not (0 <= rank < world and 0 <= local_rank < local_world <= world):
        raise BatchError(f"{given}: not a process of a run of WORLD_SIZE processes (start the run with torchrun)")
    return Launch(rank, world, local_rank, local_world)


def launch_for(out: str, prompts_file: str | None, env: Mapping[str, str] = os.environ) -> Launch | None:
    """The batch run this command is a process of: torchrun's; one process resuming a batch run's folder (it
    holds a run.json); None: an ordinary run (numbered from the next free number)."""
    launch = launch_from_env(env)
    if launch is None and prompts_file and out.strip() and (Path(out).expanduser() / RUN_FILE).is_file():
        return Launch()
    return launch


def device_for(device: str | None, launch: Launch) -> str | None:
    """--device cuda in a batch run: this process's own GPU, cuda:LOCAL_RANK (an explicit cuda:N is kept)."""
    if device is not None and device.strip().lower() == "cuda":
        return f"cuda:{launch.local_rank}"
    return device


def split_threads(device: str | None, launch: Launch, env: Mapping[str, str] = os.environ) -> int | None:
    """CPU processes on one machine share its cores: torch threads = cores // processes here. The thread count
    set, or None where it is left alone: GPU runs, one process, or an OMP_NUM_THREADS of the user's (torchrun sets
    1 when none is given, which cannot be told from a user's 1: 1 is taken as torchrun's)."""
    if launch.local_world <= 1 or (device is not None and device.strip().lower() not in ("", "cpu")):
        return None
    if env.get("OMP_NUM_THREADS", "1").strip() != "1":
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // launch.local_world)
    import torch

    torch.set_num_threads(threads)
    return threads


# -- the run's description (run.json): what a resume must repeat


def describe(prompts: list[str], settings: Mapping[str, Any], models: Mapping[str, str | None],
             batch_indices: list[int]) -> dict[str, Any]:
    """run.json's content: what makes the run's images. The device counts by its type only (processes use
    cuda:0, cuda:1, ...; a CPU and a GPU make different pixels); models by their resolved names."""
    kept = {k: v for k, v in settings.items() if k not in ("model", "refiner", "vae", "device")}
    kept["device_type"] = (settings.get("device") or "cpu").strip().lower().split(":")[0]
    digest = hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()
    description = {"format": RUN_FORMAT, "prompts": len(prompts), "prompts_sha256": digest,
                   "batch_indices": list(batch_indices), "models": dict(models), "settings": kept}
    return json.loads(json.dumps(description, sort_keys=True, default=str))  # as it reads back from the file


def differences(stored: Any, wanted: dict[str, Any], random_seed: bool) -> list[str]:
    """What differs between a stored description and this run's, in words (settings by their flags). With
    --seed -1 the seed does not count: the run takes the stored one."""
    if not isinstance(stored, dict) or not isinstance(stored.get("settings"), dict):
        return [f"everything (it is not a {RUN_FILE} that sdxl wrote)"]
    words = [DESCRIPTION_WORDS.get(key, key) for key in sorted(set(stored) | set(wanted))
             if key != "settings" and stored.get(key) != wanted.get(key)]
    a, b = stored["settings"], wanted["settings"]
    words += ["--" + key.replace("_", "-") for key in sorted(set(a) | set(b))
              if a.get(key) != b.get(key) and not (key == "seed" and random_seed)]
    return words


def _read_description(folder: Path) -> Any:
    path = folder / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return {}  # not a description: differs in everything


def check_folder(folder: Path, wanted: dict[str, Any], random_seed: bool) -> dict[str, Any] | None:
    """The stored description when `folder` holds this run's images (a resume); None when it holds no run's
    images. Another run's numbered PNGs (another run.json, or none) are refused."""
    present = image_numbers(folder)  # listed before run.json is read: a run writes run.json before its first image
    stored = _read_description(folder)
    if stored is None:
        if present:
            raise BatchError(f"{folder}: holds numbered PNGs that no batch run made here (it has no {RUN_FILE}); "
                             "give an empty or new --out folder (a batch run never mixes its images with others)")
        return None
    diff = differences(stored, wanted, random_seed)
    if not diff:
        return stored
    if present:
        raise BatchError(f"{folder}: holds the images of another run ({RUN_FILE} differs in {', '.join(diff)}); "
                         "give a new --out folder, or the same prompts and settings to resume that run")
    return None  # a run that wrote no image: its description gives way to this one's


# -- names, and which prompts are left


def image_name(index: int) -> str:
    return f"{index:0{outputs.NUMBER_DIGITS}d}{outputs.PNG}"


def image_numbers(folder: Path) -> set[int]:
    """The numbers of the numbered PNGs (00012.png) in `folder` (as `outputs.next_number` counts them)."""
    numbers = set()
    with os.scandir(folder) as entries:
        for entry in entries:
            stem, suffix = entry.name[:-len(outputs.PNG)], entry.name[-len(outputs.PNG):]
            if suffix == outputs.PNG and stem.isascii() and stem.isdigit():
                numbers.add(int(stem))
    return numbers


def remaining(present: set[int], prompts: int, kept: int) -> list[int]:
    """The prompts of which an image is missing (all of a prompt's batch is made again; only the missing are
    written)."""
    return [p for p in range(prompts) if any(p * kept + k not in present for k in range(kept))]


# -- the processes together


def _join(launch: Launch) -> None:
    """Join the run's process group (gloo: CPU processes too, across machines); nothing for one process."""
    if launch.world == 1:
        return
    from datetime import timedelta

    import torch.distributed as dist

    if dist.is_initialized():
        return
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise BatchError(f"WORLD_SIZE={launch.world} but no {' or '.join(missing)}: start the run with torchrun")
    dist.init_process_group("gloo", timeout=timedelta(days=MEET_TIMEOUT_DAYS))


def _together(launch: Launch, what: str, fn):
    """fn() across the processes; a process that died or stopped meanwhile makes one line, not a traceback."""
    try:
        return fn()
    except RuntimeError as e:  # gloo's "connection closed by peer" and the like
        raise BatchError(f"process {launch.rank} of {launch.world}: another process of the run stopped {what} "
                         f"({' '.join(str(e).split())[:160]}); the images written are kept, and the same command "
                         "again makes the rest") from None


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _stop_on_sigterm() -> None:
    """torchrun passes a Ctrl-C on to its processes as SIGTERM: end as on a Ctrl-C (the image being written
    removed, the finished ones in place, "interrupted", exit status 130), not silently."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def _from_first(launch: Launch, value: Any) -> Any:
    """Process 0's `value`, in every process."""
    if launch.world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    _together(launch, "before the work was dealt out", lambda: dist.broadcast_object_list(box, src=0))
    return box[0]


@dataclass
class Batch:
    """This process's part of a batch run: the prompts it makes, where their images go, its manifest lines."""

    target: outputs.Target  # the folder (its `written` lists this process's images)
    launch: Launch
    description: dict[str, Any]
    prompts: int  # in the whole run
    kept: int  # images kept of each prompt's batch
    todo: list[int]  # the prompts this process makes
    seed: int  # the run's (--seed -1: process 0's choice, or the one run.json stored)
    described: bool = False  # run.json is there (this process wrote it or found it)

    @property
    def folder(self) -> Path:
        return self.target.folder

    @property
    def label(self) -> str:
        return f"process {self.launch.rank} of {self.launch.world}: " if self.launch.world > 1 else ""

    def path(self, index: int) -> Path:
        return self.folder / image_name(index)

    def agree(self, settings: dict[str, Any], options: list) -> list:
        """The options with the run's seed (changed only for --seed -1, where processes drew their own)."""
        if settings["seed"] == self.seed:
            return options
        settings["seed"] = self.seed
        print(f"note: seed {self.seed}: the run's (in {self.folder / RUN_FILE})", file=sys.stderr)
        return [o.replace(seed=self.seed) for o in options]

    def write(self, index: int, data: bytes, prompt_index: int, settings: dict[str, Any]) -> Path | None:
        """Create image `index` and add its manifest line; None when it exists (made by an earlier run: kept)."""
        self._describe_run()
        path = self.path(index)
        try:
            outputs.create_new_bytes(path, data)
        except FileExistsError:
            return None
        self.target.written.append(path)
        line = json.dumps(record(index, prompt_index, settings), sort_keys=True)
        with open(self.folder / RANK_MANIFEST.format(self.launch.rank), "a", encoding="utf-8") as f:
            f.write(line + "\n")  # one write per line, flushed on close: a kill loses at most this line
        return path

    def _describe_run(self) -> None:
        """run.json, before the first image (every process tries; the first one's stays, all are equal)."""
        if self.described:
            return
        try:
            outputs.create_new_bytes(self.folder / RUN_FILE, (json.dumps(self.description, indent=1) + "\n").encode())
        except FileExistsError:
            pass
        self.described = True

    def finish(self) -> None:
        """Meet the other processes; process 0 merges the manifest and says what it lists."""
        if self.launch.world > 1:
            import torch.distributed as dist

            _together(self.launch, "before the end", dist.barrier)
        if self.launch.rank != 0:
            return
        listed, missing = merge(self.folder, self.prompts, self.kept)
        print(f"{self.folder / MANIFEST}: {listed} image(s)", file=sys.stderr)
        if missing:
            print(f"note: {missing} image(s) of the run are not in {self.folder} (across machines --out must be a "
                  "folder they all share); the same command again makes them", file=sys.stderr)

    def close(self) -> None:
        if self.launch.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def plan(target: outputs.Target, launch: Launch, description: dict[str, Any], random_seed: bool) -> Batch | None:
    """This process's part of the run into `target` (planned by `outputs.plan_images`); None for --out x.png of
    a one-process run (an ordinary run). Every process checks the folder, then process 0 deals out the work."""
    if target.name is not None:
        if launch.world == 1:
            return None
        target.discard()
        raise outputs.OutputError(f"--out {target.folder / target.name}: a run of {launch.world} processes writes "
                                  "numbered files; give a folder")
    try:
        stored = check_folder(target.folder, description, random_seed)  # every process, before any writes
        _stop_on_sigterm()
        _join(launch)
    except BaseException:
        target.discard()  # the folder, if this run made it
        raise
    if launch.rank == 0 and stored is None:
        (target.folder / RUN_FILE).unlink(missing_ok=True)  # a description without images (a run that wrote none)
    prompts, kept = description["prompts"], len(description["batch_indices"])
    seed = (stored or description)["settings"]["seed"]
    first = [seed, remaining(image_numbers(target.folder), prompts, kept)] if launch.rank == 0 else None
    seed, todo = _from_first(launch, first)
    description["settings"]["seed"] = seed
    return Batch(target, launch, description, prompts, kept, todo[launch.rank::launch.world], seed)


# -- the manifest


def record(index: int, prompt_index: int, settings: Mapping[str, Any]) -> dict[str, Any]:
    """One manifest line: the file, where it is in the run, its prompt and seed, and the settings its PNG stores."""
    return {"index": index, "file": image_name(index), "prompt_index": prompt_index,
            "batch_index": settings.get("batch_index"), "prompt": settings.get("prompt"),
            "seed": settings.get("seed"), "settings": dict(settings)}


def _read_records(path: Path) -> list[dict[str, Any]]:
    """A manifest file's lines; a line a kill cut short (or anything not a record) is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and isinstance(r.get("index"), int):
            records.append(r)
    return records


def _record_from_png(folder: Path, index: int, kept: int) -> dict[str, Any]:
    """The line of an image whose line was lost (a process killed between the image and its line)."""
    from PIL import Image

    from .metadata import JSON_KEY

    try:
        with Image.open(folder / image_name(index)) as image:
            settings = json.loads(image.info.get(JSON_KEY) or "{}")
    except (OSError, ValueError):
        settings = {}
    settings = settings if isinstance(settings, dict) else {}
    settings.pop("format", None)
    return record(index, index // kept, settings)


def _replace(path: Path, data: bytes) -> None:
    """Write `path` whole under a temporary name, then put it in place of the old one at once."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _remove_leftovers(folder: Path) -> None:
    """Temporary files of killed writers (.NAME.xxxxxxxx.partial) whose NAME exists: no writer can use them."""
    for entry in os.scandir(folder):
        name = entry.name
        if name.startswith(".") and name.endswith(".partial") and name.count(".") >= 3:
            final = name[1:].rsplit(".", 2)[0]
            if (folder / final).exists():
                Path(entry.path).unlink(missing_ok=True)


def merge(folder: Path, prompts: int, kept: int) -> tuple[int, int]:
    """Merge the processes' manifest files and an earlier manifest.jsonl into manifest.jsonl: one line per image
    of the run in the folder, by index, each once. (lines, the run's images missing from the folder)."""
    total = prompts * kept
    present = sorted(j for j in image_numbers(folder) if j < total)
    ranks = sorted(folder.glob(RANK_MANIFEST.format("*")))
    records: dict[int, dict[str, Any]] = {}
    for source in [*ranks, folder / MANIFEST]:
        for r in _read_records(source):
            records.setdefault(r["index"], r)  # the newest line first (an image deleted and made again)
    lines = [json.dumps(records.get(j) or _record_from_png(folder, j, kept), sort_keys=True) for j in present]
    _replace(folder / MANIFEST, "".join(line + "\n" for line in lines).encode("utf-8"))
    for source in ranks:
        source.unlink()
    _remove_leftovers(folder)
    return len(lines), total - len(present)
