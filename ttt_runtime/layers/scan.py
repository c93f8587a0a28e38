"""The mini-batch scan: everything that does not depend on the fast weights is computed for all
mini-batches at once; the sequential rest, mini-batch by mini-batch, is one compiled function
per number of mini-batches (no Python in the loop once traced).

Each linear map of the inner model is kept "augmented", `[W; b]` of shape (f_in + 1, f_out),
with a column of ones appended to its inputs: then `Z = X W + b` is one matmul, the dual form's
`eta * tril(XQ XK^T) + tril(eta)` is `eta * (XQa XKa^T)`, and the gradient sums of W and b come
out of the same matmul as the dual-form correction:

    [eta * (XQa XKa^T); (lr * XKa)^T] @ G  =  [correction for Zbar (n rows); sum_j lr_j XKa_j^T G_j]

On the CPU every small matmul is a separate BLAS call per head, so this layout (two calls per
mini-batch for TTT-Linear) is what sets the speed.

A chunk continuing a stream at any offset splits into at most three segments: the rest of a
mini-batch already begun (its running sums carried in the cache, the primal form's `gW`),
whole mini-batches, and the start of a new one.
"""

from __future__ import annotations

import mlx.core as mx

from ttt_runtime.layers.cache import TTTCache
from ttt_runtime.layers.ops import inner_loss, ln_fwd

_SCANS: dict = {}  # compiled scans by layer class, variant and number of mini-batches


def augment(x: mx.array) -> mx.array:
    """Append a column of ones: (..., n, f) -> (..., n, f + 1)."""
    return mx.concatenate([x, mx.ones((*x.shape[:-1], 1), dtype=x.dtype)], axis=-1)


def tril_eta(tok: mx.array, lr: mx.array) -> mx.array:
    """eta[i, j] = tok_i * lr_j for j <= i, else 0; tok (n,), lr (..., n) -> (..., n, n)."""
    eta = tok[:, None] * lr[..., None, :]
    return mx.tril(eta) if tok.shape[0] > 1 else eta


def grad_matrix(lr: mx.array, x_a: mx.array) -> mx.array:
    """(lr * x_a)^T: (..., f_in + 1, n); times G it gives sum_j lr_j x_a_j^T G_j."""
    return (lr[..., None] * x_a).swapaxes(-1, -2)


def dual_and_grad_matrix(xq_a: mx.array, x_a: mx.array, eta: mx.array, lr: mx.array) -> mx.array:
    """[eta * (xq_a x_a^T); (lr * x_a)^T]: (..., n + f_in + 1, n), applied to G (see above)."""
    attn = eta * (xq_a @ x_a.swapaxes(-1, -2))
    return mx.concatenate([attn, grad_matrix(lr, x_a)], axis=-2)


@mx.compile
def _residual_norm(xq, zbar, gamma, beta):
    """XQ + LN(Zbar), the inner model's output with its residual (one fused pass)."""
    return xq + ln_fwd(zbar, gamma, beta)


def _product(grad) -> mx.array:
    """A gradient sum given as an array or as factors (left, right) of left @ right."""
    return grad[0] @ grad[1] if isinstance(grad, tuple) else grad


def _minus_scaled(weights: mx.array, scale: mx.array, grad) -> mx.array:
    if isinstance(grad, tuple):
        left, right = grad
        return mx.addmm(weights, -scale * left, right)
    return weights - scale * grad


def _stacked(per_step: list[tuple[mx.array, ...]]) -> tuple[mx.array, ...]:
    """Per-step tuples of arrays -> one tuple of arrays with a leading step axis."""
    return tuple(mx.stack(list(parts)) for parts in zip(*per_step, strict=True))


