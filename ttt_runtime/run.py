"""The TTT run's driver: a loop that steps a learner (ttt_runtime.learners: the model and its
learning state, in train or adapt mode), obeys the channel's commands between steps, saves
checkpoints, and publishes one telemetry message per step (ttt_runtime.protocol.Telemetry).

Commands are handled on the loop's own thread, between steps, so MLX is only ever touched from
one thread. A step in progress always finishes: `stop` (or SIGTERM) exits after it, with a
"bye"; an exception is sent as an "error" message before the process exits 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import signal
import sys
import threading
import time
import traceback
from typing import Any

import mlx.core as mx

from ttt_runtime import checkpoint as ckpt
from ttt_runtime.adapt import MethodUnavailable
from ttt_runtime.blas import loaded_blas
from ttt_runtime.channel import ChannelError, ChannelServer
from ttt_runtime.config import ConfigError, RayConfig, RunConfig
from ttt_runtime.console import say
from ttt_runtime.device import device_info, memory_counters
from ttt_runtime.figures import SampleFigures
from ttt_runtime.launch import STOP_SIGNALS
from ttt_runtime.learners import (
    LEARNERS,
    Learner,
    LearnerFailed,
    LearnerRestarted,
    LearnerState,
)
from ttt_runtime.model import TTTModel
from ttt_runtime.protocol import (
    BlockTiming,
    Bye,
    ErrorReport,
    Hello,
    LayerFigures,
    MlxReport,
    Telemetry,
)
from ttt_runtime.steps import LN2
from ttt_runtime.stream import ByteStream

PAUSED_REPORT_S = 1.0  # a paused run still reports this often, for monitors that attach late
PROGRESS_S = 2.0  # stderr progress line period when no monitor is attached


class SetupError(ValueError):
    """The run cannot start (bad data path, checkpoint, socket); one line, no traceback."""


class TTTRun:
    def __init__(
        self,
        config: RunConfig,
        socket_path: str,
        resume: str | None = None,
        placement: RayConfig | None = None,
    ):
        """`placement`: spread the model over Ray actors (ttt_runtime.ray_workers)."""
        try:
            restored = ckpt.load(resume) if resume else None
            self.config = config
            self.stream = self._stream(restored.stream_position if restored else 0)
        except (ckpt.CheckpointError, ConfigError, ValueError, KeyError) as exc:
            raise SetupError(str(exc)) from None
        self.run_id = secrets.token_hex(4)
        self.step = restored.step if restored else 0
        self.tokens = restored.tokens if restored else 0
        self.conversation = restored.conversation if restored else 0
        self.paused = config.start_paused
        self.stopping = False
        self.report: dict[str, Any] = {
            "sampled_step": None, "blocks": [], "layers": [], "inner_lr": None,
        }  # fmt: skip
        self.last: dict[str, Any] = {"tokens_per_s": None, "step_ms": None, "loss_bpb": None}
        self.warmup_ms: float | None = None  # the first step: compile times, reported apart
        self.warm_from: int | None = None  # the step after it, the first one sampled
        self.device = device_info()  # fixed for the process; memory is re-read per report
        self.blas = loaded_blas()
        # adapt mode: the base's bpb on the last sampled chunk, the mean gain over them so far
        self.baseline: dict[str, Any] = {"baseline_bpb": None, "gain": None}
        self.gains: list[float] = []
        self.placement = placement
        self.learner = self._learner(restored, resume)
        try:
            self._open_channel(socket_path)
        except SetupError:
            self.learner.close()
            raise
        # a run spread over actors goes back here when one is restarted (Learner.load)
        self.safe_point = self.checkpoint() if placement else None
        self.safe_file: str | None = None  # the safe point's file (checkpoint_to_disk)

    def _stream(self, position: int) -> ByteStream:
        return ByteStream(self.config.data, self.config.seq_len, self.config.batch_size, position)

    def _learner(self, restored: ckpt.Checkpoint | None, resume: str | None) -> Learner:
        state = LearnerState(restored.arrays, restored.cache_offsets) if restored else None
        try:
            if self.placement is not None:
                try:  # Ray only when asked for
                    from ttt_runtime.ray_workers import RayLearner, RaySetupError
                except ModuleNotFoundError as exc:
                    if exc.name != "ray":
                        raise
                    raise SetupError("--ray needs Ray: pip install 'xltop[ray]'") from None

                try:
                    return RayLearner(self.config, self.placement, state)
                except RaySetupError as exc:
                    raise SetupError(str(exc)) from None
            mx.random.seed(self.config.seed)
            model = TTTModel(self.config.model_config())
            return LEARNERS[self.config.mode](model, self.config, restored)
        except MethodUnavailable as exc:  # one line naming what the method misses
            raise SetupError(str(exc)) from None
        except ValueError as exc:  # the checkpoint's arrays do not fit the model
            if restored is None or isinstance(exc, SetupError):
                raise
            raise SetupError(f"checkpoint {resume}: {exc}") from None

    # -- setup ----------------------------------------------------------------------------------
    def _open_channel(self, socket_path: str) -> None:
        hello = Hello(
            pid=os.getpid(),
            run_id=self.run_id,
            mode=self.config.mode,
            preset=self.config.preset,
            config=self.config.as_dict(),
            socket=socket_path,
            placement=dataclasses.asdict(self.placement) if self.placement else None,
            ray_dashboard=getattr(self.learner, "dashboard_url", None),
        )
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
        for signum in STOP_SIGNALS:  # the same clean stop as the command
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
                try:
                    self.run_step()
                except LearnerRestarted as exc:  # in the step, or in the checkpoint after it
                    self._go_back(str(exc))
                self.publish()
                if self.server.monitors == 0 and time.monotonic() - last_progress > PROGRESS_S:
                    last_progress = time.monotonic()
                    self._print_progress()
                if self.config.max_steps and self.step >= self.config.max_steps:
                    break
        except LearnerFailed as exc:  # a known end, one line: no traceback to read
            return self._fail(exc, f"ttt-run: error: {exc}")
        except Exception as exc:
            return self._fail(exc, traceback.format_exc().rstrip("\n"))
        self.server.publish(Bye(exit_code=0, step=self.step))
        self.close()
        return 0

    def _fail(self, exc: Exception, text: str) -> int:
        say(text)
        self.server.publish(ErrorReport(type(exc).__name__, str(exc), text))
        self.close()
        return 1

    def close(self) -> None:
        """Close the channel (its socket file is removed; its folder is the caller's) and stop
        whatever computes elsewhere (Ray actors)."""
        self.server.close()
        self.learner.close()

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
        result = self.learner.step(inputs, targets, sampled=self.is_sampled(step))
        elapsed = result.seconds
        warming_up = self.warm_from is None
        if warming_up and self.config.sample_every > 0:
            start = time.perf_counter()
            self.learner.warm_up(inputs, targets)
            elapsed += time.perf_counter() - start
        self.step = step
        self.tokens += inputs.size
        self.last = {"tokens_per_s": None, "step_ms": None, "loss_bpb": result.loss.item() / LN2}
        if warming_up:  # its times are compile times: one figure of its own
            self.warmup_ms, self.warm_from = elapsed * 1e3, step + 1
        else:
            self.last.update(tokens_per_s=inputs.size / elapsed, step_ms=elapsed * 1e3)
        if result.sample is not None:
            self._record_sample(result.sample)
            self._score_baseline(inputs, targets)
        if self.placement and self.step % self.placement.checkpoint_every == 0:
            self.safe_point = self.checkpoint()
            if self.placement.checkpoint_to_disk:
                self._keep_on_disk(self.safe_point)

    def _keep_on_disk(self, safe: ckpt.Checkpoint) -> None:
        """The safe point as a file too (it outlives the run); the one before it removed."""
        path = os.path.join(self.config.checkpoint_dir, f"safe-step-{safe.step}.safetensors")
        try:
            path = ckpt.save(path, safe)
        except ckpt.CheckpointError as exc:  # the run goes on: the safe point is in memory
            say(f"ttt-run: {exc}")
            return
        if self.safe_file and self.safe_file != path:
            with contextlib.suppress(OSError):
                os.unlink(self.safe_file)
        self.safe_file = path

    def _go_back(self, what: str) -> None:
        """Every part of the learner back to the last safe point, and the run's counters and
        data position with it: the steps since are done again, from the same data."""
        safe = self.safe_point
        assert safe is not None
        self.learner.load(LearnerState(safe.arrays, safe.cache_offsets))
        self.step, self.tokens, self.conversation = safe.step, safe.tokens, safe.conversation
        self.stream = self._stream(safe.stream_position)
        say(f"ttt-run: {what}; back to step {safe.step}")

    def _score_baseline(self, inputs: mx.array, targets: mx.array) -> None:
        """The unadapted base on the chunk just scored. Only on sampled steps, whose
        schedule bounds its cost (a forward every `sample_every` steps); out of the step's time."""
        loss = self.learner.baseline_loss(inputs, targets)
        if loss is None:
            return
        baseline = loss.item() / LN2
        self.gains.append(self.last["loss_bpb"] - baseline)
        self.baseline = {"baseline_bpb": baseline, "gain": sum(self.gains) / len(self.gains)}

    def _record_sample(self, sample: SampleFigures) -> None:
        self.report = {
            "sampled_step": self.step,
            "blocks": tuple(
                BlockTiming(f, b) for f, b in zip(sample.fwd_ms, sample.bwd_ms, strict=True)
            ),
            "layers": sample.layers,
            "inner_lr": sample.inner_lr,
        }

    # -- commands -------------------------------------------------------------------------------
    def _handle_commands(self, wait: float) -> None:
        """Obey the commands waiting (the first may take `wait` to come); the channel hands out
        only so many per look (channel.LINES_PER_LOOK), peers in turn, so a flood of them delays
        the next step by no more than that. One report after them shows their effect."""
        obeyed = False
        for peer, command in self.server.commands(wait):
            try:
                self._obey(peer, command)
            except LearnerRestarted as exc:  # an actor died: the command did not happen
                self._go_back(str(exc))
                self.server.reply(peer, command, ok=False, error=f"{exc}; not done")
            obeyed = True
        if obeyed:
            self.publish()

    def _obey(self, peer, command: dict) -> None:
        cmd = command["cmd"]
        reply: dict[str, Any] = {}  # what the command returns, beside "ok" in the reply
        if cmd == "pause":
            self.paused = True
        elif cmd == "resume":
            self.paused = False
        elif cmd == "clear_cache":
            reply["cache"] = self.learner.clear_cache()
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
        self.report["layers"] = self.learner.reset(self.report["layers"])
        self.report["sampled_step"] = self.step

    def save(self, path: str | None) -> str:
        if not path:
            path = os.path.join(self.config.checkpoint_dir, f"step-{self.step}.safetensors")
        return ckpt.save(path, self.checkpoint())

    def checkpoint(self) -> ckpt.Checkpoint:
        """The run as it stands, gathered from wherever it computes."""
        state = self.learner.state()
        return ckpt.Checkpoint(
            arrays=state.arrays, config=self.config.as_dict(), step=self.step, tokens=self.tokens,
            stream_position=self.stream.position, conversation=self.conversation,
            cache_offsets=state.cache_offsets,
        )  # fmt: skip

    # -- reporting ------------------------------------------------------------------------------
    def telemetry(self) -> Telemetry:
        report = self.report
        return Telemetry(
            t=time.time(),
            pid=os.getpid(),
            run_id=self.run_id,
            mode=self.config.mode,
            preset=self.config.preset,
            paused=self.paused,
            step=self.step,
            tokens=self.tokens,
            **self.last,
            **self.baseline,
            warmup_ms=self.warmup_ms,
            inner_lr=report["inner_lr"],
            conversation=self.conversation,
            sampled_step=report["sampled_step"],
            blocks=tuple(report["blocks"]),
            layers=tuple(LayerFigures(**layer) for layer in report["layers"]),
            mlx=MlxReport(**self.device, **memory_counters()),
            blas=self.blas,
            workers=self.learner.workers(),
        )

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
