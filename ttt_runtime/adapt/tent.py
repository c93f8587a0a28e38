"""`tent`: test-time entropy minimisation (Wang et al. 2021). After a chunk is scored, Adam
steps lower the mean entropy of its next-byte predictions, updating only the normalisation
layers' scales and shifts (the blocks' RMSNorms, the TTT layers' output LayerNorm, the final
norm); it never looks at the targets."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ttt_runtime.adapt.method import GradientMethod
from ttt_runtime.config import RunConfig
from ttt_runtime.model import TTTModel


class Tent(GradientMethod):
    name = "tent"

    def __init__(self, model: TTTModel, config: RunConfig, stats: dict[str, mx.array]):
        self.norm_weights = {
            f"{module_name}.{param}"
            for module_name, module in model.named_modules()
            if isinstance(module, (nn.RMSNorm, nn.LayerNorm))
            for param in dict(tree_flatten(module.parameters()))
        }
        super().__init__(model, config, stats)

    def learns(self, name: str) -> bool:
        return name in self.norm_weights

    def objective(self, features: mx.array, logits: mx.array, targets: mx.array) -> mx.array:
        log_p = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return -(mx.exp(log_p) * log_p).sum(axis=-1).mean()
