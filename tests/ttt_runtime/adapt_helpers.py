"""What the adapt method tests share: learners on the small base (conftest's `small_base`), the
chunks they read, and a learner's state compared array by array."""

from __future__ import annotations

import mlx.core as mx

from ttt_runtime import checkpoint as ckpt
from ttt_runtime.config import RunConfig
from ttt_runtime.corpora import CorpusStream
from ttt_runtime.learners import AdaptLearner
from ttt_runtime.model import TTTModel
from ttt_runtime.steps import LN2

METHODS = ("ttt", "reset", "dynamic", "lora", "tent", "ttt++")
LEARNING = ("ttt", "dynamic", "lora", "tent", "ttt++")  # all but the no-memory baseline
GRADIENT = ("dynamic", "lora", "tent", "ttt++")  # those that take gradient steps


def adapt_config(base: str, method: str, **overrides) -> RunConfig:
    """The base's settings in adapt mode with `method` (a high adapt_lr: few chunks to learn)."""
    saved = ckpt.load(base).config
    settings = {"mode": "adapt", "adapt_method": method, "adapt_lr": 3e-3, **overrides}
    return RunConfig().with_overrides(**{**saved, **settings})


def learner(base: str, method: str, **overrides) -> AdaptLearner:
    config = adapt_config(base, method, **overrides)
    mx.random.seed(config.seed + 1)  # other initial weights: all must come from the base
    return AdaptLearner(TTTModel(config.model_config()), config, ckpt.load(base))


def chunks(corpus: str, count: int, seq_len: int = 32) -> list[tuple[mx.array, mx.array]]:
    stream = CorpusStream(corpus, seq_len)
    return [tuple(mx.array(a) for a in next(stream)) for _ in range(count)]  # type: ignore[misc]


def bpb(adapter: AdaptLearner, chunk) -> float:
    return adapter.step(*chunk, sampled=False).loss.item() / LN2


def same_arrays(a: dict[str, mx.array], b: dict[str, mx.array]) -> bool:
    return a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)
