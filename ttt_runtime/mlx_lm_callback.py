"""mlx-lm's fine-tuning, shown live by xltop: a TrainingCallback that feeds a Reporter.

    from ttt_runtime.mlx_lm_callback import XltopCallback
    train(model, optimizer, train_set, val_set, args, training_callback=XltopCallback())

mlx-lm calls `on_train_loss_report` every `steps_per_report` iterations: each call is one report
covering those iterations (tokens/s and step time averaged over them; `pause` takes hold at the
next call). A second call of `train()` with the same callback goes on counting from where the
first ended. The learning rate is the extra scalar `learning_rate`, the last validation loss
`val_loss`. mlx-lm is an optional extra (`pip install xltop[mlx-lm]`).
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
        self._earlier_steps = 0  # the iterations of earlier calls of train()

    def on_train_loss_report(self, train_info: dict) -> None:
        iteration, total = int(train_info["iteration"]), int(train_info["trained_tokens"])
        if iteration <= self._iteration:  # train() called again: it counts from 1 again
            self._earlier_steps += self._iteration
            self._trained_tokens = 0
        tokens = total - self._trained_tokens
        self._iteration, self._trained_tokens = iteration, total
        self.reporter.step(
            loss=train_info["train_loss"],
            tokens=tokens,
            step=self._earlier_steps + iteration,
            learning_rate=train_info["learning_rate"],
        )

    def on_val_loss_report(self, val_info: dict) -> None:
        self.reporter.update_scalars(val_loss=val_info["val_loss"])
