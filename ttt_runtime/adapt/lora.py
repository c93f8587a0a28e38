"""`lora`: low-rank adapters (Hu et al. 2021) on the TTT layers' projections (q, k, v, o of
every block), learned by the same signal as `dynamic` (next-byte loss on each chunk after it is
scored) while the base stays frozen: a projection's weight is W + B A - B0 A0, where B A has rank
`lora_rank` and B0 A0 is its start, so the adapted model starts as the base.

`lora_init` chooses the start: `random` (A Gaussian, B zero, the usual LoRA), `qr` (A an
orthonormal basis of the rows of W, from its QR, B zero) or `svd` (B0 A0 the best rank-r part of
W from its SVD, as in PiSSA: the adapters start on the directions the weight uses most).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ttt_runtime.adapt.method import GradientMethod, param_key
from ttt_runtime.config import RunConfig
from ttt_runtime.model import TTTModel
from ttt_runtime.steps import next_byte_loss

PROJECTIONS = tuple(f"ttt.{p}_proj.weight" for p in "qkvo")


def initial_factors(weight: np.ndarray, rank: int, init: str, rng) -> tuple[np.ndarray, ...]:
    """(A (rank, in), B (out, rank)) for a weight (out, in), as `init` starts them."""
    out_dims, in_dims = weight.shape
    if init == "svd":
        u, s, vt = np.linalg.svd(weight, full_matrices=False)
        root = np.sqrt(s[:rank])
        return root[:, None] * vt[:rank], u[:, :rank] * root
    if init == "qr":
        q, _ = np.linalg.qr(weight.T)  # (in, min(in, out)): orthonormal, spanning W's rows
        a = q[:, :rank].T
    else:
        a = rng.standard_normal((rank, in_dims)) / np.sqrt(in_dims)
    return a, np.zeros((out_dims, rank))


class Lora(GradientMethod):
    name = "lora"

    def __init__(self, model: TTTModel, config: RunConfig, stats: dict[str, mx.array]):
        self.rank, self.init, self.seed = config.lora_rank, config.lora_init, config.seed
        super().__init__(model, config, stats)

    def initial_params(self) -> dict[str, mx.array]:
        rng = np.random.default_rng(self.seed)
        params, self.start = {}, {}
        for name, weight in self.base.items():
            if name.endswith(PROJECTIONS):
                w = np.asarray(weight.astype(mx.float32))
                a, b = (
                    mx.array(x.astype(np.float32))
                    for x in initial_factors(w, self.rank, self.init, rng)
                )
                params[f"{param_key(name)}/a"], params[f"{param_key(name)}/b"] = a, b
                self.start[name] = (b @ a).astype(weight.dtype)
        return params

    def weights(self, params: dict[str, mx.array]) -> dict[str, mx.array]:
        return {
            name: self.base[name]
            + (params[f"{param_key(name)}/b"] @ params[f"{param_key(name)}/a"] - start)
            for name, start in self.start.items()
        }

    def objective(self, features: mx.array, logits: mx.array, targets: mx.array) -> mx.array:
        return next_byte_loss(logits, targets)
