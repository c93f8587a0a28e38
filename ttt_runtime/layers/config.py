"""The configuration of one TTT layer, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass


def require_int(name: str, value: object, minimum: int) -> None:
    # bool is an int subclass; `True` heads is a mistake, not 1 head
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}")


def require_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r}: must be a positive number")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={value!r}: must be a positive finite number")


@dataclass(frozen=True)
class TTTLayerConfig:
    """Sizes and inner-loop settings of a TTT-Linear or TTT-MLP layer (see docs/ttt-maths.md).

    `compile` only chooses how the mini-batch scan runs (mx.compile or plain ops), never the maths.
    """

    hidden_size: int
    num_heads: int
    mini_batch_size: int = 16
    ttt_base_lr: float = 1.0
    use_gate: bool = False
    rope_theta: float = 10000.0
    mlp_expansion: int = 4
    compile: bool = True

    def __post_init__(self) -> None:
        require_int("hidden_size", self.hidden_size, 2)
        require_int("num_heads", self.num_heads, 1)
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}: "
                "num_heads must divide hidden_size"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"head dim hidden_size/num_heads={self.head_dim} is odd: RoPE rotates pairs, "
                "so hidden_size/num_heads must be even"
            )
        require_int("mini_batch_size", self.mini_batch_size, 1)
        require_positive("ttt_base_lr", self.ttt_base_lr)
        require_positive("rope_theta", self.rope_theta)
        require_int("mlp_expansion", self.mlp_expansion, 1)
        for name in ("use_gate", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}: must be true or false")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads
