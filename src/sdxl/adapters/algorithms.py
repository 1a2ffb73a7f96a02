"""The weight update of each adapter algorithm, as the peers compute it.

Each function takes one module's tensors by short name (`keys.ROLES`) and returns the unscaled
update in its natural shape (the caller reshapes it to the module's weight); `alpha_scale` is the factor
peers apply on top (kohya sd-scripts, LyCORIS, ComfyUI `comfy/weight_adapter`, A1111):

    lora / LoCon   up @ down                  x alpha / rank (rank = down's rows), x 1 without alpha
    lora + mid     CP/Tucker core (mid x_1 up x_2 down)  x alpha / rank
    LoHa           (w1a @ w1b) * (w2a @ w2b)  x alpha / rank (rank = w1b's rows)
    LoKr           kron(w1, w2)               x alpha / rank of the decomposed factor, x 1 when both are whole
    full           diff (and diff_b)          x 1

All of them run on meta tensors too, which is how files are checked against a model's shapes
before any tensor is read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

# Which short names each algorithm needs (one alternative per tuple entry) and may carry.
NEEDS: dict[str, tuple[tuple[str, ...], ...]] = {
    "lora": (("down",), ("up",)),
    "loha": (("w1a",), ("w1b",), ("w2a",), ("w2b",)),
    "lokr": (("w1", "w1a"), ("w2", "w2a")),
    "full": (("diff", "diff_b"),),
}
PAIRS = {"w1a": "w1b", "w2a": "w2b", "t1": "t2", "t2": "t1"}  # names that come together (LoKr's t2 alone)


def lora(t: Mapping[str, Tensor]) -> Tensor:
    """up @ down (kohya networks/lora.py); with `mid`, the CP/Tucker core of LyCORIS functional/locon.py."""
    down, up = t["down"], t["up"]
    if "mid" in t:  # down (r, in, 1, 1), mid (r, r, k, k), up (out, r, 1, 1) -> (out, in, k, k)
        return torch.einsum("i j ..., p i, j r -> p r ...", t["mid"], up.flatten(1), down.flatten(1))
    return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])


def _tucker(core: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """core (r, r, k, k), a (r, out), b (r, in) -> (out, in, k, k) (LyCORIS functional/general.py rebuild_tucker)."""
    return torch.einsum("i j ..., i p, j r -> p r ...", core, a, b)


def loha(t: Mapping[str, Tensor]) -> Tensor:
    """(w1a @ w1b) * (w2a @ w2b), the Hadamard product of two low-rank matrices (LyCORIS functional/loha.py)."""
    if "t1" in t:  # Tucker: w?a (r, out), w?b (r, in)
        return _tucker(t["t1"], t["w1a"], t["w1b"]) * _tucker(t["t2"], t["w2a"], t["w2b"])
    return (t["w1a"] @ t["w1b"].flatten(1)) * (t["w2a"] @ t["w2b"].flatten(1))


def lokr(t: Mapping[str, Tensor]) -> Tensor:
    """kron(w1, w2), each factor whole or a product (LyCORIS functional/lokr.py `_kron_weight`, `make_kron`)."""
    w1 = t["w1"] if "w1" in t else t["w1a"] @ t["w1b"]
    if "w2" in t:
        w2 = t["w2"]
    elif "t2" in t:  # t2 (r, r, k, k), w2a (r, out), w2b (r, in)
        w2 = _tucker(t["t2"], t["w2a"], t["w2b"])
    else:  # w2a (out, r), w2b (r, in, *k)
        w2b = t["w2b"]
        w2 = (t["w2a"] @ w2b.flatten(1)).reshape(t["w2a"].shape[0], *w2b.shape[1:])
    return torch.kron(w1.reshape(*w1.shape, *[1] * (w2.ndim - w1.ndim)), w2.contiguous())


def full(t: Mapping[str, Tensor]) -> Tensor:
    """The stored difference itself (LyCORIS modules/full.py)."""
    return t["diff"]


DELTAS = {"lora": lora, "loha": loha, "lokr": lokr, "full": full}


def alpha_rank(algorithm: str, shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """The rank alpha is divided by; None where peers apply no alpha (full, LoKr with both factors whole)."""
    if algorithm == "lora":
        return shapes["down"][0]
    if algorithm == "loha":
        return shapes["w1b"][0]
    if algorithm == "lokr":
        for b in ("w1b", "w2b"):  # ComfyUI weight_adapter/lokr.py: the first decomposed factor's rank
            if b in shapes:
                return shapes[b][0]
    return None


def alpha_scale(alpha: float | None, rank: int | None, rs: bool = False) -> float:
    """alpha / rank (alpha / sqrt(rank) for rank-stabilised PEFT LoRAs); 1 without an alpha or a rank."""
    if alpha is None or rank is None:
        return 1.0
    return alpha / (math.sqrt(rank) if rs else rank)


def missing(algorithm: str, names: set[str]) -> list[str]:
    """The short names an algorithm lacks among `names` (an empty list when complete)."""
    lacking = ["/".join(alts) for alts in NEEDS[algorithm] if not any(a in names for a in alts)]
    unpaired = [n for n in names if n in PAIRS and PAIRS[n] not in names]
    lacking += [PAIRS[n] for n in unpaired if not (n == "t2" and algorithm == "lokr")]
    return lacking


def fits(natural: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """Whether an update of shape `natural` is one for a weight of `shape`: equal up to trailing 1s
    (a linear update of a 1x1 convolution), or flattened after the first axis (LoHa of a convolution)."""

    def trim(s: tuple[int, ...]) -> tuple[int, ...]:
        while len(s) > 2 and s[-1] == 1:
            s = s[:-1]
        return s

    if trim(tuple(natural)) == trim(tuple(shape)):
        return True
    return len(natural) == 2 and natural[0] == shape[0] and math.prod(natural) == math.prod(shape)


def dora_axis(magnitude: tuple[int, ...], shape: tuple[int, ...]) -> str | None:
    """Which axis a DoRA magnitude normalises: "out" (one per output row: LyCORIS wd_on_out, PEFT) or "in" (one
    per input column: older LyCORIS, A1111); None if it fits neither. ComfyUI's rule: out when shape[0] agrees."""
    n = math.prod(magnitude)
    if magnitude and magnitude[0] == shape[0] and n == shape[0]:
        return "out"
    if len(magnitude) >= 2 and magnitude[0] == 1 and n == shape[1]:
        return "in"
    return None


def decompose(weight: Tensor, delta: Tensor, magnitude: Tensor, axis: str, multiplier: float) -> Tensor:
    """DoRA (Liu et al. 2024, arXiv:2402.09353): W + m (magnitude (W + dW) / ||W + dW|| - W).

    The norm is of W + dW along `axis`, plus float32's eps (LyCORIS functional/general.py weight_decompose);
    the multiplier m interpolates between the base and the decomposed weight (ComfyUI weight_adapter/base.py;
    at m = 1 both peers give magnitude (W + dW) / ||W + dW||).
    """
    merged = weight + delta
    if axis == "out":
        norm = merged.flatten(1).norm(dim=1).reshape(-1, *[1] * (merged.ndim - 1))
    else:
        norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (merged.ndim - 2))
    decomposed = merged * (magnitude.reshape(norm.shape) / (norm + torch.finfo(torch.float32).eps))
    return decomposed if multiplier == 1 else weight + multiplier * (decomposed - weight)
