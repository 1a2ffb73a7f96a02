"""Loading SDXL checkpoints in every layout users have, into the dtype and device asked for.

Each model is built on the meta device (no memory, no random initialisation), its tensors are
taken from the memory-mapped file through the format's key map, checked against the model's shapes
and assigned in place (`load_state_dict(assign=True)`): a tensor whose dtype and device already
match is used without a copy.

Each model read from safetensors files gets an `Origin` (`Components.origins[name]`): the files (kept
open), the key map and the dtype, so that any of its tensors can be read again as loading read it.
`sdxl.adapters.apply` restores the weights it merged into from there instead of keeping copies.
"""

from __future__ import annotations

import json
import math
import os
import struct
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import dtypes
from ..acceleration import QUANTISED, quantised_weight_names, store_quantised, trim_memory
from ..models import vae as vae_models
from ..models.clip import CLIPTextEncoder
from ..models.specs import MODEL_CLASSES, Components
from ..models.unet import UNet
from ..models.vae import AutoencoderKL
from . import clip_keys, unet_keys, vae_keys
from .files import SAFETENSORS_DTYPES, TensorFile, open_shards, open_tensors
from .formats import (
    OFFICIAL_IGNORED,
    OFFICIAL_PREFIXES,
    UNET_IN,
    describe_tensors,
    diffusers_components,
    diffusers_weight_files,
    read_json,
    single_file_kind,
)
from .keymap import CheckpointError, KeyMap, Rule, check_shapes, convert
from .official import (
    DIFFUSERS_RECOMMENDED,
    METADATA_RECOMMENDED,
    RECOMMENDABLE,
    official_configs,
    official_key_maps,
    saved_configs,
)

__all__ = ["Components", "Origin", "build", "load", "load_diffusers", "load_single_file", "load_vae", "load_vae_file"]


