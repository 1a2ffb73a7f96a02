"""The models a request may choose, by listed name only.

Entries: the built-in models, the model (and refiner) given on the command line, and every weight file or
diffusers folder in --models-dir (files that resolve outside their folder through a symlink are left out).
Requests name them as AUTOMATIC1111 lists them: the title "name [hash10]", the name (file stem), the file name or
the short hash; anything else, a path above all, is refused with the list of names.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from pathlib import Path

from ... import builtin
from ...checkpoints.files import open_tensors
from ...checkpoints.formats import read_json
from ...checkpoints.keymap import CheckpointError
from ...checkpoints.official import saved_configs
from .. import hashes

SDXL_NATIVE = 1024  # pixels: full-size SDXL's side, for any model whose file carries no U-Net config
WEIGHT_SUFFIXES = (".safetensors",)  # the server reads no pickle-based checkpoint (.ckpt) from its folders


@dataclass(frozen=True)
class Model:
    name: str  # "sd_xl_base_1.0", "builtin"
    path: Path
    source: str  # "builtin", "command line", "models folder"

    @property
    def filename(self) -> str:
        return self.path.name  # never the folder it is in: a listing does not tell where the server keeps files

    def short_hash(self) -> str | None:
        return hashes.short_hash(self.path)

    def sha256(self) -> str | None:
        return hashes.sha256(self.path) if self.path.is_file() else None

    def title(self) -> str:
        short = self.short_hash()
        return f"{self.name} [{short}]" if short else self.name

    def native_size(self) -> int:
        """The side of the square it makes best (the web UI's presets, OpenAI's default size)."""
        try:
            return _native_size(self.path, self.path.stat().st_mtime_ns)
        except OSError:
            return SDXL_NATIVE


@functools.lru_cache(maxsize=256)
def _native_size(path: Path, _mtime_ns: int) -> int:
    """The U-Net's latent sample_size x 8: from the configs our files carry (the built-in models, `sdxl train`'s
    models of other sizes) or a diffusers folder's unet/config.json; else SDXL's 1024."""
    try:
        if path.is_dir():
            size = read_json(path / "unet" / "config.json").get("sample_size")
        else:
            unet = (saved_configs(open_tensors(path)) or {}).get("unet")
            size = unet.sample_size if unet else None
    except (CheckpointError, OSError, AttributeError):
        size = None  # a file that does not open says so when it is used
    return size * 8 if isinstance(size, int) and size > 0 else SDXL_NATIVE


class UnknownModel(ValueError):
    pass


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def _scan(folder: Path) -> list[Model]:
    found = []
    for path in sorted(folder.rglob("*")):
        weights = path.is_file() and path.suffix.lower() in WEIGHT_SUFFIXES
        diffusers = path.is_dir() and (path / "model_index.json").is_file()
        if (weights or diffusers) and _inside(path, folder) and not any(p.name.startswith(".") for p in
                                                                       path.relative_to(folder).parents):
            found.append(Model(hashes.stem(path.name), path, "models folder"))
    return [m for m in found if not any(m.path != o.path and o.path in m.path.parents for o in found)]


class Catalog:
    def __init__(self, models_dirs: list[Path], given: list[tuple[str, Path]]):
        """given: (name as given, resolved path) of the command line's --model and --refiner."""
        self.models_dirs, self.given = models_dirs, given
        self._lock = threading.Lock()
        self._models: list[Model] | None = None

    def refresh(self) -> None:
        with self._lock:
            self._models = None

    def models(self) -> list[Model]:
        with self._lock:
            if self._models is None:
                self._models = self._list()
            return list(self._models)

    def _list(self) -> list[Model]:
        models: dict[str, Model] = {}
        for name, path in self.given:
            label = name if builtin.path(name) else hashes.stem(Path(name).name)
            models.setdefault(label, Model(label, path, "builtin" if builtin.path(name) else "command line"))
        for folder in self.models_dirs:
            for m in _scan(folder):
                models.setdefault(m.name, m)
        for name, path in builtin.FILES.items():
            if path.is_file():
                models.setdefault(name, Model(name, path, "builtin"))
        return list(models.values())

    def given_model(self, index: int) -> Model:
        """The command line's --model (0) or --refiner (1) as listed."""
        name, path = self.given[index]
        label = name if builtin.path(name) else hashes.stem(Path(name).name)
        return next(m for m in self.models() if m.name == label)

    def find(self, name: str) -> Model:
        """The model a request names; UnknownModel (a ValueError) listing the names otherwise."""
        text = str(name).strip()
        models = self.models()
        for attempt in (models, None):
            if attempt is None:
                self.refresh()  # a file added since the last listing
                models = self.models()
            for m in models:
                if text in (m.name, m.filename, m.title()) or (len(text) >= 8 and text == m.short_hash()):
                    return m
        names = ", ".join(repr(m.title()) for m in models)
        raise UnknownModel(f"model {text!r} is not one of the listed models ({names}); GET /sdapi/v1/sd-models "
                           "lists them")
