"""CLIP text transformer: both SDXL text encoders (OpenAI CLIP ViT-L/14 and OpenCLIP ViT-bigG/14).

The two encoders are the same architecture with different sizes and activations: token + learned
position embeddings, a stack of pre-norm causal self-attention blocks, a final layer norm, and
(bigG only) a bias-free text projection. SDXL reads the *penultimate* block output (no final
norm) as the per-token context, and bigG's projected end-of-text vector as the pooled embedding.

Module names follow OpenCLIP (`transformer.resblocks.{i}.attn.in_proj_weight`, `ln_final`,
`text_projection` used as `x @ P`), so the official bigG weights load with an identity map; the
transformers naming (`text_model.encoder.layers.{i}.self_attn.q_proj`, ...) is mapped by the
tables in `sdxl.checkpoints.clip_keys`.

Port notes:
- transformers builds a causal mask tensor and runs `CLIPAttention` with separate q/k/v
  projections; OpenCLIP registers an `attn_mask` buffer. We keep q/k/v fused (one matmul) and pass
  `is_causal=True` to `scaled_dot_product_attention`, so the module has no buffers at all and can
  be built on the meta device and filled with `load_state_dict(assign=True)`.
- SDXL never passes a padding mask to either encoder: padded positions are attended to causally
  like any other token (they only influence later positions), exactly as in sgm/transformers.
- Pooling position: transformers uses `argmax(input_ids)` when the config says `eos_token_id == 2`
  (every legacy CLIP config, including the official SDXL ones), otherwise the first position whose
  id equals `eos_token_id`. OpenCLIP always uses `argmax`. With CLIP's BPE vocabulary the
  end-of-text id 49407 is the largest, so both rules give the same answer on normal prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class CLIPConfig:
    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    activation: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP) | "gelu" (exact erf GELU, OpenCLIP)
    eps: float = 1e-5
    projection_dim: int | None = None  # bigG: 1280, bias-free, used as `x @ text_projection`
    # Decides the pooling position (see module docstring): 2 means "argmax of the token ids".
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        if self.activation not in ("quick_gelu", "gelu"):
            raise ValueError(f"CLIPConfig.activation must be 'quick_gelu' or 'gelu', got {self.activation!r}")
        if self.width % self.heads != 0:
            raise ValueError(f"CLIPConfig.width {self.width} is not divisible by heads {self.heads}")

    @property
    def pools_at_argmax(self) -> bool:
        """True when the pooled token is found by `argmax(tokens)` (legacy rule), else by `== eos`."""
        return self.eos_token_id == 2


# OpenAI CLIP ViT-L/14 text tower: SDXL base encoder 1 (`text_encoder`). 123,060,480 parameters.
clip_l = CLIPConfig(width=768, layers=12, heads=12, mlp_width=3072, activation="quick_gelu")
# OpenCLIP ViT-bigG/14 text tower: SDXL encoder 2 (`text_encoder_2`, refiner's only encoder).
# 694,659,840 parameters (the official single file also holds the unused `logit_scale`).
clip_g = CLIPConfig(width=1280, layers=32, heads=20, mlp_width=5120, activation="gelu", projection_dim=1280)
# Tiny versions for tests and built-in toy models. They keep the real vocabulary and 77 positions
# so the real tokenizer works with them; 3 layers so that "penultimate" is not the first block.
clip_l_tiny = replace(clip_l, width=32, layers=3, heads=4, mlp_width=64)
clip_g_tiny = replace(clip_g, width=64, layers=3, heads=4, mlp_width=128, projection_dim=64)


def quick_gelu(x: Tensor) -> Tensor:
    # OpenAI's sigmoid approximation of GELU; the CLIP-L weights were trained with it.
    return x * torch.sigmoid(1.702 * x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        w = config.width
        self.heads = config.heads
        # Fused q, k, v (stacked in that order along dim 0), as nn.MultiheadAttention/OpenCLIP store it.
        self.in_proj_weight = nn.Parameter(torch.empty(3 * w, w))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * w))
        self.out_proj = nn.Linear(w, w)
        init_normal(self.in_proj_weight, std=w**-0.5)

    def forward(self, x: Tensor) -> Tensor:
        b, t, w = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        # (B, T, 3, H, D) -> three (B, H, T, D)
        q, k, v = qkv.view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, w))


class MLP(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.width, config.mlp_width)
        self.c_proj = nn.Linear(config.mlp_width, config.width)
        self.act = quick_gelu if config.activation == "quick_gelu" else F.gelu

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class ResidualBlock(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.width, eps=config.eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.width, eps=config.eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    # Only a container, so that parameter names read `transformer.resblocks.{i}` like OpenCLIP's.
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualBlock(config) for _ in range(config.layers))


def init_normal(t: Tensor, std: float = 1.0) -> None:
    """Random init for freshly built (toy) models. Skipped on the meta device, where loading builds models: there
    torch's normal_ would import its compiler stack (1.7 s) to fill nothing."""
    if not t.is_meta:
        nn.init.normal_(t, std=std)


