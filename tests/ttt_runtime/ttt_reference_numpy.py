"""docs/ttt-maths.md written out literally in NumPy float64: the numbers the MLX layers must match.

Loops over batch, heads and tokens instead of vectorising, so that every line reads like the maths.
Both forms are here: `form="dual"` (mini-batch formulas) and `form="primal"` (each token its own
weights, as in streaming); the tests check them against each other and the MLX layers.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-6


def ln_fwd(x, gamma, beta):
    mu = x.mean(-1, keepdims=True)
    sigma = np.sqrt(x.var(-1, keepdims=True) + EPS)
    return gamma * (x - mu) / sigma + beta


def ln_l2_grad(z, target, gamma, beta):
    n = z.shape[-1]
    sigma = np.sqrt(z.var(-1, keepdims=True) + EPS)
    xhat = (z - z.mean(-1, keepdims=True)) / sigma
    g = (gamma * xhat + beta - target) * gamma
    return (n * g - g.sum(-1, keepdims=True) - xhat * (g * xhat).sum(-1, keepdims=True)) / (
        n * sigma
    )


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def gelu_tanh_grad(x):
    t = np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * x**2)


def rope(x, positions, theta):
    """Rotate consecutive pairs (2i, 2i+1) by position * theta^(-2i/f); x (L, f)."""
    f = x.shape[-1]
    angle = positions[:, None] * theta ** (-np.arange(0, f, 2) / f)[None, :]
    cos, sin = np.cos(angle), np.sin(angle)
    out = np.empty_like(x)
    out[:, 0::2] = x[:, 0::2] * cos - x[:, 1::2] * sin
    out[:, 1::2] = x[:, 0::2] * sin + x[:, 1::2] * cos
    return out


def _inner_model(kind, w, xk):
    """Z and the intermediates of the inner model under fast weights w."""
    if kind == "linear":
        return xk @ w["W1"] + w["b1"], None, None
    z1 = xk @ w["W1"] + w["b1"]
    x2 = gelu_tanh(z1)
    return x2 @ w["W2"] + w["b2"], z1, x2


def _mini_batch(kind, w, xq, xk, xv, tok, lr, gamma, beta, form):
    """One mini-batch of one head -> (Zbar (n, f), the weights after it, losses before/after)."""
    n = xq.shape[0]
    target = xv - xk
    z, z1, x2 = _inner_model(kind, w, xk)
    g = ln_l2_grad(z, target, gamma, beta)
    if kind == "linear":
        inputs = {"1": (xk, g)}
    else:
        g1 = (g @ w["W2"].T) * gelu_tanh_grad(z1)
        inputs = {"1": (xk, g1), "2": (x2, g)}
    eta = np.tril(tok[:n, None] * lr[None, :n])  # eta[i, j] = tok_i * lr_j, j <= i

    if form == "dual":
        zbar1 = (
            xq @ w["W1"]
            - (eta * np.tril(xq @ inputs["1"][0].T)) @ inputs["1"][1]
            + w["b1"]
            - eta @ inputs["1"][1]
        )
        if kind == "linear":
            zbar = zbar1
        else:
            x2bar = gelu_tanh(zbar1)
            zbar = x2bar @ w["W2"] - (eta * np.tril(x2bar @ x2.T)) @ g + w["b2"] - eta @ g
        new = {}
        for layer, (x_in, grad) in inputs.items():
            new["W" + layer] = w["W" + layer] - (eta[-1][:, None] * x_in).T @ grad
            new["b" + layer] = w["b" + layer] - (eta[-1][:, None] * grad).sum(0, keepdims=True)
    else:  # primal: token i sees W - tok_i * sum_{j<=i} lr_j x_j^T G_j
        zbar = np.empty_like(xq)
        for i in range(n):
            wi = {}
            for layer, (x_in, grad) in inputs.items():
                gW = sum(lr[j] * np.outer(x_in[j], grad[j]) for j in range(i + 1))
                gb = sum(lr[j] * grad[j] for j in range(i + 1))
                wi["W" + layer] = w["W" + layer] - tok[i] * gW
                wi["b" + layer] = w["b" + layer] - tok[i] * gb[None, :]
            h = xq[i : i + 1] @ wi["W1"] + wi["b1"]
            if kind == "mlp":
                h = gelu_tanh(h) @ wi["W2"] + wi["b2"]
            zbar[i] = h[0]
        new = wi
    loss_before = 0.5 * ((ln_fwd(z, gamma, beta) - target) ** 2).sum(-1)
    z_after = _inner_model(kind, new, xk)[0]
    loss_after = 0.5 * ((ln_fwd(z_after, gamma, beta) - target) ** 2).sum(-1)
    return zbar, new, loss_before, loss_after


def ttt_layer(
    params,
    x,
    kind,
    num_heads,
    mini_batch_size,
    base_lr=1.0,
    theta=10000.0,
    use_gate=False,
    form="dual",
):
    """The whole layer: y (B, L, d), and the per-token inner losses before/after (B, nh, L)."""
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    x = np.asarray(x, dtype=np.float64)
    B, L, d = x.shape
    nh, K = num_heads, mini_batch_size
    f = d // nh
    names = ("W1", "b1") if kind == "linear" else ("W1", "b1", "W2", "b2")
    heads = {
        name: (x @ p[f"{name}_proj.weight"].T).reshape(B, L, nh, f).transpose(0, 2, 1, 3)
        for name in "qkv"
    }
    positions = np.arange(L) % K
    tok = np.maximum(1.0 / np.arange(1, K + 1) + p["learnable_token_idx"], 0.0)
    lr_logit = np.einsum("bld,hd->bhl", x, p["learnable_ttt_lr_weight"][:, 0, :])
    lr = base_lr / (1 + np.exp(-(lr_logit + p["learnable_ttt_lr_bias"][None, :, 0:1])))
    lr = lr / f

    out = np.empty((B, nh, L, f))
    losses = np.empty((2, B, nh, L))
    for b in range(B):
        for h in range(nh):
            xq = rope(heads["q"][b, h], positions, theta)
            xk = rope(heads["k"][b, h], positions, theta)
            xv = heads["v"][b, h]
            gamma, beta = p["ttt_norm_weight"][h], p["ttt_norm_bias"][h]
            w = {name: p[name][h] for name in names}
            for s in range(0, L, K):
                cut = slice(s, min(s + K, L))
                zbar, w, before, after = _mini_batch(
                    kind, w, xq[cut], xk[cut], xv[cut], tok, lr[b, h, cut], gamma, beta, form
                )
                out[b, h, cut] = xq[cut] + ln_fwd(zbar, gamma, beta)
                losses[0, b, h, cut], losses[1, b, h, cut] = before, after
    y = out.transpose(0, 2, 1, 3).reshape(B, L, d)
    y = ln_fwd(y, p["post_norm.weight"], p["post_norm.bias"])
    if use_gate:
        y = gelu_tanh(x @ p["g_proj.weight"].T) * y
    return y @ p["o_proj.weight"].T, losses
