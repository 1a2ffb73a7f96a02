"""Reading and writing tensor files safely.

safetensors files are memory-mapped: a tensor's bytes are read from disk only when used, and a
tensor whose dtype already matches the one asked for is never copied. Pickle checkpoints
(`.ckpt`, `.pt`, `.bin`) are read with `torch.load(weights_only=True)`, which refuses anything but
tensors and plain containers, so opening a file never runs code from it.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import struct
import uuid
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
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
WEIGHT_SUFFIXES = (".weight", ".bias")  # tensors that are floating-point numbers in every SDXL layout


def _check_float(path: Path, name: str, dtype: torch.dtype | None) -> None:
    """A weight or bias stored as integers (a quantized, foreign or damaged file) is refused by name."""
    if name.endswith(WEIGHT_SUFFIXES) and dtype is not None and not (dtype.is_floating_point or dtype.is_complex):
        raise CheckpointError(f"{path}: tensor {name} is stored as {str(dtype).removeprefix('torch.')}, but weights "
                              "are floating-point numbers (a quantized or damaged file?)")


class TensorFile(Mapping[str, Tensor]):
    """A lazy name -> tensor view of one or more weight files (shards).

    `shape(name)` and `dtype(name)` come from the header without touching tensor data.
    """

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self._index: dict[str, tuple[int, str, tuple[int, ...]]] = {}
        self._offsets: dict[str, int] = {}  # absolute byte offset of each tensor's data
        self._handles = []
        # Where tensors are read to. None: the file is mapped (no copy; pages are read when used).
        # A device: each tensor is read into fresh memory there, through a few reused buffers
        # (`Staging`), and on the CPU its floats converted to `read_dtype` on the way. Loaders set it
        # when every tensor is converted or moved anyway, so the file's pages never join the
        # process's resident memory next to the converted copy, and no tensor is held twice.
        self.read_to: torch.device | None = None
        self.read_dtype: torch.dtype | None = None
        self._staging: Staging | None = None
        self.metadata: dict[str, str] = {}
        for i, path in enumerate(paths):
            header = read_safetensors_header(path)
            self.metadata.update(header.pop("__metadata__", None) or {})
            with open(path, "rb") as f:
                data_start = 8 + struct.unpack("<Q", f.read(8))[0]
            for name, entry in header.items():
                self._index[name] = (i, entry["dtype"], tuple(entry["shape"]))
                self._offsets[name] = data_start + entry["data_offsets"][0]
            try:
                self._handles.append(safe_open(str(path), framework="pt"))
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None

    @property
    def path(self) -> Path:
        return self.paths[0]

    def __getitem__(self, name: str) -> Tensor:
        i, dtype_name, shape = self._index[name]
        _check_float(self.paths[i], name, SAFETENSORS_DTYPES.get(dtype_name))
        if self.read_to is None or dtype_name not in SAFETENSORS_DTYPES:
            try:
                return self._handles[i].get_tensor(name)
            except SafetensorError as e:
                raise CheckpointError(f"{self.paths[i]}: cannot read tensor {name} ({e})") from None
        stored = SAFETENSORS_DTYPES[dtype_name]
        dtype = self.read_dtype if self.read_dtype is not None and stored.is_floating_point else stored
        # On the CPU floats are converted as they leave the buffer (no second pass). A GPU gets the stored dtype and
        # converts there, tensor by tensor: a copy to a GPU that also converts would convert on the host first.
        out = torch.empty(math.prod(shape), dtype=dtype if self.read_to.type == "cpu" else stored, device=self.read_to)
        if self._staging is None or self._staging.device != out.device:
            self._staging = Staging(out.device)
        with open(self.paths[i], "rb", buffering=0) as f:
            f.seek(self._offsets[name])
            if not self._staging.read(f, out, stored):
                raise CheckpointError(f"{self.paths[i]}: truncated while reading {name}")
        return out.to(dtype).reshape(shape)

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


class Staging:
    """Reads tensors from a file into memory on a device through reused host buffers (pinned ones for CUDA).

    The buffers are allocated once, not per tensor: fresh host memory costs a page fault per 4 KiB,
    about as much again as the read. To a GPU a ring of buffers is used, and a buffer is refilled
    only once its last copy to the device has finished (an event per buffer): while the GPU copies
    one chunk the next is being read from the file, so the load can take about as long as reading
    the file (benchmarks/load_memory.py --device cuda).
    """

    def __init__(self, device: torch.device, buffers: int | None = None, chunk: int = 16 * 2**20):
        self.device, self.chunk = device, chunk
        cuda = device.type == "cuda"
        buffers = buffers or (4 if cuda else 1)  # copies on the CPU are done when copy_ returns: one is enough
        self.buffers = [torch.empty(chunk, dtype=torch.uint8, pin_memory=cuda) for _ in range(buffers)]
        self.copied: list = [None] * buffers  # each buffer's last copy (a CUDA event), to wait for before reuse
        self.next = 0

    def read(self, f, out: Tensor, stored: torch.dtype) -> bool:
        """Fill the flat tensor `out` with out.numel() values of dtype `stored` read from file `f`'s
        current position, converted to out's dtype; False if the file ends first."""
        per_chunk = self.chunk // stored.itemsize
        for start in range(0, out.numel(), per_chunk):
            n = min(per_chunk, out.numel() - start)
            i, self.next = self.next, (self.next + 1) % len(self.buffers)
            if self.copied[i] is not None:
                self.copied[i].synchronize()
            buffer = self.buffers[i][:n * stored.itemsize]
            if f.readinto(buffer.numpy()) != buffer.numel():
                return False
            out[start:start + n].copy_(buffer.view(stored), non_blocking=True)
            if self.device.type == "cuda":
                self.copied[i] = torch.cuda.Event()
                self.copied[i].record(torch.cuda.current_stream(self.device))  # the stream the copy went on
        return True


