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

import math
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .acceleration import execution_device
from .models.specs import Components
from .models.tokenizer import EOT, SOT, clip_g_tokenizer, clip_l_tokenizer
from .prompts import parse_attention, schedule
from .models.unet import UNetConfig, micro_conditioning
from .options import EMPHASIS, GenerationOptions

__all__ = ["EMPHASIS", "Chunk", "Conditioning", "PromptCache", "conditioning", "encode_chunks", "encode_prompt",
           "encode_prompts", "micro_value_count", "micro_values", "prompt_chunks",
           "scheduled_conditioning"]

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


# ---------------------------------------------------------------------------------------------
# Weighted and long prompts, as AUTOMATIC1111 encodes them (`sd_hijack_clip.py`, v1.10; re-implemented).
#
# The prompt's fragments (sdxl.prompts.parse_attention) are tokenized one by one and laid out in chunks of
# 75 tokens, each encoded apart as [start, 75 tokens, end] and concatenated: context (1, 77 k, C). A chunk that
# fills up within 20 tokens of a comma moves what follows the comma to the next chunk; BREAK starts a new one.
# Each token's hidden state is scaled by its weight; "original" (A1111's default) then restores the chunk's
# mean, "no_norm" does not, "comfy" is ComfyUI's reading (h_empty + w (h - h_empty)), "none" takes the text
# literally. The pooled output is the first bigG chunk's, unweighted. A prompt without syntax that fits in
# 75 tokens gives exactly the single-chunk conditioning of `encode_prompts`.

CHUNK = 75  # prompt tokens per chunk (77 with the start and end tokens)
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default
COMMA = 267  # ",</w>"
_EMBEDDING_TAG = re.compile(r"(?<!\S)embedding:([^\s,]+)")  # ComfyUI's way of naming one


@dataclass
class Chunk:
    """77 token ids (start, 75, end) with one weight each, and where embeddings' vectors go."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, object]] = field(default_factory=list)  # (token offset, embedding)


class _Chunker:
    """Lays out tokens in chunks, A1111's `tokenize_line`."""

    def __init__(self):
        self.chunks: list[Chunk] = []
        self.chunk = Chunk()
        self.last_comma = -1

    def close(self) -> None:
        c = self.chunk
        pad = CHUNK - len(c.tokens)
        c.tokens = [SOT, *c.tokens, *[EOT] * pad, EOT]
        c.weights = [1.0, *c.weights, *[1.0] * pad, 1.0]
        c.fixes = [(offset + 1, emb) for offset, emb in c.fixes]
        self.chunks.append(c)
        self.chunk, self.last_comma = Chunk(), -1

    def make_room(self, token: int) -> None:
        """Before `token` goes in: note a comma, move the words after a recent comma on when the chunk is full."""
        c = self.chunk
        if token == COMMA:
            self.last_comma = len(c.tokens)
        elif len(c.tokens) == CHUNK and self.last_comma != -1 and CHUNK - self.last_comma <= COMMA_BACKTRACK:
            cut = self.last_comma + 1
            moved_tokens, moved_weights = c.tokens[cut:], c.weights[cut:]
            c.tokens, c.weights = c.tokens[:cut], c.weights[:cut]
            self.close()
            self.chunk.tokens, self.chunk.weights = moved_tokens, moved_weights
        if len(self.chunk.tokens) == CHUNK:
            self.close()

    def add(self, token: int, weight: float) -> None:
        self.chunk.tokens.append(token)
        self.chunk.weights.append(weight)

    def embed(self, embedding, weight: float) -> None:
        n = embedding.vectors
        if n > CHUNK:
            raise ValueError(f"embedding {embedding.name!r} has {n} vectors; a chunk holds {CHUNK}")
        if len(self.chunk.tokens) + n > CHUNK:
            self.close()
        self.chunk.fixes.append((len(self.chunk.tokens), embedding))
        self.chunk.tokens += [0] * n
        self.chunk.weights += [weight] * n


