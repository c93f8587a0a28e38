"""Adapt mode's exact fast weights (`exact_accumulate`): the conversation's starting fast
weights minus every update the layers applied, summed exactly (`swar.ExactAccumulator`, 128-bit
fixed point) and rounded once, beside the float32 ones; their distance is `exact_drift`, how
far float32 accumulation has wandered (docs/ttt-maths.md)."""

from __future__ import annotations

import numpy as np

from ttt_runtime.layers import TTTCache
from ttt_runtime.swar import ExactAccumulator


class ExactFastWeights:
    """The exact running fast weights of one conversation, per layer and fast-weight name."""

    def __init__(self, caches: list[TTTCache]):
        """Start from the caches' fast weights; from now on the layers record their updates."""
        self.layers: list[dict[str, ExactAccumulator]] = []
        for cache in caches:
            cache.record_updates = True
            accumulators = {}
            for name, w in cache.fast_weights.items():
                accumulators[name] = ExactAccumulator(w.shape)
                accumulators[name].add(np.array(w))
            self.layers.append(accumulators)

    def add_updates(self, caches: list[TTTCache]) -> None:
        """Subtract the updates the layers recorded in their last call (evaluated)."""
        for cache, accumulators in zip(caches, self.layers, strict=True):
            for name, acc in accumulators.items():
                update = cache.updates.get(name)
                if update is not None and update.size:
                    acc.add(-np.array(update))

    def drift(self, caches: list[TTTCache]) -> list[float]:
        """||W_float32 - W_exact|| per layer, averaged over the batch rows."""
        drifts = []
        for cache, accumulators in zip(caches, self.layers, strict=True):
            squares = sum(
                np.square(np.array(w, dtype=np.float64) - acc.value())
                .reshape(w.shape[0], -1)
                .sum(1)
                for w, acc in ((cache.fast_weights[n], a) for n, a in accumulators.items())
            )
            drifts.append(float(np.mean(np.sqrt(squares))))
        return drifts
