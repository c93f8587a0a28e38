"""`ttt++` (Liu et al. 2021): after a chunk is scored, Adam steps on its next-byte loss (the
self-supervised task) plus the distance of its features' mean and covariance from those of the
training data, update every outer weight. The features are what the head reads; their training
statistics are kept in the base checkpoint (`stats.feature_mean`, `stats.feature_cov`, written
by `feature_statistics`, see `make base`).
"""

from __future__ import annotations

from collections.abc import Iterable

import mlx.core as mx

from ttt_runtime.adapt.method import GradientMethod, MethodUnavailable
from ttt_runtime.config import RunConfig
from ttt_runtime.model import TTTModel
from ttt_runtime.steps import next_byte_loss

STATS = ("feature_mean", "feature_cov")  # in a checkpoint: stats.feature_mean, ...
ALIGN_WEIGHT = 1.0  # of the alignment beside the next-byte loss (both about 1 at the start)


def _moments(features: mx.array) -> tuple[mx.array, mx.array]:
    """Mean (d,) and covariance (d, d) of features (..., d) over all tokens."""
    x = features.reshape(-1, features.shape[-1]).astype(mx.float32)
    mean = x.mean(axis=0)
    centred = x - mean
    return mean, centred.T @ centred / max(x.shape[0] - 1, 1)


def feature_statistics(
    model: TTTModel, batches: Iterable[tuple[mx.array, mx.array]]
) -> dict[str, mx.array]:
    """The training statistics ttt++ needs, over the inputs of `batches` (each row from the
    model's initial fast weights, as in training)."""
    features = [model.features(inputs, model.make_cache(inputs.shape[0])) for inputs, _ in batches]
    mean, cov = _moments(mx.concatenate([f.reshape(-1, f.shape[-1]) for f in features]))
    return {"feature_mean": mean, "feature_cov": cov}


class TTTPlusPlus(GradientMethod):
    name = "ttt++"

    def __init__(self, model: TTTModel, config: RunConfig, stats: dict[str, mx.array]):
        missing = [f"stats.{name}" for name in STATS if name not in stats]
        if missing:
            raise MethodUnavailable(
                f"adapt_method 'ttt++' needs the training data's feature statistics "
                f"({', '.join(missing)}) in the checkpoint: resume from a base made by "
                "`make base`"
            )
        dims = model.config.layer.hidden_size
        self.train_mean, self.train_cov = (stats[name] for name in STATS)
        if self.train_mean.shape != (dims,) or self.train_cov.shape != (dims, dims):
            raise MethodUnavailable(
                f"adapt_method 'ttt++': the checkpoint's feature statistics are not of "
                f"{dims} features"
            )
        super().__init__(model, config, stats)

    def objective(self, features: mx.array, logits: mx.array, targets: mx.array) -> mx.array:
        mean, cov = _moments(features)
        dims = features.shape[-1]
        align = ((mean - self.train_mean) ** 2).sum() / dims
        align = align + ((cov - self.train_cov) ** 2).sum() / dims
        return next_byte_loss(logits, targets) + ALIGN_WEIGHT * align