class _EmbeddingIndex:
    """Embeddings found in token ids by their names' tokens, longest first (A1111's `find_embedding_at_position`).

    Only the names are read up front: an embedding's vectors are taken from the mapping when a prompt uses it."""

    def __init__(self, embeddings: Mapping[str, object]):
        tokenizer = clip_l_tokenizer()
        self.embeddings = embeddings
        self.by_first: dict[int, list[tuple[list[int], str]]] = {}
        for name in embeddings:
            ids = tokenizer.encode(name)
            if ids:
                self.by_first.setdefault(ids[0], []).append((ids, name))
        for candidates in self.by_first.values():
            candidates.sort(key=lambda c: -len(c[0]))

    def at(self, tokens: list[int], i: int) -> tuple[object | None, int]:
        for ids, name in self.by_first.get(tokens[i], ()):
            if tokens[i:i + len(ids)] == ids:
                return self.embeddings[name], len(ids)
        return None, 1


def _named_embeddings(text: str, embeddings: Mapping[str, object]) -> str:
    """`embedding:NAME` (ComfyUI) -> NAME, which the chunker then finds; an unknown name is an error."""
    def name(m: re.Match) -> str:
        wanted = m.group(1)
        stem = wanted.rsplit("/", 1)[-1].removesuffix(".safetensors").removesuffix(".pt")
        if stem not in embeddings:
            known = ", ".join(sorted(embeddings)) or "none are loaded"
            raise ValueError(f"embedding:{wanted}: no such embedding (known: {known})")
        return stem
    return _EMBEDDING_TAG.sub(name, text)


def prompt_chunks(text: str, *, emphasis: str = "original",
                  embeddings: Mapping[str, object] | None = None) -> list[Chunk]:
    """The chunks `text` is encoded in (see above). embeddings: name -> `sdxl.adapters.embeddings.Embedding`."""
    if emphasis not in EMPHASIS:
        raise ValueError(f"unknown emphasis {emphasis!r}; choose one of {', '.join(EMPHASIS)}")
    embeddings = embeddings or {}
    if embeddings:
        text = _named_embeddings(text, embeddings)
    fragments = [[text, 1.0]] if emphasis == "none" else parse_attention(text)
    index = _EmbeddingIndex(embeddings) if embeddings else None
    tokenizer, chunker = clip_l_tokenizer(), _Chunker()
    for fragment, weight in fragments:
        if weight == -1 and fragment == "BREAK":
            chunker.close()
            continue
        tokens = tokenizer.encode(fragment)
        i = 0
        while i < len(tokens):
            chunker.make_room(tokens[i])
            emb, n = index.at(tokens, i) if index else (None, 1)
            if emb is None:
                chunker.add(tokens[i], weight)
            else:
                chunker.embed(emb, weight)
            i += n
    if chunker.chunk.tokens or not chunker.chunks:
        chunker.close()
    return chunker.chunks


def _weighted(hidden: Tensor, weights: Tensor, emphasis: str, empty: Tensor | None) -> Tensor:
    """Hidden states (n, 77, W) of n chunks scaled by their tokens' weights (n, 77)."""
    w = weights.to(hidden)[..., None]
    if emphasis == "comfy":  # only where a weight is set, as ComfyUI
        return torch.where(w != 1, empty + (hidden - empty) * w, hidden)
    scaled = hidden * w
    if emphasis == "original":  # each chunk keeps its mean
        dims = (1, 2)
        scaled = scaled * (hidden.mean(dim=dims, keepdim=True) / scaled.mean(dim=dims, keepdim=True))
    return scaled


