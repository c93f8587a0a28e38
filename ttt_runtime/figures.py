"""What a sampled step reports per layer (docs/ttt-maths.md, "The figures the monitor shows").

Over all of a layer's fast-weight tensors and heads, averaged over the batch rows: `w_norm` =
||W||, `update_norm` = ||W_after - W_before|| over the step, `drift` = ||W - W_0|| with W_0 the
fast weights at the start of the conversation (train mode: every step is a fresh conversation,
so drift = update_norm). Then the inner losses before and after the step's updates and the
inner learning rate (`forward_with_stats`), and `exact_drift`, how far float32 accumulation has
wandered from the exact sums (`exact.py`; None where they are not kept).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import reduce

import mlx.core as mx
import numpy as np

from ttt_runtime.blockwise import TimedStep

Params = dict[str, mx.array]  # a layer's fast weights by name (cache.fast_weights)


def _norm(tensors: Iterable[mx.array]) -> mx.array:
    """sqrt(sum of squares over every tensor but the batch axis), averaged over the batch."""
    squares = reduce(
        operator.add, (mx.sum(mx.square(t).reshape(t.shape[0], -1), axis=1) for t in tensors)
    )
    return mx.mean(mx.sqrt(squares))


def fast_weight_stats(now: list[Params], before: list[Params], origin: list[Params]) -> list[dict]:
    """Per layer: w_norm, update_norm, drift (floats)."""
    figures = [
        (_norm(w.values()), _norm(w[k] - wb[k] for k in w), _norm(w[k] - wo[k] for k in w))
        for w, wb, wo in zip(now, before, origin, strict=True)
    ]
    mx.eval(figures)
    return [{"w_norm": n.item(), "update_norm": u.item(), "drift": d.item()} for n, u, d in figures]


def inner_stats(stats: list[dict[str, mx.array]]) -> tuple[list[dict], float]:
    """Per layer inner loss before/after (floats), and the mean inner learning rate."""
    layers = [
        {"inner_loss_before": s["inner_loss_before"].item(),
         "inner_loss_after": s["inner_loss_after"].item()}
        for s in stats
    ]  # fmt: skip
    return layers, float(np.mean([s["lr_mean"].item() for s in stats]))


@dataclass
class SampleFigures:
    """A sampled step's figures: each block's times, each layer's figures, the inner lr."""

    fwd_ms: list[float]
    bwd_ms: Sequence[float | None]
    layers: list[dict]
    inner_lr: float


def sample_figures(
    step: TimedStep, origin: list[Params], exact_drift: list[float] | None = None
) -> SampleFigures:
    """The figures of `step`, its drift measured from `origin`."""
    layers = fast_weight_stats([c.fast_weights for c in step.caches], step.before, origin)
    inner, inner_lr = inner_stats(step.stats)
    drifts = exact_drift if exact_drift is not None else [None] * len(layers)
    for layer, extra, drift in zip(layers, inner, drifts, strict=True):
        layer.update(extra, exact_drift=drift)
    return SampleFigures(step.fwd_ms, step.bwd_ms, layers, inner_lr)


def at_conversation_start(layers: list[dict], exact: bool) -> list[dict]:
    """`layers`' figures as a conversation starts: no update, no drift, no inner loss yet, and
    an exact drift of 0 where it is kept."""
    return [
        {**layer, "update_norm": 0.0, "drift": 0.0, "inner_loss_before": None,
         "inner_loss_after": None, "exact_drift": 0.0 if exact else None}
        for layer in layers
    ]  # fmt: skip
