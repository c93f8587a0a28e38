"""A byte-level language model of TTT blocks (docs/ttt-maths.md, "The model around the layers")."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ttt_runtime.config import ModelConfig
from ttt_runtime.layers import TTTMLP, TTTCache, TTTLinear

LAYER_CLASSES = {"linear": TTTLinear, "mlp": TTTMLP}  # by ModelConfig.layer_type


class SwiGLU(nn.Module):
    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden, bias=False)
        self.up_proj = nn.Linear(dims, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dims, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """RMSNorm -> TTT layer -> residual, then RMSNorm -> SwiGLU -> residual."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        dims = config.layer.hidden_size
        self.ttt_norm = nn.RMSNorm(dims, eps=config.rms_norm_eps)
        self.ttt = LAYER_CLASSES[config.layer_type](config.layer)
        self.mlp_norm = nn.RMSNorm(dims, eps=config.rms_norm_eps)
        self.mlp = SwiGLU(dims, config.intermediate_size)

    def __call__(self, h: mx.array, cache: TTTCache | None = None) -> mx.array:
        h = h + self.ttt(self.ttt_norm(h), cache=cache)
        return self.feed_forward(h)

    def feed_forward(self, h: mx.array) -> mx.array:
        """The block's second half, for callers that run `ttt` themselves (with stats)."""
        return h + self.mlp(self.mlp_norm(h))


class TTTModel(nn.Module):
    """Embedding -> blocks -> RMSNorm -> head; `model(tokens, cache)` -> logits (B, L, vocab)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        dims = config.layer.hidden_size
        self.embed = nn.Embedding(config.vocab_size, dims)
        self.blocks = [Block(config) for _ in range(config.num_blocks)]
        self.norm = nn.RMSNorm(dims, eps=config.rms_norm_eps)
        self.head = nn.Linear(dims, config.vocab_size, bias=False)

    def __call__(self, tokens: mx.array, cache: list[TTTCache] | None = None) -> mx.array:
        return self.head(self.features(tokens, cache))

    def features(self, tokens: mx.array, cache: list[TTTCache] | None = None) -> mx.array:
        """What the head reads: the last block's output, normed (B, L, dims)."""
        h = self.embed(tokens)
        caches: list[TTTCache | None] = list(cache) if cache else [None] * len(self.blocks)
        for block, block_cache in zip(self.blocks, caches, strict=True):
            h = block(h, cache=block_cache)
        return self.norm(h)

    def logits(self, h: mx.array) -> mx.array:
        return self.head(self.norm(h))

    def make_cache(self, batch_size: int) -> list[TTTCache]:
        return [block.ttt.make_cache(batch_size) for block in self.blocks]
