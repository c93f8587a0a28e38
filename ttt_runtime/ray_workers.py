"""A run spread over Ray actors: pipeline stages (`pipeline.Stage`), each in an actor of its own,
replicated for data parallelism, driven by the run process, which is the only Ray driver and
keeps its channel server (so monitors, commands and checkpoints work as for one process).

`RayLearner` is the driver's side, a `Learner` like the one-process ones. A train step sends
each replica's rows through the stages in micro-batches, GPipe order (every forward, then every
backward, so stage k works on one micro-batch while stage k+1 works on another); a stage's
replicas then average their gradients, which travel compressed (`swar.quantize`) and are summed
exactly (`swar.ExactAccumulator`) or averaged as packed words (`swar.avg_u8_round`), and each
applies AdamW to its own parameters. An adapt step sends each chunk through the stages in pieces
along time, in order, so each stage's fast weights see the stream in order while the stages
work on different pieces at once. Only hidden states, cotangents and gradients cross actors.

Faults: Ray restarts a dead actor (`max_restarts`); the driver then takes every stage back to
the run's last in-memory checkpoint (`LearnerRestarted`: the run rewinds its counters and data
position to it) and goes on. An actor that cannot come back stops the run (`LearnerFailed`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any, NoReturn

import mlx.core as mx
import numpy as np
import psutil
import ray
import ray.exceptions
from ray._private import ray_constants
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError

from ttt_runtime import swar
from ttt_runtime.blas import preload_environment
from ttt_runtime.config import RayConfig, RunConfig
from ttt_runtime.console import say
from ttt_runtime.device import memory_counters
from ttt_runtime.figures import SampleFigures
from ttt_runtime.launch import STOP_SIGNALS
from ttt_runtime.learners import LearnerFailed, LearnerRestarted, LearnerState, StepResult
from ttt_runtime.pipeline import Stage, block_ranges
from ttt_runtime.protocol import WorkerFigures

CONNECT_TIMEOUT_S = 10.0  # Ray's own connect to an address nobody answers can hang for minutes
INIT_TIMEOUT_S = 60.0  # a cluster that takes the connection but never answers; a local start
READY_TIMEOUT_S = 120.0  # actors start a Python with MLX each: seconds on a loaded machine
RESTART_WAIT_S = 60.0  # how long a dead actor may take to come back
STEP_TIMEOUT_S = 600.0
SHUTDOWN_WAIT_S = 10.0  # for a private cluster's processes to exit after ray.shutdown
# An HTTP/2 client's preface and an empty SETTINGS frame; a gRPC server's first frame answers
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
FRAME_HEADER_BYTES = 9  # length (3), type (1), flags (1), stream (4)
SETTINGS_FRAME_TYPE = b"\x04"
NOT_A_GCS = ("it answers, but not as a Ray cluster (want its GCS address: the one `ray start "
             "--head` printed, port 6379 unless --port said otherwise)")  # fmt: skip


# The driver keeps Python's handlers: Ray's C++ failure handler (stack traces of crashes) takes
# SIGTERM too, and a stop amid ray.init aborted the run (SIGABRT) with the private cluster left.
# Read by ray.init in this process only; Ray's own processes keep theirs.
ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True


class RaySetupError(RuntimeError):
    """The cluster cannot be reached or the actors cannot start: one line for the user."""


# -- the actor ----------------------------------------------------------------------------------
def _nbytes(*arrays: Any) -> int:
    return sum(a.nbytes for a in arrays if isinstance(a, np.ndarray))


class StageWorker:
    """One replica of one stage, in a Ray actor: a `Stage` behind numpy in and out, with the
    actor's own figures (its process's memory, its time computing, waiting and moving bytes)."""

    def __init__(
        self, config: RunConfig, placement: RayConfig, index: int, replica: int, rows: int
    ):
        self.stage = Stage(config, index, placement.stages, rows)
        self.replica = replica
        self.compression = placement.grad_compression
        self.average = placement.grad_average
        self.process = psutil.Process()
        self._begin(sampled=False)

    def where(self) -> dict:
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

    def _begin(self, sampled: bool) -> None:
        self.stage.begin_step(sampled)
        self.wait_ms, self.sent, self.received = 0.0, 0, 0
        self.sync_ms: float | None = None  # averaging the replicas' gradients
        self._idle_since: float | None = None

    def _enter(self, *arrays: Any) -> None:
        if self._idle_since is not None:
            self.wait_ms += (time.perf_counter() - self._idle_since) * 1e3
        self.received += _nbytes(*arrays)

    def _leave(self, *arrays: Any) -> None:
        self.sent += _nbytes(*arrays)
        self._idle_since = time.perf_counter()

    def forward(self, micro: int, x: np.ndarray, targets: np.ndarray | None, sampled: bool):
        """The hidden state for the next stage; the last stage: the loss in adapt mode, None
        in train mode (its backward starts from the loss)."""
        if micro == 0:
            self._begin(sampled)
        self._enter(x, targets)
        out = self.stage.forward(micro, mx.array(x), None if targets is None else mx.array(targets))
        result: np.ndarray | float | None = None
        if not self.stage.last:
            result = np.array(out)
        elif not self.stage.train:
            result = float(np.array(out))
        self._leave(result)
        return result

    def backward(self, micro: int, cotangent: np.ndarray | None, targets: np.ndarray | None):
        """(the loss or None, the cotangent for the previous stage or None)."""
        self._enter(cotangent, targets)
        loss, cot = self.stage.backward(
            micro,
            None if cotangent is None else mx.array(cotangent),
            None if targets is None else mx.array(targets),
        )
        result = None if cot is None else np.array(cot)
        self._leave(result)
        return (None if loss is None else loss.item()), result

    def gradient_range(self) -> dict[str, tuple[float, float]]:
        """Per gradient, its (min, max): the replicas quantize to the range they share."""
        ranges = {}
        for name, grad in self.stage.gradients().items():
            values = np.array(grad)
            ranges[name] = (float(values.min()), float(values.max()))
        return ranges

    def gradient_payload(self, *ranges: dict[str, tuple[float, float]]) -> dict[str, Any]:
        """This replica's gradients as they go on the wire (quantized unless "none"; to the
        range all replicas share when `ranges` are given, for the SWAR average)."""
        self._enter()
        payload: dict[str, Any] = {}
        for name, grad in self.stage.gradients().items():
            values = np.array(grad)
            if self.compression == "none":
                payload[name] = values
                continue
            shared = None
            if ranges:
                shared = (min(r[name][0] for r in ranges), max(r[name][1] for r in ranges))
            payload[name] = swar.quantize(values, _BITS[self.compression], shared)
        self._leave()
        self.sent += sum(_payload_bytes(p) for p in payload.values())
        return payload

    def end_step(self, *payloads: dict[str, Any]) -> dict:
        """Train: AdamW with the replicas' mean gradient (or this replica's own when alone).
        Then the step's figures."""
        self._enter()
        if self.stage.train:
            if payloads:
                others = [p for r, p in enumerate(payloads) if r != self.replica]
                self.received += sum(_payload_bytes(v) for p in others for v in p.values())
                start = time.perf_counter()
                gradients = _average(payloads, self.average)
                self.sync_ms = (time.perf_counter() - start) * 1e3
            else:
                gradients = self.stage.gradients()
            self.stage.apply(gradients)
        report = self.stage.end_step()
        self._leave()
        counters = memory_counters()
        return {
            **asdict(report),
            "wait_ms": self.wait_ms, "sync_ms": self.sync_ms, "sent": self.sent,
            "received": self.received,
            "rss": self.process.memory_info().rss, "active": counters["active"],
            "cache": counters["cache"], "peak": counters["peak"], "pid": os.getpid(),
        }  # fmt: skip

    def state(self) -> tuple[dict[str, np.ndarray], list[int]]:
        arrays, offsets = self.stage.arrays()
        return {k: np.array(v) for k, v in arrays.items()}, offsets

    def load(self, arrays: dict[str, np.ndarray], offsets: list[int]) -> None:
        self.stage.load({k: mx.array(v) for k, v in arrays.items()}, offsets)

    def reset(self) -> None:
        self.stage.reset()

    def clear_cache(self) -> int:
        mx.clear_cache()
        return mx.get_cache_memory()


