"""The inner loop's building blocks: LayerNorm forward, its fused L2 backward, GELU (tanh)."""

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
    z: mx.array, target: mx.array, gamma: mx.array, beta: mx.array, eps: float = LN_EPS
) -> mx.array:
    """d/dz of 0.5 * ||LN(z) - target||^2 over the last axis (the inner loss's gradient)."""
    n = z.shape[-1]
    zc = z - z.mean(axis=-1, keepdims=True)
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


def gelu_tanh(x: mx.array) -> mx.array:
    """GELU, tanh approximation (MLX `nn.gelu_approx`, the reference's approximate='tanh')."""
    return 0.5 * x * (1.0 + mx.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))


def gelu_tanh_grad(x: mx.array) -> mx.array:
    """The exact derivative of `gelu_tanh`."""
    t = mx.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
    du = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du


def dual_matrix(xq: mx.array, xk: mx.array, eta: mx.array) -> mx.array:
    """`eta * tril(xq @ xk.T) + tril(eta)` as one matrix, so the dual form needs one matmul.

    eta: (..., n, n) = tok_i * lr_j, already zero above the diagonal.
    """
    return eta * (xq @ xk.swapaxes(-1, -2) + 1.0)


def weighted_outer(lr: mx.array, x: mx.array, g: mx.array) -> tuple[mx.array, mx.array]:
    """(sum_j lr_j x_j^T g_j, sum_j lr_j g_j): a segment's gradient sums for one linear map."""
    lx = lr[..., None] * x
    return lx.swapaxes(-1, -2) @ g, (lr[..., None] * g).sum(axis=-2, keepdims=True)
