"""Pipeline stages chained in one process compute what the whole model computes: the same loss,
each parameter's gradient, the same update and the same fast weights, for 1, 2 and 4 stages and
with micro-batches; and a checkpoint moves between any numbers of stages."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from ttt_runtime.config import RunConfig
from ttt_runtime.learners import AdaptLearner, TrainLearner
from ttt_runtime.model import TTTModel
from ttt_runtime.pipeline import Stage, block_ranges, shift_block
from ttt_runtime.steps import fresh_cache_loss

RTOL = 1e-5


def config_for(mode: str, **overrides) -> RunConfig:
    settings = dict(num_blocks=4, batch_size=4, seq_len=32, sample_every=0, compile=False)
    return RunConfig.from_preset("tiny").with_overrides(mode=mode, **{**settings, **overrides})


def batches(config: RunConfig, count: int) -> list[tuple[mx.array, mx.array]]:
    rng = np.random.default_rng(7)
    shape = (config.batch_size, config.seq_len + 1)
    rows = [mx.array(rng.integers(0, 256, size=shape).astype(np.int32)) for _ in range(count)]
    return [(r[:, :-1], r[:, 1:]) for r in rows]


def whole_model(config: RunConfig) -> TTTModel:
    mx.random.seed(config.seed)  # as a stage builds it
    return TTTModel(config.model_config())


def close(got: mx.array, want: mx.array, name: str = "") -> None:
    scale = float(mx.abs(want).max().item()) + 1e-8
    error = float(mx.abs(got - want).max().item())
    assert error <= RTOL * scale, f"{name}: {error} > {RTOL} x {scale}"


def train_chain(stages: list[Stage], inputs, targets, micros: int) -> float:
    """One train step's gradients through the chain, GPipe order (every forward, then every
    backward) -> its loss; `apply` is left to the caller."""
    ins, tgts = np.array_split(np.array(inputs), micros), np.array_split(np.array(targets), micros)
    for stage in stages:
        stage.begin_step(sampled=False)
    for m, x in enumerate(ins):
        h = mx.array(x)
        for stage in stages:
            h = stage.forward(m, h)
    losses = []
    for m in reversed(range(micros)):
        cotangent = None
        for stage in reversed(stages):
            loss, cotangent = stage.backward(m, cotangent, mx.array(tgts[m]))
            if loss is not None:
                losses.append(loss.item())
    return float(np.mean(losses))


def apply_all(stages: list[Stage]) -> None:
    for stage in stages:
        stage.apply(stage.gradients())


@pytest.mark.parametrize("stages,micros", [(1, 1), (2, 1), (2, 2), (4, 2)])
def test_train_step_of_a_chain_is_the_whole_models(stages, micros):
    config = config_for("train")
    ((inputs, targets),) = batches(config, 1)
    model = whole_model(config)
    loss, grads = nn.value_and_grad(model, fresh_cache_loss)(model, inputs, targets)
    chain = [Stage(config, k, stages, config.batch_size) for k in range(stages)]
    assert [stage.blocks for stage in chain] == block_ranges(4, stages)
    chain_loss = train_chain(chain, inputs, targets, micros)
    assert abs(chain_loss - loss.item()) <= RTOL * abs(loss.item())
    want = dict(tree_flatten(grads))
    got = {}
    for stage in chain:  # each stage's gradients, renamed as the whole model's
        got.update({k[len("model.") :]: v for k, v in stage_named(stage, stage.gradients())})
    assert got.keys() == want.keys()
    for name in want:
        close(got[name], want[name], name)

    apply_all(chain)
    if micros == 1:  # one AdamW step, the whole model's (AdamW's first step is ~lr * sign(g):
        # with micro-batches, float-rounding-level gradient differences can flip tiny ones)
        learner = TrainLearner(whole_model(config), config)
        learner.step(inputs, targets, sampled=False)
        want_arrays = learner.state().arrays
        after = {k: v for stage in chain for k, v in stage.arrays()[0].items()}
        assert after.keys() == want_arrays.keys()
        for name in want_arrays:
            close(after[name], want_arrays[name], name)


def stage_named(stage: Stage, flat: dict[str, mx.array]) -> list[tuple[str, mx.array]]:
    """A stage's flat local names as the whole model's checkpoint names."""
    return [(shift_block(f"model.{k}", stage.blocks.start), v) for k, v in flat.items()]


@pytest.mark.parametrize("stages", [1, 2, 4])
def test_adapt_chunks_through_a_chain_leave_the_whole_models_fast_weights(stages):
    config = config_for("adapt", batch_size=2)
    learner = AdaptLearner(whole_model(config), config)
    chain = [Stage(config, k, stages, config.batch_size) for k in range(stages)]
    for inputs, targets in batches(config, 3):
        want = learner.step(inputs, targets, sampled=False).loss
        pieces = 2  # each chunk in two pieces along time, in order, as the pipeline sends them
        losses = []
        for x, y in zip(np.split(np.array(inputs), pieces, axis=1),
                        np.split(np.array(targets), pieces, axis=1), strict=True):  # fmt: skip
            h = mx.array(x)
            for stage in chain:
                h = stage.forward(0, h, mx.array(y) if stage.last else None)
            losses.append(h.item())
        assert abs(np.mean(losses) - want.item()) <= RTOL * abs(want.item())
    want_arrays = learner.state().arrays
    got = {k: v for stage in chain for k, v in stage.arrays()[0].items()}
    assert got.keys() == want_arrays.keys()
    for name in want_arrays:
        close(got[name], want_arrays[name], name)


@pytest.mark.parametrize("mode", ["train", "adapt"])
def test_a_checkpoint_moves_between_any_numbers_of_stages(mode):
    config = config_for(mode)
    two = [Stage(config, k, 2, config.batch_size) for k in range(2)]
    if mode == "train":
        ((inputs, targets),) = batches(config, 1)
        train_chain(two, inputs, targets, 1)
        apply_all(two)
    else:
        for inputs, targets in batches(config, 2):
            h = inputs
            for stage in two:
                h = stage.forward(0, h, targets if stage.last else None)
    arrays, offsets = {}, []
    for stage in two:
        part, part_offsets = stage.arrays()
        arrays.update(part)
        offsets += part_offsets
    for count in (1, 4):
        stages = [Stage(config, k, count, config.batch_size) for k in range(count)]
        for stage in stages:
            stage.load(arrays, offsets)
        again = {k: v for stage in stages for k, v in stage.arrays()[0].items()}
        assert again.keys() == arrays.keys()
        for name in arrays:
            assert mx.array_equal(again[name], arrays[name]), name


def test_more_stages_than_blocks_is_refused():
    with pytest.raises(ValueError, match="stages=5: must be from 1 to num_blocks=4"):
        block_ranges(4, 5)
