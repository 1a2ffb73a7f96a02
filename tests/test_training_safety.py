"""The trainer under interrupts, bad data and damaged state (issue "Nothing lost, nothing silent"): a kill or an
unreadable image mid-run leaves a checkpoint that resumes exactly; a fresh run never overwrites an earlier one;
loss.csv has each step once; half-written checkpoints are refused with the hint; damaged state is one line."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sdxl.training.train as T
from sdxl.training.config import TrainConfig
from sdxl.training.data import DataError
from sdxl.training.train import Interrupted, default_loader, main, train

ROOT = Path(__file__).resolve().parents[1]
KEYS = {f.name for f in dataclasses.fields(TrainConfig)}

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _gradient(w: int = 32, h: int = 32) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w] / max(w - 1, h - 1)
    return Image.fromarray((np.stack([x, y, 1 - x * y], -1) * 255).astype(np.uint8))


def _folder(folder: Path, n: int = 4, size: tuple[int, int] = (32, 32)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        _gradient(*size).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a colourful gradient")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _folder(tmp_path_factory.mktemp("data"))


def config(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(init="tiny", data=str(data), resolution=32, bucket_multiple=8, batch_size=2, steps=3, lr=1e-3,
                output_dir=str(out), log_every=1, save_dtype="fp32")
    return TrainConfig(**{**base, **kw})


def _toml(path: Path, cfg: TrainConfig) -> str:
    path.write_text(cfg.to_toml())
    return str(path)


def _cli(capsys, *argv: str) -> tuple[int, list[str]]:
    """Run `sdxl train ARGV` in this process: the exit status and stderr's lines (progress bars aside)."""
    capsys.readouterr()
    rc = main(list(argv))
    err = capsys.readouterr().err
    return rc, [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not line.startswith("train:")]


def _keys_named(message: str) -> set[str]:
    """Config keys a hint names as `key = value`."""
    return set(re.findall(r"\b([a-z_]+) = ", message))


def _state(result) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in result.components.unet.state_dict().items()}


def _steps(out: Path) -> list[int]:
    return [int(line.split(",")[0]) for line in (out / "loss.csv").read_text().splitlines()[1:]]


@pytest.fixture
def default_sigint():
    """Python's own SIGINT handler while the test runs (a test run in a background job may inherit SIG_IGN)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


class _Tripwire(torch.utils.data.Dataset):
    """The real data set; on its `at`-th read `action(path)` runs first (a signal to this process, a file spoiled)."""

    def __init__(self, ds, at: int, action):
        self.ds, self.at, self.action, self.reads = ds, at, action, 0

    def set_epoch(self, epoch: int) -> None:
        self.ds.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads == self.at:
            self.action(self.ds.paths[i])
        return self.ds[i]


def _tripwire_loader(at: int, action):
    def loader(cfg, rank, world):
        ds, sampler, collate = default_loader(cfg, rank, world)
        return _Tripwire(ds, at, action), sampler, collate
    return loader


def _sigint(*_) -> None:
    os.kill(os.getpid(), signal.SIGINT)


# A run of 3 steps of 2 micro-batches of 2 images: 4 reads a step; read 11 is step 3's second micro-batch, after its
# first one drew noise and took a batch: the stop must give those back for the resumed run to match.
EXTRA = dict(grad_accum=2, random_crop=True, caption_dropout=0.3, ema_decay=0.9)
MID_STEP_3 = 11


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    return train(config(data, tmp_path_factory.mktemp("straight") / "run", **EXTRA), progress=False)


def _resumes_exactly(straight, cfg: TrainConfig) -> None:
    resumed = train(dataclasses.replace(cfg, resume="latest"), progress=False)
    assert resumed.losses == straight.losses[2:]
    a, b = _state(straight), _state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _steps(Path(cfg.output_dir)) == [1, 2, 3]


# ---------------------------------------------------------------------------------------------
# Stopped mid-run: a checkpoint of the finished steps, which resumes exactly.


def test_sigint_in_a_step_saves_the_finished_steps_and_resumes_exactly(data, tmp_path, straight, default_sigint):
    cfg = config(data, tmp_path / "run", **EXTRA)
    with pytest.raises(Interrupted) as e:
        train(cfg, loader=_tripwire_loader(MID_STEP_3, _sigint), progress=False)
    folder = tmp_path / "run" / "checkpoints" / "step_0000002"
    assert str(e.value) == f"interrupted at step 2; saved checkpoint {folder}; continue with --resume latest"
    assert e.value.signum == signal.SIGINT
    assert (tmp_path / "run" / "latest.txt").read_text().strip() == "step_0000002"
    assert (folder / "model.safetensors").is_file() and (folder / "model_ema.safetensors").is_file()
    assert _steps(tmp_path / "run") == [1, 2]
    assert "stopped by SIGINT: interrupted at step 2" in (tmp_path / "run" / "log.txt").read_text()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is given back
    _resumes_exactly(straight, cfg)


def test_sigterm_saves_the_same_way(data, tmp_path, default_sigint):
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # (the trainer's handler replaces it for the run)
    try:
        with pytest.raises(Interrupted) as e:
            loader = _tripwire_loader(3, lambda _: os.kill(os.getpid(), signal.SIGTERM))
            train(config(data, tmp_path / "run"), loader=loader, progress=False)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert e.value.signum == signal.SIGTERM and 128 + e.value.signum == 143  # main()'s exit status
    folder = tmp_path / "run" / "checkpoints" / "step_0000001"
    assert str(e.value) == f"terminated at step 1; saved checkpoint {folder}; continue with --resume latest"


def test_unreadable_image_mid_run_saves_then_stops_in_one_line(data, tmp_path, straight):
    own = _folder(tmp_path / "data")  # the data of `straight`, in a folder of its own to spoil
    good = {p: p.read_bytes() for p in own.glob("*.png")}
    cfg = config(own, tmp_path / "run", **EXTRA)
    spoil = lambda path: path.write_bytes(good[Path(path)][:60])  # noqa: E731  truncated after the scan
    with pytest.raises(DataError) as e:
        train(cfg, loader=_tripwire_loader(MID_STEP_3, spoil), progress=False)
    message = str(e.value)
    assert "\n" not in message and message.startswith(str(own))
    assert message.endswith(f"saved checkpoint {tmp_path / 'run' / 'checkpoints' / 'step_0000002'}; "
                            "continue with --resume latest")
    for path, content in good.items():  # the file is fixed: the run continues as if nothing happened
        path.write_bytes(content)
    _resumes_exactly(straight, cfg)


def test_a_signal_during_a_save_waits_for_it_and_a_second_one_leaves_only_a_partial(data, tmp_path, monkeypatch,
                                                                                   default_sigint):
    real = T.save_single_file
    signals = {"n": 0}

    def save_with_signals(*args, **kw):
        for _ in range(signals["n"]):
            _sigint()
        real(*args, **kw)

    monkeypatch.setattr(T, "save_single_file", save_with_signals)
    out = tmp_path / "run"
    # One signal during the periodic save of step 2: the save completes, then the run stops.
    signals["n"] = 1
    with pytest.raises(Interrupted) as e:
        train(config(data, out, steps=4, save_every=2), progress=False)
    assert str(e.value) == (f"interrupted at step 2; the last checkpoint is {out / 'checkpoints' / 'step_0000002'} "
                            "(step 2); continue with --resume latest")
    assert (out / "latest.txt").read_text().strip() == "step_0000002"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002"]
    # Resumed; a signal in step 4 saves step 3, and a second one during that save stops it half-way.
    signals["n"] = 0
    at = 3  # 2 reads a step: the first of step 4
    loader = _tripwire_loader(at, lambda _: signals.update(n=1) or _sigint())
    with pytest.raises(Interrupted) as e:
        train(config(data, out, steps=4, save_every=2, resume="latest"), loader=loader, progress=False)
    partial = out / "checkpoints" / f"step_0000003{T.PARTIAL}"
    assert str(e.value) == (f"interrupted again while saving step 3; {partial} is half-written and ignored; the last "
                            f"checkpoint is {out / 'checkpoints' / 'step_0000002'} (step 2); "
                            "continue with --resume latest")
    assert partial.is_dir() and not (out / "checkpoints" / "step_0000003").exists()
    assert (out / "latest.txt").read_text().strip() == "step_0000002"
    # Resuming from the half-written folder is refused with the hint; `latest` is the complete one.
    signals["n"] = 0
    with pytest.raises(ValueError) as e:
        train(config(data, out, steps=4, resume=str(partial)), progress=False)
    assert str(e.value) == (f"{partial}: a half-written checkpoint (its save was interrupted); resume from the last "
                            "complete one with --resume latest (now step_0000002)")
    result = train(config(data, out, steps=4, save_every=2, resume="latest"), progress=False)
    assert result.step == 4 and _steps(out) == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]


def test_a_second_signal_inside_an_optimizer_step_saves_nothing_half_updated(data, tmp_path, monkeypatch,
                                                                            default_sigint):
    real, calls = T._optimizer_step, {"n": 0}

    def step_twice_signalled(run):
        calls["n"] += 1
        if calls["n"] == 2:
            _sigint()  # deferred: the step goes on
            _sigint()  # stops it where it is: the weights may be half-updated, so nothing is saved
        real(run)

    monkeypatch.setattr(T, "_optimizer_step", step_twice_signalled)
    out = tmp_path / "run"
    with pytest.raises(Interrupted) as e:
        train(config(data, out, steps=3), progress=False)
    assert e.value.forced
    assert str(e.value) == ("interrupted at step 1; steps since the last checkpoint are lost (stopped half-way); "
                            "no checkpoint was saved")
    assert not (out / "checkpoints").exists() and not (out / "latest.txt").exists()


def test_ctrl_c_kills_the_command_with_a_checkpoint_and_one_line(data, tmp_path):
    """`sdxl train` in a subprocess, SIGINT once a few steps are logged: status 130, one line, a checkpoint of
    every finished step, and loss.csv with each step once after resuming."""
    out = tmp_path / "run"
    path = _toml(tmp_path / "c.toml", config(data, out, steps=100_000, save_dtype="fp16"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    with (tmp_path / "stderr.txt").open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "sdxl", "train", path], stderr=stderr, env=env,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not ((out / "loss.csv").is_file() and len(_steps(out)) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr.txt").read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 130, err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    line = r"sdxl train: interrupted at step (\d+); saved checkpoint (\S+); continue with --resume latest"
    match = re.fullmatch(line, last)
    assert match, err
    step, folder = int(match[1]), Path(match[2])
    assert folder == out / "checkpoints" / f"step_{step:07d}" and (folder / "model.safetensors").is_file()
    assert (out / "latest.txt").read_text().strip() == folder.name
    assert _steps(out) == list(range(1, step + 1))
    result = train(config(data, out, steps=step + 1, save_dtype="fp16", resume="latest"), progress=False)
    assert result.step == step + 1 and _steps(out) == list(range(1, step + 2))


# ---------------------------------------------------------------------------------------------
# Never overwrite a run; loss.csv after a resume.


def test_fresh_run_into_a_finished_run_is_refused_and_overwrite_starts_over(data, tmp_path, capsys):
    out = tmp_path / "run"
    train(config(data, out, steps=2), progress=False)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    path = _toml(tmp_path / "c.toml", config(data, out, steps=1))
    rc, lines = _cli(capsys, path)
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0] == (f"sdxl train: error: output_dir {out} holds an earlier run (checkpoints, config.toml, "
                        "latest.txt, log.txt, loss.csv, loss.png): continue it with --resume latest "
                        "(resume = \"latest\"), or start over with --overwrite (overwrite = true), which deletes it")
    assert _keys_named(lines[0]) <= KEYS
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # untouched
    # --overwrite with a run that cannot start (here: no data folder) deletes nothing either.
    rc, lines = _cli(capsys, _toml(tmp_path / "nodata.toml", config(tmp_path / "nodata", out)), "--overwrite")
    assert rc == 2 and lines == [f"sdxl train: error: {tmp_path / 'nodata'}: not a folder"]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    rc, lines = _cli(capsys, path, "--overwrite")
    assert rc == 0, lines
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000001"]
    assert _steps(out) == [1]
    assert "overwrite = false" in (out / "config.toml").read_text()  # re-running the record deletes nothing
    assert "overwrite: deleted the earlier run's checkpoints" in (out / "log.txt").read_text()
    # A folder with other files: refused too; --overwrite trains beside them and keeps them.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.md").write_text("mine")
    rc, lines = _cli(capsys, path, "--output-dir", str(other))
    assert rc == 2 and lines == [f"sdxl train: error: output_dir {other} is not empty (notes.md): choose a new "
                                 "folder (--output-dir, output_dir), or --overwrite (overwrite = true) to train beside "
                                 "these files"]
    rc, _ = _cli(capsys, path, "--output-dir", str(other), "--overwrite")
    assert rc == 0 and (other / "notes.md").read_text() == "mine" and (other / "latest.txt").is_file()
    rc, lines = _cli(capsys, path, "--overwrite", "--resume", "latest")
    assert rc == 2 and "give one of them" in lines[0] and len(lines) == 1


def test_loss_csv_has_each_step_once_after_resuming_from_an_earlier_checkpoint(data, tmp_path, caplog):
    out = tmp_path / "run"
    train(config(data, out, steps=4, save_every=2, cache_text=True), progress=False)
    with (out / "loss.csv").open("a") as f:
        f.write("5,0.3")  # a row cut short by a kill
    (out / "cache" / "text.safetensors").write_bytes(b"\0" * 10)  # a cache cut short: rebuilt, not fatal
    result = train(config(data, out, steps=4, cache_text=True, resume=str(out / "checkpoints" / "step_0000002")),
                   progress=False)
    assert len(result.losses) == 2
    assert _steps(out) == [1, 2, 3, 4]
    assert "unreadable cache" in caplog.text
    assert (out / "latest.txt").read_text().strip() == "step_0000004"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]


# ---------------------------------------------------------------------------------------------
# Damaged resume state: one line naming the file.


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    train(config(data, out, steps=2), progress=False)
    return out


def _truncate(path: Path) -> None:
    content = path.read_bytes()
    path.unlink()
    path.write_bytes(content[: len(content) // 2])


def _replace(content: bytes):
    def damage(path: Path) -> None:
        path.unlink()  # (a hard link to the finished run's file: a new file, not the shared one)
        path.write_bytes(content)
    return damage


def _other_shapes(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    first = next(k for k in tensors if k.startswith("param."))
    path.unlink()
    save_file({**tensors, first: torch.zeros(3)}, str(path))


def _wrong_generator(path: Path) -> None:
    from safetensors.torch import save_file

    path.unlink()
    save_file({"generator": torch.zeros(3, dtype=torch.uint8), "torch": torch.get_rng_state()}, str(path))


DAMAGE = {  # file: damage, what the message says after the file's name (a regular expression)
    "truncated-state": ("state.safetensors", _truncate, "damaged"),
    "other-shapes": ("state.safetensors", _other_shapes,
                     r"\S+ has shape \(3,\), this run's \([\d, ]+\): the checkpoint is of another model"),
    "empty-state": ("state.safetensors", _replace(b""), "damaged"),
    "state-json-not-json": ("state.json", _replace(b'{"step": 2, "epo'), "damaged"),
    "state-json-incomplete": ("state.json", _replace(b"{}"), r"damaged \(lacks step, epoch, index, params"),
    "state-json-not-utf8": ("state.json", _replace(b"\xff\xfe{}"), "damaged"),
    "truncated-rng": ("rng_rank0.safetensors", _truncate, "damaged"),
    "wrong-rng": ("rng_rank0.safetensors", _wrong_generator, "damaged"),
    "missing-rng": ("rng_rank0.safetensors", Path.unlink, "missing; the checkpoint is incomplete"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_resume_state_is_one_line_naming_the_file(finished, data, tmp_path, capsys, case):
    name, damage, words = DAMAGE[case]
    out = tmp_path / "run"
    folder = out / "checkpoints" / "step_0000002"
    shutil.copytree(finished / "checkpoints" / "step_0000002", folder, copy_function=os.link)
    (out / "latest.txt").write_text("step_0000002\n")
    damage(folder / name)
    rc, lines = _cli(capsys, _toml(tmp_path / "c.toml", config(data, out, steps=3)), "--resume", "latest")
    assert rc == 2 and len(lines) == 1, lines
    assert re.match(re.escape(f"sdxl train: error: {folder / name}: ") + words, lines[0]), lines[0]


def test_resume_errors_name_what_is_wrong(finished, data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    path = _toml(tmp_path / "c.toml", config(data, out, steps=3))
    (out / "latest.txt").write_text("step_0000009\n")
    rc, lines = _cli(capsys, path, "--resume", "latest")
    assert rc == 2 and lines == [f"sdxl train: error: {out / 'latest.txt'} names 'step_0000009', which is not a "
                                 f"checkpoint folder in {out / 'checkpoints'}"]
    rc, lines = _cli(capsys, path, "--resume", str(tmp_path / "nowhere"))
    assert rc == 2 and lines == [f"sdxl train: error: resume: {tmp_path / 'nowhere'}: no such folder; give a "
                                 "checkpoints/step_NNNNNNN folder or 'latest'"]
    # Another model's checkpoint (other shapes) says so, instead of "size mismatch" from deep in torch.
    rc, lines = _cli(capsys, _toml(tmp_path / "r.toml", config(data, out, steps=3, init="tiny_refiner")),
                     "--resume", str(finished / "checkpoints" / "step_0000002"))
    assert rc == 2 and len(lines) == 1 and ("another model" in lines[0] or "other parameters" in lines[0]), lines


# ---------------------------------------------------------------------------------------------
# Data and config errors: before the models load, one line, real config keys.


def test_unreadable_images_stop_the_scan_or_are_skipped_and_counted(tmp_path, capsys):
    folder = _folder(tmp_path / "data")
    (folder / "1.png").write_bytes((folder / "1.png").read_bytes()[:70])  # truncated
    (folder / "x.png").write_bytes(b"not a picture")
    (folder / "x.txt").write_text("x")
    _gradient(48, 24).save(folder / "wide.png")  # alone in its bucket: with batch_size 2 it is never trained
    (folder / "wide.txt").write_text("wide")
    path = _toml(tmp_path / "c.toml", config(folder, tmp_path / "run", steps=1))
    rc, lines = _cli(capsys, path)
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"sdxl train: error: {folder}: 2 unreadable image(s): 1.png (")
    assert "; x.png (" in lines[0] and "skip_unreadable_images = true" in lines[0]
    assert _keys_named(lines[0]) <= KEYS
    assert not (tmp_path / "run" / "checkpoints").exists()
    rc, again = _cli(capsys, path)  # a start that failed leaves only its records: tried again, the same error
    assert rc == 2 and again == lines
    result = train(config(folder, tmp_path / "run", steps=1, overwrite=True, skip_unreadable_images=True),
                   progress=False)
    assert result.step == 1
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "data: 4 images" in log and "data: 2 unreadable image(s) skipped" in log
    assert "  1.png (" in log and "  x.png (" in log
    assert "data: 1 image(s) in buckets with fewer than batch_size images are never trained (48x24: 1)" in log


def test_too_small_buckets_and_text_errors_are_one_line(tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    for i, size in enumerate([(32, 32), (48, 24), (24, 48)]):
        _gradient(*size).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("x")
    path = _toml(tmp_path / "c.toml", config(folder, tmp_path / "run"))
    rc, lines = _cli(capsys, path)
    assert rc == 2 and lines == [
        f"sdxl train: error: {folder}: the data gives no batch: 3 images, but a batch comes from one aspect-ratio "
        "bucket and no bucket holds batch_size = 2 of them (images per bucket 24x48: 1, 32x32: 1, 48x24: 1): lower "
        "batch_size, or add images of those aspect ratios"]
    (folder / "1.txt").write_bytes(b"caf\xe9")  # Latin-1, not UTF-8
    rc, lines = _cli(capsys, path)
    assert rc == 2 and lines == [f"sdxl train: error: {folder / '1.txt'}: not UTF-8 text (byte 3: b'\\xe9'); "
                                 "save it as UTF-8"]
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'init = "tiny"\n# caf\xe9\n')
    rc, lines = _cli(capsys, str(bad))
    assert rc == 2 and lines == [f"sdxl train: error: {bad}: not UTF-8 text (byte 19: b'\\xe9\\n'); "
                                 "save the config as UTF-8"]
    rc, lines = _cli(capsys, str(tmp_path / "missing.toml"))
    assert rc == 2 and lines == [f"sdxl train: error: {tmp_path / 'missing.toml'}: no such config file"]


def test_missing_captions_hint_names_the_config_key(tmp_path):
    folder = _folder(tmp_path / "data", n=2)
    (folder / "1.txt").unlink()
    with pytest.raises(ValueError) as e:
        default_loader(config(folder, tmp_path / "run", batch_size=1), 0, 1)
    assert "1.png" in str(e.value) and "allow_missing_captions = true" in str(e.value)
    assert _keys_named(str(e.value)) <= KEYS
    ds, _, _ = default_loader(config(folder, tmp_path / "run", batch_size=1, allow_missing_captions=True), 0, 1)
    assert sorted(ds.captions) == ["", "a colourful gradient"]


def test_vae_trainer_refuses_a_used_folder_and_names_an_unreadable_image(tmp_path, capsys):
    from sdxl.training import train_vae

    folder = _folder(tmp_path / "data", n=2)
    out = tmp_path / "vae"
    out.mkdir()
    (out / "vae.safetensors").write_bytes(b"an earlier run's")
    assert train_vae.main([str(out), "--data", str(folder), "--steps", "1"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"python -m sdxl.training.train_vae: error: {out} is not empty (vae.safetensors): choose a new folder, or "
        "--overwrite to replace an earlier run's files"]
    assert (out / "vae.safetensors").read_bytes() == b"an earlier run's"
    (folder / "1.png").write_bytes(b"\x89PNG\r\n")
    assert train_vae.main([str(out), "--data", str(folder), "--steps", "1", "--overwrite"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"python -m sdxl.training.train_vae: error: {folder / '1.png'}: ")
    assert (out / "vae.safetensors").read_bytes() == b"an earlier run's"  # replaced only by a run's own files
