"""What an adapter file is, from its tensor names, shapes and metadata: no flag says it.

The naming (kohya, kohya with diffusers names, PEFT, diffusers' old attention-processor names) and
each module's algorithm follow from the keys (`keys.NAMINGS`, `keys.ROLES`); this module adds the
guesses used in messages ("it looks like an SD 1.x LoRA") and PEFT's alpha, which diffusers keeps in
the safetensors metadata rather than in a tensor.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

# Text-context widths of the families a LoRA may have been trained for (cross-attention to_k/to_v input).
CONTEXT_WIDTHS = {
    768: "SD 1.x (768-wide CLIP ViT-L text context)",
    1024: "SD 2.x (1024-wide OpenCLIP ViT-H text context)",
    2048: "SDXL base (2048-wide text context)",
    1280: "the SDXL refiner (1280-wide text context)",
}
# Name fragments of other model families' adapters (kohya, diffusers and ComfyUI spellings).
FAMILIES = (
    (("double_blocks", "single_blocks", "single_transformer_blocks"), "a Flux LoRA"),
    (("joint_blocks", "context_block"), "a Stable Diffusion 3 LoRA"),
    (("lora_transformer_", "transformer.transformer_blocks"), "a LoRA for a transformer (DiT) model, not a U-Net"),
)
_CROSS_ATTENTION_IN = re.compile(r"attn2[._]to_[kv](\.|_lora\.|$)")
_DOWN_ROLES = (".lora_down.weight", ".lora_A.weight", ".hada_w1_b", ".down.weight")
METADATA_BASE = "ss_base_model_version"  # kohya sd-scripts: "sdxl_base_v1-0", "sd_v1", "sd_v2", "flux1", ...


def context_width(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """The text width a LoRA's cross-attention key/value projections take (its down matrix's columns)."""
    for key, shape in shapes.items():
        if key.endswith(_DOWN_ROLES) and _CROSS_ATTENTION_IN.search(key.rsplit(".", 2)[0] + ".") and len(shape) == 2:
            return shape[1]
    return None


def looks_like(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> str:
    """A few words on what model family an adapter file was made for, from its names, shapes and metadata."""
    for fragments, what in FAMILIES:
        if any(f in k for k in shapes for f in fragments):
            return what
    width = context_width(shapes)
    if width is not None:
        return "a LoRA for " + CONTEXT_WIDTHS.get(width, f"a model with {width}-wide text context")
    base = metadata.get(METADATA_BASE)
    if base:
        return f"a LoRA whose metadata names the base model {base!r}"
    if any(k.startswith("lora_te_") for k in shapes):
        return "a LoRA for a model with one text encoder (SD 1.x / 2.x)"
    return "an adapter for another model"


def peft_settings(metadata: Mapping[str, str], component: str) -> dict:
    """A component's LoraConfig fields from diffusers' `lora_adapter_metadata` ({"unet.lora_alpha": 8, ...})."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        fields = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    prefix = component + "."
    return {k[len(prefix):]: v for k, v in fields.items() if k.startswith(prefix)} if isinstance(fields, dict) else {}


def peft_alpha(settings: Mapping, module: str) -> float | None:
    """PEFT's alpha for one module: `alpha_pattern` (matched as PEFT's get_pattern_key does), else `lora_alpha`."""
    for pattern, alpha in (settings.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(alpha)
    alpha = settings.get("lora_alpha")
    return None if alpha is None else float(alpha)


def trigger_words(metadata: Mapping[str, str], limit: int = 10) -> list[str]:
    """The most frequent training tags (kohya `ss_tag_frequency`: {dataset: {tag: count}}), most frequent first."""
    try:
        datasets = json.loads(metadata.get("ss_tag_frequency") or "{}")
    except json.JSONDecodeError:
        return []
    counts: dict[str, int] = {}
    for tags in datasets.values() if isinstance(datasets, dict) else ():
        for tag, n in tags.items() if isinstance(tags, dict) else ():
            counts[tag.strip()] = counts.get(tag.strip(), 0) + (n if isinstance(n, int) else 0)
    return sorted(counts, key=lambda t: -counts[t])[:limit]