_BITS = {"u8": 8, "u16": 16}
_SWAR_AVERAGE = {8: swar.avg_u8_round, 16: swar.avg_u16_round}


def _payload_bytes(value: Any) -> int:
    return value.nbytes if isinstance(value, (np.ndarray, swar.QuantizedTensor)) else 0


def _average(payloads: tuple[dict[str, Any], ...], how: str) -> dict[str, mx.array]:
    """The replicas' mean gradient: dequantized and summed exactly, or (swar) their packed
    words averaged in pairs, rounding half up, then dequantized once."""
    mean = {}
    for name in payloads[0]:
        parts = [p[name] for p in payloads]
        if how == "swar":
            words = [q.words for q in parts]
            while len(words) > 1:
                average = _SWAR_AVERAGE[parts[0].bits]
                words = [average(a, b) for a, b in zip(words[::2], words[1::2], strict=True)]
            first = parts[0]
            value = swar.dequantize(
                swar.QuantizedTensor(np.asarray(words[0]), first.bits, first.scale,
                                     first.offset, first.shape, first.dtype)
            )  # fmt: skip
        else:
            total = swar.ExactAccumulator(np.shape(_values(parts[0])))
            total.add(np.stack([_values(part) for part in parts]))  # one pass over the limbs
            value = total.value() / len(parts)
        mean[name] = mx.array(np.asarray(value, np.float32))
    return mean


