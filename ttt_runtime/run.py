"""The TTT run: a loop that trains or adapts, obeys the channel's commands between steps, and
publishes one telemetry message per step (ttt_runtime.protocol.TELEMETRY_FIELDS).

Commands are handled on the loop's own thread, between steps, so MLX is only ever touched from
one thread. A step in progress always finishes: `stop` (or SIGTERM) exits after it, with a
"bye"; an exception is sent as an "error" message before the process exits 1.
"""

from __future__ import annotations

import copy
import os
import secrets
import signal
import sys
import threading
import time
import traceback

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ttt_runtime import checkpoint as ckpt
from ttt_runtime.blas import loaded_blas
from ttt_runtime.channel import ChannelError, ChannelServer
from ttt_runtime.config import ConfigError, RunConfig
from ttt_runtime.console import say
from ttt_runtime.model import TTTModel
from ttt_runtime.steps import (
    LN2,
    adapt_step,
    cache_arrays,
    make_optimizer,
    make_train_step,
)
from ttt_runtime.stream import ByteStream
from ttt_runtime.telemetry import (
    Sample,
    device_info,
    fast_weight_stats,
    inner_stats,
    memory_counters,
    sampled_adapt_step,
    sampled_train_grads,
)

PAUSED_REPORT_S = 1.0  # a paused run still reports this often, for monitors that attach late
PROGRESS_S = 2.0  # stderr progress line period when no monitor is attached


class SetupError(ValueError):
    """The run cannot start (bad data path, checkpoint, socket); one line, no traceback."""


