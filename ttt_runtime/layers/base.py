"""What TTT-Linear and TTT-MLP share: projections, inner learning rates, RoPE, the mini-batch
scan with its streaming cache, and the output path. Subclasses give the fast weights and the
inner model (`predict`, `inner`).

A chunk of any length continuing a stream at any offset splits into at most three segments:
the rest of a mini-batch already begun (primal sums carried in the cache), whole mini-batches
(dual form, scanned; the hot path, compiled), and the start of a new mini-batch.
"""

from __future__ import annotations

from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ttt_runtime.layers.cache import TTTCache
from ttt_runtime.layers.config import TTTLayerConfig
from ttt_runtime.layers.ops import dual_matrix, gelu_tanh, inner_loss, ln_fwd

# buffers the PyTorch reference may put in a state dict; derived here, so ignored on load
_DERIVED_NAMES = ("rotary_emb.inv_freq", "token_idx")


def carried_term(x: mx.array, sums: tuple[mx.array, mx.array], tok: mx.array) -> mx.array:
    """tok_i * (x_i @ gW + gb): the part of the primal update from earlier chunks' tokens."""
    gW, gb = sums
    return tok * (x @ gW + gb)


class TTTBase(nn.Module):
    fast_weight_names: ClassVar[tuple[str, ...]]
    _compiled_steps: ClassVar[dict] = {}

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
    def predict(params, xk):
        """The inner model's output Z for inputs xk under fast weights `params`."""
        raise NotImplementedError

    @staticmethod
    def inner(params, carried, xq, xk, target, attn, eta, lr, gamma, beta):
        """One segment of a mini-batch -> (Zbar, gradient sums of the segment, one per param).

        params: fast weights at the mini-batch start; carried: None or (sums of the earlier
        tokens of this mini-batch, tok (n, 1)); attn: dual_matrix(xq, xk, eta).
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
        params = tuple(
            mx.broadcast_to(self[name].astype(mx.float32), (batch_size, *self[name].shape))
            for name in self.fast_weight_names
        )
        return TTTCache(self.fast_weight_names, params)

    # -- forward ------------------------------------------------------------------------------
    def __call__(self, x: mx.array, cache: TTTCache | None = None) -> mx.array:
        return self._forward(x, cache, with_stats=False)[0]

    def forward_with_stats(self, x: mx.array, cache: TTTCache | None = None):
        """(y, stats): stats holds MLX scalars `inner_loss_before`, `inner_loss_after` (mean
        per token over the chunk, weights before / after each mini-batch's update) and
        `lr_mean` (mean inner learning rate lr_j)."""
        return self._forward(x, cache, with_stats=True)

    def _forward(self, x: mx.array, cache: TTTCache | None, with_stats: bool):
        B, L, d = x.shape
        cfg = self.config
        if cache is None:
            cache = self.make_cache(B)
        elif cache.batch_size != B:
            raise ValueError(f"input batch {B} does not match the cache's batch {cache.batch_size}")
        xq = self._rope(self._heads(self.q_proj(x)), cache.offset)
        xk = self._rope(self._heads(self.k_proj(x)), cache.offset)
        target = self._heads(self.v_proj(x)) - xk  # T = XV - XK, (B, nh, L, f)
        lr = self._inner_lr(x)  # (B, nh, L)
        K = cfg.mini_batch_size
        tok = mx.maximum(
            1.0 / mx.arange(1, K + 1, dtype=mx.float32) + self.learnable_token_idx, 0.0
        ).astype(mx.float32)
        nh, f = cfg.num_heads, cfg.head_dim
        gamma = self.ttt_norm_weight.astype(mx.float32).reshape(nh, 1, f)
        beta = self.ttt_norm_bias.astype(mx.float32).reshape(nh, 1, f)

        zbar, losses = _Scan(self, cache, tok, gamma, beta, with_stats).run(xq, xk, target, lr)

        out = xq + ln_fwd(zbar, gamma, beta)  # (B, nh, L, f)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, d).astype(x.dtype)
        out = self.post_norm(out)
        if cfg.use_gate:
            out = gelu_tanh(self.g_proj(x)) * out
        y = self.o_proj(out)
        if not with_stats:
            return y, None
        before, after = (mx.concatenate([s.reshape(-1) for s in part]) for part in losses)
        stats = {
            "inner_loss_before": before.mean(),
            "inner_loss_after": after.mean(),
            "lr_mean": lr.mean(),
        }
        return y, stats

    def _heads(self, h: mx.array) -> mx.array:
        """(B, L, d) -> float32 (B, nh, L, f): the inner loop always runs in float32."""
        B, L, _ = h.shape
        h = h.reshape(B, L, self.config.num_heads, self.config.head_dim)
        return h.transpose(0, 2, 1, 3).astype(mx.float32)

    def _rope(self, x: mx.array, offset: int) -> mx.array:
        """RoPE at position (p mod K): pad the chunk to whole mini-batches so that positions
        restart at every mini-batch row of a (.., n, K, f) view."""
        B, nh, L, f = x.shape
        K = self.config.mini_batch_size
        lead = offset % K
        trail = -(lead + L) % K
        if lead or trail:
            x = mx.pad(x, [(0, 0), (0, 0), (lead, trail), (0, 0)])
        n = (lead + L + trail) // K
        x = mx.fast.rope(
            x.reshape(B, nh, n, K, f),
            f,
            traditional=True,
            base=self.config.rope_theta,
            scale=1.0,
            offset=0,
        )
        return x.reshape(B, nh, n * K, f)[:, :, lead : lead + L]

    def _inner_lr(self, x: mx.array) -> mx.array:
        """lr_j = ttt_base_lr * sigmoid(x_j . w_h + c_h) / f, (B, nh, L) float32."""
        cfg = self.config
        w = self.learnable_ttt_lr_weight.reshape(cfg.num_heads, cfg.hidden_size)
        logits = x.astype(mx.float32) @ w.astype(mx.float32).T + self.learnable_ttt_lr_bias.reshape(
            -1
        ).astype(mx.float32)
        lr = mx.sigmoid(logits) * (cfg.ttt_base_lr / cfg.head_dim)
        return lr.transpose(0, 2, 1)


def _as_mx(value, dtype) -> mx.array:
    if isinstance(value, mx.array):
        return value.astype(dtype)
    return mx.array(np.asarray(value, dtype=np.float32)).astype(dtype)


def _tril_eta(tok: mx.array, lr: mx.array) -> mx.array:
    """eta[i, j] = tok_i * lr_j for j <= i, else 0; tok (n,), lr (..., n) -> (..., n, n)."""
    n = tok.shape[0]
    return mx.tril(tok[:, None] * lr[..., None, :]) if n > 1 else tok[:, None] * lr[..., None, :]


class _Scan:
    """One call's walk over its segments, updating `cache` in place."""

    def __init__(self, layer: TTTBase, cache: TTTCache, tok, gamma, beta, with_stats: bool):
        self.layer = layer
        self.cache = cache
        self.tok = tok
        self.ln = (gamma, beta)
        self.with_stats = with_stats
        self.outputs: list[mx.array] = []
        self.losses: tuple[list, list] = ([], [])
        self.updates: list[tuple[mx.array, ...]] = []

    def run(self, xq, xk, target, lr):
        K = self.layer.config.mini_batch_size
        L = xq.shape[2]
        start = self.cache.offset % K
        head = min(L, K - start) if start else 0
        n_full = (L - head) // K
        parts = (
            (0, head, start, self._partial),
            (head, head + n_full * K, 0, self._whole),
            (head + n_full * K, L, 0, self._partial),
        )
        for lo, hi, pos, segment in parts:
            if hi > lo:
                cut = slice(lo, hi)
                segment(xq[:, :, cut], xk[:, :, cut], target[:, :, cut], lr[:, :, cut], pos)
        self.cache.offset += L
        if self.cache.record_updates:
            names = self.cache.names
            self.cache.updates = {
                name: mx.stack([u[i] for u in self.updates]) if self.updates else mx.array([])
                for i, name in enumerate(names)
            }
        zbar = self.outputs[0] if len(self.outputs) == 1 else mx.concatenate(self.outputs, 2)
        return zbar, self.losses

    def _partial(self, xq, xk, target, lr, pos):
        """Tokens pos .. pos+n-1 of one mini-batch, continuing the cache's running sums."""
        cache, layer, K = self.cache, self.layer, self.layer.config.mini_batch_size
        n = xq.shape[2]
        tok = self.tok[pos : pos + n]
        eta = _tril_eta(tok, lr)
        carried = None if cache.sums is None else (cache.sums, tok[:, None])
        params = cache.params
        zbar, sums = layer.inner(
            params, carried, xq, xk, target, dual_matrix(xq, xk, eta), eta, lr, *self.ln
        )
        if cache.sums is not None:
            sums = tuple(a + b for a, b in zip(cache.sums, sums, strict=True))
        self.outputs.append(zbar)
        # the weights after this segment: those of its last token
        updates = tuple(tok[-1] * s for s in sums)
        after = tuple(p - u for p, u in zip(params, updates, strict=True))
        if self.with_stats:
            for out, weights in zip(self.losses, (params, after), strict=True):
                out.append(inner_loss(layer.predict(weights, xk), target, *self.ln))
        if pos + n == K:  # the mini-batch is complete: its last token's weights carry on
            cache.params, cache.sums = after, None
            self.updates.append(updates)
        else:
            cache.sums = sums

    def _whole(self, xq, xk, target, lr, pos):
        """Whole mini-batches: precompute what does not depend on the fast weights for all of
        them at once, then scan the rest mini-batch by mini-batch."""
        B, nh, L, f = xq.shape
        K = self.layer.config.mini_batch_size
        n = L // K

        def blocks(a):  # (B, nh, n*K, ...) -> (n, B, nh, K, ...)
            return mx.moveaxis(a.reshape(B, nh, n, K, *a.shape[3:]), 2, 0)

        xq, xk, target, lr = blocks(xq), blocks(xk), blocks(target), blocks(lr)
        eta = _tril_eta(self.tok, lr)  # (n, B, nh, K, K)
        attn = dual_matrix(xq, xk, eta)
        step = self._step_fn()
        params = self.cache.params
        t_last = self.tok[K - 1]
        zbars = []
        for i in range(n):
            zbar, new_params, updates, losses = step(
                params, xq[i], xk[i], target[i], attn[i], eta[i], lr[i], t_last, *self.ln
            )
            zbars.append(zbar)
            self.updates.append(updates)
            for out, loss in zip(self.losses, losses, strict=False):
                out.append(loss)
            params = new_params
        self.cache.params = params
        self.outputs.append(mx.stack(zbars, axis=2).reshape(B, nh, L, f))

    def _step_fn(self):
        layer_cls, with_stats = type(self.layer), self.with_stats
        key = (layer_cls, with_stats, self.layer.config.compile)
        if key not in TTTBase._compiled_steps:

            def step(params, xq, xk, target, attn, eta, lr, t_last, gamma, beta):
                zbar, sums = layer_cls.inner(
                    params, None, xq, xk, target, attn, eta, lr, gamma, beta
                )
                updates = tuple(t_last * s for s in sums)
                new_params = tuple(p - u for p, u in zip(params, updates, strict=True))
                losses = ()
                if with_stats:
                    losses = tuple(
                        inner_loss(layer_cls.predict(w, xk), target, gamma, beta)
                        for w in (params, new_params)
                    )
                return zbar, new_params, updates, losses

            compiled = mx.compile(step) if self.layer.config.compile else step
            TTTBase._compiled_steps[key] = compiled
        return TTTBase._compiled_steps[key]
