"""Reading adapter files (LoRA, LoCon, LoHa, LoKr, full, DoRA; kohya, PEFT and old diffusers names) strictly.

    adapter = read_adapter("style.safetensors", components)   # parsed and checked against the models' shapes
    print(adapter.summary())

Only names and shapes are read here (plus the scalar alphas); the factors stay in the memory-mapped
file until `apply` merges them. As with checkpoints, a file for another model is refused with one
line (the file, what it looks like, how many keys matched); a file of which only some keys name
layers of the model loads the rest, with one warning that lists the others.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoints.files import open_tensors
from ..checkpoints.keymap import CheckpointError
from ..models import specs
from ..models.specs import Components, ModelSpec
from .algorithms import DELTAS, alpha_rank, alpha_scale, dora_axis, fits, missing
from .formats import METADATA_BASE, looks_like, peft_alpha, peft_settings, trigger_words
from .keys import ADAPTED, PEFT, ROLES, Naming, Target, modern_name, split_key, stems
from .slots import Slot


class AdapterWarning(UserWarning):
    """An adapter file of which some tensors name nothing in the model (they are skipped)."""


@dataclass(frozen=True)
class Patch:
    """One module's update in an adapter file."""

    stem: str
    naming: str
    target: Target
    algorithm: str  # "lora" (also LoCon and CP/Tucker LoRA), "loha", "lokr" or "full"
    keys: Mapping[str, str]  # short name ("down", "w1a", "dora", ...) -> the file's key
    scale: float  # alpha / rank, or 1 (see algorithms)
    alpha: float | None
    rank: int | None
    dora_axis: str | None = None  # "out" / "in" for weight-decomposed (DoRA) updates


@dataclass
class Adapter:
    """A parsed adapter file, checked against the models it was read for."""

    path: Path
    name: str  # ss_output_name, else the file's stem (how prompts name it)
    patches: list[Patch]
    unmatched: list[str]  # file keys that name nothing in the models (skipped)
    metadata: dict[str, str]
    tensors: Mapping[str, Tensor] = field(repr=False)
    keys: int = 0  # tensors in the file

    @property
    def touches(self) -> dict[str, int]:
        """component -> modules changed (U-Net, then the text encoders)."""
        counts = _count(p.target.component for p in self.patches)
        return {c: counts[c] for c in ADAPTED if c in counts}

    @property
    def namings(self) -> list[str]:
        return sorted({p.naming for p in self.patches})

    def summary(self) -> str:
        return describe(self)


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def _listing(names, limit: int = 6) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def adapted_models(components: Components) -> dict[str, nn.Module]:
    """The models adapters can change, by component name."""
    return {name: m for name, m in components.models().items() if name in ADAPTED}


OLD_NAMES = "diffusers (attention processors)"  # how summaries call diffusers' names before PEFT


def _group(keys) -> tuple[dict[str, dict[str, str]], list[str], set[str]]:
    """stem -> {role: file key}; the keys with no known role; the stems spelled in diffusers' old names."""
    groups: dict[str, dict[str, str]] = {}
    loose, old = [], set()
    for key in keys:
        modern = modern_name(key)
        split = split_key(modern)
        if split is None:
            loose.append(key)
            continue
        groups.setdefault(split[0], {})[split[1]] = key
        if modern != key:
            old.add(split[0])
    return groups, loose, old


def _file_shape(target: Target, model: nn.Module) -> tuple[int, ...]:
    """The module's weight shape in the layout the naming names (ours through the rule's save)."""
    ours = torch.empty(Slot(model, target.ours).shape, device="meta")
    return tuple(target.weight.save(ours)[target.index].shape)


def _bias_shape(target: Target, model: nn.Module) -> tuple[int, ...] | None:
    if target.bias is None:
        return None
    ours = torch.empty(Slot(model, target.bias.target).shape, device="meta")
    return tuple(target.bias.save(ours)[target.bias_index].shape)