class TTTRun:
    def __init__(self, config: RunConfig, socket_path: str, resume: str | None = None):
        try:
            restored = ckpt.load(resume) if resume else None
            self.config = config
            mx.random.seed(config.seed)
            self.model = TTTModel(config.model_config())
            self.stream = ByteStream(
                config.data, config.seq_len, config.batch_size,
                restored.stream_position if restored else 0,
            )  # fmt: skip
        except (ckpt.CheckpointError, ConfigError, ValueError, KeyError) as exc:
            raise SetupError(str(exc)) from None
        self.run_id = secrets.token_hex(4)
        self.step = restored.step if restored else 0
        self.tokens = restored.tokens if restored else 0
        self.conversation = restored.conversation if restored else 0
        self.paused = config.start_paused
        self.stopping = False
        self.exact = None  # adapt mode with exact_accumulate: per layer, name -> accumulator
        self.report = {"sampled_step": None, "blocks": [], "layers": [], "inner_lr": None}
        self.last = {"tokens_per_s": None, "step_ms": None, "loss_bpb": None}
        self.warmup_ms = None  # the first step of this process: compile times, reported apart
        self.warm_from = None  # the step after it, the first one sampled
        self.device = device_info()  # fixed for the process; memory is re-read per report
        self.blas = loaded_blas()
        self._setup_model(restored, resume)
        self._open_channel(socket_path)

    # -- setup ----------------------------------------------------------------------------------
    def _setup_model(self, restored: ckpt.Checkpoint | None, resume: str | None) -> None:
        model, config = self.model, self.config
        if restored is not None:
            try:
                model.load_weights(list(restored.group("model").items()), strict=True)
            except ValueError as exc:
                raise SetupError(f"checkpoint {resume}: {exc}") from None
        mx.eval(model.parameters())
        if config.mode == "train":
            self.optimizer = make_optimizer(config)
            saved = restored.group("optimizer") if restored else {}
            if saved and restored.config.get("mode") == "train":
                self.optimizer.state = tree_unflatten(list(saved.items()))
            self.optimizer.init(model.trainable_parameters())
            self.train_step = make_train_step(model, self.optimizer, config.compile)
            return
        model.freeze()
        self.new_conversation()
        saved = restored.group("cache") if restored else {}
        if saved and restored.config.get("mode") == "adapt":
            for i, cache in enumerate(self.caches):
                cache.state = [saved[f"{i}.{j}"] for j in range(len(cache.state))]
                cache.offset = restored.cache_offsets[i]
            self.new_conversation(keep_cache=True)

    def new_conversation(self, keep_cache: bool = False) -> None:
        """Adapt mode: fresh fast weights (unless kept) become the conversation's origin."""
        if not keep_cache:
            self.caches = self.model.make_cache(self.config.batch_size)
        mx.eval(cache_arrays(self.caches))
        self.origin = [c.fast_weights for c in self.caches]
        self.exact = None
        if self.config.exact_accumulate:
            from ttt_runtime.swar import ExactAccumulator

            self.exact = []  # per layer: fast-weight name -> exact running value
            for cache in self.caches:
                cache.record_updates = True
                accumulators = {}
                for name, w in cache.fast_weights.items():
                    accumulators[name] = ExactAccumulator(w.shape)
                    accumulators[name].add(np.array(w))
                self.exact.append(accumulators)

    def _open_channel(self, socket_path: str) -> None:
        hello = {
            "pid": os.getpid(),
            "run_id": self.run_id,
            "mode": self.config.mode,
            "preset": self.config.preset,
            "config": self.config.as_dict(),
            "socket": socket_path,
        }
        try:
            self.server = ChannelServer(socket_path, hello)
        except ChannelError as exc:
            raise SetupError(str(exc)) from None

    def stop_when_stdin_closes(self) -> None:
        """Stop (as after `stop`) once stdin reaches EOF: the process that started us is gone."""

        def watch() -> None:
            # os.read on the raw fd: a daemon thread blocked in sys.stdin's buffered reader
            # holds its lock and aborts the interpreter at exit.
            while os.read(sys.stdin.fileno(), 65536):
                pass
            self.stopping = True

        threading.Thread(target=watch, name="parent-lifeline", daemon=True).start()

    # -- the loop -------------------------------------------------------------------------------
    def serve(self) -> int:
        """Run until stopped; the process's exit code."""
        for signum in (signal.SIGTERM, signal.SIGINT):  # Ctrl-C in a terminal: the same clean stop
            signal.signal(signum, lambda *_: setattr(self, "stopping", True))
        last_progress = time.monotonic()
        try:
            while not self.stopping:
                self._handle_commands(wait=PAUSED_REPORT_S if self.paused else 0.0)
                if self.paused:
                    self.publish()
                    continue
                if self.stopping:
                    break
                self.run_step()
                self.publish()
                if self.server.monitors == 0 and time.monotonic() - last_progress > PROGRESS_S:
                    last_progress = time.monotonic()
                    self._print_progress()
                if self.config.max_steps and self.step >= self.config.max_steps:
                    break
        except Exception as exc:
            text = traceback.format_exc()
            say(text.rstrip("\n"))
            self.server.publish({"type": "error", "exc_type": type(exc).__name__,
                                 "message": str(exc), "traceback": text})  # fmt: skip
            self.close()
            return 1
        self.server.publish({"type": "bye", "exit_code": 0, "step": self.step})
        self.close()
        return 0

    def close(self) -> None:
        """Close the channel (its socket file is removed; its folder is the caller's)."""
        self.server.close()

    def is_sampled(self, step: int) -> bool:
        """The first step after the warm-up (figures from the start), then every
        `sample_every` steps; never the warm-up step, whose times are compile times."""
        every = self.config.sample_every
        if every <= 0 or self.warm_from is None:
            return False
        return step == self.warm_from or step % every == 0

    def run_step(self) -> None:
        inputs, targets = (mx.array(a) for a in next(self.stream))
        step = self.step + 1
        sample = None
        start = time.perf_counter()
        if self.config.mode == "train":
            if self.is_sampled(step):
                sample = sampled_train_grads(self.model, inputs, targets)
                self.optimizer.update(self.model, sample.grads)
                loss = sample.loss
            else:
                loss = self.train_step(inputs, targets)
            mx.eval(loss, self.model.parameters(), self.optimizer.state)
        else:
            if self.is_sampled(step):
                sample = sampled_adapt_step(self.model, self.caches, inputs, targets)
                loss = sample.loss
            else:
                loss = adapt_step(self.model, self.caches, inputs, targets)
            mx.eval(loss, cache_arrays(self.caches))
            if self.exact is not None:
                self._accumulate_exact()
        warming_up = self.warm_from is None
        if warming_up and self.config.sample_every > 0:
            self._warm_sampled_path(inputs, targets)
        elapsed = time.perf_counter() - start
        self.step = step
        self.tokens += inputs.size
        self.last = {"tokens_per_s": None, "step_ms": None, "loss_bpb": loss.item() / LN2}
        if warming_up:  # its times are compile times: one figure of its own
            self.warmup_ms, self.warm_from = elapsed * 1e3, step + 1
        else:
            self.last.update(tokens_per_s=inputs.size / elapsed, step_ms=elapsed * 1e3)
        if sample is not None:
            self._record_sample(sample)

    def _warm_sampled_path(self, inputs: mx.array, targets: mx.array) -> None:
        """Run the sampled path once on a throwaway (its gradients, or copies of the caches as
        the next step will find them), so that its compiling is done before it is timed."""
        if self.config.mode == "train":
            mx.eval(sampled_train_grads(self.model, inputs, targets).grads)
        else:
            sampled_adapt_step(self.model, [copy.copy(c) for c in self.caches], inputs, targets)

    def _record_sample(self, sample: Sample) -> None:
        # train: every step is a fresh conversation, so its start is the drift's origin
        origin = sample.before if self.config.mode == "train" else self.origin
        now = [c.fast_weights for c in sample.caches]
        layers = fast_weight_stats(now, sample.before, origin)
        inner, lr_mean = inner_stats(sample.stats)
        exact = self._exact_drift() if self.exact is not None else [None] * len(layers)
        for layer, extra, drift in zip(layers, inner, exact, strict=True):
            layer.update(extra, exact_drift=drift)
        self.report = {
            "sampled_step": self.step,
            "blocks": [
                {"fwd_ms": f, "bwd_ms": b}
                for f, b in zip(sample.fwd_ms, sample.bwd_ms, strict=True)
            ],
            "layers": layers,
            "inner_lr": lr_mean,
        }

    def _accumulate_exact(self) -> None:
        for cache, accumulators in zip(self.caches, self.exact, strict=True):
            for name, acc in accumulators.items():
                update = cache.updates.get(name)
                if update is not None and update.size:
                    acc.add(-np.array(update))

    def _exact_drift(self) -> list[float]:
        """||W_float32 - W_exact|| per layer, averaged over the batch rows."""
        drifts = []
        for cache, accumulators in zip(self.caches, self.exact, strict=True):
            squares = sum(
                np.square(np.array(w, dtype=np.float64) - acc.value())
                .reshape(w.shape[0], -1)
                .sum(1)
                for w, acc in ((cache.fast_weights[n], a) for n, a in accumulators.items())
            )
            drifts.append(float(np.mean(np.sqrt(squares))))
        return drifts

    # -- commands -------------------------------------------------------------------------------
    def _handle_commands(self, wait: float) -> None:
        """Obey the commands waiting (the first may take `wait` to come); the channel hands out
        only so many per look (channel.LINES_PER_LOOK), peers in turn, so a flood of them delays
        the next step by no more than that. One report after them shows their effect."""
        obeyed = False
        for peer, command in self.server.commands(wait):
            self._obey(peer, command)
            obeyed = True
        if obeyed:
            self.publish()

    def _obey(self, peer, command: dict) -> None:
        cmd, reply = command["cmd"], {}
        if cmd == "pause":
            self.paused = True
        elif cmd == "resume":
            self.paused = False
        elif cmd == "clear_cache":
            mx.clear_cache()
            reply["cache"] = mx.get_cache_memory()
        elif cmd == "reset":
            self.reset()
            reply["conversation"] = self.conversation
        elif cmd == "save":
            try:
                reply["path"] = self.save(command.get("path"))
            except ckpt.CheckpointError as exc:
                self.server.reply(peer, command, ok=False, error=str(exc))
                return
        elif cmd == "stop":
            self.stopping = True
        self.server.reply(peer, command, **reply)

    def reset(self) -> None:
        """Fast weights back to their initial values; a new conversation."""
        self.conversation += 1
        if self.config.mode == "adapt":
            self.new_conversation()
            zero = fast_weight_stats(self.origin, self.origin, self.origin)
        else:  # every train step starts from the initial fast weights anyway
            zero = [dict(layer, update_norm=0.0, drift=0.0) for layer in self.report["layers"]]
        self.report["layers"] = [
            {**layer, "inner_loss_before": None, "inner_loss_after": None,
             "exact_drift": 0.0 if self.exact is not None else None}
            for layer in zero
        ]  # fmt: skip
        self.report["sampled_step"] = self.step

    def save(self, path: str | None) -> str:
        if not path:
            path = os.path.join(self.config.checkpoint_dir, f"step-{self.step}.safetensors")
        arrays = {f"model.{k}": v for k, v in tree_flatten(self.model.parameters())}
        offsets = []
        if self.config.mode == "train":
            arrays.update({f"optimizer.{k}": v for k, v in tree_flatten(self.optimizer.state)})
        else:
            for i, cache in enumerate(self.caches):
                arrays.update({f"cache.{i}.{j}": a for j, a in enumerate(cache.state)})
                offsets.append(cache.offset)
        return ckpt.save(path, ckpt.Checkpoint(
            arrays=arrays, config=self.config.as_dict(), step=self.step, tokens=self.tokens,
            stream_position=self.stream.position, conversation=self.conversation,
            cache_offsets=offsets,
        ))  # fmt: skip

    # -- reporting ------------------------------------------------------------------------------
    def telemetry(self) -> dict:
        return {
            "type": "telemetry",
            "t": time.time(),
            "pid": os.getpid(),
            "run_id": self.run_id,
            "mode": self.config.mode,
            "preset": self.config.preset,
            "paused": self.paused,
            "step": self.step,
            "tokens": self.tokens,
            **self.last,
            "warmup_ms": self.warmup_ms,
            "conversation": self.conversation,
            **self.report,
            "mlx": {**self.device, **memory_counters()},
            "blas": self.blas,
        }

    def publish(self) -> None:
        if self.server.monitors:
            self.server.publish(self.telemetry())

    def _print_progress(self) -> None:
        last = self.last
        if last["step_ms"] is None:
            speed = f"warm-up (compile) {self.warmup_ms:.0f} ms"
        else:
            speed = f"{last['tokens_per_s']:.0f} tok/s  {last['step_ms']:.0f} ms/step"
        say(f"ttt-run: step {self.step}  loss {last['loss_bpb']:.3f} bpb  {speed}")
