"""Outputs that never overwrite and never appear half-written (`sdxl.interfaces.outputs`), and their use by
`sdxl generate` and `sdxl convert`: exclusive creation, numbering under concurrency, interrupts and kills
during a write, surprising paths, permissions, and a full disk."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from sdxl.interfaces import metadata, outputs
from sdxl.interfaces.outputs import OutputError

ENV = dict(os.environ, OMP_NUM_THREADS="1")  # two runs on shared cores: one thread each


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_new_file_is_created_complete_exclusively_and_with_the_usual_permissions(tmp_path):
    path = outputs.create_new_bytes(tmp_path / "a.png", b"first")
    assert path.read_bytes() == b"first" and files(tmp_path) == ["a.png"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask()
    with pytest.raises(FileExistsError):
        outputs.create_new_bytes(tmp_path / "a.png", b"second")
    assert path.read_bytes() == b"first" and files(tmp_path) == ["a.png"]  # untouched, no temporary left


def test_the_final_name_appears_only_when_the_file_is_complete(tmp_path, monkeypatch):
    seen = []
    real_link = os.link

    def link(src, dst):
        seen.append((Path(src).name, Path(src).read_bytes(), Path(dst).exists()))
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link)
    outputs.create_new_bytes(tmp_path / "x.png", b"0123456789")
    [(tmp, data, existed)] = seen
    assert tmp.startswith(".x.png.") and tmp.endswith(".partial")  # hidden while written
    assert data == b"0123456789" and not existed
    assert files(tmp_path) == ["x.png"]


def test_without_hard_links_the_name_is_reserved_then_replaced(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    outputs.create_new_bytes(tmp_path / "x.png", b"data")
    assert (tmp_path / "x.png").read_bytes() == b"data" and files(tmp_path) == ["x.png"]
    with pytest.raises(FileExistsError):
        outputs.create_new_bytes(tmp_path / "x.png", b"other")
    assert (tmp_path / "x.png").read_bytes() == b"data" and files(tmp_path) == ["x.png"]


def test_an_interrupt_during_a_write_leaves_nothing(tmp_path):
    def interrupted(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        outputs.create_new(tmp_path / "x.png", interrupted)
    assert files(tmp_path) == []


SLOW_WRITER = """
import sys, time
from pathlib import Path
from PIL import Image
from sdxl.interfaces import metadata, outputs

