"""The learners: the model of a run and its learning state, one kind per mode, stepped through
one interface (`Learner`) by whatever drives the run (`run.TTTRun`).

Train (`TrainLearner`): every step starts from the learned initial fast weights, and AdamW
updates the outer weights. Adapt (`AdaptLearner`): the base's outer weights are kept as they
came, one cache per block carries the fast weights from step to step, one long conversation
until `reset`, and the adapt method (`ttt_runtime.adapt`) learns from each chunk after it is
scored; with `exact_accumulate` the fast weights' exact sums are kept beside them (`exact.py`).

A step is the unsampled, fully fused one (`steps.py`) or, when sampled, the same step run block
by block with each block timed (`blockwise.py`), followed by its figures (`figures.py`).
"""

from __future__ import annotations

import copy
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Protocol

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ttt_runtime import blockwise
from ttt_runtime.adapt import METHODS
from ttt_runtime.checkpoint import Checkpoint
from ttt_runtime.config import Mode, RunConfig
from ttt_runtime.exact import ExactFastWeights
from ttt_runtime.figures import (
    SampleFigures,
    at_conversation_start,
    fast_weight_stats,
    sample_figures,
)
from ttt_runtime.model import TTTModel
from ttt_runtime.protocol import WorkerFigures
from ttt_runtime.steps import adapt_step, cache_arrays, make_optimizer, make_train_step


@dataclass
class StepResult:
    loss: mx.array  # the outer loss in nats, evaluated
    seconds: float  # the step's own time: its figures are measured after the clock stops
    sample: SampleFigures | None = None  # a sampled step's figures


@dataclass
class LearnerState:
    """What a checkpoint keeps of a learner."""

    # by checkpoint name: "model.*", "optimizer.*", "cache.<block>.<i>", "adapt.*", "stats.*"
    arrays: dict[str, mx.array]
    cache_offsets: list[int] = field(default_factory=list)  # adapt: tokens seen, per block


class LearnerFailed(RuntimeError):
    """The learner cannot go on (a Ray actor lost for good): the run stops with this line."""


class LearnerRestarted(RuntimeError):
    """Part of the learner was lost and restarted from scratch: the run takes it back to its
    last checkpoint (`load`) and goes on from there."""


class Learner(Protocol):
    """What a driver calls, between steps and on the one thread that touches MLX."""

    def step(self, inputs: mx.array, targets: mx.array, sampled: bool) -> StepResult:
        """One step on a batch: the update applied and evaluated; a sampled one is run block by
        block and comes with its figures."""
        ...

    def warm_up(self, inputs: mx.array, targets: mx.array) -> None:
        """Run the sampled path once on a throwaway (it changes no weight), so that its
        compiling is done before a sampled step is timed."""
        ...

    def reset(self, reported: list[dict]) -> list[dict]:
        """Fast weights back to their start, a new conversation: the layer figures that stand
        now, given the last ones reported."""
        ...

    def state(self) -> LearnerState: ...

    def load(self, state: LearnerState) -> None:
        """Back to a checkpoint's arrays (after LearnerRestarted)."""
        ...

    def clear_cache(self) -> int:
        """mx.clear_cache() wherever the learner computes: the cache bytes left."""
        ...

    def workers(self) -> tuple[WorkerFigures, ...]:
        """The processes besides the run's that compute its steps (Ray actors), if any."""
        ...

    def close(self) -> None: ...

    def baseline_loss(self, inputs: mx.array, targets: mx.array) -> mx.array | None:
        """The loss (nats) of the unadapted base on this batch, from fresh fast weights (what
        adapting is measured against); None when the run has no base (train mode)."""
        ...


def _named(group: str, tree: Any) -> dict[str, mx.array]:
    """A tree's arrays under their checkpoint names, "group.path.to.array"."""
    return {f"{group}.{k}": v for k, v in dict(tree_flatten(tree)).items()}


