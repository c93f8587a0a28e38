"""TTT-MLP: the hidden state is a two-layer MLP per head, `Z = gelu(X W1 + b1) W2 + b2`."""

from __future__ import annotations

import mlx.core as mx

from ttt_runtime.layers.base import TTTBase
from ttt_runtime.layers.ops import gelu_tanh, gelu_tanh_and_grad, ln_l2_grad
from ttt_runtime.layers.scan import augment, grad_matrix


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
    def inner(maps, carried, xkq, target, lmat, eta, lr, gamma, beta, *hoisted):
        W1, W2 = maps
        n = target.shape[-2]
        r1 = xkq @ W1  # (B, nh, 2n, 4f): Z1 = XK W1 + b1, then XQ W1 + b1
        z1 = r1[..., :n, :]
        x2, gelu_grad = gelu_tanh_and_grad(z1)
        x2_a = augment(x2)  # (B, nh, n, 4f + 1)
        g2 = ln_l2_grad(x2_a @ W2, target, gamma, beta)  # (B, nh, n, f)
        g1 = (g2 @ W2[..., :-1, :].swapaxes(-1, -2)) * gelu_grad  # (B, nh, n, 4f)
        zbar1 = r1[..., n:, :] - lmat[..., :n, :] @ g1  # dual form, (B, nh, n, 4f)
        if carried is not None:  # primal part from this mini-batch's earlier tokens
            (sums1, sums2), tok = carried
            zbar1 = zbar1 - tok * (xkq[..., n:, :] @ sums1)
        x2bar_a = augment(gelu_tanh(zbar1))
        attn2 = eta * (x2bar_a @ x2_a.swapaxes(-1, -2))  # (B, nh, n, n)
        zbar = x2bar_a @ W2 - attn2 @ g2
        if carried is not None:
            zbar = zbar - tok * (x2bar_a @ sums2)
        # the gradient sums as factors: the step folds them into the weights with one addmm
        return zbar, ((lmat[..., n:, :], g1), (grad_matrix(lr, x2_a), g2))