def _values(part: Any) -> np.ndarray:
    return swar.dequantize(part) if isinstance(part, swar.QuantizedTensor) else part


# -- the cluster --------------------------------------------------------------------------------
class Cluster:
    """The driver's connection: a private local cluster on 127.0.0.1 ("local"), or an existing
    one at host:port, reached within CONNECT_TIMEOUT_S or not at all."""

    def __init__(self, placement: RayConfig):
        self.temp_dir: str | None = None
        if placement.address != "local":
            _check_reachable(placement.address)
        # A stop signal amid the setup leaves the cluster first (a private one would outlive
        # us), then does what it did before (the run takes the signals over later).
        self._leaving = {s: self._leave_then(signal.getsignal(s)) for s in STOP_SIGNALS}
        self._take_signals()
        if placement.address == "local":
            context = self._start_local(placement.dashboard)
        else:
            context = self._init(address=placement.address)
        self._take_signals()  # ray.init put in a SIGTERM handler of its own
        url = context.dashboard_url
        self.dashboard_url = f"http://{url}" if url else None  # for xltop's Ray panel

    def _start_local(self, dashboard: bool) -> Any:
        """A private cluster on 127.0.0.1. Ray gives its node a fixed 30 s to start, which a
        loaded machine can miss: then once more."""
        for attempt in (1, 2):
            # Ray's Unix sockets live under its temp dir; their paths cap at 107 bytes
            self.temp_dir = tempfile.mkdtemp(prefix="xr-", dir="/tmp")
            try:
                with _tmpdir(self.temp_dir):  # Ray's processes' own scratch goes there too
                    return self._init(num_cpus=os.cpu_count(), include_dashboard=dashboard,
                                      dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
                                      _temp_dir=self.temp_dir)  # fmt: skip
            except RaySetupError as exc:
                if attempt == 2 or "timed out during startup" not in str(exc):
                    raise
                say(f"ttt-run: {exc}; starting it once more")

    def _init(self, **options: Any) -> Any:
        """ray.init, bounded: a cluster that accepts the connection but never answers would
        hold the run for minutes."""
        done = threading.Event()

        def give_up() -> None:
            if not done.wait(INIT_TIMEOUT_S):
                say(f"ttt-run: error: the Ray cluster did not answer in {INIT_TIMEOUT_S:.0f} s")
                self.close()
                os._exit(1)

        threading.Thread(target=give_up, name="ray-connect-watchdog", daemon=True).start()
        try:
            return ray.init(log_to_driver=False, configure_logging=False, **options)
        except SystemExit as exc:  # ray.init's own SIGTERM handler: sys.exit(signum)
            if exc.code in self._leaving:
                self._take_signals()
                signal.raise_signal(exc.code)  # to ours: the cluster left, then as before
            raise
        except Exception as exc:  # Ray raises many kinds here; the user needs one line
            self.close()
            raise RaySetupError(f"cannot join the Ray cluster: {_first_line(exc)}") from None
        finally:
            done.set()

    def _take_signals(self) -> None:
        for signum, handler in self._leaving.items():
            signal.signal(signum, handler)

    def _leave_then(self, handler: Any) -> Any:
        if not callable(handler):
            return handler

        def leave(signum: int, frame: Any) -> None:
            self.close()
            handler(signum, frame)

        return leave

    def close(self) -> None:
        """Leave the cluster; a private one stops, and its temp dir is removed once its
        processes are gone (ray.shutdown returns while they still write their logs there)."""
        private = psutil.Process().children(recursive=True) if self.temp_dir else []
        if ray.is_initialized():
            ray.shutdown()
        if self.temp_dir:
            _, alive = psutil.wait_procs(private, timeout=SHUTDOWN_WAIT_S)
            for process in alive:
                with contextlib.suppress(psutil.Error):
                    process.kill()
            psutil.wait_procs(alive, timeout=SHUTDOWN_WAIT_S)
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None


