"""Speed and memory modes for generation: a compiled U-Net, fp8 weights, and weights offloaded to CPU memory.

    compile_unet(unet)                          # torch.compile of the U-Net's forward, in place
    store_fp8(unet)                             # its linear layers' weights kept in float8: half of float16
    Offload("model", "cuda", [te1, te2, unet, vae])       # one component on the GPU at a time
    Offload("sequential", "cuda", [te1, te2, unet, vae])  # one layer's weights on the GPU at a time

`sdxl.load(..., compile=True, fp8=True, offload="model")` and `sdxl generate --compile --fp8 --offload model` set
these up; the pipeline finds where a component computes with `execution_device`.

Offloading never copies weights back: inference does not change them, so a module's CPU tensors
stay where they are and "moving to the device" points its parameters at device copies, which
"moving back" simply drops. On CUDA the CPU copies are pinned once, so the copies to the device
are asynchronous DMA transfers that overlap with the Python that follows them.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BF16_WORTH",
    "COMPILE_MODE",
    "OFFLOAD_MODES",
    "QUANTISED",
    "FP8Linear",
    "Int8Linear",
    "Offload",
    "QuantisedLinear",
    "check_modes",
    "compile_unet",
    "cpu_bf16_speedup",
    "cpu_has_bf16_matrix_units",
    "execution_device",
    "is_compiled",
    "quantised_weight_names",
    "quantize_fp8",
    "quantize_int8",
    "store_fp8",
    "store_quantised",
    "trim_memory",
]

OFFLOAD_MODES = ("model", "sequential")


def check_modes(compile: bool | str, offload: str | None) -> None:
    """ValueError for an unknown offload mode, or for a combination that cannot work."""
    if offload is not None and offload not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {', '.join(OFFLOAD_MODES)} or None, got {offload!r}")
    if offload == "sequential" and compile:
        raise ValueError("compile and sequential offload do not combine (its hooks move weights in the middle of "
                         "the U-Net's forward); use model offload with compile")


# ---------------------------------------------------------------------------------------------
# fp8 weight storage

FP8 = torch.float8_e4m3fn  # 4 exponent bits, 3 mantissa bits: the format for weights (max 448)


def quantize_fp8(w: Tensor) -> tuple[Tensor, Tensor]:
    """(w / scale in float8 e4m3, scale in w's dtype), one scale per output row (max |w| / 448). On the meta
    device it gives meta tensors of those dtypes and shapes (a model's structure made before its weights)."""
    scale = w.float().abs().amax(dim=1, keepdim=True) / torch.finfo(FP8).max
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero rows stay zero
    return (w.float() / scale).to(FP8), scale.to(w.dtype)


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """(round(w / scale) in int8, scale in w's dtype), one scale per output row (max |w| / 127): symmetric
    absmax quantisation, as LLM.int8's weights and sd.cpp's q8_0 (which scales blocks of 32)."""
    scale = w.abs().amax(dim=1, keepdim=True).float() / 127  # the max of w's values is one of them: exact
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.div(w, scale).round_().clamp_(-127, 127).to(torch.int8), scale.to(w.dtype)  # in float32


class QuantisedLinear(nn.Module):
    """nn.Linear with its weight stored quantised (`stored`) and one scale per output row. Each call widens the
    weight to the input's dtype (weight-only quantisation: the matmul itself runs in that dtype)."""

    stored = ""  # the quantised weight's attribute
    quantise = staticmethod(quantize_fp8)  # weight -> (quantised, scale)

    def __init__(self, linear: nn.Linear):
        super().__init__()
        quantised, scale = type(self).quantise(linear.weight.detach())
        self.register_buffer(self.stored, quantised)
        self.register_buffer("scale", scale)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features


class FP8Linear(QuantisedLinear):
    """Weight in float8 (e4m3): a quarter of its float32 memory, half of float16's; any device that can cast
    float8 runs it (GPUs cast fast; CPUs slowly: `Int8Linear` is the CPU's)."""

    stored = "weight_fp8"
    quantise = staticmethod(quantize_fp8)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight_fp8.to(x.dtype) * self.scale.to(x.dtype), self.bias)


class Int8Linear(QuantisedLinear):
    """Weight in int8, as small as float8 and about as close (per-row absmax), and widened 5x faster on the CPU
    (float8 has no vectorised conversion there). The scale goes on whichever is smaller, the weight or the
    output: with fewer input rows than input features (the 16x16 stage's 512 rows against 1280 features at
    512x512, the text's 154 rows in cross-attention) scaling the output is the shorter pass."""

    stored = "weight_int8"
    quantise = staticmethod(quantize_int8)

    def forward(self, x: Tensor) -> Tensor:
        w, scale = self.weight_int8.to(x.dtype), self.scale.to(x.dtype)
        if x.numel() < self.in_features * self.in_features:  # rows < in_features
            y = F.linear(x, w).mul_(scale.view(-1))
            return y.add_(self.bias.to(y.dtype)) if self.bias is not None else y
        return F.linear(x, w.mul_(scale), self.bias)


QUANTISED = {"fp8": FP8Linear, "int8": Int8Linear}  # the weight formats `store_quantised` and loaders take


def quantised_weight_names(module: nn.Module) -> list[str]:
    """The state-dict names of the weights `store_quantised` would quantise (those of plain nn.Linear layers)."""
    return [f"{name}.weight" for name, child in module.named_modules() if type(child) is nn.Linear]



def store_quantised(module: nn.Module, kind: str = "fp8") -> int:
    """Replace every nn.Linear inside `module` by a QuantisedLinear of `kind` (in place, for inference; on the
    meta device it makes the structure only); returns how many.

    In the SDXL base U-Net the linear layers (attention, feed-forward, projections, embeddings) hold 87% of the
    weights (2.23 of 2.57 billion): in float16 it takes 5.1 GB, with 8-bit linear weights 2.9 GB. The
    convolutions stay as they are."""
    layer = QUANTISED[kind]
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, layer(child))
                count += 1
    return count


