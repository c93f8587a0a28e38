"""The inner loop's building blocks: LayerNorm forward, its fused L2 backward, GELU (tanh form)."""

from __future__ import annotations

import math

import mlx.core as mx

LN_EPS = 1e-6
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def ln_fwd(x: mx.array, gamma: mx.array, beta: mx.array, eps: float = LN_EPS) -> mx.array:
    """LayerNorm over the last axis with biased variance, as the reference's `ln_fwd`."""
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    rstd = mx.rsqrt((xc * xc).mean(axis=-1, keepdims=True) + eps)
    return gamma * (xc * rstd) + beta


def ln_l2_grad(
    z: mx.array,
    target: mx.array,
    gamma: mx.array,
    beta: mx.array,
    eps: float = LN_EPS,
    mean: mx.array | None = None,
) -> mx.array:
    """d/dz of 0.5 * ||LN(z) - target||^2 over the last axis (the inner loss's gradient).

    `mean`: z's mean over the last axis where the caller knows it (TTT-Linear's follows from
    its weights): one reduction fewer in the sequential scan.
    """
    n = z.shape[-1]
    zc = z - (z.mean(axis=-1, keepdims=True) if mean is None else mean)
    rstd = mx.rsqrt((zc * zc).mean(axis=-1, keepdims=True) + eps)
    xhat = zc * rstd
    g = (gamma * xhat + beta - target) * gamma
    g_sum = g.sum(axis=-1, keepdims=True)
    gx_sum = (g * xhat).sum(axis=-1, keepdims=True)
    return (n * g - g_sum - xhat * gx_sum) * (rstd / n)


def inner_loss(
    z: mx.array, target: mx.array, gamma: mx.array, beta: mx.array, eps: float = LN_EPS
) -> mx.array:
    """0.5 * ||LN(z) - target||^2 per token (summed over the last axis only)."""
    diff = ln_fwd(z, gamma, beta, eps) - target
    return 0.5 * (diff * diff).sum(axis=-1)


# Eigen's rational approximation of tanh, clamped to [-7.9, 7.9] (max abs error 3e-7 over all
# inputs): MLX's CPU tanh costs ~5x more, and TTT-MLP's inner loop evaluates tanh twice per
# mini-batch on (B, nh, K, 4f) values.
_TANH_CLAMP = 7.90531110763549805
_TANH_P = (
    4.89352455891786e-03,
    6.37261928875436e-04,
    1.48572235717979e-05,
    5.12229709037114e-08,
    -8.60467152213735e-11,
    2.00018790482477e-13,
    -2.76076847742355e-16,
)
_TANH_Q = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)


def _poly(x2: mx.array, coefficients: tuple[float, ...]) -> mx.array:
    out = x2 * coefficients[-1] + coefficients[-2]
    for c in reversed(coefficients[:-2]):
        out = out * x2 + c
    return out


def tanh_rational(x: mx.array) -> mx.array:
    x = mx.clip(x, -_TANH_CLAMP, _TANH_CLAMP)
    x2 = x * x
    return x * _poly(x2, _TANH_P) / _poly(x2, _TANH_Q)


def gelu_tanh(x: mx.array) -> mx.array:
    """GELU, tanh approximation (MLX `nn.gelu_approx`, the reference's approximate='tanh')."""
    return 0.5 * x * (1.0 + tanh_rational(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))


def gelu_tanh_and_grad(x: mx.array) -> tuple[mx.array, mx.array]:
    """(gelu_tanh(x), its exact derivative), sharing one tanh."""
    t = tanh_rational(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
    du = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
    return 0.5 * x * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