class Scan:
    """One call's walk over its segments, updating `cache` in place."""

    def __init__(self, layer, cache: TTTCache, with_stats: bool):
        self.layer = layer
        self.cache = cache
        self.tok = layer.token_factors()
        self.ln = layer.inner_norm()
        self.with_stats = with_stats
        self.losses: tuple[list, list] = ([], [])
        self.learning_rates: list[mx.array] = []
        self.updates: list[tuple[mx.array, ...]] = []

    def run(self, x: mx.array) -> mx.array:
        """x (B, L, d) -> float32 (B, L, d): per head XQ + LN(Zbar), heads side by side."""
        K = self.layer.config.mini_batch_size
        L = x.shape[1]
        pos = self.cache.offset % K
        head = min(L, K - pos) if pos else 0
        whole_end = head + (L - head) // K * K
        outputs = [
            self._segment(x[:, lo:hi], start)
            for lo, hi, start in ((0, head, pos), (head, whole_end, 0), (whole_end, L, 0))
            if hi > lo
        ]
        self.cache.offset += L
        if self.cache.record_updates:
            self.cache.record(self.updates)
        return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=1)

    def _segment(self, x: mx.array, pos: int) -> mx.array:
        """Tokens at positions pos.. of S consecutive mini-batches (S > 1 only when pos = 0)."""
        B, L, d = x.shape
        K = self.layer.config.mini_batch_size
        n = min(L, K - pos)
        S = L // n
        xkq, target, lr = self.layer.project(x, pos, S, n)
        self.learning_rates.append(lr)
        xkq_a = augment(xkq)  # [XKa; XQa] per step: one matmul gives Z and XQ W
        tok = self.tok[pos : pos + n]
        eta = tril_eta(tok, lr)
        lmat = dual_and_grad_matrix(xkq_a[..., n:, :], xkq_a[..., :n, :], eta, lr)
        cache = self.cache
        # sums carry over inside a mini-batch only: at its start, a cache restored from a
        # checkpoint holds zeros there (cache.state), which must not count as begun
        carried = pos > 0
        hoisted = self.layer.hoisted(cache.maps, xkq_a, n)
        scan = self._scan_fn(carried=carried, finish=pos + n == K, steps=S)
        zbar, maps, sums, updates, losses = scan(
            cache.maps, cache.sums if carried else (), hoisted, xkq_a, target, lmat, eta, lr, tok,
            *self.ln,
        )  # fmt: skip
        cache.maps, cache.sums = maps, (sums or None)
        if updates:
            self.updates.append(updates)
        for out, loss in zip(self.losses, losses, strict=False):
            out.append(loss)
        # computed in (B, S, n, nh, f) order, so that the result is (B, L, d) without a copy
        order = (1, 0, 3, 2, 4)
        gamma, beta = (p.reshape(p.shape[0], -1) for p in self.ln)  # (nh, f)
        out = _residual_norm(xkq[..., n:, :].transpose(order), zbar.transpose(order), gamma, beta)
        return out.reshape(B, L, d)

    def _scan_fn(self, carried: bool, finish: bool, steps: int):
        layer_cls, with_stats = type(self.layer), self.with_stats
        # returning the update tensors costs a full write of the weights per step: only on demand
        record = finish and self.cache.record_updates
        use_compile = self.layer.config.compile
        key = (layer_cls, carried, finish, with_stats, record, use_compile, steps)
        if key in _SCANS:
            return _SCANS[key]

        def step(maps, sums, hoisted, xkq, target, lmat, eta, lr, tok, gamma, beta):
            n = target.shape[-2]
            zbar, grads = layer_cls.inner(
                maps, (sums, tok[:, None]) if carried else None, xkq, target, lmat, eta, lr,
                gamma, beta, *hoisted,
            )  # fmt: skip
            t_last = tok[-1]
            if finish and not carried and not record:
                # the weights of the mini-batch's last token, W - tok_K * sum_j lr_j x_j^T G_j,
                # in one BLAS call per map where the layer gave the sum as factors
                after = tuple(_minus_scaled(m, t_last, g) for m, g in zip(maps, grads, strict=True))
            else:
                grads = tuple(_product(g) for g in grads)
                if carried:
                    grads = tuple(s + g for s, g in zip(sums, grads, strict=True))
                updates = tuple(t_last * g for g in grads)
                after = tuple(m - u for m, u in zip(maps, updates, strict=True))
            losses = ()
            if with_stats:
                xk_a = xkq[..., :n, :]
                losses = tuple(
                    inner_loss(layer_cls.predict(w, xk_a), target, gamma, beta)
                    for w in (maps, after)
                )
            if finish:  # the mini-batch is complete: its last token's weights carry on
                return zbar, after, (), updates if record else (), losses
            return zbar, maps, grads, (), losses

        def scan(maps, sums, hoisted, xkq_a, target, lmat, eta, lr, tok, gamma, beta):
            """All `steps` mini-batches: inputs with a leading step axis, outputs stacked."""
            stepped = (*hoisted, xkq_a, target, lmat, eta, lr)
            # squeeze, not [0]: a view, where indexing is a gather (an op of its own) per step
            per_step = [mx.split(a, steps) if steps > 1 else [a] for a in stepped]
            zbars, updates, losses = [], [], []
            for inputs in zip(*per_step, strict=True):
                inputs = [a.squeeze(0) for a in inputs]
                zbar, maps, sums, update, loss = step(
                    maps, sums, inputs[: len(hoisted)], *inputs[len(hoisted) :], tok, gamma, beta
                )
                zbars.append(zbar)
                updates.append(update)
                losses.append(loss)
            return mx.stack(zbars), maps, sums, _stacked(updates), _stacked(losses)

        _SCANS[key] = mx.compile(scan) if use_compile else scan
        return _SCANS[key]