def store_fp8(module: nn.Module) -> int:
    """`store_quantised(module, "fp8")`."""
    return store_quantised(module, "fp8")


def trim_memory() -> None:
    """Hand freed memory back to the system now. glibc keeps freed blocks under its mmap threshold (which rises to
    32 MiB as large blocks are freed, so most weight tensors end up under it) in its heaps: releasing SDXL's bigG
    encoder (1.29 GiB) lowered the RSS by 0.12 GiB without this, by 1.29 GiB with it. A no-op without glibc."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def _find_malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        return None


_malloc_trim = _find_malloc_trim()


# ---------------------------------------------------------------------------------------------
# torch.compile


# The torch.compile mode `compile_unet` uses unless told otherwise, on every device: inductor's default.
# Its fused kernels (norms, activations, adds around cuBLAS / cuDNN / oneDNN calls) are most of what
# compiling gains for a U-Net, and its first compilation is the shortest of the modes (the first
# image's warm-up should stay near a minute; inductor caches the graphs on disk for later processes).
# "max-autotune-no-cudagraphs" first benchmarks Triton variants of every matmul and convolution shape
# (SDXL compiles of 5-10 minutes are reported; the tuning is cached on disk).
# "reduce-overhead" / "max-autotune" add CUDA graphs, which save launch overhead that is small next to
# SDXL's kernels, bake in every weight's address (offloaded weights get new ones each image), keep a
# private memory pool (against the peak-memory target) and overwrite their outputs on each replay.
# Any of them can be asked for: `compile_unet(unet, mode=...)`, `Pipeline(compile="max-autotune")`.
COMPILE_MODE = "default"


def compile_unet(unet: nn.Module, *, mode: str | None = None) -> nn.Module:
    """Replace `unet.forward` by its torch.compile'd version (the same module object is returned).

    fullgraph=True: the U-Net has no data-dependent control flow, so any graph break is a bug to fix,
    not a slowdown to live with. dynamic=False: each input shape (image size, batch, with or without
    guidance) gets its own specialised graph, compiled on first use and reused for every later
    image of that shape; timesteps are tensors, so a new step never recompiles. Only `forward` is
    compiled, so forward hooks (model offload) run eagerly around the graph.
    """
    if isinstance(unet.__dict__.get("forward"), Compiled):
        return unet  # already compiled: compiling again would start over
    mode = mode or COMPILE_MODE
    unet.forward = Compiled(torch.compile(unet.forward, fullgraph=True, dynamic=False, mode=mode), mode)
    return unet


class Compiled:
    """A compiled forward, marked so that `compile_unet` and `is_compiled` can tell it apart."""

    def __init__(self, fn, mode: str):
        self.fn = fn
        self.graphs = mode in ("reduce-overhead", "max-autotune")  # the modes that use CUDA graphs

    def __call__(self, *args, **kwargs):
        if not self.graphs:
            return self.fn(*args, **kwargs)
        torch.compiler.cudagraph_mark_step_begin()  # each call is a new step: the last one's buffers may be reused
        return self.fn(*args, **kwargs).clone()  # a replay overwrites its outputs; the samplers keep predictions


def is_compiled(unet: nn.Module) -> bool:
    return isinstance(unet.__dict__.get("forward"), Compiled)


# A measured bfloat16 speed-up from which bfloat16 is worth its rounding on the CPU (`--dtype auto`, the CLI's
# note). Measured on the development machines: 4.6x with AMX (a U-Net step), 3x with AVX512-BF16 alone; CPUs
# without bfloat16 instructions emulate it, slower than float32.
BF16_WORTH = 1.5


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup(n: int = 1024, repeats: int = 3) -> float:
    """How many times faster an n x n bfloat16 matrix product runs than a float32 one on this CPU, with torch's
    threads, measured now (best of `repeats` each; ~0.1 s once per process). A measurement rather than a list of
    CPU flags: AMX, AVX512-BF16 and emulation all exist, and what oneDNN makes of each is what counts."""
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.ones(n, n, dtype=dtype), torch.ones(n, n, dtype=dtype)
        a @ b  # warm-up: oneDNN builds its kernel on the first call
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        times[dtype] = best
    return times[torch.float32] / max(times[torch.bfloat16], 1e-9)


def cpu_has_bf16_matrix_units() -> bool:
    """True where this CPU multiplies bfloat16 matrices in hardware (Intel AMX, Xeon 4th generation on):
    there a bfloat16 U-Net step takes about a fifth of the time of a float32 one (benchmarks/README.md).
    Asks a private torch function; False where it is missing."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except (RuntimeError, AttributeError):
        return False


