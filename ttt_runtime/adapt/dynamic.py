"""`dynamic`: dynamic evaluation (Krause et al. 2018), the classic test-time adaptation of a
language model. After a chunk is scored, `adapt_steps` Adam steps of next-byte loss on that
chunk update every outer weight; the fast weights carry on as in `ttt`."""

from __future__ import annotations

import mlx.core as mx

from ttt_runtime.adapt.method import GradientMethod
from ttt_runtime.steps import next_byte_loss


class Dynamic(GradientMethod):
    name = "dynamic"

    def objective(self, features: mx.array, logits: mx.array, targets: mx.array) -> mx.array:
        return next_byte_loss(logits, targets)
