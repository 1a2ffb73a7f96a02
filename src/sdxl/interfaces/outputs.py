"""Output files that never overwrite anything and are never seen half-written.

Every file `sdxl generate` and `sdxl convert` write for a user follows one protocol (`create_new`):

1. it is written in full under a hidden temporary name in its destination folder (`.NAME.<random>.partial`)
   and flushed to disk;
2. it is hard-linked to its final name, which fails when that name exists: creation is exclusive, so two
   processes writing into one folder never overwrite each other, and the final name appears only complete;
3. the temporary name is removed, also when anything fails or is interrupted on the way.

On file systems without hard links (some network and FAT file systems) the final name is reserved with
O_CREAT | O_EXCL and the complete temporary file renamed over the reservation: there a kill at that
moment can leave an empty file, never a truncated one.

Where files go is planned before the slow part (`plan_images`, `plan_checkpoint`): odd paths refused, folders
created and probed for writing, so a run never loads a model to fail at its first write. Folders a plan created
are removed again (`Target.discard`) when a run ends without writing into them.

Nothing here imports torch.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PNG = ".png"
# Image formats sdxl does not write: `--out photo.jpg` is a mistake, not a folder named photo.jpg.
OTHER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jfif", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif", ".heic",
                        ".jxl", ".exr", ".ppm", ".tga")
SAFETENSORS = ".safetensors"
# Weight and data files that `sdxl convert` does not write: `convert X out.ckpt` must not make a folder out.ckpt.
OTHER_FILE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle", ".gguf", ".onnx", ".sft", ".h5",
                       ".msgpack", ".npz", ".npy", ".json", ".yaml", ".yml", ".toml", ".txt", ".zip", ".tar",
                       ".gz", *OTHER_IMAGE_SUFFIXES, PNG)
NUMBER_DIGITS = 5  # 00000.png, 00001.png, ...
MAX_CLASHES = 1000  # numbers taken by other runs in a row before giving up (a name that exists but is not listed)


class OutputError(ValueError):
    """An output path that cannot or should not be written (one line naming it and what is allowed)."""


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")


def _flush_to_disk(path: Path) -> None:
    """Ask the system to put the file's data on disk before it gets its name (best effort: where a read-only
    descriptor cannot be synced, e.g. on Windows, the rename still shows a complete file to other processes)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _publish(tmp: Path, path: Path) -> None:
    """Give the complete file `tmp` the name `path`, only if nothing has that name (FileExistsError)."""
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        raise
    except OSError as e:  # no hard links here (EPERM, ENOTSUP, EXDEV on odd mounts ...): reserve, then rename
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        os.replace(tmp, path)
    except BaseException:
        path.unlink()  # our own empty reservation
        raise


