"""Adapter names as data: which name in a LoRA / LyCORIS / PEFT file means which of our tensors.

Nothing here is written by hand per layer: every name comes from the checkpoint key tables
(`checkpoints.unet_keys`, `checkpoints.clip_keys`), read both ways, for reading files and for the
trainer's writer. A key table's rule fills one of our tensors from one or more of a layout's
`<module>.weight` tensors; an adapter names the same module, spelled by its *naming*:

    naming                   U-Net                               text encoders (transformers' CLIP names)
    kohya (sd-scripts)       lora_unet_ + sgm name, "." -> "_"     lora_te1_ / lora_te2_ + name, "." -> "_"
    kohya (diffusers names)  lora_unet_ + diffusers name, "." -> "_"  (as kohya)
    PEFT (diffusers)         unet. + diffusers name                  text_encoder. / text_encoder_2. + name

The file's tensor for a module is `<stem>.<role>` (`lora_down.weight`, `hada_w1_a`, `lora_A.weight`,
...; `ROLES`). Our tensor is `rule.target`; the module's weight in the file's layout is
`rule.save(ours)[index]`, a view (fused q/k/v: a third of `in_proj_weight`; bigG's
`text_projection`: its transpose), so an update computed in the file's layout is added in place.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..checkpoints import clip_keys, unet_keys
from ..checkpoints.keymap import KeyMap, Rule

ADAPTED = ("unet", "text_encoder", "text_encoder_2")  # the components adapters change
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class Target:
    """One module an adapter can change: its weight is source `index` of `weight` (our tensor `weight.target`)."""

    component: str  # "unet", "text_encoder" or "text_encoder_2"
    module: str  # the module's name in the naming's layout (sgm, diffusers or transformers), unprefixed
    weight: Rule
    index: int
    bias: Rule | None = None  # the rule that fills the module's bias, for full (`diff_b`) updates
    bias_index: int = 0

    @property
    def ours(self) -> str:
        """Our name of the tensor the weight lives in (`...attn.in_proj_weight` for a q/k/v projection)."""
        return self.weight.target


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: the four below are the only ones
class Naming:
    """How one family of files spells the modules of each component."""

    name: str
    prefixes: Mapping[str, str]  # component -> stem prefix
    separator: str  # what "." becomes in a stem
    tables: Mapping[str, Callable[[object], KeyMap]]  # component -> key table of the layout it names

    def stem(self, component: str, module: str) -> str:
        return self.prefixes[component] + module.replace(".", self.separator)


def _transformers(config) -> KeyMap:
    return clip_keys.transformers_clip_keys(config, prefix="text_model.")


_CLIP = {"text_encoder": _transformers, "text_encoder_2": _transformers}
KOHYA = Naming("kohya", {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}, "_",
               {"unet": unet_keys.official_unet_keys, **_CLIP})
KOHYA_DIFFUSERS = Naming("kohya (diffusers names)", {"unet": "lora_unet_"}, "_",
                         {"unet": unet_keys.diffusers_unet_keys})
PEFT = Naming("PEFT", {"unet": "unet.", "text_encoder": "text_encoder.", "text_encoder_2": "text_encoder_2."}, ".",
              {"unet": unet_keys.diffusers_unet_keys, **_CLIP})
NAMINGS = (KOHYA, KOHYA_DIFFUSERS, PEFT)

# The tensors of one module in a file: role (the key's suffix after the stem) -> (algorithm, our short name).
# Algorithm None: a role that any algorithm may carry. Sources: kohya sd-scripts networks/lora.py, LyCORIS
# lycoris/modules/{locon,loha,lokr,full}.py, PEFT tuners/lora (lora_A/B, DoRA's lora_magnitude_vector).
ROLES: dict[str, tuple[str | None, str]] = {
    "lora_down.weight": ("lora", "down"), "lora_up.weight": ("lora", "up"), "lora_mid.weight": ("lora", "mid"),
    "lora_A.weight": ("lora", "down"), "lora_B.weight": ("lora", "up"),
    "hada_w1_a": ("loha", "w1a"), "hada_w1_b": ("loha", "w1b"), "hada_w2_a": ("loha", "w2a"),
    "hada_w2_b": ("loha", "w2b"), "hada_t1": ("loha", "t1"), "hada_t2": ("loha", "t2"),
    "lokr_w1": ("lokr", "w1"), "lokr_w1_a": ("lokr", "w1a"), "lokr_w1_b": ("lokr", "w1b"),
    "lokr_w2": ("lokr", "w2"), "lokr_w2_a": ("lokr", "w2a"), "lokr_w2_b": ("lokr", "w2b"), "lokr_t2": ("lokr", "t2"),
    "diff": ("full", "diff"), "diff_b": ("full", "diff_b"),
    "alpha": (None, "alpha"), "dora_scale": (None, "dora"),
    "lora_magnitude_vector": (None, "dora"), "lora_magnitude_vector.weight": (None, "dora"),
}
_ROLES_LONGEST_FIRST = sorted(ROLES, key=len, reverse=True)

# diffusers' names before PEFT (attention processors, `LoRACompatibleLinear`, text-encoder monkey patches) ->
# PEFT names, as diffusers itself converts them (diffusers utils/state_dict_utils.py UNET_TO_DIFFUSERS,
# DIFFUSERS_OLD_TO_PEFT).
OLD_DIFFUSERS = (
    (re.compile(r"\.processor\.to_(q|k|v)_lora\.(down|up)\.weight$"), r".to_\1.lora_\2.weight"),
    (re.compile(r"\.processor\.to_out_lora\.(down|up)\.weight$"), r".to_out.0.lora_\1.weight"),
    (re.compile(r"\.self_attn\.to_(q|k|v)_lora\.(down|up)\.weight$"), r".self_attn.\1_proj.lora_\2.weight"),
    (re.compile(r"\.self_attn\.to_out_lora\.(down|up)\.weight$"), r".self_attn.out_proj.lora_\1.weight"),
    (re.compile(r"\.(?:lora|lora_linear_layer)\.(down|up)\.weight$"), r".lora_\1.weight"),
)


def modern_name(key: str) -> str:
    """A key in diffusers' old LoRA names -> the same tensor's PEFT-naming key (`.lora_down/up.weight` roles)."""
    for pattern, replacement in OLD_DIFFUSERS:
        if pattern.search(key):
            return pattern.sub(replacement, key)
    return key


def split_key(key: str) -> tuple[str, str] | None:
    """`<stem>.<role>` -> (stem, role); None when the key ends in no known role."""
    for role in _ROLES_LONGEST_FIRST:
        if key.endswith("." + role):
            return key[: -len(role) - 1], role
    return None


def targets(rules: KeyMap, component: str) -> dict[str, Target]:
    """Layout module name -> Target, for every rule that reads a layout's `<module>.weight`."""
    biases = {s.removesuffix(".bias"): (r, i) for r in rules for i, s in enumerate(r.sources) if s.endswith(".bias")}
    out = {}
    for rule in rules:
        for i, source in enumerate(rule.sources):
            if source.endswith(".weight"):
                module = source.removesuffix(".weight")
                bias, bias_index = biases.get(module, (None, 0))
                out[module] = Target(component, module, rule, i, bias, bias_index)
    return out


@functools.lru_cache(maxsize=16)
def _component_stems(naming: Naming, component: str, config) -> dict[str, Target]:
    found = targets(naming.tables[component](config), component)
    return {naming.stem(component, module): t for module, t in found.items()}


def stems(configs: Mapping[str, object]) -> dict[str, tuple[Naming, Target]]:
    """Every stem any naming gives a module of these models (component -> config) -> (naming, target)."""
    out: dict[str, tuple[Naming, Target]] = {}
    for naming in NAMINGS:
        for component, config in configs.items():
            if component in naming.tables:
                for stem, target in _component_stems(naming, component, config).items():
                    out.setdefault(stem, (naming, target))
    return out


def stems_of(naming: Naming, component: str, config) -> dict[str, str]:
    """Our weight name -> its stem in `naming` (for writers); only single-source weights (no q/k/v parts)."""
    found = _component_stems(naming, component, config)
    return {t.ours: stem for stem, t in found.items() if len(t.weight.sources) == 1}
