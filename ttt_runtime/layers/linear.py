"""TTT-Linear: the hidden state is a linear map per head, `Z = X W + b`."""

from __future__ import annotations

import mlx.core as mx

from ttt_runtime.layers.base import TTTBase, carried_term
from ttt_runtime.layers.ops import ln_l2_grad, weighted_outer


class TTTLinear(TTTBase):
    fast_weight_names = ("W1", "b1")

    def _init_fast_weights(self, nh: int, f: int) -> None:
        self.W1 = mx.random.normal((nh, f, f)) * 0.02
        self.b1 = mx.zeros((nh, 1, f))

    @staticmethod
    def predict(params, xk):
        W, b = params
        return xk @ W + b  # (B, nh, n, f)

    @staticmethod
    def inner(params, carried, xq, xk, target, attn, eta, lr, gamma, beta):
        W, b = params
        g = ln_l2_grad(xk @ W + b, target, gamma, beta)  # (B, nh, n, f)
        # dual form: every token's output under the weights updated up to and including it
        zbar = xq @ W + b - attn @ g
        if carried is not None:
            sums, tok = carried
            zbar = zbar - carried_term(xq, sums, tok)
        return zbar, weighted_outer(lr, xk, g)