@contextlib.contextmanager
def _tmpdir(path: str) -> Iterator[None]:
    """TMPDIR=`path` for the processes started meanwhile (a private cluster's: its dashboard's
    multiprocessing leaves /tmp/pymp-* folders behind when stopped), then as it was."""
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = path
    try:
        yield
    finally:
        if before is None:
            del os.environ["TMPDIR"]
        else:
            os.environ["TMPDIR"] = before


def _check_reachable(address: str) -> None:
    """A Ray GCS answers at `address`, else RaySetupError within about CONNECT_TIMEOUT_S: Ray's
    own connect to a silent port, or to a server that is not a GCS, waits out INIT_TIMEOUT_S.
    The GCS is a gRPC server: it answers an HTTP/2 client's preface with a SETTINGS frame."""
    host, _, port = address.rpartition(":")  # its form checked by RayConfig
    host = host.removeprefix("[").removesuffix("]")  # an IPv6 address's brackets: [::1]:6379
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S) as conn:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
                return  # a GCS with TLS wants a TLS handshake first: Ray's connect must do
            conn.sendall(HTTP2_PREFACE)
            frame = conn.recv(FRAME_HEADER_BYTES, socket.MSG_WAITALL)
    except TimeoutError:
        reason = f"no answer in {CONNECT_TIMEOUT_S:.0f} s"
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__.replace("Error", "").lower() or str(exc)
    else:
        if frame[3:4] == SETTINGS_FRAME_TYPE:
            return
        reason = NOT_A_GCS
    raise RaySetupError(f"cannot reach the Ray cluster at {address}: {reason}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# -- the driver's side --------------------------------------------------------------------------
class RayLearner:
    """The learner of a run whose stages live in Ray actors (see the module's docstring)."""

    def __init__(self, config: RunConfig, placement: RayConfig, restored: LearnerState | None):
        self.config, self.placement = config, placement
        self.train = config.mode == "train"
        self.rows = config.batch_size // placement.replicas
        self.micros = placement.micro_count(config)
        self.blocks = block_ranges(config.num_blocks, placement.stages)
        self.cluster = Cluster(placement)
        try:
            self._start_actors()
            if restored is not None:
                self.load(restored)
        except BaseException:
            self.cluster.close()
            raise

    def _start_actors(self) -> None:
        # the fast BLAS, as this machine has it (a node laid out otherwise falls back to MLX's)
        env_vars = preload_environment(os.environ)
        if self.cluster.temp_dir:  # a private cluster's processes got its TMPDIR: not MLX's,
            env_vars["TMPDIR"] = tempfile.gettempdir()  # which compiles kernels under it
        env = {"env_vars": env_vars}
        actor = ray.remote(StageWorker).options(
            num_cpus=0, max_restarts=self.placement.max_restarts, max_task_retries=0,
            scheduling_strategy="SPREAD", runtime_env=env,
        )  # fmt: skip
        self.actors: list[list[Any]] = [
            [actor.remote(self.config, self.placement, k, r, self.rows) for r in self._replicas()]
            for k in range(self.placement.stages)
        ]
        self.restarts = [[0 for _ in self._replicas()] for _ in self.actors]
        self.node_ips: dict[str, str] = {}
        try:
            found = self._get([[a.where.remote() for a in row] for row in self.actors],
                              READY_TIMEOUT_S)  # fmt: skip
            self.places = [[self._place(where) for where in row] for row in found]
        except GetTimeoutError:
            raise RaySetupError(f"the stage actors did not start in {READY_TIMEOUT_S:.0f} s "
                           "(is the cluster short of memory?)") from None  # fmt: skip
        except RayActorError as exc:
            raise RaySetupError(f"a stage actor failed to start: {_first_line(exc)}") from None
        self.reports: list[list[dict | None]] = [[None for _ in row] for row in self.actors]

    def _place(self, where: dict) -> dict:
        """`where` with the node's address as the cluster knows it (the one it was started
        with; the actor's own guess is the machine's first interface)."""
        if where["node_id"] not in self.node_ips:
            self.node_ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        return {**where, "node_ip": self.node_ips.get(where["node_id"], "?")}

    def _replicas(self) -> range:
        return range(self.placement.replicas)

    @staticmethod
    def _get(refs: Any, timeout: float = STEP_TIMEOUT_S) -> Any:
        """ray.get of a list of lists of refs, shaped as given."""
        flat = [r for row in refs for r in row]
        values = iter(ray.get(flat, timeout=timeout))
        return [[next(values) for _ in row] for row in refs]

    # -- a step ---------------------------------------------------------------------------------
    def step(self, inputs: mx.array, targets: mx.array, sampled: bool) -> StepResult:
        start = time.perf_counter()
        try:
            losses = (
                self._train(inputs, targets, sampled)
                if self.train
                else self._adapt(inputs, targets, sampled)
            )
        except ray.exceptions.RayError as exc:  # an actor died, or met a call of that step
            self._recover(exc)  # raises
        seconds = time.perf_counter() - start
        sample = self._sample() if sampled else None
        return StepResult(mx.array(float(np.mean(losses))), seconds, sample)

    def _rows(self, array: mx.array) -> list[np.ndarray]:
        return np.split(np.array(array), self.placement.replicas)

    def _train(self, inputs: mx.array, targets: mx.array, sampled: bool) -> list[float]:
        last = len(self.actors) - 1
        loss_refs = []
        for r, (x_rows, y_rows) in enumerate(zip(self._rows(inputs), self._rows(targets),
                                                 strict=True)):  # fmt: skip
            xs, ys = np.array_split(x_rows, self.micros), np.array_split(y_rows, self.micros)
            for m, x in enumerate(xs):
                h: Any = x
                for k in range(last):
                    h = self.actors[k][r].forward.remote(m, h, None, sampled)
                self.actors[last][r].forward.remote(m, h, None, sampled)
            for m in reversed(range(self.micros)):
                loss, cot = (
                    self.actors[last][r].backward.options(num_returns=2).remote(m, None, ys[m])
                )
                loss_refs.append(loss)
                for k in reversed(range(last)):
                    _, cot = self.actors[k][r].backward.options(num_returns=2).remote(m, cot, None)
        if self.placement.replicas == 1:
            self.reports = self._get([[row[0].end_step.remote()] for row in self.actors])
        else:
            self.reports = self._get([self._averaged_update(row) for row in self.actors])
        return ray.get(loss_refs, timeout=STEP_TIMEOUT_S)

    def _averaged_update(self, replicas: list) -> list:
        """end_step refs of one stage's replicas, each given every replica's gradients."""
        ranges = []
        if self.placement.grad_average == "swar":
            ranges = [a.gradient_range.remote() for a in replicas]
        payloads = [a.gradient_payload.remote(*ranges) for a in replicas]
        return [a.end_step.remote(*payloads) for a in replicas]

    def _adapt(self, inputs: mx.array, targets: mx.array, sampled: bool) -> list[float]:
        last = len(self.actors) - 1
        loss_refs = []
        for r, (x_rows, y_rows) in enumerate(zip(self._rows(inputs), self._rows(targets),
                                                 strict=True)):  # fmt: skip
            pieces = zip(np.array_split(x_rows, self.micros, axis=1),
                         np.array_split(y_rows, self.micros, axis=1), strict=True)  # fmt: skip
            for p, (x, y) in enumerate(pieces):
                h: Any = x
                for k in range(last):
                    h = self.actors[k][r].forward.remote(p, h, None, sampled)
                loss_refs.append((self.actors[last][r].forward.remote(p, h, y, sampled), y.size))
        self.reports = self._get([[a.end_step.remote() for a in row] for row in self.actors])
        losses = ray.get([ref for ref, _ in loss_refs], timeout=STEP_TIMEOUT_S)
        weights = [size for _, size in loss_refs]  # pieces may differ by a token
        return [float(np.average(losses, weights=weights))]

    def _sample(self) -> SampleFigures:
        """The sampled step's figures: each stage's blocks, from its first replica."""
        fwd_ms: list[float] = []
        bwd_ms: list[float | None] = []
        layers: list[dict] = []
        lrs: list[float] = []
        for row in self.reports:
            report = row[0]
            assert report is not None
            fwd_ms += report["fwd_ms"]
            bwd_ms += report["bwd_ms"]
            layers += report["layers"]
            lrs += report["inner_lrs"]
        return SampleFigures(fwd_ms, bwd_ms, layers, float(np.mean(lrs)) if lrs else 0.0)

    @property
    def dashboard_url(self) -> str | None:
        return self.cluster.dashboard_url

    def baseline_loss(self, inputs: mx.array, targets: mx.array) -> mx.array | None:
        return None  # the base's weights live in the actors: not scored apart here

    def warm_up(self, inputs: mx.array, targets: mx.array) -> None:
        """Nothing to do: each stage runs block by block always, so no step compiles apart."""

    # -- faults ---------------------------------------------------------------------------------
    def _recover(self, failure: ray.exceptions.RayError) -> NoReturn:
        """After a failed call: LearnerRestarted once every dead actor is back (Ray restarted
        it), LearnerFailed if one cannot come back."""
        came_back = []
        for k, row in enumerate(self.actors):
            for r, actor in enumerate(row):
                place = self._wait_alive(actor, k, r)
                if place["pid"] != self.places[k][r]["pid"]:
                    came_back.append(f"{self._name(k, r)} died; restarted as pid {place['pid']}")
                    self.restarts[k][r] += 1
                    self.places[k][r] = place
        if not came_back:
            raise failure
        raise LearnerRestarted("; ".join(came_back))

    def _wait_alive(self, actor: Any, k: int, r: int) -> dict:
        deadline = time.monotonic() + RESTART_WAIT_S
        while True:
            try:
                return self._place(ray.get(actor.where.remote(), timeout=RESTART_WAIT_S))
            except ActorDiedError:
                restarts = self.placement.max_restarts
                raise LearnerFailed(
                    f"{self._name(k, r)} died and cannot come back (max_restarts={restarts})"
                ) from None
            except (RayActorError, GetTimeoutError):  # still restarting
                if time.monotonic() > deadline:
                    raise LearnerFailed(f"{self._name(k, r)} died and did not come back in "
                                        f"{RESTART_WAIT_S:.0f} s") from None  # fmt: skip
                time.sleep(0.2)

    def _name(self, k: int, r: int) -> str:
        place = self.places[k][r]
        return f"stage {k} replica {r} (pid {place['pid']} on node {place['node_ip']})"

    # -- commands and state ---------------------------------------------------------------------
    def _on_every_actor(self, method: str) -> list[list[Any]]:
        """`method` called in every actor, its results shaped as self.actors. A dead actor is a
        step's fault too (LearnerRestarted, LearnerFailed): a command or a checkpoint met it."""
        try:
            return self._get([[getattr(a, method).remote() for a in row] for row in self.actors])
        except ray.exceptions.RayError as exc:
            self._recover(exc)

    def reset(self, reported: list[dict]) -> list[dict]:
        from ttt_runtime.figures import at_conversation_start

        self._on_every_actor("reset")
        return at_conversation_start(reported, exact=False)

    def clear_cache(self) -> int:
        """mx.clear_cache() in every actor (and here): the cache bytes left, summed."""
        mx.clear_cache()
        left = self._on_every_actor("clear_cache")
        return mx.get_cache_memory() + sum(sum(row) for row in left)

    def state(self) -> LearnerState:
        """Every stage's part gathered into one checkpoint's arrays: the parameters (and
        optimizer state) of replica 0, every replica's cache rows, in row order."""
        parts = self._on_every_actor("state")
        arrays: dict[str, mx.array] = {}
        offsets: list[int] = []
        for row in parts:
            (first, first_offsets) = row[0]
            for name, value in first.items():
                if name.startswith("cache."):
                    value = np.concatenate([part[0][name] for part in row])
                arrays[name] = mx.array(value)
            offsets += first_offsets
        return LearnerState(arrays, offsets)

    def load(self, state: LearnerState) -> None:
        """Every actor takes its part of a checkpoint (its stage's names, its replica's rows)."""
        arrays = {k: np.array(v) for k, v in state.arrays.items()}
        refs = []
        for r in self._replicas():
            rows = slice(r * self.rows, (r + 1) * self.rows)
            mine = {k: (v[rows] if k.startswith("cache.") else v) for k, v in arrays.items()}
            shared = ray.put(mine)
            refs.append([row[r].load.remote(shared, state.cache_offsets) for row in self.actors])
        try:
            self._get(refs, READY_TIMEOUT_S)
        except RayActorError as exc:
            raise ValueError(_first_line(exc)) from None

    def workers(self) -> tuple[WorkerFigures, ...]:
        figures = []
        for k, row in enumerate(self.reports):
            for r, report in enumerate(row):
                place = self.places[k][r]
                report = report or {}
                figures.append(WorkerFigures(
                    stage=k, replica=r, blocks=tuple(self.blocks[k]), node_id=place["node_id"],
                    node_ip=place["node_ip"], pid=place["pid"], restarts=self.restarts[k][r],
                    rss=report.get("rss"), active=report.get("active", 0),
                    cache=report.get("cache", 0), peak=report.get("peak", 0),
                    fwd_ms=sum(report.get("fwd_ms", [])),
                    bwd_ms=sum(report["bwd_ms"]) if self.train and report else None,
                    wait_ms=report.get("wait_ms", 0.0), sync_ms=report.get("sync_ms"),
                    sent=report.get("sent", 0),
                    received=report.get("received", 0),
                ))  # fmt: skip
        return tuple(figures)

    def close(self) -> None:
        """Stop the actors and leave the cluster."""
        for row in getattr(self, "actors", []):
            for actor in row:
                ray.kill(actor, no_restart=True)
        self.cluster.close()