def _alpha(names: dict[str, str], tensors, naming: Naming, target: Target, metadata: Mapping[str, str]) -> float | None:
    if "alpha" in names:  # 0 means "no scaling", as in kohya networks/lora.py and LyCORIS
        return float(tensors[names["alpha"]].float()) or None
    if naming is PEFT:
        return peft_alpha(peft_settings(metadata, target.component), target.module)
    return None


def _check(algorithm: str, names: dict[str, str], tensors, target: Target,
           model: nn.Module) -> tuple[str | None, str | None]:
    """(problem, DoRA axis): a shape that does not fit the module, in words, else None."""
    shapes = {n: tuple(tensors.shape(k)) for n, k in names.items()}
    weight_shape = _file_shape(target, model)
    factors = {n: torch.empty(s, device="meta") for n, s in shapes.items() if n not in ("alpha", "dora", "diff_b")}
    if algorithm != "full" or "diff" in factors:
        try:
            natural = tuple(DELTAS[algorithm](factors).shape)
        except RuntimeError:
            return f"factors of shapes {shapes} do not multiply", None
        if not fits(natural, weight_shape):
            return f"adapter {natural}, model {weight_shape}", None
    if "diff_b" in shapes and shapes["diff_b"] != _bias_shape(target, model):
        return f"bias adapter {shapes['diff_b']}, model {_bias_shape(target, model)}", None
    if "dora" not in shapes:
        return None, None
    axis = dora_axis(shapes["dora"], weight_shape)
    return (None, axis) if axis else (f"DoRA magnitude {shapes['dora']} for a weight {weight_shape}", None)


def _patch(stem: str, roles: dict[str, str], naming: Naming, target: Target, tensors, model: nn.Module,
           metadata: Mapping[str, str]) -> Patch | str:
    """The module's Patch, or a one-line reason why its tensors do not fit it."""
    kinds = {ROLES[r][0] for r in roles} - {None}
    if len(kinds) != 1:
        return f"{stem}: {'mixes ' + ' and '.join(sorted(kinds)) if kinds else 'has no weights'} ({_listing(roles)})"
    algorithm = kinds.pop()
    names = {ROLES[r][1]: key for r, key in roles.items()}
    lacking = missing(algorithm, set(names))
    if lacking:
        return f"{stem}: {algorithm} without {', '.join(lacking)}"
    problem, axis = _check(algorithm, names, tensors, target, model)
    if problem:
        return f"{stem}: {problem}"
    alpha = _alpha(names, tensors, naming, target, metadata)
    rank = alpha_rank(algorithm, {n: tuple(tensors.shape(k)) for n, k in names.items()})
    rs = naming is PEFT and bool(peft_settings(metadata, target.component).get("use_rslora"))
    return Patch(stem, naming.name, target, algorithm, names, alpha_scale(alpha, rank, rs), alpha, rank, axis)


@dataclass
class Parsed:
    patches: list[Patch]
    unmatched: list[str]
    mismatched: list[str]  # one line per module whose tensors do not fit
    matched_keys: int


def parse(tensors, models: Mapping[str, nn.Module]) -> Parsed:
    """Match an opened adapter file's tensors to `models` (component -> model)."""
    metadata = getattr(tensors, "metadata", {}) or {}
    index = stems({name: model.config for name, model in models.items()})
    groups, unmatched, old = _group(tensors)
    patches, mismatched, matched = [], [], 0
    for stem, roles in groups.items():
        if stem not in index:
            unmatched += roles.values()
            continue
        naming, target = index[stem]
        result = _patch(stem, roles, naming, target, tensors, models[target.component], metadata)
        if isinstance(result, str):
            mismatched.append(result)
        else:
            patches.append(replace(result, naming=OLD_NAMES) if stem in old else result)
            matched += len(roles)
    return Parsed(patches, unmatched, mismatched, matched)


def _refusal(path: Path, tensors, parsed: Parsed) -> str:
    shapes = {k: tuple(tensors.shape(k)) for k in tensors}
    what = looks_like({modern_name(k): s for k, s in shapes.items()}, getattr(tensors, "metadata", {}) or {})
    line = (f"{path}: not an adapter for this model: it looks like {what}; "
            f"{parsed.matched_keys} of {len(shapes)} keys match")
    if parsed.mismatched:
        line += f", {len(parsed.mismatched)} module(s) do not fit (e.g. {parsed.mismatched[0]})"
    elif parsed.unmatched:
        line += f" (e.g. {_listing(parsed.unmatched, 3)})"
    return line