def encode_chunks(encoder, chunks: list[Chunk], *, which: str, hidden_layer: int, pooled: bool,
                  emphasis: str = "original") -> tuple[Tensor, Tensor | None]:
    """(hidden (1, 77 n, W), pooled of the first chunk or None) of one encoder ("clip_l" or "clip_g")."""
    device = execution_device(encoder)
    tokens = torch.tensor([c.tokens for c in chunks], dtype=torch.int64)
    if which == "clip_g":  # bigG pads with 0 after the first end token (open_clip)
        ends = (tokens == EOT).int().argmax(dim=1, keepdim=True)
        tokens = torch.where(torch.arange(tokens.shape[1]) > ends, torch.zeros_like(tokens), tokens)
    tokens = tokens.to(device)
    embeds = None
    if any(c.fixes for c in chunks):
        embeds = encoder.token_embedding(tokens)
        for row, chunk in enumerate(chunks):
            for offset, emb in chunk.fixes:
                vectors = getattr(emb, which)
                embeds[row, offset:offset + len(vectors)] = vectors.to(embeds)
    hidden, pool = encoder(tokens, hidden_layer=hidden_layer, pooled=pooled, token_embeds=embeds)
    weights = torch.tensor([c.weights for c in chunks])
    if emphasis != "none" and bool((weights != 1).any()):
        empty = None
        if emphasis == "comfy":
            blank = Chunk([SOT, *[EOT] * (CHUNK + 1)], [1.0] * (CHUNK + 2))
            empty, _ = encode_chunks(encoder, [blank], which=which, hidden_layer=hidden_layer, pooled=False,
                                     emphasis="none")
        hidden = _weighted(hidden, weights.to(hidden.device), emphasis, empty)
    return hidden.reshape(1, -1, hidden.shape[-1]), (pool[:1] if pool is not None else None)


def encode_prompt(parts: Components, text: str, text_2: str, *, hidden_layer: int = PENULTIMATE,
                  emphasis: str = "original", embeddings: Mapping[str, object] | None = None) -> tuple[Tensor, Tensor]:
    """(context (1, 77 k, C), pooled (1, P)) of one prompt pair in AUTOMATIC1111's syntax (see above)."""
    device = execution_device(parts.unet)
    chunks_2 = prompt_chunks(text_2, emphasis=emphasis, embeddings=embeddings)
    hidden_2, pooled = encode_chunks(parts.text_encoder_2, chunks_2, which="clip_g", hidden_layer=hidden_layer,
                                     pooled=True, emphasis=emphasis)
    hidden = [hidden_2.to(device)]
    if parts.text_encoder is not None:
        chunks = chunks_2 if text == text_2 else prompt_chunks(text, emphasis=emphasis, embeddings=embeddings)
        h, _ = encode_chunks(parts.text_encoder, chunks, which="clip_l", hidden_layer=hidden_layer, pooled=False,
                             emphasis=emphasis)
        if h.shape[1] != hidden_2.shape[1]:
            raise ValueError(f"prompt and prompt_2 give {h.shape[1] // 77} and {hidden_2.shape[1] // 77} chunks of "
                             "75 tokens; give them the same length (or BREAKs)")
        hidden.insert(0, h.to(device))
    return torch.cat(hidden, dim=-1), pooled.to(device)


