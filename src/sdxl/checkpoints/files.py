"""Reading and writing tensor files safely.

safetensors files are memory-mapped: a tensor's bytes are read from disk only when used, and a
tensor whose dtype already matches the one asked for is never copied. Pickle checkpoints
(`.ckpt`, `.pt`, `.bin`) are read with `torch.load(weights_only=True)`, which refuses anything but
tensors and plain containers, so opening a file never runs code from it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .keymap import CheckpointError

# safetensors dtype names -> torch dtypes (the ones SDXL files use, and a few more).
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


class TensorFile(Mapping[str, Tensor]):
    """A lazy name -> tensor view of one or more weight files (shards).

    `shape(name)` and `dtype(name)` come from the header without touching tensor data.
    """

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self._index: dict[str, tuple[int, str, tuple[int, ...]]] = {}
        self._handles = []
        self.metadata: dict[str, str] = {}
        for i, path in enumerate(paths):
            header = read_safetensors_header(path)
            self.metadata.update(header.pop("__metadata__", None) or {})
            for name, entry in header.items():
                self._index[name] = (i, entry["dtype"], tuple(entry["shape"]))
            try:
                self._handles.append(safe_open(str(path), framework="pt"))
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None

    @property
    def path(self) -> Path:
        return self.paths[0]

    def __getitem__(self, name: str) -> Tensor:
        i = self._index[name][0]
        return self._handles[i].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._index[name][2]

    def dtype(self, name: str) -> torch.dtype | None:
        return SAFETENSORS_DTYPES.get(self._index[name][1])

    def storage_dtypes(self, prefix: str = "") -> dict[str, int]:
        """How many tensors under `prefix` are stored in each dtype ("F16": 1680, ...)."""
        counts: dict[str, int] = {}
        for name, (_, dt, _) in self._index.items():
            if name.startswith(prefix):
                counts[dt] = counts.get(dt, 0) + 1
        return counts


class PickledTensors(dict):
    """Tensors read from a pickle checkpoint with `weights_only=True` (same interface as TensorFile)."""

    def __init__(self, path: Path, tensors: dict[str, Tensor]):
        super().__init__(tensors)
        self.paths = [path]
        self.path = path
        self.metadata: dict[str, str] = {}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self[name].dtype

    def storage_dtypes(self, prefix: str = "") -> dict[str, int]:
        names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
        counts: dict[str, int] = {}
        for k, t in self.items():
            if k.startswith(prefix):
                counts[names.get(t.dtype, str(t.dtype))] = counts.get(names.get(t.dtype, str(t.dtype)), 0) + 1
        return counts


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file's size.

    Done by hand (it is 8 bytes + JSON) so that truncated and corrupt files get an error that
    says what is wrong, before any tensor is touched.
    """
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > _MAX_HEADER or 8 + n > size:
            head = _describe_start(path)
            raise CheckpointError(f"{path}: not a safetensors file or truncated (header of {n} bytes in a {size}-byte file; {head})")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = entry["data_offsets"]
            entry["dtype"], entry["shape"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header (bad entry for {name!r})") from None
        end = max(end, stop)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated: the header describes {8 + n + end:,} bytes but the file has {size:,} "
            "(an incomplete download?)"
        )
    return header


def _describe_start(path: Path) -> str:
    with open(path, "rb") as f:
        start = f.read(64)
    if start[:2] == b"PK":
        return "it looks like a zip archive (a PyTorch .ckpt/.pt pickle)"
    if start[:1] == b"\x80":
        return "it looks like a raw pickle"
    if start.lstrip()[:1] in (b"{", b"["):
        return "it looks like a JSON file"
    if start.lstrip()[:1] == b"<":
        return "it looks like an HTML/XML page (a failed download?)"
    return "its first bytes are " + start[:16].hex(" ")


def open_tensors(path: str | Path) -> TensorFile | PickledTensors:
    """Open a weight file lazily: safetensors by memory map, pickles with weights_only=True."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a weight file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _load_pickle(path)
    return TensorFile([path])


def _load_pickle(path: Path) -> PickledTensors:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # UnpicklingError, RuntimeError for non-zip files, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refused to load this pickle file: it holds more than plain tensors or is corrupt "
            f"({reason[:200]}). Only weights_only pickles are read; prefer a .safetensors file."
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: the pickle does not hold a state dict of tensors")
    return PickledTensors(path, obj)


def save_tensors(tensors: Mapping[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file (contiguous CPU copies, written to a temporary name first)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)