class CLIPTextEncoder(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width,
                                            _weight=torch.empty(config.vocab_size, config.width))
        init_normal(self.token_embedding.weight)  # nn.Embedding's own draw, here: seeded models stay as they were
        self.positional_embedding = nn.Parameter(torch.empty(config.max_positions, config.width))
        self.transformer = Transformer(config)
        self.ln_final = nn.LayerNorm(config.width, eps=config.eps)
        self.text_projection = (
            nn.Parameter(torch.empty(config.width, config.projection_dim)) if config.projection_dim else None
        )
        # Only matters for freshly built toy models; real weights replace all of this.
        init_normal(self.token_embedding.weight, std=0.02)
        init_normal(self.positional_embedding, std=0.01)
        if self.text_projection is not None:
            init_normal(self.text_projection, std=config.width**-0.5)

    def block_index(self, hidden_layer: int) -> int:
        """Python-style index over the blocks' outputs -> non-negative block index."""
        n = self.config.layers
        if not -n <= hidden_layer < n:
            raise IndexError(f"hidden_layer {hidden_layer} out of range for {n} blocks")
        return hidden_layer % n

    def pool_positions(self, tokens: Tensor) -> Tensor:
        """(B, T) token ids -> (B,) index of the end-of-text token each sequence is pooled at."""
        if self.config.pools_at_argmax:
            return tokens.argmax(dim=-1)
        # First occurrence: argmax returns the first maximal element (padding may repeat the eos id).
        return (tokens == self.config.eos_token_id).int().argmax(dim=-1)

    def forward(
        self, tokens: Tensor, *, hidden_layer: int = -2, pooled: bool = True, token_embeds: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """tokens (B, 77) int64 -> (hidden (B, 77, W), pooled (B, P or W)).

        hidden = output of transformer block `hidden_layer` (python-style index over the blocks'
        outputs: -1 last block, -2 penultimate = SDXL's choice for both encoders; "clip skip"),
        WITHOUT the final layer norm. (transformers' `hidden_states[k]` equals `hidden_layer=k-1`
        for k >= 1, and `hidden_states[-k]` equals `hidden_layer=-k`.)
        pooled = ln_final(output of the last block) at the end-of-text position, then
        @ text_projection if the config has one. With `pooled=False` the blocks after
        `hidden_layer` are skipped and None is returned instead (SDXL's encoder 1 needs no pooled).
        token_embeds: (B, 77, W) used instead of token_embedding(tokens) (textual-inversion vectors in place);
        `tokens` still say where the end-of-text token is.
        """
        t = tokens.shape[1]
        if t > self.config.max_positions:
            raise ValueError(f"{t} tokens but only {self.config.max_positions} positions")
        keep = self.block_index(hidden_layer)
        last = len(self.transformer.resblocks) - 1 if pooled else keep

        x = (self.token_embedding(tokens) if token_embeds is None else token_embeds) + self.positional_embedding[:t]
        hidden = x
        for i, block in enumerate(self.transformer.resblocks[: last + 1]):
            x = block(x)
            if i == keep:
                hidden = x
        if not pooled:
            return hidden, None

        # LayerNorm is per token, so normalising only the pooled rows gives ln_final(x)[rows].
        rows = x[torch.arange(x.shape[0], device=x.device), self.pool_positions(tokens).to(x.device)]
        pool = self.ln_final(rows)
        if self.text_projection is not None:
            pool = pool @ self.text_projection
        return hidden, pool


def count_parameters(config: CLIPConfig) -> int:
    """Number of parameters of a `CLIPTextEncoder(config)`, computed without building it."""
    w, m = config.width, config.mlp_width
    block = 2 * 2 * w + (3 * w * w + 3 * w) + (w * w + w) + (w * m + m) + (m * w + w)
    proj = w * config.projection_dim if config.projection_dim else 0
    return (config.vocab_size + config.max_positions) * w + config.layers * block + 2 * w + proj

