"""The step run block by block: the same gradients as one whole-model value_and_grad, and the
same result wherever the blocks are cut into runs (a pipeline stage steps its own blocks)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from ttt_runtime.blockwise import backward_blocks, forward_blocks, head_vjp, train_grads
from ttt_runtime.config import RunConfig
from ttt_runtime.model import TTTModel
from ttt_runtime.steps import fresh_cache_loss


def tiny_model_and_batch(**overrides) -> tuple[TTTModel, mx.array, mx.array]:
    config = RunConfig.from_preset("tiny").with_overrides(**overrides)
    mx.random.seed(1)
    model = TTTModel(config.model_config())
    rng = np.random.default_rng(0)
    tokens = mx.array(rng.integers(0, 256, size=(2, 33)).astype(np.int32))
    return model, tokens[:, :-1], tokens[:, 1:]


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_timed_train_step_gradients_match_value_and_grad(layer_type):
    model, inputs, targets = tiny_model_and_batch(layer_type=layer_type)
    loss, want = nn.value_and_grad(model, fresh_cache_loss)(model, inputs, targets)
    timed, grads = train_grads(model, inputs, targets)
    assert abs(timed.loss.item() - loss.item()) < 1e-5
    blocks = len(model.blocks)
    assert len(timed.fwd_ms) == len(timed.bwd_ms) == len(timed.stats) == blocks
    want, got = dict(tree_flatten(want)), dict(tree_flatten(grads))
    assert want.keys() == got.keys()
    for name in want:
        scale = float(mx.abs(want[name]).max().item()) + 1e-8
        assert float(mx.abs(got[name] - want[name]).max().item()) <= 1e-4 * scale, name


def test_blocks_cut_into_two_runs_step_exactly_as_one():
    """Hidden states handed forward and the cotangent handed back across the cut: the same
    bits as one run of all the blocks."""
    model, inputs, targets = tiny_model_and_batch(num_blocks=4)
    blocks, cut = model.blocks, 2

    def step(runs):
        caches = model.make_cache(inputs.shape[0])
        hidden, h = [], model.embed(inputs)
        for first, end in runs:
            part, _, _ = forward_blocks(blocks[first:end], h, caches[first:end])
            hidden.append(part)
            h = part[-1]
        loss, _, cotangent = head_vjp(model, h, targets)
        grads = []
        for (first, end), part in reversed(list(zip(runs, hidden, strict=True))):
            part_grads, cotangent, _ = backward_blocks(blocks[first:end], part, cotangent)
            grads = part_grads + grads
        return [loss, h, cotangent, *(a for _, a in tree_flatten(grads))]

    whole = step([(0, len(blocks))])
    cut_in_two = step([(0, cut), (cut, len(blocks))])
    assert len(whole) == len(cut_in_two) > 3
    for a, b in zip(whole, cut_in_two, strict=True):
        assert mx.array_equal(a, b).item()
