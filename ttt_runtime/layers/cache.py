"""The streaming state of one TTT layer (mlx-lm's cache convention: the layer mutates it)."""

from __future__ import annotations

import mlx.core as mx


class TTTCache:
    """Fast weights at the start of the current mini-batch, plus the running gradient sums
    (`gW = sum_j lr_j XK_j^T G_j`, `gb = sum_j lr_j G_j`) of the tokens already seen in it.

    `params` and `sums` are tuples of float32 arrays in `names` order, each (B, nh, ...);
    `sums` is None at a mini-batch boundary. `offset` counts the tokens seen.
    """

    def __init__(self, names: tuple[str, ...], params: tuple[mx.array, ...]):
        self.names = names
        self.params = params
        self.sums: tuple[mx.array, ...] | None = None
        self.offset = 0
        # when True, the layer stores in `updates` the tensors it subtracted from the fast
        # weights, stacked over the mini-batches completed in its last call
        self.record_updates = False
        self.updates: dict[str, mx.array] = {}

    @property
    def batch_size(self) -> int:
        return self.params[0].shape[0]

    @property
    def fast_weights(self) -> dict[str, mx.array]:
        """Fast weights as they stand after the last completed mini-batch."""
        return dict(zip(self.names, self.params, strict=True))

    @property
    def state(self) -> list[mx.array]:
        sums = self.sums or tuple(mx.zeros_like(p) for p in self.params)
        return [*self.params, *sums]

    @state.setter
    def state(self, arrays: list[mx.array]) -> None:
        n = len(self.names)
        if len(arrays) != 2 * n:
            raise ValueError(f"cache state needs {2 * n} arrays ({self.names} and their sums)")
        for name, old, new in zip(self.names * 2, self.state, arrays, strict=True):
            if tuple(new.shape) != tuple(old.shape):
                raise ValueError(f"cache state {name}: shape {new.shape}, expected {old.shape}")
        self.params = tuple(mx.array(a, dtype=mx.float32) for a in arrays[:n])
        self.sums = tuple(mx.array(a, dtype=mx.float32) for a in arrays[n:])

    @property
    def meta_state(self) -> tuple[str, ...]:
        return (str(self.offset),)

    @meta_state.setter
    def meta_state(self, values: tuple[str, ...]) -> None:
        (self.offset,) = (int(v) for v in values)