def slow(tmp, data):
    with open(tmp, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        print("half written", flush=True)
        time.sleep(60)
        f.write(data[len(data) // 2:])

outputs.write_bytes = slow
metadata.write_png(Image.new("RGB", (64, 64), (1, 2, 3)), Path(sys.argv[1]), {"prompt": "p"})
"""


def test_a_kill_during_a_png_write_leaves_no_truncated_png(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(tmp_path / "00000.png")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "half written", proc.stderr.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    names = files(tmp_path)
    assert "00000.png" not in names
    assert len(names) == 1 and names[0].startswith(".00000.png.") and names[0].endswith(".partial")  # hidden
    assert outputs.next_number(tmp_path) == 0  # and never counted as an image


def test_numbered_files_take_the_next_free_number_even_when_another_run_takes_it_first(tmp_path, monkeypatch):
    target = outputs.plan_images(str(tmp_path / "out"), 3)
    assert target.created == [tmp_path / "out"]
    (tmp_path / "out" / "00000.png").write_bytes(b"other run")  # appeared after the plan
    assert target.write(b"a").name == "00001.png"
    real = outputs.next_number
    stale = iter([1, 1])  # another run linked 00002 between our scan and our link: scanned again
    monkeypatch.setattr(outputs, "next_number", lambda folder: next(stale, None) or real(folder))
    (tmp_path / "out" / "00002.png").write_bytes(b"other run")
    assert target.write(b"b").name == "00003.png"
    assert (tmp_path / "out" / "00000.png").read_bytes() == b"other run"
    assert target.written == [tmp_path / "out" / "00001.png", tmp_path / "out" / "00003.png"]


def test_a_folder_another_run_creates_first_is_used_and_not_counted_as_ours(tmp_path, monkeypatch):
    real_mkdir = Path.mkdir

    def other_run_first(self, *args, **kwargs):  # the other run's mkdir lands between our check and ours
        if self.name == "out":
            real_mkdir(self)
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", other_run_first)
    target = outputs.plan_images(str(tmp_path / "a" / "out"), 2)
    assert target.created == [tmp_path / "a"]  # "out" is the other run's: never removed by us
    target.discard()
    assert (tmp_path / "a" / "out").is_dir()


def test_a_named_file_that_appears_meanwhile_is_an_error_and_is_kept(tmp_path):
    target = outputs.plan_images(str(tmp_path / "one.png"), 1)
    (tmp_path / "one.png").write_bytes(b"someone else's")
    with pytest.raises(OutputError, match="one.png: appeared while this run was working"):
        target.write(b"ours")
    assert (tmp_path / "one.png").read_bytes() == b"someone else's" and files(tmp_path) == ["one.png"]


@pytest.mark.parametrize("value, count, expect", [
    ("x.png", 1, ("", "x.png")),
    ("X.PNG", 1, ("", "X.PNG")),  # the suffix in any case
    ("out", 4, ("out", None)),
    ("run.v2", 2, ("run.v2", None)),  # dots in folder names are fine
    ("shots.png/", 2, ("shots.png", None)),  # a trailing slash says folder
    ("a/b/c", 1, ("a/b/c", None)),
])
def test_where_images_go(tmp_path, monkeypatch, value, count, expect):
    monkeypatch.chdir(tmp_path)
    target = outputs.plan_images(value, count)
    folder, name = expect
    assert target.folder == Path(folder or ".") and target.name == name
    assert Path(folder or ".").is_dir()
    target.discard()
    assert files(tmp_path) == []  # folders the plan made are removed when nothing was written


@pytest.mark.parametrize("value, count, message", [
    ("", 1, "--out is empty"),
    ("  ", 1, "--out is empty"),
    ("photo.jpg", 1, "sdxl writes PNG files"),
    ("photo.WebP", 1, "sdxl writes PNG files"),
    ("x.png", 2, "names one file, but this run makes 2 images"),
    ("taken.png", 1, "taken.png already exists"),
    ("notes.txt", 1, "notes.txt: exists and is not a folder"),
    ("notes.txt/sub", 1, "notes.txt exists and is not a folder"),
])
def test_surprising_output_paths_are_refused(tmp_path, monkeypatch, value, count, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken.png").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(OutputError, match=message.replace(".", r"\.")):
        outputs.plan_images(value, count)
    assert files(tmp_path) == ["notes.txt", "taken.png"]


def test_an_unwritable_folder_is_found_before_the_model_loads(tmp_path):
    if sys.platform.startswith("linux"):  # /proc takes no new files, whoever asks (root included)
        with pytest.raises(OutputError, match="cannot write in /proc"):
            outputs.probe(Path("/proc"), "--out", "/proc")
    if hasattr(os, "geteuid") and os.geteuid() != 0:  # permissions bind everyone but root
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(OutputError, match="cannot write in"):
            outputs.plan_images(str(locked / "x.png"), 1)


@pytest.mark.parametrize("value, layout", [
    ("m.safetensors", "single-file"), ("M.SAFETENSORS", "single-file"), ("sd_xl_base_1.0", "diffusers"),
    ("folder", "diffusers"),
])
def test_convert_destinations_follow_the_suffix(value, layout):
    assert outputs.checkpoint_layout(value) == layout


@pytest.mark.parametrize("value", ["out.ckpt", "out.PT", "out.bin", "out.gguf", "out.json", ""])
def test_convert_destinations_that_are_other_files_are_refused(value):
    with pytest.raises(OutputError):
        outputs.checkpoint_layout(value)


def _generate(prompt: str, out: Path):
    return subprocess.Popen([sys.executable, "-m", "sdxl", "generate", prompt, "--steps", "2", "--batch", "2",
                             "--out", str(out), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)


def test_two_runs_into_one_folder_keep_both_runs_images(tmp_path):
    out = tmp_path / "out"
    runs = [_generate("a red circle", out), _generate("a blue square", out)]  # both plan before either writes
    results = [p.communicate(timeout=300) for p in runs]
    assert all(p.returncode == 0 for p in runs), [err for _, err in results]
    written = [f["path"] for stdout, _ in results for f in json.loads(stdout)["files"]]
    assert sorted(Path(p).name for p in written) == ["00000.png", "00001.png", "00002.png", "00003.png"]
    prompts = sorted(metadata.read_settings(p)["prompt"] for p in written)
    assert prompts == ["a blue square"] * 2 + ["a red circle"] * 2  # every image of both runs is there
    assert files(out) == ["00000.png", "00001.png", "00002.png", "00003.png"]  # and nothing else


def test_ctrl_c_during_a_run_exits_130_with_one_line_and_no_partial_file(tmp_path):
    """SIGINT at several moments (start-up, loading, sampling): exit 130, one line, only complete PNGs left."""
    delays = (1.0, 2.0, 3.5)
    procs = []
    for i, delay in enumerate(delays):
        out = tmp_path / f"out{i}"
        argv = ["generate", "a red circle", "--steps", "400", "--batch", "2", "--out", str(out)]
        procs.append((delay, out, subprocess.Popen([sys.executable, "-m", "sdxl", *argv], stdout=subprocess.PIPE,
                                                   stderr=subprocess.PIPE, text=True, env=ENV)))
    start = time.monotonic()
    for delay, _, proc in procs:
        time.sleep(max(0.0, start + delay - time.monotonic()))
        proc.send_signal(signal.SIGINT)
    for delay, out, proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, (delay, err)
        assert err.splitlines() == ["sdxl generate: interrupted"], (delay, err)
        left = files(out) if out.exists() else []
        assert all(name.endswith(".png") and not name.startswith(".") for name in left), left
        for name in left:
            Image.open(out / name).load()  # complete


def test_convert_writes_the_usual_permissions_and_keeps_recommended_settings_in_a_diffusers_folder(tmp_path):
    from sdxl.interfaces import cli

    assert cli.main(["convert", "builtin", str(tmp_path / "one.SAFETENSORS")]) == 0  # a file, whatever the case
    assert stat.S_IMODE((tmp_path / "one.SAFETENSORS").stat().st_mode) == 0o666 & ~umask()
    assert cli.main(["convert", "builtin", str(tmp_path / "folder")]) == 0
    weights = sorted((tmp_path / "folder").rglob("*.safetensors"))
    assert len(weights) == 4 and {stat.S_IMODE(w.stat().st_mode) for w in weights} == {0o666 & ~umask()}
    index = json.loads((tmp_path / "folder" / "model_index.json").read_text())
    assert index["_sdxl.recommended"] == {"cfg": 3.0}  # the built-in model's scale (diffusers skips "_" keys)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_the_recommended_settings_key_is_one_diffusers_ignores():
    diffusers = pytest.importorskip("diffusers")
    config = {"_class_name": "StableDiffusionXLPipeline", "_sdxl.recommended": {"cfg": 3.0}, "force_zeros_for_empty_prompt": True}
    init, unused, _ = diffusers.StableDiffusionXLPipeline.extract_init_dict(config)
    assert "_sdxl.recommended" not in init and "_sdxl.recommended" not in unused and "sdxl.recommended" not in init


def test_convert_onto_a_full_disk_fails_in_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError

    from sdxl.checkpoints import files as tensor_files
    from sdxl.interfaces import cli

    def full_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 1000)  # as far as it got
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(tensor_files, "save_file", full_disk)
    for dst in ("deep/new/m.safetensors", "deep/new/folder"):
        assert cli.main(["convert", "builtin", str(tmp_path / dst)]) == 2
        [line] = capsys.readouterr().err.splitlines()
        assert line == f"sdxl convert: error: {tmp_path / dst}: no space left on the device", line
        assert files(tmp_path) == []  # no file, no temporary, no folder it made
