"""adapt_method 'lora': low-rank adapters on the TTT projections, the base untouched."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from adapt_helpers import bpb, chunks, learner, same_arrays
from mlx.utils import tree_flatten

from ttt_runtime import checkpoint as ckpt
from ttt_runtime.adapt.lora import PROJECTIONS, initial_factors


@pytest.mark.parametrize("init", ["random", "qr", "svd"])
def test_it_starts_as_the_base_and_learns_only_the_projections(small_base, init):
    adapter = learner(small_base, "lora", lora_init=init)
    base = dict(adapter.base)
    (chunk,) = chunks("prose", 1)
    assert adapter.step(*chunk, sampled=False).loss.item() == adapter.baseline_loss(*chunk).item()
    bpb(adapter, chunk)
    now = dict(tree_flatten(adapter.model.parameters()))
    moved = {k for k in now if not mx.array_equal(now[k], base[k]).item()}
    assert moved and all(k.endswith(PROJECTIONS) for k in moved)
    assert same_arrays(adapter.base, base)  # the base itself is never changed


def test_svd_starts_from_the_weights_best_rank_r_part():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 6))
    a, b = initial_factors(weight, 2, "svd", rng)
    u, s, vt = np.linalg.svd(weight)
    np.testing.assert_allclose(b @ a, (u[:, :2] * s[:2]) @ vt[:2], atol=1e-12)
    a, b = initial_factors(weight, 2, "qr", rng)
    np.testing.assert_allclose(a @ a.T, np.eye(2), atol=1e-12)  # orthonormal rows
    assert not b.any()


def test_a_checkpoint_of_another_rank_is_one_line(small_base, tmp_path):
    adapter = learner(small_base, "lora", lora_rank=2)
    state = adapter.state()
    config = ckpt.load(small_base).config | {"mode": "adapt", "adapt_method": "lora"}
    path = ckpt.save(
        str(tmp_path / "rank2.safetensors"),
        ckpt.Checkpoint(state.arrays, config | {"lora_rank": 2}, 1, 0, 0, 0, state.cache_offsets),
    )
    with pytest.raises(ValueError, match="its lora state .* is not that of this method"):
        learner(path, "lora", lora_rank=4)
