"""Reporter: a user's own MLX training loop, shown live by `xltop --attach SOCKET`.

    reporter = Reporter(socket="/tmp/mine.sock")   # no socket: a private path, printed
    for batch in loader:
        loss = train_step(batch)
        reporter.step(loss=loss, tokens=batch.size, lr=lr)   # lr: an extra scalar, `user_lr`

It serves the run's own channel (ttt_runtime.channel, protocol.Hello and Telemetry), so xltop
watches it exactly as it watches a TTT run: step, tokens/s, step time, loss, this process's MLX
memory counters (read here, where they are true), and the extra scalars. docs/reporter.md has
the details.

`step()` only records: a service thread answers the monitors' commands and publishes the newest
record (at most every PUBLISH_S), so a monitor, attached or gone, costs the loop next to nothing
and never raises into it. Work that must happen between two steps of the loop (a `save`, and
the fast-weight figures of a watched model) runs inside `step()`, on the loop's own thread.
"""

from __future__ import annotations

import atexit
import os
import re
import reprlib
import secrets
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn

from ttt_runtime.blas import loaded_blas
from ttt_runtime.channel import ChannelServer
from ttt_runtime.console import say
from ttt_runtime.device import device_info, memory_counters
from ttt_runtime.figures import fast_weight_stats
from ttt_runtime.launch import private_socket_path, remove_private_socket
from ttt_runtime.layers.base import TTTBase
from ttt_runtime.layers.cache import TTTCache
from ttt_runtime.protocol import Bye, ErrorReport, Hello, LayerFigures, MlxReport, Telemetry

MODE = "user"  # a Reporter's mode in its hello and reports ("train" and "adapt" are ttt-run's)
PUBLISH_S = 0.1  # the newest record goes out at most this often (xltop ticks every 0.2 s or more)
PAUSED_REPORT_S = 1.0  # a paused loop still reports this often (as a paused TTT run does)
PAUSE_POLL_S = 0.05  # a paused step() looks this often for a resume, a save, a monitor gone
MAX_SCALARS = 64  # extra scalars of one loop: one report must fit a line (channel.MAX_LINE)
MAX_COUNT = 2**53  # tokens and steps: exact in any JSON reader (xltop refuses 100 digits)
MAX_NAME = 200  # characters of the run's name: it goes out with every report
SCALAR_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")  # it becomes a CSV column, user_<name>
UNSUPPORTED = "not supported by a user loop's reporter"

SaveFunction = Callable[[str | None], str]  # the path asked for (None: yours) -> the path written


class _Record(NamedTuple):
    """What the loop's last step() said; replaced whole, so the service thread reads one. A
    NamedTuple: made once a step, it must be cheap (a frozen dataclass took 4 us)."""

    step: int = 0
    tokens: int = 0
    tokens_per_s: float | None = None
    step_ms: float | None = None
    loss: float | None = None
    warmup_ms: float | None = None
    user: dict[str, float | None] = {}  # shared default: never changed, only replaced
    sampled_step: int | None = None
    layers: tuple[LayerFigures, ...] = ()


class _FastWeights:
    """The fast weights of a model's TTT layers, step by step: the carried caches' when the loop
    carries them (mlx-lm's cache convention), else each layer's own initial fast weights (which
    the outer optimizer trains). Figures as figures.fast_weight_stats: over the last step, and
    the drift since `watch`."""

    def __init__(self, model: nn.Module, caches: Sequence[TTTCache] | None):
        layers = [m for _, m in model.named_modules() if isinstance(m, TTTBase)]
        if caches is None and not layers:
            raise ValueError(f"{type(model).__name__} has no TTT layers (ttt_runtime.layers)")
        if caches is not None:
            self._read = lambda: [cache.maps for cache in caches]
        else:
            names = [[n for pair in layer.fast_weight_maps for n in pair] for layer in layers]
            self._read = lambda: [
                tuple(layer[n] for n in layer_names)
                for layer, layer_names in zip(layers, names, strict=True)
            ]
        self._augmented = caches is not None  # cache maps are [W; b] with a batch axis
        self.origin = self.before = self._read()
        self.count = len(self.origin)
        self.measured = False  # figures taken since `watch`

    def advance(self, measure: bool) -> list[dict] | None:
        """Take the step's fast weights (references: free); their figures when `measure`."""
        now, before = self._read(), self.before
        self.before = now
        if not measure:
            return None
        self.measured = True
        return fast_weight_stats(*(self._as_params(w) for w in (now, before, self.origin)))

    def _as_params(self, reading: list[tuple[mx.array, ...]]) -> list[dict[str, mx.array]]:
        # a layer's own weights have no batch axis: one conversation, a batch of one
        return [
            {str(i): a if self._augmented else a[None] for i, a in enumerate(arrays)}
            for arrays in reading
        ]


