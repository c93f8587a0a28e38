"""The TTT layers against a float64 NumPy transcription of docs/ttt-maths.md, and own invariants."""

from __future__ import annotations

import collections
import io
import re

import mlx.core as mx
import numpy as np
import pytest
import ttt_reference_numpy as ref
from mlx.utils import tree_flatten

from ttt_runtime.layers import TTTMLP, TTTLayerConfig, TTTLinear
from ttt_runtime.layers.ops import gelu_tanh, gelu_tanh_and_grad, inner_loss, ln_l2_grad

LAYERS = {"linear": TTTLinear, "mlp": TTTMLP}
D, NH, K = 32, 4, 4


def random_weights(kind, d=D, nh=NH, k=K, use_gate=False, seed=0):
    """Reference-named parameters, scaled so that every term of the inner loop matters."""
    rng = np.random.default_rng(seed)
    f = d // nh
    wide = 4 * f
    w = {f"{n}_proj.weight": rng.normal(0, d**-0.5, (d, d)) for n in "qkvo"}
    w.update(
        learnable_ttt_lr_weight=rng.normal(0, 0.2, (nh, 1, d)),
        learnable_ttt_lr_bias=rng.normal(0, 0.5, (nh, 1)),
        learnable_token_idx=rng.normal(0, 0.1, (k,)),
        ttt_norm_weight=rng.normal(1, 0.2, (nh, f)),
        ttt_norm_bias=rng.normal(0, 0.2, (nh, f)),
        **{
            "post_norm.weight": rng.normal(1, 0.2, (d,)),
            "post_norm.bias": rng.normal(0, 0.2, (d,)),
        },
    )
    if use_gate:
        w["g_proj.weight"] = rng.normal(0, d**-0.5, (d, d))
    if kind == "linear":
        w.update(W1=rng.normal(0, 0.3, (nh, f, f)), b1=rng.normal(0, 0.3, (nh, 1, f)))
    else:
        w.update(
            W1=rng.normal(0, 0.3, (nh, f, wide)),
            b1=rng.normal(0, 0.3, (nh, 1, wide)),
            W2=rng.normal(0, 0.3, (nh, wide, f)),
            b2=rng.normal(0, 0.3, (nh, 1, f)),
        )
    return {name: value.astype(np.float32) for name, value in w.items()}


def make_layer(kind, seed=0, use_gate=False, compile=True, base_lr=1.0):
    cfg = TTTLayerConfig(
        D, NH, mini_batch_size=K, use_gate=use_gate, compile=compile, ttt_base_lr=base_lr
    )
    weights = random_weights(kind, use_gate=use_gate, seed=seed)
    return LAYERS[kind].from_state_dict(cfg, weights), weights


