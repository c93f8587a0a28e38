"""The sampled steps and what the run reports about itself.

A sampled step is a real step (same maths, same update) run block by block with an evaluation
at every block boundary, so that each block's time can be read off the clock; that costs the
fusion across blocks, hence the sampling schedule. In train mode the backward pass is chained
block by block with `mx.vjp`; each block's vjp re-runs its forward, which is evaluated first, so
that the clock then reads the backward alone (the cotangents' evaluation).

Fast-weight figures per TTT layer (docs/ttt-maths.md), over all of a layer's fast-weight
tensors and heads, averaged over the batch rows: `w_norm` = ||W||, `update_norm` = ||W_after -
W_before|| over the step, `drift` = ||W - W_0|| with W_0 the fast weights at the start of the
conversation (train mode: every step is a fresh conversation, so drift = update_norm).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ttt_runtime.layers import TTTCache
from ttt_runtime.model import TTTModel
from ttt_runtime.steps import cache_arrays, next_byte_loss

Params = dict[str, mx.array]  # a layer's fast weights by name (cache.fast_weights)


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1e3


def _norm(tensors) -> mx.array:
    """sqrt(sum of squares over every tensor but the batch axis), averaged over the batch."""
    squares = sum(mx.sum(mx.square(t).reshape(t.shape[0], -1), axis=1) for t in tensors)
    return mx.mean(mx.sqrt(squares))


def fast_weight_stats(now: list[Params], before: list[Params], origin: list[Params]) -> list[dict]:
    """Per layer: w_norm, update_norm, drift (floats)."""
    figures = [
        (_norm(w.values()), _norm(w[k] - wb[k] for k in w), _norm(w[k] - wo[k] for k in w))
        for w, wb, wo in zip(now, before, origin, strict=True)
    ]
    mx.eval(figures)
    return [{"w_norm": n.item(), "update_norm": u.item(), "drift": d.item()} for n, u, d in figures]


def timed_forward(model: TTTModel, inputs: mx.array, caches: list[TTTCache]):
    """Blocks one by one -> (hidden states before each block and after the last, inner-loop
    stats per layer, forward ms per block)."""
    h = model.embed(inputs)
    mx.eval(h)
    hidden, stats, fwd_ms = [h], [], []
    for block, cache in zip(model.blocks, caches, strict=True):
        start = time.perf_counter()
        y, layer_stats = block.ttt.forward_with_stats(block.ttt_norm(h), cache)
        h = block.feed_forward(h + y)
        mx.eval(h, layer_stats, cache_arrays([cache]))
        fwd_ms.append(_ms_since(start))
        hidden.append(h)
        stats.append(layer_stats)
    return hidden, stats, fwd_ms


def _grad_of(module, inputs: list[mx.array], fn, cotangent: mx.array):
    """vjp of `fn(module with params, *inputs)` -> (outputs, param grads as a tree, input
    grads), unevaluated."""
    flat = tree_flatten(module.trainable_parameters())
    names = [name for name, _ in flat]
    n = len(flat)

    def call(*arrays):
        module.update(tree_unflatten(list(zip(names, arrays[:n], strict=True))))
        return [fn(*arrays[n:])]

    outputs, grads = mx.vjp(call, [a for _, a in flat] + inputs, [cotangent])
    module.update(tree_unflatten(flat))  # the real parameters back, not the traced ones
    return outputs, tree_unflatten(list(zip(names, grads[:n], strict=True))), grads[n:]


@dataclass
class Sample:
    """What a sampled step measured."""

    loss: mx.array
    caches: list[TTTCache]  # the fast weights as the step left them
    before: list[dict]  # the fast weights at the step's start
    stats: list[dict]  # per layer: forward_with_stats' inner losses and lr
    fwd_ms: list[float]
    bwd_ms: list[float | None]
    grads: dict | None = None  # train mode: the outer gradients, for the optimizer


def sampled_train_grads(model: TTTModel, inputs: mx.array, targets: mx.array) -> Sample:
    """A train step's loss and gradients, timed per block (the caller applies the update)."""
    batch = inputs.shape[0]
    caches = model.make_cache(batch)
    before = [c.fast_weights for c in caches]
    hidden, stats, fwd_ms = timed_forward(model, inputs, caches)

    head = {"norm": model.norm.trainable_parameters(), "head": model.head.trainable_parameters()}
    flat_head = tree_flatten(head)

    def head_loss(*arrays):
        params = tree_unflatten(list(zip([k for k, _ in flat_head], arrays[:-1], strict=True)))
        model.norm.update(params["norm"])
        model.head.update(params["head"])
        return [next_byte_loss(model.logits(arrays[-1]), targets)]

    (loss,), head_grads = mx.vjp(
        head_loss, [a for _, a in flat_head] + [hidden[-1]], [mx.array(1.0)]
    )
    model.norm.update(head["norm"])
    model.head.update(head["head"])
    cotangent = head_grads[-1]
    grads = tree_unflatten(list(zip([k for k, _ in flat_head], head_grads[:-1], strict=True)))
    mx.eval(loss, cotangent)

    block_grads, bwd_ms = [None] * len(model.blocks), [0.0] * len(model.blocks)
    for i in reversed(range(len(model.blocks))):
        block = model.blocks[i]
        outputs, block_grads[i], (cotangent,) = _grad_of(
            block, [hidden[i]], lambda h, b=block: b(h, cache=b.ttt.make_cache(batch)), cotangent
        )
        mx.eval(outputs)  # the forward again, kept for the backward: not backward time
        start = time.perf_counter()
        mx.eval(block_grads[i], cotangent)
        bwd_ms[i] = _ms_since(start)
    grads["blocks"] = block_grads
    _, grads["embed"], _ = _grad_of(model.embed, [], lambda: model.embed(inputs), cotangent)
    return Sample(loss, caches, before, stats, fwd_ms, bwd_ms, grads)