# ---------------------------------------------------------------------------------------------
# Offloading


def execution_device(module: nn.Module) -> torch.device:
    """Where `module` computes: its offload's device, else where its weights are."""
    offload = module.__dict__.get("_offload")
    if offload is not None:
        return offload.device
    return next(itertools.chain(module.parameters(), module.buffers())).device


def _own_tensors(module: nn.Module, recurse: bool) -> Iterable[Tensor]:
    return itertools.chain(module.parameters(recurse=recurse), module.buffers(recurse=recurse))


# What `_copy_in` replaced: (the module's _parameters or _buffers dict, name, the CPU tensor).
Stored = list[tuple[dict, str, Tensor]]


def _copy_in(module: nn.Module, device: torch.device, *, recurse: bool) -> Stored:
    """Give the module (and its children if `recurse`) copies of its tensors on `device`.

    The copies take the CPU tensors' places in the modules, as new Parameter objects: the CPU
    tensors themselves are left as they are, so `_restore` only has to put them back.
    """
    stored = []
    for m in module.modules() if recurse else [module]:
        for slots in (m._parameters, m._buffers):
            for name, t in slots.items():
                if t is None or t.device == device:
                    continue
                copy = t.detach().to(device, non_blocking=True)  # asynchronous from pinned memory
                slots[name] = nn.Parameter(copy, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else copy
                stored.append((slots, name, t))
    return stored


def _restore(stored: Stored) -> None:
    for slots, name, t in stored:
        slots[name] = t  # the device copy is freed (after the queued work that reads it)


def _entry_points(component: nn.Module) -> list[nn.Module]:
    """The modules a call to `component` enters through: itself, or, when it has no forward of its
    own (the VAE is called through encode / decode), its direct children."""
    if type(component).forward is not nn.Module.forward:
        return [component]
    return list(component.children())


class Offload:
    """Keeps the components' weights in CPU memory and runs them on `device`.

    mode "model": a component (text encoder, U-Net, VAE) is copied to the device when it is called
    and stays there until another component is called or `unload()`: one component on the device at
    a time, each copied in once per image. mode "sequential": every module's own weights are copied
    in just before its forward and dropped right after it (forward pre/post hooks), so the device
    holds about one layer's weights, at the price of copying all weights on every call.
    With `device` equal to the storage device nothing is copied; the hooks are still in place.
    """

    def __init__(self, mode: str, device: torch.device | str, components: Iterable[nn.Module]):
        if mode not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, got {mode!r}")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" is the current GPU; tensors say "cuda:0"
            device = torch.device("cuda", torch.cuda.current_device())
        self.mode, self.device = mode, device
        self.components = list({id(m): m for m in components}.values())  # base and refiner may share a VAE
        self.resident: nn.Module | None = None  # model mode: the component now on the device
        self._stored: Stored = []  # model mode: the resident component's CPU tensors
        self._layers: dict[int, Stored] = {}  # sequential: those of each module now running
        self._handles = []
        pin = self.device.type == "cuda"
        for component in self.components:
            if component.__dict__.get("_offload") is not None:
                raise ValueError(f"{type(component).__name__} is already offloaded")
            if mode == "sequential" and is_compiled(component):
                raise ValueError("sequential offload cannot run inside a compiled U-Net (its hooks move weights "
                                 "during the forward); use model offload with compile")
            with torch.no_grad():
                for t in _own_tensors(component, recurse=True):
                    data = t.data.cpu()
                    t.data = _pinned(data) if pin else data
            component._offload = self
            if mode == "model":
                for module in _entry_points(component):
                    self._handles.append(module.register_forward_pre_hook(lambda m, args, c=component: self.load(c)))
            else:
                for module in component.modules():
                    if next(_own_tensors(module, recurse=False), None) is not None:
                        self._handles.append(module.register_forward_pre_hook(self._layer_in))
                        self._handles.append(module.register_forward_hook(self._layer_out, always_call=True))

    def load(self, component: nn.Module) -> None:
        """Model mode: make `component` the one on the device."""
        if self.resident is component:
            return
        self.unload()
        self._stored = _copy_in(component, self.device, recurse=True)
        self.resident = component

    def unload(self) -> None:
        """Drop whatever is on the device (the weights' CPU tensors are untouched)."""
        _restore(self._stored)
        self._stored, self.resident = [], None

    def _layer_in(self, module: nn.Module, args) -> None:
        self._layers[id(module)] = _copy_in(module, self.device, recurse=False)

    def _layer_out(self, module: nn.Module, args, output) -> None:
        _restore(self._layers.pop(id(module), []))

    def remove(self) -> None:
        """Take the hooks off; every weight is left in CPU memory."""
        self.unload()
        for h in self._handles:
            h.remove()
        self._handles = []
        for component in self.components:
            component.__dict__.pop("_offload", None)


def _pinned(t: Tensor) -> Tensor:
    """A page-locked copy (asynchronous copies to the GPU), or `t` where the OS refuses to lock more memory."""
    try:
        return t.pin_memory()
    except RuntimeError:
        return t
