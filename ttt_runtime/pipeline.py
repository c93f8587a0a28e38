"""A TTT model cut into pipeline stages: stage k of n owns a contiguous run of blocks (the first
stage also the embedding, the last the final norm, the head and the loss) and its own learning
state (train: the AdamW state of its parameters; adapt: its blocks' fast-weight caches).

A `Stage` is plain MLX in one process: a Ray stage actor (`ray_workers.py`) holds one, and the
parity tests chain them in-process. Stages exchange only the hidden state going forward and its
cotangent coming back, so a chain of stages computes what the whole model computes: the same
loss, the same gradients of each parameter (each block's vjp, as `blockwise` runs it), the same
fast weights. AdamW is elementwise, so each stage updating its own parameters is the whole
model's update.

Checkpoint names are the whole model's ("model.blocks.5.ttt...", "cache.5.0"): `arrays()`
renames the stage's own block indices to the model's, and `load()` takes the names it owns out
of a whole checkpoint, so any number of stages reads and writes the one checkpoint format.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ttt_runtime import blockwise
from ttt_runtime.config import RunConfig
from ttt_runtime.figures import fast_weight_stats, inner_stats
from ttt_runtime.layers import TTTCache
from ttt_runtime.model import Block, TTTModel
from ttt_runtime.steps import cache_arrays, make_optimizer, next_byte_loss


def block_ranges(num_blocks: int, stages: int) -> list[range]:
    """Contiguous runs of blocks, one per stage, sizes differing by at most one (the earlier
    stages take the extra blocks: the last one also runs the head)."""
    if not 1 <= stages <= num_blocks:
        raise ValueError(f"stages={stages}: must be from 1 to num_blocks={num_blocks}")
    size, extra = divmod(num_blocks, stages)
    bounds = [0]
    for k in range(stages):
        bounds.append(bounds[-1] + size + (k < extra))
    return [range(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


class StageModel(nn.Module):
    """The parameters of one stage, named as in TTTModel but with block indices from 0."""

    def __init__(self, model: TTTModel, blocks: range, first: bool, last: bool):
        super().__init__()
        if first:
            self.embed = model.embed
        self.blocks: list[Block] = model.blocks[blocks.start : blocks.stop]
        if last:
            self.norm = model.norm
            self.head = model.head

    def logits(self, h: mx.array) -> mx.array:
        return self.head(self.norm(h))


_BLOCK = re.compile(r"^(model|optimizer|cache)\.(?:blocks\.)?(\d+)")


def shift_block(name: str, by: int) -> str:
    """`name` with its block index moved by `by` ("model.blocks.1.x" -> "model.blocks.3.x")."""
    return _BLOCK.sub(lambda m: m[0][: m.start(2) - m.start(0)] + str(int(m[2]) + by), name)


@dataclass
class StageReport:
    """What a stage measured since `begin_step`, and (sampled) its blocks' figures."""

    fwd_ms: list[float]  # per block, summed over the step's micro-batches
    bwd_ms: list[float | None]
    compute_ms: float  # the stage's own work, all calls of the step
    layers: list[dict] = field(default_factory=list)  # sampled: per block, as figures.py gives
    inner_lrs: list[float] = field(default_factory=list)  # sampled: per block


