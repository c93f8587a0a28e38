"""What every test-time adaptation method is to the adapt learner (`Method`), and what the
methods that take gradient steps share (`GradientMethod`).

The learner scores each chunk first (its loss is the one reported), then hands the method the
fast weights the chunk started from, and the method learns from the chunk: a chunk's own
update never reaches its own score. A method's learned state (`state()`) is kept in
checkpoints as `adapt.*`, beside the base weights (`model.*`), which no method changes.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from ttt_runtime.config import RunConfig
from ttt_runtime.layers import TTTCache
from ttt_runtime.model import TTTModel


class MethodUnavailable(ValueError):
    """The method cannot apply to this base (e.g. statistics it needs are not in the
    checkpoint); the message, one line, names what is missing."""


class Method:
    """Frozen weights, fast weights carried from chunk to chunk (`ttt`): nothing more to learn."""

    name: ClassVar[str]
    carries_fast_weights: ClassVar[bool] = True  # False: every chunk starts from fresh ones

    def __init__(self, model: TTTModel, config: RunConfig, stats: dict[str, mx.array]):
        """stats: what the base checkpoint holds of its training data (`stats.*`)."""
        self.model = model

    def learn(self, start: list[TTTCache], inputs: mx.array, targets: mx.array) -> None:
        """Learn from a chunk already scored; `start`: the fast weights it started from."""

    def apply(self) -> None:
        """Put the adapted weights into the model (after the base was put there)."""

    def reset(self) -> None:
        """Back to the base: nothing learned."""

    def state(self) -> dict[str, mx.array]:
        return {}

    def load_state(self, saved: dict[str, mx.array]) -> None:
        """ValueError if `saved` is not a state of this method on this model."""
        _check_fits(self.state(), saved, self.name)


def _check_fits(expected: dict[str, mx.array], saved: dict[str, mx.array], name: str) -> None:
    shapes = {k: tuple(v.shape) for k, v in saved.items()}
    if shapes != {k: tuple(v.shape) for k, v in expected.items()}:
        raise ValueError(
            f"its {name} state ({len(saved)} arrays) is not that of this method on this model "
            f"({len(expected)} arrays, or other shapes)"
        )


def param_key(name: str) -> str:
    """A parameter's name as a key of `params`: without dots, so that the optimizer's state,
    flattened for a checkpoint ("key.m"), unflattens to the same tree."""
    return name.replace(".", "/")


def weight_name(key: str) -> str:
    return key.replace("/", ".")


class GradientMethod(Method):
    """Learns `params` (a flat dict, keys by `param_key`) by Adam steps on `objective` over each
    chunk, `adapt_steps` of them, each from the chunk's starting fast weights; `weights(params)`
    are the model weights (by name) they stand for (by default, `params` are model weights)."""

    params: dict[str, mx.array]
    optimizer: optim.Adam

    def __init__(self, model: TTTModel, config: RunConfig, stats: dict[str, mx.array]):
        super().__init__(model, config, stats)
        self.lr, self.steps = config.adapt_lr, config.adapt_steps
        self.base = dict(tree_flatten(model.parameters()))
        self.initial = self.initial_params()
        self.reset()
        self._grad = mx.grad(self._loss)

    def initial_params(self) -> dict[str, mx.array]:
        """The base's own weights that `learns` picks, to be learned in place."""
        return {param_key(k): v for k, v in self.base.items() if self.learns(k)}

    def learns(self, name: str) -> bool:
        """Whether the model weight `name` is learned (by the default `initial_params`)."""
        return True

    def weights(self, params: dict[str, mx.array]) -> dict[str, mx.array]:
        """The model weights (by name) that `params` stand for."""
        return {weight_name(k): v for k, v in params.items()}

    def objective(self, features: mx.array, logits: mx.array, targets: mx.array) -> mx.array:
        raise NotImplementedError

    def _loss(self, params, start, inputs, targets) -> mx.array:
        self.model.update(tree_unflatten(list(self.weights(params).items())), strict=False)
        features = self.model.features(inputs, [copy.copy(c) for c in start])
        return self.objective(features, self.model.head(features), targets)

    def learn(self, start: list[TTTCache], inputs: mx.array, targets: mx.array) -> None:
        for _ in range(self.steps):
            grads = self._grad(self.params, start, inputs, targets)
            self.params = self.optimizer.apply_gradients(grads, self.params)
            mx.eval(self.params, self.optimizer.state)
        self.apply()

    def apply(self) -> None:
        weights = self.weights(self.params)
        self.model.update(tree_unflatten(list(weights.items())), strict=False)
        mx.eval(list(weights.values()))

    def reset(self) -> None:
        self.params = dict(self.initial)
        self.optimizer = optim.Adam(learning_rate=self.lr)
        self.optimizer.init(self.params)
        self.apply()

    def state(self) -> dict[str, mx.array]:
        optimizer = dict(tree_flatten(self.optimizer.state))
        return {
            **{f"params.{k}": v for k, v in self.params.items()},
            **{f"optimizer.{k}": v for k, v in optimizer.items()},
        }

    def load_state(self, saved: dict[str, mx.array]) -> None:
        _check_fits(self.state(), saved, self.name)
        self.params = {k[len("params.") :]: v for k, v in saved.items() if k.startswith("params.")}
        optimizer: Any = tree_unflatten(
            [(k[len("optimizer.") :], v) for k, v in saved.items() if k.startswith("optimizer.")]
        )
        self.optimizer.state = optimizer
        self.optimizer.learning_rate = self.lr  # this run's, not the saved run's
        self.apply()
