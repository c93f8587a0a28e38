"""What TTT-Linear and TTT-MLP share: projections, inner learning rates, RoPE, the cache, and
the output path. Subclasses give the fast weights and the inner model (`predict`, `inner`);
`scan.py` walks the mini-batches.
"""

from __future__ import annotations

from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ttt_runtime.config import TTTLayerConfig
from ttt_runtime.layers.cache import TTTCache
from ttt_runtime.layers.ops import gelu_tanh
from ttt_runtime.layers.scan import Scan

# buffers the PyTorch reference may put in a state dict; derived here, so ignored on load
_DERIVED_NAMES = ("rotary_emb.inv_freq", "token_idx")


class TTTBase(nn.Module):
    # the inner model's linear maps as (weight, bias) names, e.g. (('W1', 'b1'),)
    fast_weight_maps: ClassVar[tuple[tuple[str, str], ...]]

    def __init__(self, config: TTTLayerConfig):
        super().__init__()
        self.config = config
        d, nh, f, K = config.hidden_size, config.num_heads, config.head_dim, config.mini_batch_size
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.learnable_ttt_lr_weight = mx.random.normal((nh, 1, d)) * 0.02
        self.learnable_ttt_lr_bias = mx.zeros((nh, 1))
        self.learnable_token_idx = mx.zeros((K,))
        self.ttt_norm_weight = mx.ones((nh, f))
        self.ttt_norm_bias = mx.zeros((nh, f))
        self.post_norm = nn.LayerNorm(d, eps=1e-6)
        if config.use_gate:
            self.g_proj = nn.Linear(d, d, bias=False)
        self._init_fast_weights(nh, f)

    # -- subclass interface -------------------------------------------------------------------
    def _init_fast_weights(self, nh: int, f: int) -> None:
        raise NotImplementedError

    @staticmethod
    def predict(maps, xk_a):
        """The inner model's output Z for augmented inputs xk_a under augmented maps."""
        raise NotImplementedError

    @staticmethod
    def hoisted(maps, xkq_a, n: int) -> tuple[mx.array, ...]:
        """What `inner` needs that the scan can compute for all its steps before it starts,
        each with a leading step axis; maps at the scan's start, xkq_a (S, B, nh, 2n, f + 1)."""
        return ()

    @staticmethod
    def inner(maps, carried, xkq, target, lmat, eta, lr, gamma, beta, *hoisted):
        """One mini-batch (or a segment of one) -> (Zbar, per map sum_j lr_j Xa_j^T G_j).

        maps: augmented fast weights [W; b] at the mini-batch start, (B, nh, f_in + 1, f_out);
        carried: None, or (those sums over this mini-batch's earlier tokens, tok (n, 1));
        xkq: [XKa; XQa] (B, nh, 2n, f + 1); lmat: dual_and_grad_matrix(XQa, XKa, eta, lr);
        hoisted: this step's share of what `hoisted` gave.
        """
        raise NotImplementedError

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, config: TTTLayerConfig, weights: dict) -> TTTBase:
        """A layer with the reference's parameter names loaded from `weights` (NumPy or MLX)."""
        layer = cls(config)
        expected = dict(tree_flatten(layer.parameters()))
        missing = sorted(set(expected) - set(weights))
        unexpected = sorted(set(weights) - set(expected) - set(_DERIVED_NAMES))
        misshaped = [
            f"{name} {tuple(np.shape(weights[name]))} (expected {tuple(expected[name].shape)})"
            for name in sorted(set(expected) & set(weights))
            if tuple(np.shape(weights[name])) != tuple(expected[name].shape)
        ]
        problems = [
            f"{label}: {', '.join(names)}"
            for label, names in (
                ("missing", missing),
                ("wrong shape", misshaped),
                ("unexpected", unexpected),
            )
            if names
        ]
        if problems:
            raise ValueError(f"{cls.__name__} state dict: " + "; ".join(problems))
        layer.load_weights([(name, _as_mx(weights[name], p.dtype)) for name, p in expected.items()])
        return layer

    def make_cache(self, batch_size: int) -> TTTCache:
        maps = tuple(
            mx.concatenate([self[w], self[b]], axis=-2).astype(mx.float32)
            for w, b in self.fast_weight_maps
        )
        maps = tuple(mx.broadcast_to(m, (batch_size, *m.shape)) for m in maps)
        return TTTCache(self.fast_weight_maps, maps)

    # -- forward ------------------------------------------------------------------------------
    def __call__(self, x: mx.array, cache: TTTCache | None = None) -> mx.array:
        return self._forward(x, cache, with_stats=False)[0]

    def forward_with_stats(self, x: mx.array, cache: TTTCache | None = None):
        """(y, stats): stats holds MLX scalars `inner_loss_before`, `inner_loss_after` (mean
        per token over the chunk, weights before / after each mini-batch's update) and
        `lr_mean` (mean inner learning rate lr_j)."""
        return self._forward(x, cache, with_stats=True)

    def _forward(self, x: mx.array, cache: TTTCache | None, with_stats: bool):
        cfg = self.config
        if cache is None:
            cache = self.make_cache(x.shape[0])
        elif cache.batch_size != x.shape[0]:
            raise ValueError(
                f"input batch {x.shape[0]} does not match the cache's batch {cache.batch_size}"
            )
        scan = Scan(self, cache, with_stats)
        out = scan.run(x).astype(x.dtype)  # (B, L, d): XQ + LN(Zbar), heads side by side
        out = self.post_norm(out)
        if cfg.use_gate:
            out = gelu_tanh(self.g_proj(x)) * out
        y = self.o_proj(out)
        if not with_stats:
            return y, None
        before, after, lr = (
            mx.concatenate([a.reshape(-1) for a in part])
            for part in (*scan.losses, scan.learning_rates)
        )
        stats = {
            "inner_loss_before": before.mean(),
            "inner_loss_after": after.mean(),
            "lr_mean": lr.mean(),
        }
        return y, stats

    def project(self, x: mx.array, pos: int, steps: int, n: int):
        """The inner loop's inputs for `steps` mini-batch segments of n tokens each, the first
        at position `pos` of its mini-batch, laid out step-first and float32:

        xkq (S, B, nh, 2n, f): RoPE'd XK then XQ of each step; target (S, B, nh, n, f) = XV - XK;
        lr (S, B, nh, n) = ttt_base_lr * sigmoid(x_j . w_h + c_h) / f.
        """
        cfg = self.config
        B = x.shape[0]
        nh, f = cfg.num_heads, cfg.head_dim

        d = cfg.hidden_size
        # K, Q, V and the inner learning rates' logits in one GEMM over x
        w_lr = self.learnable_ttt_lr_weight.reshape(nh, d)
        w = mx.concatenate([self.k_proj.weight, self.q_proj.weight, self.v_proj.weight, w_lr])
        kqv = x @ w.T  # (B, S * n, 3d + nh)
        kq = kqv[..., : 2 * d].reshape(B, steps, n, 2, nh, f).transpose(1, 0, 4, 3, 2, 5)
        # (S, B, nh, 2, n, f): RoPE positions restart every mini-batch (p mod K), so along n
        # they are pos, pos + 1, ...
        kq = mx.fast.rope(
            kq.astype(mx.float32), f, traditional=True, base=cfg.rope_theta, scale=1.0, offset=pos
        )
        xkq = kq.reshape(steps, B, nh, 2 * n, f)
        v = kqv[..., 2 * d : 3 * d].reshape(B, steps, n, nh, f).transpose(1, 0, 3, 2, 4)
        target = v.astype(mx.float32) - xkq[..., :n, :]
        c = self.learnable_ttt_lr_bias.reshape(nh).astype(mx.float32)
        lr = mx.sigmoid(kqv[..., 3 * d :].astype(mx.float32) + c) * (cfg.ttt_base_lr / f)
        lr = lr.reshape(B, steps, n, nh).transpose(1, 0, 3, 2)
        return xkq, target, lr

    def inner_norm(self) -> tuple[mx.array, mx.array]:
        """The inner LayerNorm's (gamma, beta) as float32 (nh, 1, f)."""
        nh, f = self.config.num_heads, self.config.head_dim
        gamma, beta = (
            p.astype(mx.float32).reshape(nh, 1, f)
            for p in (self.ttt_norm_weight, self.ttt_norm_bias)
        )
        return gamma, beta

    def token_factors(self) -> mx.array:
        """tok_i = max(1/i + learnable_token_idx[i-1], 0), i = 1..K, float32."""
        K = self.config.mini_batch_size
        i = mx.arange(1, K + 1, dtype=mx.float32)
        return mx.maximum(1.0 / i + self.learnable_token_idx.astype(mx.float32), 0.0)


def _as_mx(value, dtype) -> mx.array:
    if isinstance(value, mx.array):
        return value.astype(dtype)
    return mx.array(np.asarray(value, dtype=np.float32)).astype(dtype)
