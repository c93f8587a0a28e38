"""TTT-MLP: the hidden state is a two-layer MLP per head, `Z = gelu(X W1 + b1) W2 + b2`."""

from __future__ import annotations

import mlx.core as mx

from ttt_runtime.layers.base import TTTBase, carried_term
from ttt_runtime.layers.ops import (
    dual_matrix,
    gelu_tanh,
    gelu_tanh_grad,
    ln_l2_grad,
    weighted_outer,
)


class TTTMLP(TTTBase):
    fast_weight_names = ("W1", "b1", "W2", "b2")

    def _init_fast_weights(self, nh: int, f: int) -> None:
        wide = self.config.mlp_expansion * f
        self.W1 = mx.random.normal((nh, f, wide)) * 0.02
        self.b1 = mx.zeros((nh, 1, wide))
        self.W2 = mx.random.normal((nh, wide, f)) * 0.02
        self.b2 = mx.zeros((nh, 1, f))

    @staticmethod
    def predict(params, xk):
        W1, b1, W2, b2 = params
        return gelu_tanh(xk @ W1 + b1) @ W2 + b2

    @staticmethod
    def inner(params, carried, xq, xk, target, attn, eta, lr, gamma, beta):
        W1, b1, W2, b2 = params
        z1 = xk @ W1 + b1  # (B, nh, n, 4f)
        x2 = gelu_tanh(z1)
        g2 = ln_l2_grad(x2 @ W2 + b2, target, gamma, beta)  # (B, nh, n, f)
        g1 = (g2 @ W2.swapaxes(-1, -2)) * gelu_tanh_grad(z1)  # (B, nh, n, 4f)
        zbar1 = xq @ W1 + b1 - attn @ g1
        if carried is not None:
            sums, tok = carried
            zbar1 = zbar1 - carried_term(xq, sums[:2], tok)
        x2bar = gelu_tanh(zbar1)
        zbar = x2bar @ W2 + b2 - dual_matrix(x2bar, x2, eta) @ g2
        if carried is not None:
            zbar = zbar - carried_term(x2bar, sums[2:], tok)
        return zbar, (*weighted_outer(lr, xk, g1), *weighted_outer(lr, x2, g2))
