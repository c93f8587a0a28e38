"""A step run block by block, each block timed.

A timed step is a real step (same maths, same update) with an evaluation at every block
boundary, so that each block's time can be read off the clock; that costs the fusion across
blocks, hence the run's sampling schedule. The forward runs the blocks one by one
(`forward_blocks`). Train mode's backward is chained block by block with `mx.vjp` from the head
down (`backward_blocks`); each block's vjp re-runs its forward, which is evaluated first, so
that the clock then reads the backward alone (the cotangents' evaluation). Its gradients are
those of the whole-model `value_and_grad` (tested).

`forward_blocks` and `backward_blocks` take any contiguous run of blocks with the hidden state
(or its cotangent) at the run's boundary, so a part of the model that owns blocks i..j (a
pipeline stage) steps them with the same code.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ttt_runtime.layers import TTTCache
from ttt_runtime.model import Block, TTTModel
from ttt_runtime.steps import cache_arrays, next_byte_loss

if TYPE_CHECKING:
    from ttt_runtime.pipeline import StageModel


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1e3


@dataclass
class TimedStep:
    """What a step run block by block measured."""

    loss: mx.array
    caches: list[TTTCache]  # the fast weights as the step left them
    before: list[dict[str, mx.array]]  # the fast weights at the step's start
    stats: list[dict[str, mx.array]]  # per layer: forward_with_stats' inner losses and lr
    fwd_ms: list[float]
    bwd_ms: Sequence[float | None]  # None: no backward (adapt mode)


def forward_blocks(
    blocks: Sequence[Block], h: mx.array, caches: Sequence[TTTCache]
) -> tuple[list[mx.array], list[dict[str, mx.array]], list[float]]:
    """Blocks one by one from hidden state `h` (the caches carry on) -> (the hidden states
    before each block and after the last, inner-loop stats per layer, forward ms per block)."""
    mx.eval(h)  # what came before the first block is not its time
    hidden, stats, fwd_ms = [h], [], []
    for block, cache in zip(blocks, caches, strict=True):
        start = time.perf_counter()
        y, layer_stats = block.ttt.forward_with_stats(block.ttt_norm(h), cache)
        h = block.feed_forward(h + y)
        mx.eval(h, layer_stats, cache_arrays([cache]))
        fwd_ms.append(_ms_since(start))
        hidden.append(h)
        stats.append(layer_stats)
    return hidden, stats, fwd_ms


def backward_blocks(
    blocks: Sequence[Block], hidden: list[mx.array], cotangent: mx.array
) -> tuple[list[Any], mx.array, list[float]]:
    """Train mode's backward through `blocks`, last to first, from the cotangent of their output
    -> (parameter gradients per block, the cotangent of their input, backward ms per block).
    `hidden`: `forward_blocks`' hidden states; each block's forward is re-run from a fresh cache,
    as train mode runs it."""
    batch = hidden[0].shape[0]
    grads: list[Any] = [None] * len(blocks)
    bwd_ms = [0.0] * len(blocks)
    for i in reversed(range(len(blocks))):
        block = blocks[i]
        outputs, grads[i], (cotangent,) = vjp_of(
            block, [hidden[i]], lambda h, b=block: b(h, cache=b.ttt.make_cache(batch)), cotangent
        )
        mx.eval(outputs)  # the forward again, kept for the backward: not backward time
        start = time.perf_counter()
        mx.eval(grads[i], cotangent)
        bwd_ms[i] = _ms_since(start)
    return grads, cotangent, bwd_ms


def vjp_of(
    module: nn.Module, inputs: list[mx.array], fn: Callable[..., mx.array], cotangent: mx.array
) -> tuple[list[mx.array], Any, list[mx.array]]:
    """vjp of `fn(*inputs)` with `module`'s trainable parameters as inputs too -> (outputs,
    parameter gradients as a tree, input gradients), unevaluated."""
    params = dict(tree_flatten(module.trainable_parameters()))
    names = list(params)
    n = len(names)

    def call(*arrays: mx.array) -> list[mx.array]:
        module.update(tree_unflatten(list(zip(names, arrays[:n], strict=True))))
        return [fn(*arrays[n:])]

    outputs, grads = mx.vjp(call, [*params.values(), *inputs], [cotangent])
    module.update(tree_unflatten(list(params.items())))  # the real ones back, not the traced
    return outputs, tree_unflatten(list(zip(names, grads[:n], strict=True))), grads[n:]


def head_vjp(
    model: TTTModel | StageModel, h: mx.array, targets: mx.array
) -> tuple[mx.array, dict[str, Any], mx.array]:
    """The loss from the last hidden state -> (loss, gradients of the final norm and the head,
    the cotangent of `h`), unevaluated."""
    head = {"norm": model.norm.trainable_parameters(), "head": model.head.trainable_parameters()}
    params = dict(tree_flatten(head))
    names = list(params)

    def head_loss(*arrays: mx.array) -> list[mx.array]:
        params = tree_unflatten(list(zip(names, arrays[:-1], strict=True)))
        model.norm.update(params["norm"])
        model.head.update(params["head"])
        return [next_byte_loss(model.logits(arrays[-1]), targets)]

    (loss,), grads = mx.vjp(head_loss, [*params.values(), h], [mx.array(1.0)])
    model.norm.update(head["norm"])  # the real parameters back, not the traced ones
    model.head.update(head["head"])
    return loss, tree_unflatten(list(zip(names, grads[:-1], strict=True))), grads[-1]


def train_grads(
    model: TTTModel, inputs: mx.array, targets: mx.array
) -> tuple[TimedStep, dict[str, Any]]:
    """A train step, timed per block, and its outer gradients (the caller applies the update)."""
    caches = model.make_cache(inputs.shape[0])
    before = [c.fast_weights for c in caches]
    hidden, stats, fwd_ms = forward_blocks(model.blocks, model.embed(inputs), caches)
    loss, grads, cotangent = head_vjp(model, hidden[-1], targets)
    mx.eval(loss, cotangent)
    block_grads, cotangent, bwd_ms = backward_blocks(model.blocks, hidden, cotangent)
    grads["blocks"] = block_grads
    _, grads["embed"], _ = vjp_of(model.embed, [], lambda: model.embed(inputs), cotangent)
    return TimedStep(loss, caches, before, stats, fwd_ms, bwd_ms), grads


def adapt_step(
    model: TTTModel, caches: list[TTTCache], inputs: mx.array, targets: mx.array
) -> TimedStep:
    """One adapt step (the caches carry on), timed per block."""
    before = [c.fast_weights for c in caches]
    hidden, stats, fwd_ms = forward_blocks(model.blocks, model.embed(inputs), caches)
    loss = next_byte_loss(model.logits(hidden[-1]), targets)
    mx.eval(loss)
    return TimedStep(loss, caches, before, stats, fwd_ms, [None] * len(fwd_ms))
