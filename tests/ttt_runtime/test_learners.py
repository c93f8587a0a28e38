"""The learners, through the interface a driver calls: what a checkpoint keeps of a learner
restores one that steps on exactly as the original."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from ttt_runtime import checkpoint as ckpt
from ttt_runtime.config import RunConfig
from ttt_runtime.learners import LEARNERS
from ttt_runtime.model import TTTModel


@pytest.mark.parametrize(
    "overrides",
    [{"mode": "train"}, {"mode": "adapt"}, {"mode": "adapt", "exact_accumulate": True}],
)
def test_a_learner_restored_from_its_checkpoint_steps_on_as_the_original(tmp_path, overrides):
    config = RunConfig.from_preset("tiny").with_overrides(**overrides)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(3):
        tokens = rng.integers(0, 256, size=(config.batch_size, config.seq_len + 1))
        batches.append((mx.array(tokens[:, :-1]), mx.array(tokens[:, 1:])))
    mx.random.seed(config.seed)
    original = LEARNERS[config.mode](TTTModel(config.model_config()), config)
    for inputs, targets in batches[:2]:
        original.step(inputs, targets, sampled=False)
    state = original.state()
    path = ckpt.save(
        str(tmp_path / "learner.safetensors"),
        ckpt.Checkpoint(state.arrays, config.as_dict(), 2, 0, 0, 0, state.cache_offsets),
    )
    mx.random.seed(config.seed + 1)  # other initial weights: all must come from the file
    restored = LEARNERS[config.mode](TTTModel(config.model_config()), config, ckpt.load(path))
    assert restored.state().cache_offsets == state.cache_offsets
    results = [learner.step(*batches[2], sampled=True) for learner in (original, restored)]
    assert results[0].loss.item() == results[1].loss.item()
    assert all(r.sample is not None and r.seconds > 0 for r in results)
    after = [learner.state().arrays for learner in (original, restored)]
    assert after[0].keys() == after[1].keys()
    assert any(name.startswith(("optimizer.", "cache.")) for name in after[0])
    for name, value in after[0].items():
        assert mx.array_equal(value, after[1][name]).item(), name
