"""Checkpoint files: atomic, verified, and never loaded when incomplete or altered. Also the
sampled train step: the same gradients as one whole-model value_and_grad."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from ttt_runtime.checkpoint import Checkpoint, CheckpointError, load, save
from ttt_runtime.config import RunConfig, checkpoint_config
from ttt_runtime.model import TTTModel
from ttt_runtime.steps import fresh_cache_loss, model_config
from ttt_runtime.telemetry import sampled_train_grads


def make_checkpoint() -> Checkpoint:
    rng = np.random.default_rng(0)
    arrays = {
        "model.w": mx.array(rng.normal(size=(8, 8)).astype(np.float32)),
        "optimizer.step": mx.array(3, dtype=mx.uint64),
        "cache.0.0": mx.array(rng.normal(size=(1, 2, 5, 4)).astype(np.float32)),
    }
    return Checkpoint(arrays, {"preset": "tiny", "seq_len": 32}, 7, 224, 224, 2, [224])


def test_round_trip_keeps_everything(tmp_path):
    original = make_checkpoint()
    path = save(str(tmp_path / "sub" / "c.safetensors"), original)
    assert os.listdir(tmp_path / "sub") == ["c.safetensors"]  # no temporary left behind
    loaded = load(path)
    assert (loaded.step, loaded.tokens, loaded.stream_position) == (7, 224, 224)
    assert (loaded.conversation, loaded.cache_offsets, loaded.config) == (2, [224], original.config)
    for name, value in original.arrays.items():
        assert mx.array_equal(loaded.arrays[name], value).item()
    assert loaded.group("model").keys() == {"w"}
    assert checkpoint_config(path) == original.config  # the header alone, without MLX


def test_a_failed_save_leaves_the_old_file_alone(tmp_path):
    path = tmp_path / "c.safetensors"
    save(str(path), make_checkpoint())
    before = path.read_bytes()
    bad = make_checkpoint()
    bad.arrays["model.w"] = object()  # cannot be written
    with pytest.raises(Exception):  # noqa: B017 - whatever MLX raises, the old file stays
        save(str(path), bad)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.safetensors"]


@pytest.mark.parametrize("keep", [0.5, 0.99, 0.02])
def test_truncated_file_is_refused(tmp_path, keep):
    path = Path(save(str(tmp_path / "c.safetensors"), make_checkpoint()))
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="truncated"):
        load(str(path))


def test_flipped_byte_in_a_tensor_is_refused(tmp_path):
    path = Path(save(str(tmp_path / "c.safetensors"), make_checkpoint()))
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # inside the last tensor's bytes: a well-formed file with wrong numbers
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load(str(path))


def test_unwritable_place_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CheckpointError, match="cannot"):
        save(str(blocker / "c.safetensors"), make_checkpoint())


def test_missing_or_foreign_file_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load(str(tmp_path / "none.safetensors"))
    foreign = str(tmp_path / "other.safetensors")
    mx.save_safetensors(foreign, {"x": mx.zeros(3)})
    with pytest.raises(CheckpointError, match="not an xltop TTT checkpoint"):
        load(foreign)


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_sampled_train_step_gradients_match_value_and_grad(layer_type):
    config = RunConfig.from_preset("tiny").with_overrides(layer_type=layer_type)
    mx.random.seed(1)
    model = TTTModel(model_config(config))
    rng = np.random.default_rng(0)
    tokens = mx.array(rng.integers(0, 256, size=(2, 33)).astype(np.int32))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    loss, want = nn.value_and_grad(model, fresh_cache_loss)(model, inputs, targets)
    sample = sampled_train_grads(model, inputs, targets)
    assert abs(sample.loss.item() - loss.item()) < 1e-5
    assert len(sample.fwd_ms) == len(sample.bwd_ms) == len(sample.stats) == config.num_blocks
    want, got = dict(tree_flatten(want)), dict(tree_flatten(sample.grads))
    assert want.keys() == got.keys()
    for name in want:
        scale = float(mx.abs(want[name]).max().item()) + 1e-8
        assert float(mx.abs(got[name] - want[name]).max().item()) <= 1e-4 * scale, name
