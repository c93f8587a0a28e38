"""The unsampled steps: one whole-model call per step, evaluated once at the end (full fusion).

Train: a fresh cache from the learned initial fast weights each step, next-byte cross-entropy,
MLX autograd through the inner TTT loop, an AdamW update. Adapt: outer weights frozen, one
persistent cache carried across steps (one long conversation).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from ttt_runtime.config import RunConfig
from ttt_runtime.layers import TTTCache
from ttt_runtime.model import TTTModel

LN2 = math.log(2.0)


def next_byte_loss(logits: mx.array, targets: mx.array) -> mx.array:
    """Mean cross-entropy in nats."""
    return nn.losses.cross_entropy(logits, targets, reduction="mean")


def fresh_cache_loss(model: TTTModel, inputs: mx.array, targets: mx.array) -> mx.array:
    """Train mode's loss: every step starts from the learned initial fast weights."""
    cache = model.make_cache(inputs.shape[0])
    return next_byte_loss(model(inputs, cache), targets)


def make_optimizer(config: RunConfig) -> optim.Optimizer:
    return optim.AdamW(learning_rate=config.lr, weight_decay=config.weight_decay)


def make_train_step(model: TTTModel, optimizer: optim.Optimizer, compile: bool):
    """step(inputs, targets) -> loss (nats), parameters and optimizer state updated."""
    loss_and_grad = nn.value_and_grad(model, fresh_cache_loss)

    def step(inputs: mx.array, targets: mx.array) -> mx.array:
        loss, grads = loss_and_grad(model, inputs, targets)
        optimizer.update(model, grads)
        return loss

    if not compile:
        return step
    state = [model.state, optimizer.state]
    return mx.compile(step, inputs=state, outputs=state)


def adapt_step(
    model: TTTModel, cache: list[TTTCache], inputs: mx.array, targets: mx.array
) -> mx.array:
    """Frozen outer weights; the cache (fast weights) carries over to the next chunk."""
    return next_byte_loss(model(inputs, cache), targets)


def cache_arrays(cache: list[TTTCache]) -> list[mx.array]:
    """What must be evaluated for a cache to stand on its own (no graph kept alive)."""
    return [a for c in cache for a in c.state]