class Prefixed(Mapping[str, Tensor]):
    """The tensors of a file under one prefix, with the prefix removed."""

    def __init__(self, tensors: Mapping[str, Tensor], prefix: str):
        self.tensors, self.prefix = tensors, prefix
        self._keys = [k[len(prefix):] for k in tensors if k.startswith(prefix)]

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[self.prefix + name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _device_dtype(dtype: torch.dtype | str | None, device: torch.device | str | None) -> tuple[torch.dtype, torch.device]:
    return dtypes.torch_dtype(dtype) if dtype is not None else torch.float32, torch.device(device or "cpu")


def _choose_reads(tensors: Mapping[str, Tensor], dtype: torch.dtype, device: torch.device, mapped: bool = True) -> None:
    """Map the file when its tensors can be used as they are (unless not `mapped`); read copies when each is
    converted, straight to the GPU when that is where they go."""
    source, prefix = (tensors.tensors, tensors.prefix) if isinstance(tensors, Prefixed) else (tensors, "")
    if isinstance(source, TensorFile):
        stored = {source.dtype(prefix + k) for k in tensors}
        floats = {d for d in stored if d is not None and d.is_floating_point}
        if device.type == "cuda":
            source.read_to = device  # through pinned buffers: reading the file overlaps with the copies
        elif device.type == "cpu" and floats == {dtype} and mapped:
            source.read_to = None  # the mapped tensors are used as they are
        else:
            source.read_to = torch.device("cpu")
        source.read_dtype = dtype


def build(
    model_cls: type[nn.Module],
    config,
    tensors: Mapping[str, Tensor],
    rules: KeyMap,
    *,
    where: str,
    ignore: tuple[str, ...] = (),
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Build `model_cls(config)` on the meta device and fill it from `tensors` through `rules`."""
    return build_with_origin(model_cls, config, tensors, rules, where=where, ignore=ignore, dtype=dtype,
                             device=device)[0]


def _check_floats(state: Mapping[str, Tensor], model: nn.Module, where: str) -> None:
    """Weights stored as integers (a damaged or foreign file) would be assigned as they are: refuse them."""
    expected = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for k, v in state.items():
        if k in expected and expected[k].is_floating_point() and not v.is_floating_point():
            raise CheckpointError(f"{where}: {k} is stored as {str(v.dtype).removeprefix('torch.')}; "
                                  "weights must be floating-point tensors")


def build_with_origin(model_cls: type[nn.Module], config, tensors: Mapping[str, Tensor], rules: KeyMap, *, where: str,
                      ignore: tuple[str, ...] = (), dtype=None, device=None,
                      quantise: str | None = None, mapped: bool = True) -> tuple[nn.Module, Origin | None]:
    """`build`, and the model's `Origin` (None unless `tensors` is a safetensors file or a prefix of one).

    quantise ("fp8", "int8"): the linear layers' weights are quantised as they are read (the layers of
    `acceleration.store_quantised`, filled tensor by tensor), so the model never exists in `dtype` whole.
    mapped=False: copies even where the file's pages could be used in place. Mapped pages stay resident (and in the
    RSS) while the file is mapped, also those of tensors quantised or released since: a full-size SDXL quantised
    from a mapped float16 file peaked at 7.64 GiB, 4.31 of them file pages."""
    dtype, device = _device_dtype(dtype, device)
    _choose_reads(tensors, dtype, device, mapped=mapped and quantise is None)
    with torch.device("meta"):
        model = model_cls(config)
    layer = QUANTISED[quantise] if quantise else None
    quantised, scales = set(quantised_weight_names(model) if layer else ()), {}

    def finish(name: str, v: Tensor) -> Tensor:  # one at a time: each stored-dtype copy is freed as it is converted
        v = v.to(device=device, dtype=dtype if v.is_floating_point() else None)
        if name in quantised and v.is_floating_point() and v.dim() == 2:
            v, scales[name] = layer.quantise(v)
        return v

    state = convert(tensors, rules, where=where, ignore=ignore, finish=finish)
    check_shapes(state, model, where=where, rules=rules)
    _check_floats({k: v for k, v in state.items() if k not in scales}, model, where)  # quantised: were floats
    if scales:
        store_quantised(model, quantise)  # on the meta device: the layers' structure; their tensors come from `state`
        for name, scale in scales.items():
            prefix = name.removesuffix("weight")
            state[prefix + layer.stored], state[prefix + "scale"] = state.pop(name), scale
        trim_memory()  # the float copies quantising made, freed into glibc's heaps: given back before the next model
    model.load_state_dict(state, strict=True, assign=True)
    model = model.eval().requires_grad_(False)
    source, prefix = (tensors.tensors, tensors.prefix) if isinstance(tensors, Prefixed) else (tensors, "")
    if not isinstance(source, TensorFile):
        return model, None  # pickles (read whole), manifests in tests
    return model, Origin(source.paths, prefix, rules, tuple(ignore), dtype, device, model)


# ---------------------------------------------------------------------------------------------
# Where a loaded model's weights came from, to read them again.


def tensor_states(tensors: Iterable[tuple[str, Tensor]]) -> tuple:
    """What tells tensors apart from themselves at another time: per (attribute, tensor), its version counter
    (every in-place write bumps it), address (`.data = ...` changes it), dtype, shape and device."""
    return tuple((attr, t._version, t.data_ptr(), t.dtype, tuple(t.shape), t.device) for attr, t in tensors)


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_size, st.st_mtime_ns


def _pread_into(fd: int, buffer: Tensor, offset: int) -> bool:
    """Fill the uint8 CPU tensor `buffer` from `fd` at `offset`; False if the file ends first."""
    view = memoryview(buffer.numpy()).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            return False
        done += n
    return True


def _pread(fd: int, n: int, offset: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = os.pread(fd, n - len(out), offset + len(out))
        if not chunk:
            break
        out += chunk
    return out


class Origin:
    """Where one loaded model's weights came from: its safetensors file(s), the prefix of its tensors there, the key
    map and ignored entries it was loaded through, and the dtype and device its floats were converted to.

    `read(name)` reads our tensor `name` again from the files, through its rule, as the file stores it: copying it
    into a tensor of the dtype loading converted to gives the same bits loading gave. The files stay open, so a file
    replaced on disk since (renamed over, deleted) is still the one read; one changed in place (other size or
    modification time) is refused. `known[name]`: the tensor's `tensor_states` when it last held what `read` gives
    (loading records every tensor; `sdxl.adapters` updates it when it restores one).
    """

    def __init__(self, paths: Iterable[Path], prefix: str, rules: KeyMap, ignore: tuple[str, ...],
                 dtype: torch.dtype, device: torch.device, model: nn.Module):
        self.paths, self.prefix, self.rules, self.ignore = tuple(paths), prefix, rules, ignore
        self.dtype, self.device = dtype, device
        self._model = weakref.ref(model)
        self._fds = [os.open(p, os.O_RDONLY) for p in self.paths]
        weakref.finalize(self, _close, list(self._fds))
        self._identities = [_identity(fd) for fd in self._fds]
        self._targets: dict[str, Rule] | None = None
        self._entries: dict[str, tuple[int, int, torch.dtype | None, tuple[int, ...]]] | None = None
        self._buffer: Tensor | None = None
        self.known: dict[str, tuple] = {k: tensor_states([(k.rpartition(".")[2], t)])
                                        for k, t in model.state_dict(keep_vars=True).items()}

    def __repr__(self) -> str:
        where = self.paths[0] if len(self.paths) == 1 else f"{self.paths[0].parent} ({len(self.paths)} files)"
        return f"Origin({where}, prefix={self.prefix!r}, {len(self.rules)} tensors, {self.dtype})"

    def describes(self, model: nn.Module) -> bool:
        """Whether `model` is the model loaded (not one put in its place since)."""
        return self._model() is model

    def changed(self) -> Path | None:
        """The first file changed in place since loading, if any."""
        for path, fd, identity in zip(self.paths, self._fds, self._identities):
            if _identity(fd) != identity:
                return path
        return None

    def holds(self, name: str) -> bool:
        """Whether our tensor `name` was loaded from the files (in a dtype `read` can read)."""
        rule, index = self._rules().get(name), self._index()
        return rule is not None and all(index.get(self.prefix + s, (None,) * 4)[2] is not None for s in rule.sources)

    def read(self, name: str) -> Tensor:
        """Our tensor `name` as the files hold it, on the CPU (its floats in the stored dtype, unless a fused tensor's
        parts are stored in several: then in `dtype`, converted part by part as loading did). It lives in a buffer
        that the next `read` reuses; `release()` frees it."""
        self._check()
        rule, index = self._rules()[name], self._index()
        entries = [index[self.prefix + s] for s in rule.sources]
        sizes = [math.prod(shape) * dtype.itemsize for _, _, dtype, shape in entries]
        starts = [0]
        for size in sizes:
            starts.append(starts[-1] + -(-size // 16) * 16)  # parts aligned for any dtype's view
        if self._buffer is None or self._buffer.numel() < starts[-1]:
            self._buffer = torch.empty(starts[-1], dtype=torch.uint8)
        parts = []
        for source, (i, offset, dtype, shape), start, size in zip(rule.sources, entries, starts, sizes):
            chunk = self._buffer[start:start + size]
            if not _pread_into(self._fds[i], chunk, offset):
                raise CheckpointError(f"{self.paths[i]}: truncated while reading {self.prefix + source}")
            parts.append(chunk.view(dtype).reshape(shape))
        if len({p.dtype for p in parts if p.is_floating_point()}) > 1:
            parts = [p.to(self.dtype) if p.is_floating_point() else p for p in parts]
        return rule.load(parts)

    def read_into(self, name: str, out: Tensor) -> bool:
        """Read our tensor `name` straight into `out` where `out` holds the file's bytes as they are (a contiguous CPU
        tensor of the stored dtype, laid out as the rule lays out the file's tensor: most tensors of a model loaded in
        its file's dtype); False, with nothing read, where it does not."""
        rule = self._rules()[name]
        if len(rule.sources) != 1 or out.device.type != "cpu" or not out.is_contiguous():
            return False
        i, offset, dtype, shape = self._index()[self.prefix + rule.sources[0]]
        if dtype != out.dtype or math.prod(shape) != out.numel():
            return False
        laid_out = rule.load([out.view(-1).view(shape)])
        if (laid_out.data_ptr(), laid_out.shape, laid_out.stride()) != (out.data_ptr(), out.shape, out.stride()):
            return False
        self._check()
        if not _pread_into(self._fds[i], out.view(-1).view(torch.uint8), offset):
            raise CheckpointError(f"{self.paths[i]}: truncated while reading {self.prefix + rule.sources[0]}")
        return True

    def _check(self) -> None:
        changed = self.changed()
        if changed is not None:
            raise CheckpointError(f"{changed}: changed on disk since it was loaded; load the model again")

    def release(self) -> None:
        """Free the buffer `read` reads into."""
        self._buffer = None

    def _rules(self) -> dict[str, Rule]:
        if self._targets is None:
            self._targets = {r.target: r for r in self.rules}
        return self._targets

    def _index(self) -> dict[str, tuple[int, int, torch.dtype | None, tuple[int, ...]]]:
        """file name -> (file, absolute offset, stored dtype, shape), from the headers of the files as opened."""
        if self._entries is None:
            entries = {}
            for i, (fd, path) in enumerate(zip(self._fds, self.paths)):
                (n,) = struct.unpack("<Q", _pread(fd, 8, 0))
                try:
                    header = json.loads(_pread(fd, n, 8))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON)") from None
                for key, entry in header.items():
                    if key != "__metadata__":
                        entries[key] = (i, 8 + n + entry["data_offsets"][0], SAFETENSORS_DTYPES.get(entry["dtype"]),
                                        tuple(entry["shape"]))
            self._entries = entries
        return self._entries


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Official single files (sd_xl_base_1.0.safetensors, sd_xl_refiner_1.0.safetensors, fine-tunes).


