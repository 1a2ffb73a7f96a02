"""Adapter and embedding files found by name in the folders a user configured, as prompts name them.

    loras = Library([Path("~/loras")], LORA_SUFFIXES, aliases=True)
    loras.find("style")   # ~/loras/sdxl/style.safetensors (by file stem, or by its ss_output_name)

Only names resolve, never paths: `<lora:../../secret>` or a name with a folder separator is refused, so a
prompt (which may come from anyone, e.g. through the server) can reach nothing outside those folders.
Folders are searched recursively; a name found twice is taken from the first folder given (a note says so).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..checkpoints.files import read_safetensors_header
from ..checkpoints.keymap import CheckpointError

LORA_SUFFIXES = (".safetensors",)
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
_BAD = ("/", "\\", "\x00")


def folders_from_env(variable: str) -> list[Path]:
    """The folders listed in an environment variable (os.pathsep-separated)."""
    return [Path(p).expanduser() for p in os.environ.get(variable, "").split(os.pathsep) if p.strip()]


def _alias(path: Path) -> str | None:
    """A kohya file's own name for itself (`ss_output_name`), read from its header only."""
    if path.suffix.lower() != ".safetensors":
        return None
    try:
        metadata = read_safetensors_header(path).get("__metadata__") or {}
    except (CheckpointError, OSError):
        return None  # an unreadable file is reported when it is used, not while scanning
    name = metadata.get("ss_output_name")
    return name if isinstance(name, str) and name and not any(c in name for c in _BAD) else None


class Library:
    """name -> file over some folders: file stems first, then (with aliases=True) kohya's ss_output_name."""

    def __init__(self, folders: Iterable[str | Path], suffixes: tuple[str, ...], *, kind: str = "LoRA",
                 aliases: bool = False):
        self.folders = [Path(f).expanduser() for f in folders]
        self.suffixes, self.kind, self.aliases = suffixes, kind, aliases
        self.confined = False  # True: files that a symlink takes outside their folder are left out (a server)
        self._index: dict[str, Path] | None = None

    def _scan(self) -> dict[str, Path]:
        stems: dict[str, Path] = {}
        alias_of: dict[str, Path] = {}
        for folder in self.folders:
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder}: no such {self.kind} folder")
            for path in sorted(folder.rglob("*")):
                if path.suffix.lower() not in self.suffixes or not path.is_file():
                    continue
                if self.confined and not path.resolve().is_relative_to(folder.resolve()):
                    continue
                if path.stem in stems and stems[path.stem] != path:
                    warnings.warn(f"{self.kind} {path.stem!r} is in {stems[path.stem]} and {path}; using the first")
                    continue
                stems[path.stem] = path
                alias = _alias(path) if self.aliases else None
                if alias:
                    alias_of.setdefault(alias, path)
        return {**alias_of, **stems}  # a file's own stem wins over another file's alias

    def names(self) -> dict[str, Path]:
        """Every name that resolves, with its file (the folders are read once, then again after `refresh`)."""
        if self._index is None:
            self._index = self._scan()
        return self._index

    def refresh(self) -> None:
        self._index = None

    def find(self, name: str) -> Path:
        """The file `name` refers to; ValueError naming the folders when there is none."""
        if not name or any(c in name for c in _BAD) or name in (".", ".."):
            raise ValueError(f"{self.kind} name {name!r}: a name from the {self.kind} folders, not a path")
        path = self.names().get(name)
        if path is None:
            self.refresh()  # a file added since the last scan
            path = self.names().get(name)
        if path is None:
            if not self.folders:
                raise ValueError(f"{self.kind} {name!r}: not found in any folder (no {self.kind} folder is configured)")
            raise ValueError(f"{self.kind} {name!r}: not found in {', '.join(map(str, self.folders))}")
        return path


class Embeddings(Mapping):
    """name -> Embedding over a Library of embedding files: names listed up front, each file read when a prompt
    first uses it (then kept)."""

    def __init__(self, library: Library, components):
        self.library, self.components = library, components
        self._loaded: dict[str, object] = {}

    def __iter__(self):
        return iter(self.library.names())

    def __len__(self) -> int:
        return len(self.library.names())

    def __getitem__(self, name: str):
        if name not in self._loaded:
            from .embeddings import read_embedding

            self._loaded[name] = read_embedding(self.library.names()[name], self.components)
        return self._loaded[name]


class Active:
    """The adapters merged into one model's weights now: changed (restoring the base weights first) only when the
    set asked for changes, so repeated generations with the same LoRAs merge once."""

    def __init__(self):
        self.key: tuple | None = None
        self.applied = None
        self._read: dict[tuple, object] = {}  # (path, size, mtime, model) -> Adapter

    def _adapter(self, path: Path, components):
        from .read import read_adapter

        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns, id(components))
        if key not in self._read:
            self._read[key] = read_adapter(path, components)
        return self._read[key]

    def set(self, components, uses: list[tuple[Path, float, float]]) -> bool:
        """Merge exactly `uses` ((file, U-Net multiplier, text-encoder multiplier), in order) into `components`.
        True when the text encoders' weights changed (cached prompt encodings are then stale)."""
        from .apply import apply

        key = (id(components), tuple((str(p), u, t) for p, u, t in uses))
        if key == self.key:
            return False
        adapters = [(self._adapter(p, components), u, t) for p, u, t in uses]  # read (and checked) before changing
        text_changed = False
        if self.applied is not None:
            text_changed = self.applied.touches_text_encoders
            self.applied.restore()
            self.applied, self.key = None, None
        if adapters:
            self.applied = apply(components, adapters)
            text_changed = text_changed or self.applied.touches_text_encoders
        self.key = key
        return text_changed