class _WholeModel(ABC):
    """A learner of the whole model in this process: loads the outer weights from a checkpoint,
    and times and measures its steps."""

    def __init__(self, model: TTTModel, restored: Checkpoint | None):
        """ValueError if the checkpoint's arrays do not fit the model."""
        self.model = model
        if restored is not None:
            model.load_weights(list(restored.group("model").items()), strict=True)
        mx.eval(model.parameters())

    def step(self, inputs: mx.array, targets: mx.array, sampled: bool) -> StepResult:
        start = time.perf_counter()
        loss, timed = self._advance(inputs, targets, sampled)
        seconds = time.perf_counter() - start
        sample = self._figures(timed) if timed is not None else None
        return StepResult(loss, seconds, sample)

    @abstractmethod
    def _advance(
        self, inputs: mx.array, targets: mx.array, sampled: bool
    ) -> tuple[mx.array, blockwise.TimedStep | None]:
        """The step, evaluated: (its loss, what it measured when sampled)."""

    @abstractmethod
    def _figures(self, timed: blockwise.TimedStep) -> SampleFigures: ...

    def load(self, state: LearnerState) -> None:
        raise LearnerFailed("a one-process run never restarts part of itself")

    def clear_cache(self) -> int:
        mx.clear_cache()
        return mx.get_cache_memory()

    def workers(self) -> tuple[WorkerFigures, ...]:
        return ()

    def close(self) -> None:  # noqa: B027 - nothing runs elsewhere
        pass


class TrainLearner(_WholeModel):
    """The model, its AdamW optimizer and the compiled train step."""

    def __init__(self, model: TTTModel, config: RunConfig, restored: Checkpoint | None = None):
        super().__init__(model, restored)
        self.optimizer = make_optimizer(config)
        saved = restored.group("optimizer") if restored else {}
        self.optimizer.init(model.trainable_parameters())
        if saved and restored is not None and restored.config.get("mode") == "train":
            fresh = {k: v.shape for k, v in dict(tree_flatten(self.optimizer.state)).items()}
            if {k: v.shape for k, v in saved.items()} != fresh:
                raise ValueError("its optimizer state is not that of this model's parameters")
            self.optimizer.state = tree_unflatten(list(saved.items()))
        self.train_step = make_train_step(model, self.optimizer, config.compile)

    def _advance(
        self, inputs: mx.array, targets: mx.array, sampled: bool
    ) -> tuple[mx.array, blockwise.TimedStep | None]:
        timed = None
        if sampled:
            timed, grads = blockwise.train_grads(self.model, inputs, targets)
            self.optimizer.update(self.model, grads)
            loss = timed.loss
        else:
            loss = self.train_step(inputs, targets)
        mx.eval(loss, self.model.parameters(), self.optimizer.state)
        return loss, timed

    def _figures(self, timed: blockwise.TimedStep) -> SampleFigures:
        return sample_figures(timed, origin=timed.before)  # each step is a fresh conversation

    def warm_up(self, inputs: mx.array, targets: mx.array) -> None:
        mx.eval(blockwise.train_grads(self.model, inputs, targets)[1])

    def reset(self, reported: list[dict]) -> list[dict]:
        # every train step starts from the initial fast weights anyway: nothing to reset
        return at_conversation_start(reported, exact=False)

    def state(self) -> LearnerState:
        model, optimizer = self.model.parameters(), self.optimizer.state
        return LearnerState({**_named("model", model), **_named("optimizer", optimizer)})

    def baseline_loss(self, inputs: mx.array, targets: mx.array) -> mx.array | None:
        return None