def sampled_adapt_step(model: TTTModel, caches: list[TTTCache], inputs, targets) -> Sample:
    """One adapt step (the caches carry on), timed per block."""
    before = [c.fast_weights for c in caches]
    hidden, stats, fwd_ms = timed_forward(model, inputs, caches)
    loss = next_byte_loss(model.logits(hidden[-1]), targets)
    mx.eval(loss)
    return Sample(loss, caches, before, stats, fwd_ms, [None] * len(fwd_ms))


def inner_stats(stats: list[dict]) -> tuple[list[dict], float]:
    """Per layer inner loss before/after (floats), and the mean inner learning rate."""
    layers = [
        {"inner_loss_before": s["inner_loss_before"].item(),
         "inner_loss_after": s["inner_loss_after"].item()}
        for s in stats
    ]  # fmt: skip
    return layers, float(np.mean([s["lr_mean"].item() for s in stats]))


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def device_info() -> dict:
    """The run's device as MLX describes it in this process (see `describe_device`)."""
    backend = backend_name(mx.default_device(), mx.cuda.is_available())
    return describe_device(mx.device_info(), backend)


def backend_name(device: mx.Device, cuda_available: bool) -> str:
    """'cpu', 'cuda', or 'gpu' for Metal (MLX's GPU is one or the other)."""
    if device.type == mx.DeviceType.cpu:
        return "cpu"
    return "cuda" if cuda_available else "gpu"


def describe_device(info: dict, backend: str) -> dict:
    """Backend, name, memory size and (Metal) recommended working set, from `mx.device_info()`.

    Metal reports the memory size and the working set; MLX's CPU backend only names the device,
    so the memory size is the machine's there and the working set None."""
    return {
        "backend": backend,
        "device": str(info.get("device_name", "")),
        "memory_size": int(info.get("memory_size") or _physical_memory()),
        "working_set": info.get("max_recommended_working_set_size"),
    }


def memory_counters() -> dict:
    """This process's MLX memory in bytes (MLX counters are per process)."""
    return {
        "active": mx.get_active_memory(),
        "cache": mx.get_cache_memory(),
        "peak": mx.get_peak_memory(),
        "limit": mx.get_memory_limit(),
    }
