"""adapt_method 'dynamic': every outer weight learns the chunk's next bytes."""

from __future__ import annotations

import mlx.core as mx
from adapt_helpers import bpb, chunks, learner
from mlx.utils import tree_flatten


def test_every_outer_weight_a_chunk_uses_moves_and_more_steps_learn_more(small_base):
    adapter = learner(small_base, "dynamic")
    before = dict(tree_flatten(adapter.model.parameters()))
    (chunk,) = chunks("prose", 1)
    bpb(adapter, chunk)
    after = dict(tree_flatten(adapter.model.parameters()))
    still = {k for k in before if mx.array_equal(before[k], after[k]).item()}
    # the initial fast weights make a conversation's first cache only: no chunk's loss uses them
    assert still == {f"blocks.{i}.ttt.{w}" for i in range(2) for w in ("W1", "b1")}
    assert mx.array_equal(adapter.base["head.weight"], before["head.weight"]).item()
    one, three = (learner(small_base, "dynamic", adapt_steps=n) for n in (1, 3))
    for adapter in (one, three):
        bpb(adapter, chunk)
    assert bpb(three, chunk) < bpb(one, chunk)
