"""TTT-Linear: the hidden state is a linear map per head, `Z = X W + b`."""

from __future__ import annotations

import mlx.core as mx

from ttt_runtime.layers.base import TTTBase
from ttt_runtime.layers.ops import ln_l2_grad


class TTTLinear(TTTBase):
    fast_weight_maps = (("W1", "b1"),)

    def _init_fast_weights(self, nh: int, f: int) -> None:
        self.W1 = mx.random.normal((nh, f, f)) * 0.02
        self.b1 = mx.zeros((nh, 1, f))

    @staticmethod
    def predict(maps, xk_a):
        return xk_a @ maps[0]  # (B, nh, n, f)

    @staticmethod
    def hoisted(maps, xkq_a, n):
        # the inner loss's gradient G sums to zero over features (LayerNorm ignores a shift),
        # so no update changes W's row means: Z's mean over features is XKa @ mean(W) in every
        # mini-batch, computed here for all of them at once
        row_means = maps[0].mean(axis=-1)[..., None, :]  # (B, nh, 1, f + 1)
        return ((xkq_a[..., :n, :] * row_means).sum(axis=-1, keepdims=True),)

    @staticmethod
    def inner(maps, carried, xkq, target, lmat, eta, lr, gamma, beta, z_mean):
        (W,) = maps
        n = target.shape[-2]
        r = xkq @ W  # (B, nh, 2n, f): Z = XK W + b, then XQ W + b
        g = ln_l2_grad(r[..., :n, :], target, gamma, beta, mean=z_mean)  # (B, nh, n, f)
        s = lmat @ g  # (B, nh, n + f + 1, f): dual correction, then the gradient sums
        zbar = r[..., n:, :] - s[..., :n, :]
        if carried is not None:  # primal part from this mini-batch's earlier tokens
            (sums,), tok = carried
            zbar = zbar - tok * (xkq[..., n:, :] @ sums)
        return zbar, (s[..., n:, :],)