def repeat_chunks(context: Tensor, chunks: int) -> Tensor:
    """context (B, 77 k, C) repeated to 77 `chunks` tokens (a multiple of k): attention over a repeated context
    gives what the context gives, so prompts with different chunk counts can share a batch."""
    k = context.shape[1] // 77
    return context.repeat(1, chunks // k, 1) if chunks != k else context


def common_chunks(*contexts: Tensor) -> int:
    """The least common multiple of the contexts' chunk counts."""
    return math.lcm(*(c.shape[1] // 77 for c in contexts))


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
    """(context (1, 77 k, C), pooled (1, P)) of recent prompt pairs: repeated prompts are encoded once.

    Entries are keyed by the models' identities; `clear()` when their weights change (text-encoder LoRAs)."""

    def __init__(self, size: int = 16, before_encode: Callable[[Components], None] | None = None):
        self.size = size
        self.entries: OrderedDict = OrderedDict()  # key -> (context, pooled), oldest first
        self.before_encode = before_encode  # called before the encoders run (a miss): e.g. to read them back in

    def clear(self) -> None:
        self.entries.clear()

    def encode(self, parts: Components, prompt: str, prompt_2: str, hidden_layer: int, *,
               emphasis: str = "original", embeddings: Mapping[str, object] | None = None) -> tuple[Tensor, Tensor]:
        key = (id(parts), id(parts.text_encoder), id(parts.text_encoder_2), prompt, prompt_2, hidden_layer, emphasis,
               tuple(sorted(embeddings or ())))  # the names only: an embedding is read when a prompt uses it
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        if self.before_encode is not None:
            self.before_encode(parts)
        result = encode_prompt(parts, prompt, prompt_2, hidden_layer=hidden_layer, emphasis=emphasis,
                               embeddings=embeddings)
        self.entries[key] = result
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return result


# AUTOMATIC1111 counts U-Net calls for prompt editing, and lays the schedule over twice the steps for the
# samplers that call it twice a step (its 'second_order' samplers).
SECOND_ORDER = frozenset({"heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "restart"})

Schedule = list[tuple[int, Conditioning]]  # (last U-Net call it is used for, counted from 0; its conditioning)


def scheduled_conditioning(parts: Components, o: GenerationOptions, width: int, height: int, cache: PromptCache, *,
                           embeddings: Mapping[str, object] | None = None, negative: bool | None = None) -> Schedule:
    """The conditioning of each span of U-Net calls: prompt editing `[a:b:when]` and alternation `[a|b]`
    (`sdxl.prompts.schedule`) in the prompts, on AUTOMATIC1111's count of calls. Every entry's context has the
    same shape (prompts repeated to a common chunk count), so the U-Net sees static shapes."""
    steps = o.steps * (2 if o.sampler in SECOND_ORDER else 1)
    texts = {key: schedule(getattr(o, key), steps) if getattr(o, key) else [(steps, getattr(o, key))]
             for key in ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2")}
    ends = sorted({end for spans in texts.values() for end, _ in spans})
    entries = []
    for end in ends:
        at = {key: next(text for last, text in spans if end <= last) for key, spans in texts.items()}
        entries.append((end, conditioning(parts, o.replace(**at), width, height, cache, embeddings=embeddings,
                                          negative=negative)))
    chunks = common_chunks(*(c.context for _, c in entries))
    return [(end, Conditioning(repeat_chunks(c.context, chunks), c.y, c.guided)) for end, c in entries]


def conditioning(parts: Components, o: GenerationOptions, width: int, height: int, cache: PromptCache, *,
                 embeddings: Mapping[str, object] | None = None, negative: bool | None = None) -> Conditioning:
    """The conditioning of `parts`' U-Net for options `o` at an output size of width x height.

    negative: build the negative branch (default: when guided, cfg > 1; the CFG++ samplers need it always)."""
    hidden_layer = PENULTIMATE - (o.clip_skip or 0)
    encode = lambda text, text_2: cache.encode(parts, text, text_2, hidden_layer, emphasis=o.emphasis,  # noqa: E731
                                               embeddings=embeddings)
    context, pooled = encode(o.prompt, o.prompt_2 or o.prompt)
    config = parts.unet.config
    n = micro_value_count(config, pooled.shape[-1])
    original, target = o.original_size or (height, width), o.target_size or (height, width)
    y = micro_conditioning(pooled, micro_values(n, original, o.crop_top_left, target, o.aesthetic_score),
                           dim=config.addition_time_embed_dim)
    b = o.batch
    context, y = context.expand(b, -1, -1), y.expand(b, -1)
    if not (o.cfg > 1.0 if negative is None else negative):
        return Conditioning(context, y, False)

    neg_2 = o.negative_prompt_2 or o.negative_prompt
    if parts.force_zeros_for_empty_prompt and not o.negative_prompt and not neg_2:
        neg_context, neg_pooled = torch.zeros_like(context[:1]), torch.zeros_like(pooled)
    else:
        neg_context, neg_pooled = encode(o.negative_prompt, neg_2)
    neg_values = micro_values(n, o.negative_original_size or original, o.negative_crop_top_left or o.crop_top_left,
                              o.negative_target_size or target, o.negative_aesthetic_score)
    neg_y = micro_conditioning(neg_pooled, neg_values, dim=config.addition_time_embed_dim)
    chunks = common_chunks(context, neg_context)  # prompts of different lengths share the batch
    context = torch.cat([repeat_chunks(neg_context, chunks).expand(b, -1, -1), repeat_chunks(context, chunks)])
    return Conditioning(context, torch.cat([neg_y.expand(b, -1), y]), True)