class PickledTensors(dict):
    """Tensors read from a pickle checkpoint with `weights_only=True` (same interface as TensorFile)."""

    def __init__(self, path: Path, tensors: dict[str, Tensor]):
        super().__init__(tensors)
        self.paths = [path]
        self.path = path
        self.metadata: dict[str, str] = {}

    def __getitem__(self, name: str) -> Tensor:
        tensor = super().__getitem__(name)
        _check_float(self.path, name, tensor.dtype)
        return tensor

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(dict.__getitem__(self, name).shape)

    def dtype(self, name: str) -> torch.dtype:
        return dict.__getitem__(self, name).dtype

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
            if entry is not None and not isinstance(entry, dict):
                raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not a JSON object)")
            continue
        try:
            begin, stop = entry["data_offsets"]
            ok = isinstance(entry["dtype"], str) and isinstance(entry["shape"], list)
            ok = ok and all(isinstance(x, int) and x >= 0 for x in [begin, stop, *entry["shape"]]) and begin <= stop
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: corrupt safetensors header (bad entry for {name!r})")
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
    if start[8:9] == b"{":
        return "it looks like a safetensors file cut short inside its header (an incomplete download?)"
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
    with open(path, "rb") as f:
        start = f.read(2)
    # torch.save writes a zip archive (PK); older files are a raw pickle (protocol 2+: 0x80, the protocol)
    if not zipfile.is_zipfile(path) and not (start[:1] == b"\x80" and start[1:2] in b"\x02\x03\x04\x05"):
        size = path.stat().st_size
        what = "it is empty" if size == 0 else _describe_start(path)
        raise CheckpointError(f"{path}: refused to load this pickle file: it is corrupt or not a PyTorch checkpoint "
                              f"at all (neither a zip archive nor a pickle; {what})")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols: not the user's business
            warnings.simplefilter("ignore")
            # mmap works only for the zip format; older (legacy) pickles are read whole, equally safely.
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # UnpicklingError, RuntimeError for non-zip files, ...
        raise CheckpointError(
            f"{path}: refused to load this pickle file: {_pickle_refusal(e)}. "
            "Only weights_only pickles are read; prefer a .safetensors file."
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: the pickle does not hold a state dict of tensors")
    return PickledTensors(path, obj)


def _pickle_refusal(e: Exception) -> str:
    """One line on why torch.load(weights_only=True) refused a file (torch's text is long and
    suggests weights_only=False, which would run the file's code)."""
    if "Weights only load failed" in str(e):
        found = re.search(r"(Unsupported [^\n]*|Trying to load [^\n]*)", str(e))
        detail = found.group(1).split(" Please use", 1)[0].strip() if found else "objects other than tensors"
        return f"it holds more than plain tensors ({detail[:200]})"
    text = " ".join(str(e).split())
    return f"it is corrupt or not a PyTorch checkpoint ({type(e).__name__}: {text[:200]})"


def open_shards(files: list[Path]) -> TensorFile | PickledTensors:
    """One file's tensors, or the tensors of a sharded checkpoint's files as one mapping."""
    return open_tensors(files[0]) if len(files) == 1 else TensorFile(files)


def save_tensors(tensors: Mapping[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file (contiguous CPU copies): to a hidden temporary name in the same folder first,
    renamed into place when complete; removed on any failure. The file gets the usual permissions (0666 less
    the umask: 0644 by default), not the 0600 of safetensors' own temporary file. An OSError (naming `path`)
    when it cannot be written, e.g. a full disk."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        try:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        except SafetensorError as e:
            raise _write_error(e, path) from None
        os.chmod(tmp, 0o666 & ~_umask())
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_error(e: SafetensorError, path: Path) -> OSError:
    """safetensors' I/O error as an OSError of `path` ("... (os error 28)": no space left on the device)."""
    found = re.search(r"os error (\d+)", str(e))
    code = int(found.group(1)) if found else errno.EIO
    return OSError(code, os.strerror(code), str(path))


def _umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux), else by setting it back."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
