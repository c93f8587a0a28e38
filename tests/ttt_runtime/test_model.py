"""The byte-level TTT language model: shapes, streaming, training gradients, config errors."""

from __future__ import annotations

from typing import get_args

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from ttt_runtime.config import LayerType, ModelConfig, TTTLayerConfig
from ttt_runtime.layers import TTTMLP, TTTLinear
from ttt_runtime.model import LAYER_CLASSES, TTTModel

SMALL = dict(layer=TTTLayerConfig(32, 4, mini_batch_size=4), num_blocks=2, intermediate_size=48)


def tokens(batch, length, seed=0):
    return mx.array(np.random.default_rng(seed).integers(0, 256, (batch, length)).astype(np.int32))


@pytest.mark.parametrize(("layer_type", "cls"), [("linear", TTTLinear), ("mlp", TTTMLP)])
def test_model_shapes_and_parts(layer_type, cls):
    model = TTTModel(ModelConfig(layer_type=layer_type, **SMALL))
    logits = model(tokens(2, 9))
    assert logits.shape == (2, 9, 256) and logits.dtype == mx.float32
    assert len(model.blocks) == 2 and all(isinstance(b.ttt, cls) for b in model.blocks)
    h = model.embed(tokens(2, 9))
    for block in model.blocks:
        h = block.feed_forward(h + block.ttt(block.ttt_norm(h)))
    assert float(mx.abs(model.logits(h) - logits).max()) < 1e-5


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_model_streaming_matches_one_pass(layer_type):
    model = TTTModel(ModelConfig(layer_type=layer_type, **SMALL))
    t = tokens(2, 23)
    cache = model.make_cache(2)
    pieces = [model(t[:, a:b], cache=cache) for a, b in [(0, 5), (5, 6), (6, 16), (16, 23)]]
    whole = model(t)
    err = mx.abs(mx.concatenate(pieces, axis=1) - whole).max() / mx.abs(whole).max()
    assert float(err) < 1e-4
    assert [c.offset for c in cache] == [23, 23]


def test_training_steps_lower_the_loss_on_a_repeated_text():
    model = TTTModel(ModelConfig(**SMALL))
    data = mx.array(np.frombuffer(b"the quick brown fox jumps over the lazy dog. " * 2, np.uint8))
    inputs, targets = data[None, :-1].astype(mx.int32), data[None, 1:].astype(mx.int32)

    def loss_fn(m):
        return nn.losses.cross_entropy(m(inputs), targets, reduction="mean")

    step = nn.value_and_grad(model, loss_fn)
    optimizer = optim.Adam(learning_rate=1e-2)
    first = None
    for _ in range(15):
        loss, grads = step(model)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        first = first if first is not None else loss.item()
    assert loss.item() < 0.8 * first


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"layer_type": "attention"}, "layer_type"),
        ({"num_blocks": 0}, "num_blocks"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"intermediate_size": -4}, "intermediate_size"),
        ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
        ({"layer": {"hidden_size": 32}}, "layer"),
    ],
)
def test_bad_model_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}="):
        ModelConfig(**{**SMALL, **kwargs})


def test_every_layer_type_has_its_layer_class():
    assert set(LAYER_CLASSES) == set(get_args(LayerType))


def test_wrong_cache_length_is_an_error():
    model = TTTModel(ModelConfig(**SMALL))
    with pytest.raises(ValueError):
        model(tokens(1, 4), cache=model.make_cache(1)[:1])


@pytest.mark.parametrize("layer_type", get_args(LayerType))
@pytest.mark.parametrize("use_gate", [False, True])
def test_the_config_counts_the_models_parameters(layer_type, use_gate):
    # what the run's memory check (RunConfig) reckons with, against the real model's weights
    layer = TTTLayerConfig(hidden_size=48, num_heads=6, mini_batch_size=4, use_gate=use_gate)
    config = ModelConfig(layer, layer_type=layer_type, num_blocks=3, intermediate_size=40)
    weights = tree_flatten(TTTModel(config).parameters())
    assert config.parameter_count() == sum(w.size for _, w in weights)