def random_input(batch, length, seed=1):
    return np.random.default_rng(seed).normal(0, 1, (batch, length, D)).astype(np.float32)


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_numpy_dual_and_primal_forms_agree(kind):
    weights = random_weights(kind)
    x = random_input(2, 10)
    dual, dual_losses = ref.ttt_layer(weights, x, kind, NH, K, form="dual")
    primal, primal_losses = ref.ttt_layer(weights, x, kind, NH, K, form="primal")
    assert rel_err(dual, primal) < 1e-12
    np.testing.assert_allclose(dual_losses, primal_losses, rtol=1e-10)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize(
    ("batch", "length", "use_gate"),
    [(1, 16, False), (2, 13, False), (3, 1, False), (2, 7, True)],
    ids=["whole-mini-batches", "L-not-multiple-of-K", "one-token", "gate"],
)
def test_layer_matches_numpy_reference(kind, batch, length, use_gate):
    layer, weights = make_layer(kind, use_gate=use_gate)
    x = random_input(batch, length)
    expected, losses = ref.ttt_layer(weights, x, kind, NH, K, use_gate=use_gate)
    y, stats = layer.forward_with_stats(mx.array(x))
    assert y.shape == (batch, length, D)
    assert rel_err(y, expected) < 1e-4
    lr_logit = np.einsum("bld,hd->bhl", x, weights["learnable_ttt_lr_weight"][:, 0])
    lr = 1 / (1 + np.exp(-(lr_logit + weights["learnable_ttt_lr_bias"][None, :, :1]))) / (D // NH)
    assert stats["lr_mean"].item() == pytest.approx(lr.mean(), rel=1e-4)
    assert stats["inner_loss_before"].item() == pytest.approx(losses[0].mean(), rel=1e-4)
    assert stats["inner_loss_after"].item() == pytest.approx(losses[1].mean(), rel=1e-4)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("mini_batch", [1, 5, 16])
def test_other_mini_batch_sizes_match_the_reference_in_one_pass_and_in_chunks(kind, mini_batch):
    cfg = TTTLayerConfig(D, NH, mini_batch_size=mini_batch, ttt_base_lr=0.5)
    weights = random_weights(kind, k=mini_batch, seed=4)
    layer = LAYERS[kind].from_state_dict(cfg, weights)
    x = random_input(2, 11, seed=4)
    expected, _ = ref.ttt_layer(weights, x, kind, NH, mini_batch, base_lr=0.5)
    assert rel_err(layer(mx.array(x)), expected) < 1e-4
    cache = layer.make_cache(2)
    pieces = [layer(mx.array(x[:, a:b]), cache=cache) for a, b in [(0, 2), (2, 9), (9, 11)]]
    assert rel_err(mx.concatenate(pieces, axis=1), expected) < 1e-4


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_stats_of_a_continued_chunk_match_the_reference(kind):
    """A chunk that starts mid-mini-batch and ends the stream: its inner losses before/after
    are the reference's for those tokens (the weights at each mini-batch's start and end)."""
    layer, weights = make_layer(kind)
    x = random_input(1, 3 * K + 1)
    _, losses = ref.ttt_layer(weights, x, kind, NH, K)
    cache = layer.make_cache(1)
    layer(mx.array(x[:, : K + 2]), cache=cache)
    _, stats = layer.forward_with_stats(mx.array(x[:, K + 2 :]), cache=cache)
    tail = losses[:, :, :, K + 2 :]
    assert stats["inner_loss_before"].item() == pytest.approx(tail[0].mean(), rel=1e-4)
    assert stats["inner_loss_after"].item() == pytest.approx(tail[1].mean(), rel=1e-4)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_cache_at_rest_holds_the_reference_fast_weights(kind):
    """After 2 whole mini-batches the cache's fast weights are the reference's, per batch row."""
    layer, weights = make_layer(kind)
    x = random_input(2, 2 * K)
    cache = layer.make_cache(2)
    layer(mx.array(x), cache=cache)
    assert cache.offset == 2 * K and cache.sums is None
    for name, value in cache.fast_weights.items():
        assert value.dtype == mx.float32 and value.shape == (2, *weights[name].shape)
    # a third mini-batch's output depends on the stream only through those fast weights
    x3 = random_input(2, K, seed=7)
    y3 = layer(mx.array(x3), cache=cache)
    expected, _ = ref.ttt_layer(weights, np.concatenate([x, x3], 1), kind, NH, K)
    assert rel_err(y3, expected[:, 2 * K :]) < 1e-4


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_chunkings_match_one_pass(kind, seed):
    layer, _ = make_layer(kind, seed=seed)
    length = 37
    x = mx.array(random_input(2, length, seed=seed))
    whole = layer(x)
    rng = np.random.default_rng(seed)
    cuts = sorted(rng.choice(np.arange(1, length), size=rng.integers(3, 9), replace=False))
    cache = layer.make_cache(2)
    pieces = [
        layer(x[:, a:b], cache=cache) for a, b in zip([0, *cuts], [*cuts, length], strict=True)
    ]
    assert rel_err(mx.concatenate(pieces, axis=1), whole) < 1e-4
    assert cache.offset == length


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_token_by_token_matches_one_pass(kind):
    layer, _ = make_layer(kind)
    x = mx.array(random_input(1, 2 * K + 3))
    cache = layer.make_cache(1)
    pieces = [layer(x[:, i : i + 1], cache=cache) for i in range(x.shape[1])]
    assert rel_err(mx.concatenate(pieces, axis=1), layer(x)) < 1e-4


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_compiled_and_plain_scans_agree(kind):
    compiled, _ = make_layer(kind, compile=True)
    plain, _ = make_layer(kind, compile=False)
    x = mx.array(random_input(2, 3 * K))
    assert rel_err(compiled(x), plain(x)) < 1e-5


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_recorded_updates_sum_to_the_weight_change(kind):
    layer, _ = make_layer(kind)
    cache = layer.make_cache(1)
    layer(mx.array(random_input(1, 3)), cache=cache)  # start mid-mini-batch
    start = {name: np.array(w, dtype=np.float64) for name, w in cache.fast_weights.items()}
    cache.record_updates = True
    layer(mx.array(random_input(1, 3 * K, seed=5)), cache=cache)
    for name, w in cache.fast_weights.items():
        updates = np.array(cache.updates[name], dtype=np.float64)
        assert updates.shape[0] == 3  # the one begun earlier and two whole ones
        np.testing.assert_allclose(start[name] - updates.sum(0), np.array(w), atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_cache_state_round_trip_continues_the_stream(kind):
    layer, _ = make_layer(kind)
    x = mx.array(random_input(1, 2 * K + 5))
    cache = layer.make_cache(1)
    layer(x[:, : K + 2], cache=cache)
    restored = layer.make_cache(1)
    restored.state = [mx.array(np.array(a)) for a in cache.state]
    restored.meta_state = cache.meta_state
    assert rel_err(layer(x[:, K + 2 :], cache=restored), layer(x[:, K + 2 :], cache=cache)) < 1e-6
    with pytest.raises(ValueError, match="shape"):
        restored.state = [mx.zeros((1, 1)) for _ in cache.state]


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_bf16_model_keeps_fast_weights_float32(kind):
    layer, _ = make_layer(kind)
    x = random_input(1, 2 * K + 1)
    y32 = layer(mx.array(x))
    layer.set_dtype(mx.bfloat16)
    cache = layer.make_cache(1)
    y16 = layer(mx.array(x).astype(mx.bfloat16), cache=cache)
    assert y16.dtype == mx.bfloat16
    assert all(w.dtype == mx.float32 for w in cache.fast_weights.values())
    assert all(s.dtype == mx.float32 for s in cache.sums)
    assert rel_err(y16.astype(mx.float32), y32) < 0.1


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_outer_gradients_flow_through_the_compiled_scan(kind):
    layer, _ = make_layer(kind, compile=True)
    plain, _ = make_layer(kind, compile=False)
    x = mx.array(random_input(1, 2 * K + 1))

    def grads(model):
        def loss(params):
            model.update(params)
            return (model(x) ** 2).mean()

        return dict(tree_flatten(mx.grad(loss)(model.trainable_parameters())))

    compiled_grads, plain_grads = grads(layer), grads(plain)
    for name in ("W1", "q_proj.weight", "learnable_ttt_lr_weight", "ttt_norm_weight"):
        assert float(mx.abs(compiled_grads[name]).max()) > 0
        assert rel_err(compiled_grads[name], plain_grads[name]) < 1e-4


# primitives that only make a view of their input: no kernel runs for them
VIEWS = {"Slice", "Squeeze", "ExpandDims", "Reshape", "Split", "Broadcast", "Transpose"}


def kernels(layer, length: int) -> collections.Counter:
    """The kernels in the graph of one call of `length` tokens, by primitive."""
    dot = io.StringIO()
    mx.export_to_dot(dot, layer(mx.zeros((1, length, D))))
    names = re.findall(r'label ="([^"]+)"', dot.getvalue())
    return collections.Counter(name for name in names if name not in VIEWS)


def kernels_per_mini_batch(layer) -> collections.Counter:
    """The kernels one more mini-batch adds to the layer's compiled graph, by primitive."""
    return kernels(layer, 3 * K) - kernels(layer, 2 * K)


@pytest.mark.parametrize(("kind", "most"), [("linear", 14), ("mlp", 40)])
def test_the_scan_runs_few_kernels_per_mini_batch(kind, most):
    """Each kernel in the sequential scan costs ~10 us on the CPU whatever its size: a step's
    inputs are views of the stacked ones (no gather per step), and TTT-Linear's Z mean comes
    from before the scan (one reduction fewer)."""
    per_step = kernels_per_mini_batch(make_layer(kind)[0])
    assert per_step["Gather"] == 0
    assert sum(per_step.values()) <= most, per_step
    if kind == "linear":
        assert per_step["Sum"] == 3  # LN variance, sum(G), sum(G xhat): not the mean


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_one_gemm_projects_x_for_k_q_v_and_the_learning_rates(kind):
    layer = make_layer(kind)[0]
    in_scan = kernels_per_mini_batch(layer)["Matmul"]
    # beside the scan's: that one projection, the dual form's XQ XK^T, and o_proj
    assert kernels(layer, K)["Matmul"] == in_scan + 3


def test_ln_l2_grad_is_the_gradient_of_the_inner_loss():
    rng = np.random.default_rng(3)
    z, target = (mx.array(rng.normal(0, 1, (5, 16)).astype(np.float32)) for _ in range(2))
    gamma, beta = (mx.array(rng.normal(1, 0.3, (16,)).astype(np.float32)) for _ in range(2))
    autograd = mx.grad(lambda z: inner_loss(z, target, gamma, beta).sum())(z)
    assert rel_err(ln_l2_grad(z, target, gamma, beta), autograd) < 1e-5
    expected = ref.ln_l2_grad(*(np.array(a, dtype=np.float64) for a in (z, target, gamma, beta)))
    assert rel_err(ln_l2_grad(z, target, gamma, beta), expected) < 1e-5


def test_gelu_tanh_and_its_derivative_match_the_exact_formulas():
    x = mx.linspace(-12, 12, 2001)
    value, grad = gelu_tanh_and_grad(x)
    exact = ref.gelu_tanh(np.array(x, dtype=np.float64))
    assert float(np.abs(np.array(gelu_tanh(x)) - exact).max()) < 2e-6
    assert float(np.abs(np.array(value) - exact).max()) < 2e-6
    assert rel_err(grad, ref.gelu_tanh_grad(np.array(x, dtype=np.float64))) < 1e-5
    assert rel_err(grad, mx.vmap(mx.grad(gelu_tanh))(x)) < 1e-5


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"hidden_size": 30, "num_heads": 4}, "num_heads=4: must divide hidden_size=30"),
        ({"hidden_size": 12, "num_heads": 4}, "hidden_size=12: hidden_size/num_heads=3 is odd"),
        ({"hidden_size": 32, "num_heads": 0}, "num_heads"),
        ({"hidden_size": 32, "num_heads": 4, "mini_batch_size": 0}, "mini_batch_size"),
        ({"hidden_size": 32, "num_heads": 4, "ttt_base_lr": -1.0}, "ttt_base_lr"),
        ({"hidden_size": 32, "num_heads": 4, "rope_theta": float("nan")}, "rope_theta"),
        ({"hidden_size": 32, "num_heads": True}, "num_heads"),
        ({"hidden_size": 32, "num_heads": 4, "use_gate": "yes"}, "use_gate"),
    ],
)
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        TTTLayerConfig(**kwargs)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_from_state_dict_names_missing_misshaped_and_unexpected_entries(kind):
    cfg = TTTLayerConfig(D, NH, mini_batch_size=K)
    weights = random_weights(kind)
    del weights["W1"]
    weights["post_norm.weight"] = np.ones(D + 1, dtype=np.float32)
    weights["stray.weight"] = np.ones(3, dtype=np.float32)
    with pytest.raises(ValueError) as err:
        LAYERS[kind].from_state_dict(cfg, weights)
    message = str(err.value)
    assert "missing: W1" in message
    assert "post_norm.weight (33,) (expected (32,))" in message
    assert "unexpected: stray.weight" in message


def test_from_state_dict_accepts_mlx_arrays_and_reference_buffers():
    cfg = TTTLayerConfig(D, NH, mini_batch_size=K)
    weights = random_weights("linear")
    loaded = TTTLinear.from_state_dict(cfg, {k: mx.array(v) for k, v in weights.items()})
    also = TTTLinear.from_state_dict(cfg, {**weights, "rotary_emb.inv_freq": np.ones(4)})
    x = mx.array(random_input(1, 5))
    assert rel_err(loaded(x), also(x)) == 0.0


def test_cache_batch_mismatch_is_an_error():
    layer, _ = make_layer("linear")
    with pytest.raises(ValueError, match="batch"):
        layer(mx.array(random_input(2, 3)), cache=layer.make_cache(1))
