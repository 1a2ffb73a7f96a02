"""Model file hashes as AUTOMATIC1111 writes them ("Model hash: 31e35c80fc"), cached, and found again.

A1111's short hash is the first 10 hex digits of the file's sha256 (civitai's "AutoV2"). Hashing a 7 GB
checkpoint takes seconds, so each hash is kept in `$XDG_CACHE_HOME/sdxl/hashes.json` (default
`~/.cache/sdxl/hashes.json`), keyed by the file's resolved path and valid while its size and mtime are
unchanged; the file is written atomically (a temporary file renamed over it), and a cache that cannot be read
or written only costs the hashing again.

The cache doubles as the list of model files this machine has used: `find` looks a model up by file name or
stem and by short hash, so `sdxl generate --from-image` finds the model an image names (as A1111 finds a
checkpoint by its hash) without storing the user's folders in the image.

Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

SHORT = 10  # hex digits in A1111's "Model hash"
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_CHUNK = 1 << 20

_memory: dict[str, dict[str, Any]] = {}  # this process's entries, also when the cache file cannot be written


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "sdxl" / "hashes.json"


def _load() -> dict[str, dict[str, Any]]:
    try:
        entries = json.loads(cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        entries = {}
    if not isinstance(entries, dict):
        entries = {}
    return {**{k: v for k, v in entries.items() if isinstance(v, dict)}, **_memory}


def _save(key: str, entry: dict[str, Any]) -> None:
    _memory[key] = entry
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _load()  # re-read: another process may have added entries since
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".hashes-", suffix=".json")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(entries, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # atomic: a reader sees the old file or the new one, never half of one
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _current(path: Path, entry: dict[str, Any]) -> bool:
    """Whether a cache entry still describes the file or folder at `path`."""
    try:
        stat = path.stat()
    except OSError:
        return False
    if entry.get("folder"):
        return path.is_dir()
    return entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns and bool(entry.get("sha256"))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def sha256(path: str | Path, *, on_compute: Callable[[Path], None] | None = None) -> str:
    """The file's sha256 (hex), from the cache while the file's size and mtime are unchanged.

    on_compute(path) is called before a file is read (so that a caller can say why it takes seconds)."""
    path = Path(path).resolve()
    entry = _load().get(str(path))
    if entry and _current(path, entry):
        return entry["sha256"]
    if on_compute is not None:
        on_compute(path)
    stat = path.stat()
    digest = _file_sha256(path)
    _save(str(path), {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest})
    return digest


def short_hash(path: str | Path, *, on_compute: Callable[[Path], None] | None = None) -> str | None:
    """A1111's "Model hash" of a weight file; None for a folder (a diffusers folder or a Hub snapshot is several
    files: A1111 and civitai know no hash for it) and for anything else that is not a file."""
    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            remember_folder(path)
        return None
    return sha256(path, on_compute=on_compute)[:SHORT]


def remember_folder(path: str | Path) -> None:
    """Note a model folder (no hash) so that `find` finds it by name later."""
    path = Path(path).resolve()
    if str(path) not in _load():
        _save(str(path), {"folder": True})


def stem(name: str) -> str:
    """A model's name as A1111 writes it: the file name without a weight-file suffix."""
    for suffix in WEIGHT_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def find(name: str | None = None, short: str | None = None) -> Path | None:
    """A model file or folder this machine has used: the one whose short hash is `short` (and whose name matches
    `name`, if one has both), else the only one named `name` (file name or stem). None when there is none."""
    name = Path(name).name if name else None
    entries = [(Path(k), v) for k, v in _load().items() if _current(Path(k), v)]

    def named(p: Path) -> bool:
        return name is not None and name in (p.name, stem(p.name))

    if short:
        hashed = [p for p, v in entries if str(v.get("sha256", "")).startswith(short.lower())]
        best = [p for p in hashed if named(p)] or hashed
        if best:
            return best[0]
    same = sorted({p for p, _ in entries if named(p)})
    return same[0] if len(same) == 1 else None