class Stage:
    """Stage `index` of `count` of the run's model, on `rows` rows of each batch."""

    def __init__(self, config: RunConfig, index: int, count: int, rows: int):
        self.blocks = block_ranges(config.num_blocks, count)[index]
        self.first, self.last = index == 0, index == count - 1
        mx.random.seed(config.seed)  # the whole model's initial weights, then this stage's part
        self.model = StageModel(TTTModel(config.model_config()), self.blocks, self.first, self.last)
        self.train = config.mode == "train"
        self.rows = rows
        if self.train:
            self.optimizer = make_optimizer(config)
            self.optimizer.init(self.model.trainable_parameters())
            mx.eval(self.optimizer.state)
        else:
            self.model.freeze()
        mx.eval(self.model.parameters())
        self._saved: dict[int, tuple[mx.array, list[mx.array]]] = {}  # train: micro -> its fwd
        self._grads: Any = None  # train: summed over the step's micro-batches
        self.caches: list[TTTCache] = []  # adapt: one per block, carried from step to step
        self.reset()
        self.begin_step(sampled=False)

    # -- a step ---------------------------------------------------------------------------------
    def begin_step(self, sampled: bool) -> None:
        self.sampled = sampled
        n = len(self.blocks)
        self._fwd_ms, self._bwd_ms = [0.0] * n, [0.0 if self.train else None] * n
        self._compute_ms = 0.0
        self._stats: list[dict[str, mx.array]] = []
        self._caches = [] if self.train else self.caches  # those the figures are taken from
        self._before = [c.fast_weights for c in self._caches]
        self._micros = 0

    def forward(self, micro: int, x: mx.array, targets: mx.array | None = None) -> mx.array:
        """The stage's blocks on micro-batch `micro` (tokens on the first stage, the hidden state
        after that) -> the hidden state for the next stage or, given `targets` (adapt mode's last
        stage), the loss in nats. Train mode keeps what `backward` needs and starts each
        micro-batch from the initial fast weights; adapt mode's caches carry on."""
        start = time.perf_counter()
        h = self.model.embed(x) if self.first else x
        if self.train:
            self._caches = [block.ttt.make_cache(x.shape[0]) for block in self.model.blocks]
            self._before = [c.fast_weights for c in self._caches]
        hidden, self._stats, fwd_ms = blockwise.forward_blocks(self.model.blocks, h, self._caches)
        self._fwd_ms = [a + b for a, b in zip(self._fwd_ms, fwd_ms, strict=True)]
        out = hidden[-1]
        if self.train:
            self._saved[micro] = (x, hidden)
            self._micros += 1
        elif targets is not None:
            out = next_byte_loss(self.model.logits(out), targets)
            mx.eval(out)
        self._compute_ms += (time.perf_counter() - start) * 1e3
        return out

    def backward(
        self, micro: int, cotangent: mx.array | None, targets: mx.array | None = None
    ) -> tuple[mx.array | None, mx.array | None]:
        """Train mode: micro-batch `micro`'s gradients added to the step's, from the cotangent
        of the stage's output or, on the last stage, from the loss on `targets` -> (that loss
        or None, the cotangent of the stage's input or None on the first stage)."""
        start = time.perf_counter()
        x, hidden = self._saved.pop(micro)
        loss, grads = None, dict[str, Any]()
        if self.last:
            assert targets is not None, "the last stage's backward starts from the loss"
            loss, grads, cotangent = blockwise.head_vjp(self.model, hidden[-1], targets)
            mx.eval(loss, cotangent)
        assert cotangent is not None, "a stage's backward needs its output's cotangent"
        block_grads, cotangent, bwd_ms = blockwise.backward_blocks(
            self.model.blocks, hidden, cotangent
        )
        grads["blocks"] = block_grads
        if self.first:
            embed = self.model.embed
            _, grads["embed"], _ = blockwise.vjp_of(embed, [], lambda: embed(x), cotangent)
            cotangent = None
        self._grads = grads if self._grads is None else _tree_add(self._grads, grads)
        mx.eval(self._grads, cotangent)
        self._bwd_ms = [(a or 0.0) + b for a, b in zip(self._bwd_ms, bwd_ms, strict=True)]
        self._compute_ms += (time.perf_counter() - start) * 1e3
        return loss, cotangent

    def gradients(self) -> dict[str, mx.array]:
        """The step's gradient (the mean over its micro-batches), flat by local name."""
        scale = 1.0 / max(self._micros, 1)
        return {k: v * scale for k, v in _flat(self._grads).items()}

    def apply(self, gradients: dict[str, mx.array]) -> None:
        """AdamW on this stage's parameters with `gradients` (flat, as `gradients()` gives)."""
        start = time.perf_counter()
        self.optimizer.update(self.model, tree_unflatten(list(gradients.items())))
        mx.eval(self.model.parameters(), self.optimizer.state)
        self._grads, self._micros = None, 0
        self._compute_ms += (time.perf_counter() - start) * 1e3

    def end_step(self) -> StageReport:
        report = StageReport(self._fwd_ms, self._bwd_ms, self._compute_ms)
        if self.sampled and self._stats:
            origin = self._before if self.train else self.origin
            now = [c.fast_weights for c in self._caches]
            weights = fast_weight_stats(now, self._before, origin)
            inner, _ = inner_stats(self._stats)
            report.layers = [
                {**w, **i, "exact_drift": None} for w, i in zip(weights, inner, strict=True)
            ]
            report.inner_lrs = [float(np.array(s["lr_mean"])) for s in self._stats]
        return report

    # -- state ----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Adapt mode: fresh fast weights, the origin of a new conversation."""
        if not self.train:
            self.caches = [block.ttt.make_cache(self.rows) for block in self.model.blocks]
            self._new_origin()

    def _new_origin(self) -> None:
        mx.eval(cache_arrays(self.caches))
        self.origin = [c.fast_weights for c in self.caches]
        self.begin_step(sampled=False)

    def arrays(self) -> tuple[dict[str, mx.array], list[int]]:
        """This stage's part of a checkpoint, under the whole model's names, and (adapt) its
        blocks' cache offsets."""
        named = {f"model.{k}": v for k, v in _flat(self.model.parameters()).items()}
        if self.train:
            named.update({f"optimizer.{k}": v for k, v in _flat(self.optimizer.state).items()})
        else:
            for i, cache in enumerate(self.caches):
                named.update({f"cache.{i}.{j}": a for j, a in enumerate(cache.state)})
        offsets = [] if self.train else [c.offset for c in self.caches]
        return {shift_block(k, self.blocks.start): v for k, v in named.items()}, offsets

    def load(self, arrays: dict[str, mx.array], cache_offsets: list[int]) -> None:
        """This stage's part of a whole checkpoint's arrays (ValueError if they do not fit);
        the optimizer state and the caches only where the checkpoint has them. Whatever a step
        left half done (a restart's) is dropped."""
        self._saved.clear()
        self._grads, self._micros = None, 0
        first, owned = self.blocks.start, set(self.blocks)
        mine = {}
        for name, value in arrays.items():
            match = _BLOCK.match(name)
            if match is None:
                mine[name] = value
            elif int(match[2]) in owned:
                mine[shift_block(name, -first)] = value
        params = [
            (k[len("model.") :], v) for k, v in mine.items()
            if k.startswith("model.") and k.split(".")[1] in self.model
        ]  # fmt: skip
        self.model.load_weights(params, strict=True)
        if self.train:
            fresh = _flat(self.optimizer.state)
            saved = {k: mine[f"optimizer.{k}"] for k in fresh if f"optimizer.{k}" in mine}
            if saved:
                if {k: v.shape for k, v in saved.items()} != {k: v.shape for k, v in fresh.items()}:
                    raise ValueError("its optimizer state is not that of this model's parameters")
                self.optimizer.state = tree_unflatten(list(saved.items()))
            mx.eval(self.model.parameters(), self.optimizer.state)
            return
        if any(k.startswith("cache.") for k in mine):
            for i, cache in enumerate(self.caches):
                cache.state = [mine[f"cache.{i}.{j}"] for j in range(len(cache.state))]
                cache.offset = cache_offsets[first + i]
        self._new_origin()


def _flat(tree: Any) -> dict[str, mx.array]:
    return dict(tree_flatten(tree))


def _tree_add(a: Any, b: Any) -> Any:
    flat_b = _flat(b)
    return tree_unflatten([(k, v + flat_b[k]) for k, v in _flat(a).items()])
