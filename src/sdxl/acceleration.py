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

import itertools
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["COMPILE_MODE", "OFFLOAD_MODES", "FP8Linear", "Offload", "check_modes", "compile_unet",
           "cpu_has_bf16_matrix_units", "execution_device", "is_compiled", "store_fp8"]

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


class FP8Linear(nn.Module):
    """nn.Linear with its weight stored in float8 (e4m3) and one scale per output row: a quarter of the weight's
    float32 memory, half of float16's. Each call widens the weight to the input's dtype (weight-only
    quantisation: the matmul itself runs in that dtype, so any device that can cast float8 runs it)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        scale = w.float().abs().amax(dim=1, keepdim=True) / torch.finfo(FP8).max
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero rows stay zero
        self.register_buffer("weight_fp8", (w.float() / scale).to(FP8))
        self.register_buffer("scale", scale.to(w.dtype))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight_fp8.to(x.dtype) * self.scale.to(x.dtype), self.bias)


def store_fp8(module: nn.Module) -> int:
    """Replace every nn.Linear inside `module` by an FP8Linear (in place, for inference); returns how many.

    In the SDXL base U-Net the linear layers (attention, feed-forward, projections, embeddings) hold 87% of the
    weights (2.23 of 2.57 billion): in float16 it takes 5.1 GB, with fp8 linear weights 2.9 GB. The convolutions
    stay as they are."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, FP8Linear(child))
                count += 1
    return count


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