class AdaptLearner(_WholeModel):
    """The base's weights, the adapt method, one cache per block carried across steps, the
    fast weights the conversation started from, and (exact_accumulate) their exact sums."""

    def __init__(self, model: TTTModel, config: RunConfig, restored: Checkpoint | None = None):
        """ValueError (adapt.MethodUnavailable where the method cannot apply to this base) if
        the checkpoint does not fit."""
        super().__init__(model, restored)
        self.batch_size = config.batch_size
        self.exact_accumulate = config.exact_accumulate
        model.freeze()
        self.base = dict(tree_flatten(model.parameters()))
        self.stats = restored.group("stats") if restored else {}  # the base's training data's
        self.method = METHODS[config.adapt_method](model, config, self.stats)
        self._new_conversation()
        saved_config = restored.config if restored else {}
        adapted = saved_config.get("mode") == "adapt"
        if adapted and saved_config.get("adapt_method", "ttt") == config.adapt_method:
            self.method.load_state(restored.group("adapt") if restored else {})
        saved = restored.group("cache") if restored else {}
        if saved and restored is not None and adapted:
            names = {
                f"{i}.{j}" for i, cache in enumerate(self.caches) for j in range(len(cache.state))
            }
            if set(saved) != names or len(restored.cache_offsets) != len(self.caches):
                raise ValueError(
                    f"its caches ({len(saved)} arrays, {len(restored.cache_offsets)} offsets) are "
                    f"not those of this model ({len(names)} arrays, {len(self.caches)} offsets)"
                )
            for i, cache in enumerate(self.caches):
                cache.state = [saved[f"{i}.{j}"] for j in range(len(cache.state))]
                cache.offset = restored.cache_offsets[i]
            self._new_conversation(keep_cache=True)

    def _new_conversation(self, keep_cache: bool = False) -> None:
        """Fresh fast weights (unless kept) become the conversation's origin."""
        if not keep_cache:
            self.caches = self.model.make_cache(self.batch_size)
        mx.eval(cache_arrays(self.caches))
        self.origin = [c.fast_weights for c in self.caches]
        self.exact = ExactFastWeights(self.caches) if self.exact_accumulate else None

    def _advance(
        self, inputs: mx.array, targets: mx.array, sampled: bool
    ) -> tuple[mx.array, blockwise.TimedStep | None]:
        if not self.method.carries_fast_weights:
            self.caches = self.model.make_cache(self.batch_size)
        start = [copy.copy(c) for c in self.caches]  # the scoring below moves the caches on
        timed = None
        if sampled:
            timed = blockwise.adapt_step(self.model, self.caches, inputs, targets)
            loss = timed.loss
        else:
            loss = adapt_step(self.model, self.caches, inputs, targets)
        mx.eval(loss, cache_arrays(self.caches))
        if self.exact is not None:
            self.exact.add_updates(self.caches)
        self.method.learn(start, inputs, targets)  # scored first: no peeking
        return loss, timed

    def _figures(self, timed: blockwise.TimedStep) -> SampleFigures:
        exact_drift = self.exact.drift(self.caches) if self.exact is not None else None
        return sample_figures(timed, self.origin, exact_drift)

    def warm_up(self, inputs: mx.array, targets: mx.array) -> None:
        # on copies of the caches as the next step will find them
        blockwise.adapt_step(self.model, [copy.copy(c) for c in self.caches], inputs, targets)

    def reset(self, reported: list[dict]) -> list[dict]:
        self._new_conversation()
        self.method.reset()
        fresh = fast_weight_stats(self.origin, self.origin, self.origin)
        return at_conversation_start(fresh, exact=self.exact is not None)

    def state(self) -> LearnerState:
        arrays = {f"model.{k}": v for k, v in self.base.items()}
        arrays.update({f"adapt.{k}": v for k, v in self.method.state().items()})
        arrays.update({f"stats.{k}": v for k, v in self.stats.items()})
        for i, cache in enumerate(self.caches):
            arrays.update({f"cache.{i}.{j}": a for j, a in enumerate(cache.state)})
        return LearnerState(arrays, [cache.offset for cache in self.caches])

    def baseline_loss(self, inputs: mx.array, targets: mx.array) -> mx.array | None:
        self.model.update(tree_unflatten(list(self.base.items())))
        try:
            loss = adapt_step(self.model, self.model.make_cache(inputs.shape[0]), inputs, targets)
            mx.eval(loss)
        finally:
            self.method.apply()  # the adapted weights back
        return loss


LEARNERS: dict[Mode, type[TrainLearner | AdaptLearner]] = {
    "train": TrainLearner,
    "adapt": AdaptLearner,
}  # by RunConfig.mode
