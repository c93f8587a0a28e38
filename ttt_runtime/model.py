"""A byte-level language model of TTT blocks (docs/ttt-maths.md, "The model around the layers")."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ttt_runtime.layers import TTTMLP, TTTCache, TTTLayerConfig, TTTLinear
from ttt_runtime.layers.config import require_int, require_positive

LAYER_TYPES = {"linear": TTTLinear, "mlp": TTTMLP}


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of a TTTModel; invalid values raise ValueError naming the field."""

    vocab_size: int = 256
    hidden_size: int = 256
    num_heads: int = 4
    num_blocks: int = 2
    layer_type: str = "linear"
    mini_batch_size: int = 16
    ttt_base_lr: float = 1.0
    intermediate_size: int = 512
    rope_theta: float = 10000.0
    use_gate: bool = False
    rms_norm_eps: float = 1e-6
    compile: bool = True

    def __post_init__(self) -> None:
        require_int("vocab_size", self.vocab_size, 1)
        require_int("num_blocks", self.num_blocks, 1)
        require_int("intermediate_size", self.intermediate_size, 1)
        require_positive("rms_norm_eps", self.rms_norm_eps)
        if self.layer_type not in LAYER_TYPES:
            raise ValueError(
                f"layer_type={self.layer_type!r}: must be one of {', '.join(LAYER_TYPES)}"
            )
        self.layer_config()  # validates the TTT layer's own fields

    def layer_config(self) -> TTTLayerConfig:
        return TTTLayerConfig(
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            mini_batch_size=self.mini_batch_size,
            ttt_base_lr=self.ttt_base_lr,
            use_gate=self.use_gate,
            rope_theta=self.rope_theta,
            compile=self.compile,
        )


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
        self.ttt_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ttt = LAYER_TYPES[config.layer_type](config.layer_config())
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

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
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = [Block(config) for _ in range(config.num_blocks)]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def __call__(self, tokens: mx.array, cache: list[TTTCache] | None = None) -> mx.array:
        h = self.embed(tokens)
        for block, block_cache in zip(self.blocks, cache or [None] * len(self.blocks), strict=True):
            h = block(h, cache=block_cache)
        return self.logits(h)

    def logits(self, h: mx.array) -> mx.array:
        return self.head(self.norm(h))

    def make_cache(self, batch_size: int) -> list[TTTCache]:
        return [block.ttt.make_cache(batch_size) for block in self.blocks]
