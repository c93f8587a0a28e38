"""mlx-lm's fine-tuning, shown live by xltop: a TrainingCallback that feeds a Reporter.

    from ttt_runtime.mlx_lm_callback import XltopCallback
    train(model, optimizer, train_set, val_set, args, training_callback=XltopCallback())

mlx-lm calls `on_train_loss_report` every `steps_per_report` iterations: each call is one report
covering those iterations (tokens/s and step time averaged over them; `pause` takes hold at the
next call). mlx-lm counts the iterations of each `train()` from 1: they are counted on from the
reporter's steps when it began (the loop's own, an earlier `train()`'s). The learning rate is
the extra scalar `learning_rate`, the last validation loss `val_loss`. mlx-lm is an optional
extra (`pip install xltop[mlx-lm]`).
"""

from __future__ import annotations

from typing import Any

from mlx_lm.tuner.callbacks import TrainingCallback

from ttt_runtime.report import Reporter


class XltopCallback(TrainingCallback):
    """Reports mlx-lm's training to `reporter`, else to a Reporter made with `options`
    (Reporter's own: socket, name, save, sample_every)."""

    def __init__(self, reporter: Reporter | None = None, **options: Any):
        self.reporter = reporter if reporter is not None else Reporter(**options)
        self._iteration = 0  # mlx-lm's, at the last report
        self._trained_tokens = 0  # mlx-lm's running total, at the last report
        self._steps_before: int | None = None  # the reporter's count when this train() began

    def on_train_loss_report(self, train_info: dict) -> None:
        iteration, total = int(train_info["iteration"]), int(train_info["trained_tokens"])
        if self._steps_before is None or iteration <= self._iteration:  # a train() begins
            self._steps_before, self._trained_tokens = self.reporter.steps, 0
        tokens = total - self._trained_tokens
        self._iteration, self._trained_tokens = iteration, total
        self.reporter.step(
            loss=train_info["train_loss"],
            tokens=tokens,
            step=self._steps_before + iteration,
            learning_rate=train_info["learning_rate"],
        )

    def on_val_loss_report(self, val_info: dict) -> None:
        self.reporter.update_scalars(val_loss=val_info["val_loss"])