class Reporter:
    """Serve a user's training loop to xltop monitors. `socket`: the path to listen at (None: a
    private one, printed on stderr and removed on close). `name`: shown as the run's preset
    (default: the script's file name). `save(path)`: called by the `save` command between two
    steps, returns the path written (None: `save` is not supported). `sample_every`: steps
    between two fast-weight figures of a watched model. Raises ChannelError when the socket
    cannot be listened at, ValueError naming an option of the wrong kind."""

    def __init__(
        self,
        socket: str | None = None,
        *,
        name: str | None = None,
        save: SaveFunction | None = None,
        sample_every: int = 20,
    ):
        if type(sample_every) is not int or sample_every < 1:
            raise ValueError(
                f"sample_every must be a whole number of at least 1, got {sample_every!r}"
            )
        if save is not None and not callable(save):
            raise ValueError(
                f"save must be a function (path -> the path written), got {type(save).__name__}"
            )
        if name is not None and (type(name) is not str or len(name) > MAX_NAME):
            raise ValueError(
                f"name must be a str of at most {MAX_NAME} characters, got {reprlib.repr(name)}"
            )
        self._private = socket is None
        self.socket = private_socket_path() if socket is None else os.fsdecode(socket)
        script = (getattr(sys, "argv", None) or [""])[0]  # an embedded interpreter may have none
        self.name = name or os.path.basename(script) or "python"
        self._save = save
        self.sample_every = sample_every
        self.run_id = secrets.token_hex(4)
        self._device = device_info()
        self._blas = loaded_blas()
        self._record = _Record()
        # one call at a time builds the next record from the last; reentrant, for a signal handler
        # that reports while the loop's thread is inside a call (a Lock would wait for itself)
        self._lock = threading.RLock()
        self._clock = time.perf_counter()  # when the step being timed began
        self._fast_weights: _FastWeights | None = None
        self._paused = False
        self._closed = False
        self._said: set[str] = set()  # the kinds of slip already said on stderr (_say_once)
        self._for_loop: deque[tuple[Any, dict]] = deque()  # (peer, save command): step() obeys
        self._wake = threading.Event()  # a paused step() looks again
        hello = Hello(os.getpid(), self.run_id, MODE, self.name, {}, self.socket)
        try:
            self._server = ChannelServer(self.socket, hello)
        except BaseException:
            if self._private:
                remove_private_socket(self.socket)
            raise
        if self._private:
            say(f"reporter: listening on {self.socket} (xltop --attach {self.socket})")
        self._service = threading.Thread(target=self._serve, name="reporter", daemon=True)
        self._service.start()
        atexit.register(self._at_exit)
        _open_reporters.add(self)

    # -- the loop's side ------------------------------------------------------------------------
    def step(
        self, loss: Any = None, tokens: int = 0, step: int | None = None, **scalars: Any
    ) -> None:
        """One step (or, with `step`, up to that step) of the loop is done: `loss`, the `tokens`
        it consumed, extra named scalars (numbers or MLX scalars, read as Python numbers here:
        a report is plain JSON). The time since the last call is the step time (the first
        call: the warm-up). Blocks while paused. Any thread may call it."""
        tokens, loss = _count("tokens", tokens), _number(loss)
        with self._lock:
            now, last = time.perf_counter(), self._record
            steps = 1 if step is None else _count("step", step) - last.step
            if steps < 1:  # a count that starts again (each epoch's own) must not end the loop
                self._say_once("step", f"step {step} does not come after step {last.step}:"
                               " counted as one step")  # fmt: skip
                steps = 1
            user = self._merged(last.user, scalars) if scalars else last.user
            elapsed = now - self._clock
            self._clock = now
            first = last.step == 0 and last.warmup_ms is None
            watched = self._fast_weights
            sample = watched.advance(self._is_sampled(last.step, steps)) if watched else None
            self._record = _Record(
                step=last.step + steps,
                tokens=last.tokens + tokens,
                tokens_per_s=None if first or elapsed <= 0 else tokens / elapsed,
                step_ms=None if first else elapsed * 1e3 / steps,
                loss=loss,
                warmup_ms=elapsed * 1e3 if first else last.warmup_ms,
                user=user,
                sampled_step=last.step + steps if sample is not None else last.sampled_step,
                layers=tuple(_layer_figures(**f) for f in sample) if sample else last.layers,
            )
        if self._for_loop:
            self._obey_saves()
        if self._paused:
            self._wait_while_paused()

    @property
    def steps(self) -> int:
        """The steps counted so far."""
        return self._record.step

    def update_scalars(self, **scalars: Any) -> None:
        """Set extra scalars without counting a step (a validation loss); they go out with the
        next report."""
        with self._lock:
            last = self._record
            self._record = last._replace(user=self._merged(last.user, scalars))

    def watch(self, model: nn.Module, caches: Sequence[TTTCache] | None = None) -> None:
        """Report the fast-weight figures of `model`'s TTT layers (ttt_runtime.layers) every
        `sample_every` steps: those of `caches` when the loop carries them from step to step,
        else the layers' own initial fast weights. Call again to start a new conversation
        (drift is measured from the last call)."""
        watched = _FastWeights(model, caches)
        layers = (_layer_figures(None, None, None),) * watched.count
        with self._lock:
            self._fast_weights = watched
            self._record = self._record._replace(layers=layers, sampled_step=None)

    def _merged(self, known: dict[str, float | None], scalars: dict[str, Any]) -> dict:
        """`known` updated with `scalars` as floats (None for a None); ValueError naming a bad
        one. New names beyond MAX_SCALARS are left out, said once: a name that first comes
        hours in (one per epoch) must not end the loop."""
        new = [name for name in scalars if name not in known]
        for name in new:
            if not SCALAR_NAME.fullmatch(name):
                raise ValueError(
                    f"scalar name {reprlib.repr(name)}: letters, digits and _ only, at most 64"
                )
        left_out = new[MAX_SCALARS - len(known) :]
        if left_out:
            self._say_once("scalars", f"at most {MAX_SCALARS} extra scalars; {left_out[0]!r}"
                           " and later new names are left out")  # fmt: skip
            scalars = {name: v for name, v in scalars.items() if name not in left_out}
        return {**known, **{name: _number(value, name) for name, value in scalars.items()}}

    def _say_once(self, kind: str, text: str) -> None:
        """A slip the loop goes on after, said on stderr the first time of its kind only."""
        if kind not in self._said:
            self._said.add(kind)
            say(f"reporter: {text}")

    def _is_sampled(self, step: int, steps: int) -> bool:
        """The first step after `watch`, then whenever `sample_every` divides a step the call
        covers."""
        watched = self._fast_weights
        fresh = watched is not None and not watched.measured
        return fresh or (step + steps) // self.sample_every > step // self.sample_every

    def _obey_saves(self) -> None:
        while True:
            try:  # another thread of the loop may take the last one first
                peer, command = self._for_loop.popleft()
            except IndexError:
                return
            save = self._save
            assert save is not None  # only queued when there is one
            try:
                path = save(command.get("path"))
            except Exception as exc:  # the user's function failed: the monitor hears why
                self._server.reply(peer, command, ok=False, error=f"save failed: {_one_line(exc)}")
                continue
            self._server.reply(peer, command, path=str(path))

    def _wait_while_paused(self) -> None:
        """Block until `resume`, the reporter's close, or the last monitor's leaving (nobody is
        left to resume); saves asked for meanwhile are made. The pause is no step time."""
        while self._paused and not self._closed:
            if self._server.monitors == 0:
                self._paused = False
                break
            self._wake.wait(PAUSE_POLL_S)
            self._wake.clear()
            self._obey_saves()
        self._clock = time.perf_counter()

    # -- the service thread ---------------------------------------------------------------------
    def _serve(self) -> None:
        published: tuple[_Record | None, bool] = (None, False)  # what last went out
        published_at = 0.0
        monitors = 0
        while not self._closed:
            obeyed = False
            for peer, command in self._server.commands(wait=PUBLISH_S):
                self._obey(peer, command)
                obeyed = True
            now, seen = time.monotonic(), monitors
            monitors = self._server.monitors
            state = (self._record, self._paused)
            due = (
                state[0] is not published[0]
                or state[1] != published[1]
                or obeyed
                or monitors > seen  # a newcomer hears at once, not after the next step
                or (self._paused and now - published_at >= PAUSED_REPORT_S)
            )
            if monitors and state[0].step and due:
                self._server.publish(self._telemetry(*state))
                published, published_at = state, now

    def _obey(self, peer: Any, command: dict) -> None:
        cmd = command["cmd"]
        if cmd == "pause":
            self._paused = True
        elif cmd == "resume":
            self._paused = False
            self._wake.set()
        elif cmd == "clear_cache":  # MLX's allocator is thread-safe (its streams run on threads)
            mx.clear_cache()
            self._server.reply(peer, command, cache=mx.get_cache_memory())
            return
        elif cmd == "save" and self._save is not None:
            self._for_loop.append((peer, command))  # between two steps, on the loop's thread
            self._wake.set()
            return
        else:  # save without a function, reset, stop: a foreign loop has no such thing
            self._server.reply(peer, command, ok=False, error=f"{cmd} is {UNSUPPORTED}")
            return
        self._server.reply(peer, command)

    def _telemetry(self, record: _Record, paused: bool) -> Telemetry:
        return Telemetry(
            t=time.time(),
            pid=os.getpid(),
            run_id=self.run_id,
            mode=MODE,
            preset=self.name,
            paused=paused,
            step=record.step,
            tokens=record.tokens,
            tokens_per_s=record.tokens_per_s,
            step_ms=record.step_ms,
            loss_bpb=record.loss,
            warmup_ms=record.warmup_ms,
            inner_lr=None,
            conversation=0,
            sampled_step=record.sampled_step,
            blocks=(),
            layers=record.layers,
            mlx=MlxReport(**self._device, **memory_counters()),
            blas=self._blas,
            user=record.user,
        )

    # -- closing --------------------------------------------------------------------------------
    def close(self, error: BaseException | None = None) -> None:
        """Say goodbye (or report `error`) to the monitors and stop listening; the loop's own
        exit needs nothing more (an open reporter is closed at interpreter exit)."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._service.join(2 * PUBLISH_S + 1.0)
        if error is None:
            self._server.publish(Bye(exit_code=0, step=self._record.step))
        else:
            text = "".join(traceback.format_exception(error))
            self._server.publish(ErrorReport(type(error).__name__, str(error), text))
        self._server.close()
        if self._private:
            remove_private_socket(self.socket)
        atexit.unregister(self._at_exit)
        _open_reporters.discard(self)

    def _disown(self) -> None:
        """In a forked child: the channel, its socket and its monitors are the parent's (the
        threads serving them were not forked), so the child's copy only records, never blocks
        on a pause, and its close (at its exit too) touches nothing."""
        self._closed, self._paused = True, False
        self._for_loop.clear()
        self._lock = threading.RLock()  # a thread that held it was not forked

    def _at_exit(self) -> None:
        # an uncaught exception ends the script: its monitors hear it as a run's error
        self.close(getattr(sys, "last_value", None))

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.close(exc if isinstance(exc, Exception) else None)


_open_reporters: weakref.WeakSet[Reporter] = weakref.WeakSet()


def _disown_in_child() -> None:
    for reporter in list(_open_reporters):
        reporter._disown()


os.register_at_fork(after_in_child=_disown_in_child)


def _number(value: Any, scalar: str | None = None) -> float | None:
    """`value` (a number, a NumPy or MLX scalar: an unevaluated one is evaluated) as a float,
    None for None; ValueError naming the extra `scalar` (None: the loss) when it is none. A call
    every step: nothing is spent on the message until it is needed."""
    if value is None or type(value) is float:
        return value
    if type(value) not in (str, bytes):  # float() reads "1.5": text is no number here
        try:
            return float(value)
        except OverflowError:  # an integer too large for a float
            raise ValueError(f"{_scalar_name(scalar)} is out of a float's range") from None
        except (TypeError, ValueError):
            pass
    raise ValueError(f"{_scalar_name(scalar)} must be a number, got {type(value).__name__}")


def _scalar_name(scalar: str | None) -> str:
    return "loss" if scalar is None else f"scalar {scalar!r}"


def _count(what: str, value: Any) -> int:
    """`value` as a whole number from 0 to MAX_COUNT; ValueError naming `what` was wrong."""
    if type(value) is int and 0 <= value <= MAX_COUNT:  # the common case, a call every step
        return value
    try:
        count = int(value)
    except (TypeError, ValueError, OverflowError):  # None, text, NaN, infinity
        count = -1
    if not 0 <= count <= MAX_COUNT:
        raise ValueError(
            f"{what} must be a whole number from 0 to 2**53, got {reprlib.repr(value)}"
        )
    return count


def _layer_figures(w_norm: float | None, update_norm: float | None, drift: float | None):
    """A watched layer's figures: the loop's own steps run no inner loss we could read."""
    return LayerFigures(w_norm, update_norm, drift, inner_loss_before=None, inner_loss_after=None)


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())