def load_single_file(
    path: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    components: tuple[str, ...] | None = None,
    progress: Callable[[str], None] | None = None,
    quantise: Mapping[str, str] | None = None,
    mapped: bool = True,
) -> Components:
    """Load an official-layout SDXL file (base, refiner or a fine-tune of either).

    progress(name) is called after each component is loaded (e.g. to advance a progress bar). quantise: component
    ("unet", ...) -> weight format ("fp8", "int8") of its linear layers, quantised as they are read. mapped=False:
    every tensor copied, none used from the mapped file (`build_with_origin`)."""
    path = Path(path)
    return load_official_tensors(open_tensors(path), path, dtype=dtype, device=device, components=components,
                                 progress=progress, quantise=quantise, mapped=mapped)


def load_official_tensors(tensors, path: Path, *, dtype=None, device=None, components=None,
                          progress: Callable[[str], None] | None = None,
                          quantise: Mapping[str, str] | None = None, mapped: bool = True) -> Components:
    """`load_single_file` for an opened file (a TensorFile, or a manifest of meta tensors in tests)."""
    desc = describe_tensors(tensors, path)
    if desc.layout != "single-file":
        raise CheckpointError(f"{path}: not an SDXL single-file checkpoint but a {desc.kind} ({desc.layout})")
    kind = single_file_kind(tensors)
    prefixes = OFFICIAL_PREFIXES[kind]
    _check_no_strays(tensors, prefixes.values(), path)
    configs = official_configs(tensors, kind, tensors.shape(UNET_IN)[1])
    maps = official_key_maps(configs)
    out = Components(kind=desc.kind, source=path, force_zeros_for_empty_prompt=(kind == "base"),
                     recommended=_recommended(tensors, path))
    for name, prefix in prefixes.items():
        if name not in desc.components or (components is not None and name not in components):
            continue
        rules, ignore = maps[name]
        model, origin = build_with_origin(
            MODEL_CLASSES[name], configs[name], Prefixed(tensors, prefix), rules,
            where=f"{path} ({name}, {prefix}*)", ignore=ignore, dtype=dtype, device=device,
            quantise=(quantise or {}).get(name), mapped=mapped,
        )
        setattr(out, name, model)
        if origin is not None:
            out.origins[name] = origin
        if progress is not None:
            progress(name)
    return out


