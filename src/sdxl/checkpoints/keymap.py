"""Declarative key maps between a checkpoint format and our module names.

A key map is a list of `Rule`s. Each rule fills one of our tensors from one or more tensors of the
file (and, for saving, splits it back). Tables for repeated layers are built by small functions
that loop over the config, so every format's mapping reads as data, not as string surgery.

`convert` applies a map strictly: every rule's sources must exist, every file tensor must be used
by some rule (or be listed as ignorable), and `check_shapes` compares the result with a model built
on the meta device. Errors name the file and list what was missing or left over.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor


class CheckpointError(ValueError):
    """A checkpoint that is not what it was offered as: bad file, missing or mis-shaped tensors."""


def _single(tensors: list[Tensor]) -> Tensor:
    return tensors[0]


def _unsingle(tensor: Tensor) -> list[Tensor]:
    return [tensor]


@dataclass(frozen=True)
class Rule:
    """Our tensor `target` is `load(file[sources])`; saving writes `save(ours)` to `sources`."""

    target: str
    sources: tuple[str, ...]
    load: Callable[[list[Tensor]], Tensor] = field(default=_single, compare=False)
    save: Callable[[Tensor], list[Tensor]] = field(default=_unsingle, compare=False)


KeyMap = list[Rule]


# ---------------------------------------------------------------------------------------------
# Rule constructors for the cases that occur in SDXL checkpoints.


def rename(target: str, source: str) -> Rule:
    return Rule(target, (source,))


def renamed(pairs: Iterable[tuple[str, str]]) -> KeyMap:
    return [rename(t, s) for t, s in pairs]


def params(target: str, source: str, names: Iterable[str] = ("weight", "bias")) -> KeyMap:
    """`target.weight <- source.weight`, `target.bias <- source.bias` (or other parameter names)."""
    return [rename(f"{target}.{n}", f"{source}.{n}") for n in names]


def fused(target: str, sources: Iterable[str]) -> Rule:
    """One tensor stored as several concatenated along dim 0 (fused q/k/v projections)."""
    sources = tuple(sources)
    n = len(sources)
    return Rule(target, sources, load=lambda ts: torch.cat(ts, 0), save=lambda t: list(t.chunk(n, 0)))


def transposed(target: str, source: str) -> Rule:
    """A matrix stored transposed (OpenCLIP's `text_projection` is used as `x @ P`)."""
    return Rule(target, (source,), load=lambda ts: ts[0].t(), save=lambda t: [t.t()])


def as_linear(target: str, source: str) -> Rule:
    """A 1x1 convolution weight [out, in, 1, 1] stored as a linear weight [out, in] (and back)."""
    return Rule(
        target,
        (source,),
        load=lambda ts: ts[0].reshape(*ts[0].shape, 1, 1) if ts[0].ndim == 2 else ts[0],
        save=lambda t: [t.reshape(t.shape[0], t.shape[1])],
    )


def prefixed(rules: KeyMap, target_prefix: str = "", source_prefix: str = "") -> KeyMap:
    """The same map for a component stored under other prefixes."""
    return [
        Rule(target_prefix + r.target, tuple(source_prefix + s for s in r.sources), r.load, r.save)
        for r in rules
    ]


# ---------------------------------------------------------------------------------------------
# Applying a map.


def _listing(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def convert(
    tensors: Mapping[str, Tensor],
    rules: KeyMap,
    *,
    where: str,
    ignore: Iterable[str] = (),
    allow_unused: bool = False,
    finish: Callable[[str, Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """Apply `rules` to `tensors` (a file's name -> tensor mapping, possibly lazy).

    `ignore` holds regular expressions for file entries that are not weights (buffers such as
    `position_ids`); anything else the rules don't use is an error unless `allow_unused`. `finish(target,
    tensor)` is applied to each result as it is made (a dtype conversion, a quantisation), so that no more than
    one tensor exists in the file's form at a time.
    """
    needed = {s for r in rules for s in r.sources}
    missing = needed - set(tensors.keys())
    if missing:
        raise CheckpointError(f"{where}: missing {len(missing)} tensor(s): {_listing(missing)}")
    if not allow_unused:
        ignored = [re.compile(p) for p in ignore]
        unused = {k for k in tensors.keys() if k not in needed and not any(p.fullmatch(k) for p in ignored)}
        if unused:
            raise CheckpointError(f"{where}: {len(unused)} unexpected tensor(s): {_listing(unused)}")
    out = {}
    for r in rules:
        parts = [tensors[s] for s in r.sources]
        try:
            out[r.target] = r.load(parts) if finish is None else finish(r.target, r.load(parts))
        except RuntimeError:  # e.g. q/k/v of different widths cannot be fused
            shapes = ", ".join(f"{s} {tuple(t.shape)}" for s, t in zip(r.sources, parts))
            raise CheckpointError(f"{where}: tensor(s) of the wrong shape: {shapes}") from None
    return out


def invert(state: Mapping[str, Tensor], rules: KeyMap) -> dict[str, Tensor]:
    """Our state dict -> the file's names (for saving in a format)."""
    out = {}
    for r in rules:
        for name, t in zip(r.sources, r.save(state[r.target]), strict=True):
            out[name] = t.contiguous()
    return out


def check_covers(rules: KeyMap, module: torch.nn.Module, *, where: str) -> None:
    """The map fills exactly the module's state dict (a bug in a table, not in a user's file)."""
    targets = [r.target for r in rules]
    expected = set(module.state_dict().keys())
    dup = {t for t in targets if targets.count(t) > 1}
    missing, extra = expected - set(targets), set(targets) - expected
    if dup or missing or extra:
        raise AssertionError(
            f"{where}: key map does not match the model: duplicate {_listing(dup)}; "
            f"unfilled {_listing(missing)}; unknown {_listing(extra)}"
        )


def check_shapes(
    state: Mapping[str, Tensor], module: torch.nn.Module, *, where: str, rules: KeyMap | None = None
) -> None:
    """Every converted tensor has the shape the module (built from the config) expects.

    With `rules`, errors name the file's tensors rather than ours.
    """
    expected = module.state_dict()
    names = {r.target: " + ".join(r.sources) for r in rules or []}
    bad = [
        f"{names.get(k, k)}: file {tuple(v.shape)}, model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if bad:
        raise CheckpointError(f"{where}: {len(bad)} tensor(s) have the wrong shape: " + "; ".join(bad[:5]))
