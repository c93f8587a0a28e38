"""adapt_method 'tent': entropy minimisation on the norms, never looking at the targets."""

from __future__ import annotations

import mlx.core as mx
from adapt_helpers import chunks, learner
from mlx.utils import tree_flatten


def entropy(adapter, inputs) -> float:
    logits = adapter.model(inputs, adapter.model.make_cache(inputs.shape[0]))
    log_p = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return -(mx.exp(log_p) * log_p).sum(axis=-1).mean().item()


def test_it_lowers_the_entropy_of_a_repeated_chunk_by_moving_only_the_norms(small_base):
    adapter = learner(small_base, "tent")
    (chunk,) = chunks("prose", 1)
    entropies = []
    for _ in range(4):
        entropies.append(entropy(adapter, chunk[0]))
        adapter.step(*chunk, sampled=False)
    assert entropies[-1] < entropies[0] - 0.05, entropies
    now = dict(tree_flatten(adapter.model.parameters()))
    moved = {k for k in now if not mx.array_equal(now[k], adapter.base[k]).item()}
    assert moved == adapter.method.norm_weights and all("norm" in k for k in moved)


def test_its_update_does_not_depend_on_the_targets(small_base):
    (chunk,) = chunks("prose", 1)
    true_targets, other_targets = learner(small_base, "tent"), learner(small_base, "tent")
    true_targets.step(*chunk, sampled=False)
    other_targets.step(chunk[0], mx.zeros_like(chunk[1]), sampled=False)
    for name, value in true_targets.method.params.items():
        assert mx.array_equal(value, other_targets.method.params[name]).item(), name
