"""SDXL's conditioning: prompts -> (context, pooled), micro-conditioning -> y, and guidance's negative half.

context = cat(CLIP ViT-L hidden states, OpenCLIP bigG hidden states) at the penultimate layer
(B, 77, 768 + 1280; the refiner has bigG only, 1280), with no final layer norm. y = bigG's projected
pooled output + sinusoidal embeddings of the micro-conditioning numbers: original (h, w), crop (top,
left), target (h, w) for the base (6 values); original (h, w), crop (top, left), aesthetic score for
the refiner (5 values). With guidance, the negative prompt's conditioning is computed the same way,
or is all zeros when the negative prompts are empty and the model asks for that
(`force_zeros_for_empty_prompt`: the official base does, the refiner does not).

Generation (`sdxl.pipeline`) and training (`sdxl.training.train`) both condition through here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .acceleration import execution_device
from .models.specs import Components
from .models.tokenizer import clip_g_tokenizer, clip_l_tokenizer
from .models.unet import UNetConfig, micro_conditioning
from .options import GenerationOptions

__all__ = ["Conditioning", "PromptCache", "conditioning", "encode_prompts", "micro_value_count", "micro_values"]

PENULTIMATE = -2  # SDXL conditions on the penultimate layer of both text encoders


def encode_prompts(
    text_encoder, text_encoder_2, prompts: Sequence[str], prompts_2: Sequence[str], *,
    hidden_layer: int = PENULTIMATE, device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """SDXL's text conditioning: (context (B, 77, 768 + 1280 or 1280), pooled bigG (B, 1280)).

    context = cat(CLIP ViT-L hidden[hidden_layer] of `prompts`, bigG hidden[hidden_layer] of
    `prompts_2`) with no final layer norm; `text_encoder` is None for the refiner (bigG only).
    """
    hidden = []
    if text_encoder is not None:
        h, _ = text_encoder(clip_l_tokenizer()(list(prompts)).to(execution_device(text_encoder)),
                            hidden_layer=hidden_layer, pooled=False)
        hidden.append(h)
    h2, pooled = text_encoder_2(clip_g_tokenizer()(list(prompts_2)).to(execution_device(text_encoder_2)),
                                hidden_layer=hidden_layer, pooled=True)
    device = device or h2.device
    return torch.cat([h.to(device) for h in (*hidden, h2)], dim=-1), pooled.to(device)


def micro_value_count(config: UNetConfig, pooled_width: int) -> int:
    """How many micro-conditioning numbers the U-Net's y holds: 6 (base) or 5 (refiner); ValueError otherwise."""
    d = config.addition_time_embed_dim
    n = (config.adm_in_channels - pooled_width) // d
    if n * d + pooled_width != config.adm_in_channels or n not in (5, 6):
        raise ValueError(f"U-Net label input of width {config.adm_in_channels} does not fit pooled text of "
                         f"width {pooled_width} plus 5 or 6 micro-conditioning values of width {d}")
    return n


def micro_values(n: int, original: tuple[int, int], crop: tuple[int, int], target: tuple[int, int],
                 aesthetic_score: float) -> list[float]:
    """The n = 6 (base: original, crop, target) or 5 (refiner: original, crop, aesthetic score) numbers of y."""
    return [*original, *crop, *target] if n == 6 else [*original, *crop, aesthetic_score]


@dataclass
class Conditioning:
    """What the U-Net is conditioned on for one stage of a run."""

    context: Tensor  # (B or 2B, 77, C): negative rows first when guided
    y: Tensor  # (B or 2B, adm)
    guided: bool


class PromptCache:
    """(context (1, 77, C), pooled (1, P)) of recent prompt pairs: repeated prompts are encoded once."""

    def __init__(self, size: int = 16):
        self.size = size
        self.entries: OrderedDict = OrderedDict()  # key -> (context, pooled), oldest first

    def encode(self, parts: Components, prompt: str, prompt_2: str, hidden_layer: int) -> tuple[Tensor, Tensor]:
        key = (id(parts), id(parts.text_encoder), id(parts.text_encoder_2), prompt, prompt_2, hidden_layer)
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        result = encode_prompts(parts.text_encoder, parts.text_encoder_2, [prompt], [prompt_2],
                                hidden_layer=hidden_layer, device=execution_device(parts.unet))
        self.entries[key] = result
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return result


def conditioning(parts: Components, o: GenerationOptions, width: int, height: int, cache: PromptCache) -> Conditioning:
    """The conditioning of `parts`' U-Net for options `o` at an output size of width x height."""
    hidden_layer = PENULTIMATE - (o.clip_skip or 0)
    context, pooled = cache.encode(parts, o.prompt, o.prompt_2 or o.prompt, hidden_layer)
    config = parts.unet.config
    n = micro_value_count(config, pooled.shape[-1])
    original, target = o.original_size or (height, width), o.target_size or (height, width)
    y = micro_conditioning(pooled, micro_values(n, original, o.crop_top_left, target, o.aesthetic_score),
                           dim=config.addition_time_embed_dim)
    b = o.batch
    context, y = context.expand(b, -1, -1), y.expand(b, -1)
    if not o.cfg > 1.0:
        return Conditioning(context, y, False)

    neg_2 = o.negative_prompt_2 or o.negative_prompt
    if parts.force_zeros_for_empty_prompt and not o.negative_prompt and not neg_2:
        neg_context, neg_pooled = torch.zeros_like(context[:1]), torch.zeros_like(pooled)
    else:
        neg_context, neg_pooled = cache.encode(parts, o.negative_prompt, neg_2, hidden_layer)
    neg_values = micro_values(n, o.negative_original_size or original, o.negative_crop_top_left or o.crop_top_left,
                              o.negative_target_size or target, o.negative_aesthetic_score)
    neg_y = micro_conditioning(neg_pooled, neg_values, dim=config.addition_time_embed_dim)
    return Conditioning(torch.cat([neg_context.expand(b, -1, -1), context]), torch.cat([neg_y.expand(b, -1), y]), True)