def create_new(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Create the file `path`, which must not exist (FileExistsError), by `write(tmp)` writing it in full at a
    temporary path in the same folder. The final name never shows a partial file; nothing is left on failure."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        write(tmp)
        _flush_to_disk(tmp)
        _publish(tmp, path)
    except OSError as e:
        if e.filename is None or os.fsdecode(e.filename) != str(tmp):
            raise
        raise OSError(e.errno, e.strerror, str(path)) from None  # the file the user asked for, not our temporary
    finally:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()
    return path


def write_bytes(tmp: Path, data: bytes) -> None:
    """Write `data` to the new file `tmp` (the umask's usual permissions, 0644 by default)."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def create_new_bytes(path: str | Path, data: bytes) -> Path:
    """`create_new` for bytes in memory."""
    return create_new(path, lambda tmp: write_bytes(tmp, data))


def next_number(folder: Path) -> int:
    """One more than the largest numbered PNG (00012.png) in `folder`."""
    numbers = [int(p.stem) for p in folder.glob(f"*{PNG}") if p.stem.isdigit()]
    return max(numbers, default=-1) + 1


# -- planning where outputs go, before the slow part


@dataclass
class Target:
    """Where a run's images go: one named file, or numbered files in a folder."""

    folder: Path
    name: str | None = None  # a named file (--out x.png); None: numbered files
    created: list[Path] = field(default_factory=list)  # folders this plan made (removed again if left empty)
    written: list[Path] = field(default_factory=list)

    def write(self, data: bytes) -> Path:
        """Create the next output file with `data`: the named file (an error if it appeared meanwhile), or the
        next free number in the folder (the next after that if another process took it first)."""
        if self.name is not None:
            path = self.folder / self.name
            try:
                return self._wrote(create_new_bytes(path, data))
            except FileExistsError:
                raise OutputError(f"{path}: appeared while this run was working (another run?); "
                                  "not overwritten: choose a new name or an output folder") from None
        for _ in range(MAX_CLASHES):
            path = self.folder / f"{next_number(self.folder):0{NUMBER_DIGITS}d}{PNG}"
            try:
                return self._wrote(create_new_bytes(path, data))
            except FileExistsError:
                continue  # another run took this number between the scan and the link: scan again
        raise OutputError(f"{self.folder}: found no free file number after {MAX_CLASHES} tries (a name "
                          "that exists but is not listed?)")

    def _wrote(self, path: Path) -> Path:
        self.written.append(path)
        return path

    def discard(self) -> None:
        """Remove the folders this plan created, if they are still empty (a run that wrote nothing)."""
        for folder in reversed(self.created):
            try:
                folder.rmdir()
            except OSError:
                break  # not empty (or gone): leave it and its parents


def _make_folders(folder: Path, flag: str, value: str) -> list[Path]:
    """Create `folder` and its missing parents; the ones created, outermost first."""
    missing = []
    for p in (folder, *folder.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                raise OutputError(f"{flag} {value}: {p} exists and is not a folder")
            break
        missing.append(p)
    created = []
    try:
        for p in reversed(missing):
            try:
                p.mkdir()
            except FileExistsError:
                if not p.is_dir():
                    raise
                continue  # another run made it between the check and here: it is not ours to remove
            created.append(p)
    except OSError as e:
        for p in reversed(created):
            p.rmdir()
        raise OutputError(f"{flag} {value}: cannot create the folder {e.filename or folder} "
                          f"({e.strerror or e})") from None
    return created


def probe(folder: Path, flag: str, value: str) -> None:
    """Check that files can be created in `folder` (a small file is created and removed)."""
    tmp = folder / f".sdxl-write-test.{uuid.uuid4().hex[:8]}"
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        raise OutputError(f"{flag} {value}: cannot write in {folder} ({e.strerror or e})") from None
    tmp.unlink()


def _reject_empty(flag: str, value: str) -> None:
    if not value.strip():
        raise OutputError(f"{flag} is empty: give a file name or a folder")


def plan_images(value: str, count: int, flag: str = "--out") -> Target:
    """Where `count` PNGs go: `value` itself for one image named *.png (any case), else numbered files in
    folder `value`. Refused: an empty value, another image format's suffix, a *.png for several images, an
    existing file. The folder is created and probed for writing."""
    _reject_empty(flag, value)
    path = Path(value).expanduser()
    as_folder = value.endswith(("/", os.sep)) or path.is_dir()
    suffix = path.suffix.lower()
    if not as_folder and suffix in OTHER_IMAGE_SUFFIXES:
        raise OutputError(f"{flag} {value}: sdxl writes PNG files (their text chunks carry the settings); "
                          f"name a .png file or a folder")
    if not as_folder and suffix == PNG:
        if count != 1:
            raise OutputError(f"{flag} {value} names one file, but this run makes {count} images: "
                              "give a folder for numbered files")
        if path.exists() or path.is_symlink():
            raise OutputError(f"{path} already exists; choose a new name or an output folder")
        target = Target(path.parent, path.name)
    elif path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {value}: exists and is not a folder (a new .png name or a folder, please)")
    else:
        target = Target(path)
    target.created = _make_folders(target.folder, flag, value)
    try:
        probe(target.folder, flag, value)
    except OutputError:
        target.discard()
        raise
    return target


def checkpoint_layout(value: str) -> str:
    """"single-file" for NAME.safetensors (any case), else "diffusers" (a folder); other files' suffixes
    (.ckpt, .bin, .json, ...) are refused rather than made into folders."""
    _reject_empty("DST", value)
    suffix = Path(value).suffix.lower()
    if suffix == SAFETENSORS:
        return "single-file"
    if suffix in OTHER_FILE_SUFFIXES:
        raise OutputError(f"{value}: sdxl convert writes NAME.safetensors (the official single-file layout) or a "
                          f"diffusers folder, not a {suffix} file")
    return "diffusers"


def plan_checkpoint(value: str) -> tuple[str, Target]:
    """(layout, target) for `sdxl convert`'s DST: refused when it exists (a folder may exist empty for the
    diffusers layout); its folder created and probed for writing."""
    layout = checkpoint_layout(value)
    path = Path(value).expanduser()
    if layout == "single-file" and (path.exists() or path.is_symlink()):
        raise OutputError(f"{value} already exists; choose a new path (nothing is overwritten)")
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        raise OutputError(f"{value} already exists; choose a new path (nothing is overwritten)")
    parent = path.absolute().parent
    target = Target(parent, path.name)
    target.created = _make_folders(parent, "DST", value)
    try:
        probe(parent, "DST", value)
    except OutputError:
        target.discard()
        raise
    return layout, target