def read_adapter(path: str | Path, components: Components) -> Adapter:
    """Open and check an adapter file for `components` (CheckpointError if it is for another model)."""
    path = Path(path)
    tensors = open_tensors(path)
    parsed = parse(tensors, adapted_models(components))
    if parsed.mismatched or not parsed.patches:
        raise CheckpointError(_refusal(path, tensors, parsed))
    if parsed.unmatched:
        warnings.warn(AdapterWarning(
            f"{path}: {len(parsed.unmatched)} of {len(tensors)} tensors name nothing in this model and are skipped: "
            + _listing(parsed.unmatched)), stacklevel=2)
    metadata = dict(getattr(tensors, "metadata", {}) or {})
    return Adapter(path, metadata.get("ss_output_name") or path.stem, parsed.patches, parsed.unmatched, metadata,
                   tensors, len(tensors))


def output_name(path: str | Path) -> str:
    """The name an adapter calls itself (kohya `ss_output_name`), else its file name without the suffix."""
    path = Path(path)
    metadata = getattr(open_tensors(path), "metadata", {}) or {}
    return metadata.get("ss_output_name") or path.stem


@functools.lru_cache(maxsize=2)
def meta_components(spec: ModelSpec = specs.BASE) -> Components:
    """A spec's adapted models on the meta device (shapes without memory), to describe files without a model."""
    with torch.device("meta"):
        return Components(kind=spec.kind, **{name: specs.MODEL_CLASSES[name](getattr(spec, name))
                                             for name in ADAPTED if getattr(spec, name) is not None})


def describe(adapter: Adapter) -> str:
    """A one-screen summary: format, algorithms, ranks and alphas, what it touches, its base model and tags."""
    p, m = adapter.patches, adapter.metadata
    ranks = ", ".join(map(str, sorted({x.rank for x in p if x.rank is not None}))) or "-"
    alphas = ", ".join(f"{a:g}" for a in sorted({x.alpha for x in p if x.alpha is not None})) or "none (scale 1)"
    algos = _count(x.algorithm + (" + DoRA" if x.dora_axis else "") for x in p)
    lines = [f"{adapter.path}: adapter {adapter.name!r} ({', '.join(adapter.namings)} names)",
             "  algorithm   " + ", ".join(f"{a} x {n}" for a, n in sorted(algos.items())),
             f"  rank        {ranks}   alpha {alphas}",
             "  touches     " + ", ".join(f"{c} ({n} modules)" for c, n in adapter.touches.items())]
    if m.get(METADATA_BASE):
        lines.append(f"  base model  {m[METADATA_BASE]}")
    if m.get("ss_network_module"):
        dim, alpha = m.get("ss_network_dim", "?"), m.get("ss_network_alpha", "?")
        lines.append(f"  trained by  {m['ss_network_module']} (dim {dim}, alpha {alpha})")
    tags = trigger_words(m)
    if tags:
        lines.append("  tags        " + ", ".join(tags))
    if adapter.unmatched:
        skipped = _listing(adapter.unmatched, 3)
        lines.append(f"  skipped     {len(adapter.unmatched)} tensors that name nothing in the model: {skipped}")
    return "\n".join(lines)


def describe_adapter(path: str | Path, components: Components | None = None) -> str:
    """`sdxl info FILE` for an adapter: its summary against `components` (default: the official SDXL base's shapes,
    else the refiner's). CheckpointError, with the one-line reason, for a file that is not an adapter for them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AdapterWarning)  # the summary lists the skipped tensors itself
        if components is not None:
            return describe(read_adapter(path, components))
        try:
            return describe(read_adapter(path, meta_components(specs.BASE)))
        except CheckpointError as base_error:
            try:
                return describe(read_adapter(path, meta_components(specs.REFINER))) + "\n  fits        the SDXL refiner"
            except CheckpointError:
                raise base_error from None
