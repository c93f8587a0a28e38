"""TTT-MLP: the hidden state is a two-layer MLP per head, `Z = gelu(X W1 + b1) W2 + b2`."""

from __future__ import annotations

import mlx.core as mx

from ttt_runtime.layers.base import TTTBase
from ttt_runtime.layers.ops import gelu_tanh, gelu_tanh_and_grad, ln_l2_grad
from ttt_runtime.layers.scan import augment, dual_and_grad_matrix


class TTTMLP(TTTBase):
    fast_weight_maps = (("W1", "b1"), ("W2", "b2"))

    def _init_fast_weights(self, nh: int, f: int) -> None:
        wide = self.config.mlp_expansion * f
        self.W1 = mx.random.normal((nh, f, wide)) * 0.02
        self.b1 = mx.zeros((nh, 1, wide))
        self.W2 = mx.random.normal((nh, wide, f)) * 0.02
        self.b2 = mx.zeros((nh, 1, f))

    @staticmethod
    def predict(maps, xk_a):
        W1, W2 = maps
        return augment(gelu_tanh(xk_a @ W1)) @ W2

    @staticmethod
    def inner(maps, carried, xkq, target, lmat, eta, lr, gamma, beta):
        W1, W2 = maps
        n = target.shape[-2]
        r1 = xkq @ W1  # (B, nh, 2n, 4f): Z1 = XK W1 + b1, then XQ W1 + b1
        z1 = r1[..., :n, :]
        x2, gelu_grad = gelu_tanh_and_grad(z1)
        x2_a = augment(x2)  # (B, nh, n, 4f + 1)
        g2 = ln_l2_grad(x2_a @ W2, target, gamma, beta)  # (B, nh, n, f)
        g1 = (g2 @ W2[..., :-1, :].swapaxes(-1, -2)) * gelu_grad  # (B, nh, n, 4f)
        s1 = lmat @ g1  # (B, nh, n + f + 1, 4f)
        zbar1 = r1[..., n:, :] - s1[..., :n, :]
        if carried is not None:  # primal part from this mini-batch's earlier tokens
            (sums1, sums2), tok = carried
            zbar1 = zbar1 - tok * (xkq[..., n:, :] @ sums1)
        x2bar_a = augment(gelu_tanh(zbar1))
        s2 = dual_and_grad_matrix(x2bar_a, x2_a, eta, lr) @ g2  # (B, nh, n + 4f + 1, f)
        zbar = x2bar_a @ W2 - s2[..., :n, :]
        if carried is not None:
            zbar = zbar - tok * (x2bar_a @ sums2)
        return zbar, (s1[..., n:, :], s2[..., n:, :])