def _recommended(tensors: Mapping[str, Tensor], path: Path) -> dict:
    saved = getattr(tensors, "metadata", {}).get(METADATA_RECOMMENDED)
    if not saved:
        return {}
    try:
        return _recommendable(json.loads(saved))
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable recommended settings in the file's metadata ({e})") from None


def _recommendable(values: dict) -> dict:
    """The settings a model may recommend, typed (others are ignored: a newer sdxl may recommend more)."""
    if not isinstance(values, dict):
        raise TypeError(f"expected a JSON object, got {type(values).__name__}")
    out = {k: RECOMMENDABLE[k](v) for k, v in values.items() if k in RECOMMENDABLE}
    if any(isinstance(v, bool) or not math.isfinite(v) for v in out.values()):
        raise ValueError(f"not finite numbers: {values}")
    return out


def _check_no_strays(tensors: Mapping[str, Tensor], prefixes, path: Path) -> None:
    import re

    ignored = [re.compile(p) for p in OFFICIAL_IGNORED]
    strays = [k for k in tensors if not any(k.startswith(p) for p in prefixes) and not any(p.fullmatch(k) for p in ignored)]
    if strays:
        shown = ", ".join(sorted(strays)[:5])
        raise CheckpointError(f"{path}: {len(strays)} tensor(s) outside the SDXL components: {shown}")


