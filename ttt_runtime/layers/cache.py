"""The streaming state of one TTT layer (mlx-lm's cache convention: the layer mutates it)."""

from __future__ import annotations

import mlx.core as mx


class TTTCache:
    """Fast weights at the start of the current mini-batch, plus the running gradient sums
    (`gW = sum_j lr_j XK_j^T G_j`, `gb = sum_j lr_j G_j`) of the tokens already seen in it.

    Each linear map of the inner model is one augmented float32 array `[W; b]`
    (B, nh, f_in + 1, f_out); `sums` has the same shapes, and is None at a mini-batch boundary.
    `offset` counts the tokens seen.
    """

    def __init__(self, map_names: tuple[tuple[str, str], ...], maps: tuple[mx.array, ...]):
        self.map_names = map_names
        self.maps = maps
        self.sums: tuple[mx.array, ...] | None = None
        self.offset = 0
        # when True, the layer stores in `updates` the tensors it subtracted from the fast
        # weights, stacked over the mini-batches completed in its last call
        self.record_updates = False
        self.updates: dict[str, mx.array] = {}

    @property
    def batch_size(self) -> int:
        return self.maps[0].shape[0]

    @property
    def fast_weights(self) -> dict[str, mx.array]:
        """Fast weights ("W1", "b1", ...) as they stand after the last completed mini-batch."""
        return _split(self.map_names, self.maps)

    def record(self, updates: list[tuple[mx.array, ...]]) -> None:
        """updates: per segment of the last call, a tuple of per-map stacks (steps, ...)."""
        if updates:
            stacked = tuple(mx.concatenate(list(parts)) for parts in zip(*updates, strict=True))
        else:
            stacked = tuple(mx.zeros((0, *m.shape), dtype=m.dtype) for m in self.maps)
        self.updates = _split(self.map_names, stacked)

    @property
    def state(self) -> list[mx.array]:
        sums = self.sums or tuple(mx.zeros_like(m) for m in self.maps)
        return [*self.maps, *sums]

    @state.setter
    def state(self, arrays: list[mx.array]) -> None:
        n = len(self.maps)
        if len(arrays) != 2 * n:
            raise ValueError(f"cache state needs {2 * n} arrays (the fast weights and their sums)")
        for old, new in zip(self.state, arrays, strict=True):
            if tuple(new.shape) != tuple(old.shape):
                raise ValueError(f"cache state: shape {tuple(new.shape)}, expected {old.shape}")
        self.maps = tuple(mx.array(a, dtype=mx.float32) for a in arrays[:n])
        self.sums = tuple(mx.array(a, dtype=mx.float32) for a in arrays[n:])

    @property
    def meta_state(self) -> tuple[str, ...]:
        return (str(self.offset),)

    @meta_state.setter
    def meta_state(self, values: tuple[str, ...]) -> None:
        (self.offset,) = (int(v) for v in values)


def _split(map_names, maps) -> dict[str, mx.array]:
    """Augmented [W; b] arrays -> {"W1": W, "b1": b, ...} (the bias as a (..., 1, f) row)."""
    out = {}
    for (w, b), m in zip(map_names, maps, strict=True):
        out[w], out[b] = m[..., :-1, :], m[..., -1:, :]
    return out