# ---------------------------------------------------------------------------------------------
# Standalone VAE files (sdxl_vae.safetensors, fp16-fix VAEs, diffusers-named VAE files).


def load_vae_file(path: str | Path, *, dtype=None, device=None) -> AutoencoderKL:
    """A VAE on its own: official names (`encoder.down.*`) or diffusers names (`encoder.down_blocks.*`)."""
    path = Path(path)
    tensors = open_tensors(path)
    desc = describe_tensors(tensors, path)
    if desc.kind != "vae":
        raise CheckpointError(f"{path}: not a VAE file but an SDXL {desc.kind} checkpoint ({desc.layout})")
    saved = saved_configs(tensors) or {}  # a VAE of another size that we wrote (e.g. by sdxl.training.train_vae)
    config = saved.get("vae", vae_models.base)
    official = any(k.startswith("encoder.down.") for k in tensors)
    rules = vae_keys.official_vae_keys(config) if official else vae_keys.diffusers_vae_keys(config)
    return build(AutoencoderKL, config, tensors, rules, where=str(path), ignore=vae_keys.VAE_IGNORED, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# diffusers folders: models built from each component's config.json.


def _open_component(folder: Path, variant: str | None) -> Mapping[str, Tensor]:
    return open_shards(diffusers_weight_files(folder, variant))


# What building one component of a diffusers folder takes: (model class, config, tensors, key map, ignored entries).
Part = tuple[type[nn.Module], object, Mapping[str, Tensor], KeyMap, tuple[str, ...]]


def _unet_part(folder: Path, variant: str | None) -> Part:
    config = unet_keys.unet_config_from_diffusers(read_json(folder / "config.json"))
    return UNet, config, _open_component(folder, variant), unet_keys.diffusers_unet_keys(config), ()


def _vae_part(folder: Path, variant: str | None) -> Part:
    config = vae_keys.vae_config_from_diffusers(read_json(folder / "config.json"))
    return (AutoencoderKL, config, _open_component(folder, variant), vae_keys.diffusers_vae_keys(config),
            vae_keys.VAE_IGNORED)


def _clip_part(folder: Path, variant: str | None) -> Part:
    """A transformers CLIPTextModel / CLIPTextModelWithProjection folder (either key spelling)."""
    tensors = _open_component(folder, variant)
    config = clip_keys.clip_config_from_transformers(read_json(folder / "config.json"), keys=set(tensors))
    prefix = clip_keys.detect_transformers_prefix(set(tensors))
    return (CLIPTextEncoder, config, tensors, clip_keys.transformers_clip_keys(config, prefix=prefix),
            clip_keys.TRANSFORMERS_IGNORED)


DIFFUSERS_PARTS = {"unet": _unet_part, "vae": _vae_part, "text_encoder": _clip_part, "text_encoder_2": _clip_part}


def _load_part(name: str, folder: str | Path, *, dtype=None, device=None, variant: str | None = None,
               quantise: str | None = None, mapped: bool = True) -> tuple[nn.Module, Origin | None]:
    folder = Path(folder)
    model_cls, config, tensors, rules, ignore = DIFFUSERS_PARTS[name](folder, variant)
    return build_with_origin(model_cls, config, tensors, rules, where=str(folder), ignore=ignore, dtype=dtype,
                             device=device, quantise=quantise, mapped=mapped)


def load_unet_diffusers(folder: str | Path, *, dtype=None, device=None, variant: str | None = None) -> UNet:
    return _load_part("unet", folder, dtype=dtype, device=device, variant=variant)[0]


def load_vae_diffusers(folder: str | Path, *, dtype=None, device=None, variant: str | None = None) -> AutoencoderKL:
    return _load_part("vae", folder, dtype=dtype, device=device, variant=variant)[0]


def load_clip_transformers(folder: str | Path, *, dtype=None, device=None, variant: str | None = None) -> CLIPTextEncoder:
    """A transformers CLIPTextModel / CLIPTextModelWithProjection folder (either key spelling)."""
    return _load_part("text_encoder", folder, dtype=dtype, device=device, variant=variant)[0]


DIFFUSERS_LOADERS = {
    "unet": load_unet_diffusers,
    "vae": load_vae_diffusers,
    "text_encoder": load_clip_transformers,
    "text_encoder_2": load_clip_transformers,
}


def load_diffusers(
    folder: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    variant: str | None = None,
    components: tuple[str, ...] | None = None,
    progress: Callable[[str], None] | None = None,
    quantise: Mapping[str, str] | None = None,
    mapped: bool = True,
) -> Components:
    """Load a diffusers-format SDXL folder (model_index.json, unet/, vae/, text_encoder*/); quantise: see
    `load_single_file`."""
    folder = Path(folder)
    kind, parts = diffusers_components(folder)
    unet_config = folder / "unet" / "config.json"
    if unet_config.is_file() and read_json(unet_config).get("in_channels") == 9:
        kind = "inpaint"
    index = read_json(folder / "model_index.json")
    out = Components(kind=kind, source=folder, force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True))
    if DIFFUSERS_RECOMMENDED in index:  # written by our save_diffusers (diffusers ignores "_" keys)
        try:
            out.recommended = _recommendable(index[DIFFUSERS_RECOMMENDED])
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{folder / 'model_index.json'}: unreadable {DIFFUSERS_RECOMMENDED} ({e})") from None
    scheduler = folder / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        out.scheduler = read_json(scheduler)
    for name in parts:
        if components is None or name in components:
            model, origin = _load_part(name, folder / name, dtype=dtype, device=device, variant=variant,
                                       quantise=(quantise or {}).get(name), mapped=mapped)
            setattr(out, name, model)
            if origin is not None:
                out.origins[name] = origin
            if progress is not None:
                progress(name)
    return out


def load(
    path: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    variant: str | None = None,
    progress: Callable[[str], None] | None = None,
    quantise: Mapping[str, str] | None = None,
    mapped: bool = True,
) -> Components:
    """Load any SDXL checkpoint: an official-layout single file or a diffusers folder.

    progress(name) is called after each component (unet, vae, text_encoder, text_encoder_2) is loaded. quantise:
    component -> weight format ("fp8", "int8") of its linear layers, quantised as they are read. mapped=False:
    nothing used from the mapped files (see `build_with_origin`)."""
    path = Path(path)
    if path.is_dir():
        return load_diffusers(path, dtype=dtype, device=device, variant=variant, progress=progress, quantise=quantise,
                              mapped=mapped)
    return load_single_file(path, dtype=dtype, device=device, progress=progress, quantise=quantise, mapped=mapped)


def load_vae(path: str | Path, *, dtype: torch.dtype | str | None = None,
             device: torch.device | str | None = None) -> AutoencoderKL:
    """A VAE from a standalone file, a diffusers VAE folder, or the vae/ of a diffusers pipeline folder."""
    path = Path(path)
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        return load_vae_diffusers(folder, dtype=dtype, device=device)
    return load_vae_file(path, dtype=dtype, device=device)
