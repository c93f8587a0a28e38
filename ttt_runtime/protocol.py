"""The wire format between a TTT run and its monitors: one JSON object per line.

Plain JSON only, so nothing a peer sends is ever evaluated as code. This module must not import
MLX: the monitor (`xltop`) imports it.

Monitor -> run (a command):
    {"cmd": "pause" | "resume" | "clear_cache" | "reset" | "save" | "stop" | "hello",
     "id": <echoed back: null, a string (at most 100 characters) or an integer within
            +-2**53>, "path": <str, optional, for "save">}

Run -> monitor: the five messages below (`Message`), each a dataclass whose fields are the
JSON object's keys, plus a "type" naming it. `encode` writes them and `decode_message` reads
them back, checking every field's type on receipt: a malformed message is a ProtocolError
naming the field, never a half-read report.
    Hello        "hello", once per connection
    Telemetry    "telemetry", once per step, pushed to every connected monitor
    Reply        "reply", one per line received, in the order of the lines
    ErrorReport  "error": the run raised; it then exits non-zero
    Bye          "bye": the run is exiting cleanly
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import reprlib
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from functools import cache
from typing import Any, ClassVar, TypeAlias, Union, get_args, get_origin, get_type_hints

COMMANDS = ("pause", "resume", "clear_cache", "reset", "save", "stop", "hello")


# Sizes are bytes, times milliseconds, losses bits per byte (outer) or the inner loss
# (docs/ttt-maths.md). A figure that can come out NaN or infinite is optional: it travels as null.
@dataclass(frozen=True)
class BlockTiming:
    """One block's times on the sampled step."""

    fwd_ms: float | None
    bwd_ms: float | None  # None in adapt mode (no backward)


@dataclass(frozen=True)
class LayerFigures:
    """One TTT layer's fast-weight figures on the sampled step (docs/ttt-maths.md)."""

    w_norm: float | None
    update_norm: float | None
    drift: float | None
    inner_loss_before: float | None
    inner_loss_after: float | None
    exact_drift: float | None = None  # float32 vs exact accumulation; None when that is off


@dataclass(frozen=True)
class MlxReport:
    """The run process's MLX memory (its own counters) and device."""

    active: int
    cache: int
    peak: int
    limit: int  # mx.get_memory_limit()
    backend: str  # "cpu", "gpu" (Metal), "cuda"
    device: str  # mx.device_info()'s device name
    memory_size: int  # the device's memory, else the machine's
    working_set: int | None  # Metal's recommended working set, None elsewhere


@dataclass(frozen=True)
class WorkerFigures:
    """One Ray stage actor of a distributed run (ttt_runtime.ray_workers), as of the last step."""

    stage: int
    replica: int
    blocks: tuple[int, ...]  # the blocks it owns
    node_id: str
    node_ip: str
    pid: int  # its process now (a restarted actor has a new one)
    restarts: int  # times Ray restarted it in this run
    rss: int | None  # its process's resident memory
    active: int  # its process's own MLX counters
    cache: int
    peak: int
    fwd_ms: float  # its forward time over the last step, all micro-batches
    bwd_ms: float | None  # None in adapt mode
    wait_ms: float  # time between its calls within the last step: waiting for input
    sync_ms: float | None  # averaging the replicas' gradients (None without replicas)
    sent: int  # bytes it returned over the last step (activations, cotangents, gradients)
    received: int  # bytes it was sent over the last step


@dataclass(frozen=True)
class Hello:
    TYPE: ClassVar[str] = "hello"
    pid: int  # the run's process id
    run_id: str  # random id of this run process
    mode: str  # "train" or "adapt"
    preset: str  # preset name the config came from
    config: dict[str, Any]  # the whole run configuration (RunConfig.as_dict())
    socket: str  # the socket path the run listens on
    # a run spread over Ray actors: its placement (config.RayConfig) and, where the cluster
    # serves one, its dashboard's URL; None for a one-process run (or a message without them)
    placement: dict[str, Any] | None = None
    ray_dashboard: str | None = None


@dataclass(frozen=True)
class Telemetry:
    """One report per step. Per-block and per-layer figures and inner_lr: the last step on the
    sampling schedule, `sampled_step`."""

    TYPE: ClassVar[str] = "telemetry"
    t: float  # unix time of the report (s)
    pid: int
    run_id: str
    mode: str
    preset: str
    paused: bool
    step: int  # steps completed
    tokens: int  # tokens (bytes) seen
    tokens_per_s: float | None  # throughput over the last step
    step_ms: float | None  # wall time of the last step
    loss_bpb: float | None  # outer loss of the last step, bits per byte
    # wall time of this process's first step, which compiles (None before it); that step's
    # step_ms and tokens_per_s are None, and it is never the sampled step
    warmup_ms: float | None
    inner_lr: float | None  # mean inner learning rate (eta) over the sampled step
    conversation: int  # conversation id; bumped by reset
    sampled_step: int | None  # the step `blocks`, `layers` and `inner_lr` come from
    blocks: tuple[BlockTiming, ...]
    layers: tuple[LayerFigures, ...]  # one per block's TTT layer
    mlx: MlxReport
    blas: str  # BLAS library the run's process has loaded, e.g. "openblas" or "bundled"
    # extra scalars by name that a user's own loop reports (ttt_runtime.report); a TTT run has
    # none, and a message without the key is read as having none
    user: dict[str, float | None] = field(default_factory=dict)
    # adapt mode: the unadapted base's bits per byte on the sampled step's chunk (from fresh
    # fast weights, as adapt_method 'reset'), and the mean over the sampled steps so far of
    # loss_bpb - baseline_bpb (below 0: adapting helps); None in train mode and until sampled
    baseline_bpb: float | None = None
    gain: float | None = None
    # a distributed run's stage actors (ttt_runtime.ray_workers); empty for a one-process run,
    # and a message without the key is read as having none
    workers: tuple[WorkerFigures, ...] = ()


@dataclass(frozen=True)
class Reply:
    TYPE: ClassVar[str] = "reply"
    id: int | str | None  # the command's, echoed (None when the line had none fit to echo)
    cmd: str | None
    ok: bool
    error: str | None = None  # one line saying what was wrong
    # what the command returns (save: "path"), flat beside the fields above on the wire
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clash = set(self.extras) & {"type", *(f.name for f in dataclasses.fields(Reply))}
        if clash:
            raise ValueError(f"a reply's extras may not be named {sorted(clash)}")


@dataclass(frozen=True)
class ErrorReport:
    TYPE: ClassVar[str] = "error"
    exc_type: str
    message: str
    traceback: str


@dataclass(frozen=True)
class Bye:
    TYPE: ClassVar[str] = "bye"
    exit_code: int
    step: int


Message: TypeAlias = Hello | Telemetry | Reply | ErrorReport | Bye
MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls for cls in (Hello, Telemetry, Reply, ErrorReport, Bye)
}


class ProtocolError(ValueError):
    """A line that is not a JSON object of the expected shape. `echo`: the line's "id" and
    "cmd" where they are fit to go back in the error reply, else None."""

    def __init__(self, message: str, echo: dict[str, Any] | None = None):
        super().__init__(message)
        self.echo = echo or {"id": None, "cmd": None}


MAX_ID_CHARS = 100
ID_RULE = (
    f"'id' must be null, a string of at most {MAX_ID_CHARS} characters or an integer within"
    " +-2**53 (exact in any JSON reader)"
)
MAX_DIGITS = 100  # in any integer of a line: the protocol needs none longer


def _integer(text: str) -> int:
    # refused before int() parses it: that costs time quadratic in the digits
    digits = len(text.lstrip("-"))
    if digits > MAX_DIGITS:
        raise ValueError(f"an integer of {digits} digits (at most {MAX_DIGITS})")
    return int(text)


def valid_id(value: Any) -> bool:
    if isinstance(value, str):
        return len(value) <= MAX_ID_CHARS
    return value is None or (type(value) is int and abs(value) <= 2**53)  # bool is no id


def json_data(value: Any) -> Any:
    """`value` as plain JSON data, in one walk: dataclasses as objects, tuples as lists, enums
    as their values, and every NaN or infinite float None (JSON has none)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Enum):
        return value.value
    if value is None or isinstance(value, (str, int)):
        return value
    if dataclasses.is_dataclass(value):
        return {f.name: json_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: json_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_data(v) for v in value]
    return value


def to_wire(message: Message) -> dict[str, Any]:
    """A message as the JSON object that goes on the wire: "type" first, a reply's extras
    beside its fields."""
    data = json_data(message)
    extras = data.pop("extras", {})
    return {"type": message.TYPE, **data, **extras}


def encode(message: Message | dict[str, Any]) -> bytes:
    """A message (or a monitor's command, a plain dict) as a newline-terminated UTF-8 JSON line;
    a diverged loss travels as null rather than breaking the stream."""
    data = json_data(message) if isinstance(message, dict) else to_wire(message)
    return (json.dumps(data, separators=(",", ":"), allow_nan=False) + "\n").encode()


def decode(line: bytes | str) -> dict[str, Any]:
    """Parse one line; raise ProtocolError naming what is wrong (never anything else)."""
    try:
        message = json.loads(line, parse_int=_integer)
    except RecursionError:
        raise ProtocolError("not JSON: nested too deeply") from None
    except ValueError as exc:  # bad JSON or UTF-8, an integer of too many digits
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"expected a JSON object, got {type(message).__name__}")
    return message


def decode_message(line: bytes | str) -> Message:
    """One line from a run as its message, every field checked against its type; raise
    ProtocolError naming the first field that is missing or of the wrong type. Keys a message
    does not know are ignored, except in a Reply, whose extras they are."""
    data = decode(line)
    kind = data.get("type")
    read = _MESSAGE_READERS.get(kind) if isinstance(kind, str) else None
    if read is None:
        raise ProtocolError(f"unknown message type {reprlib.repr(kind)}")
    try:
        return read(data, "")
    except _Mismatch as exc:
        raise ProtocolError(f"{kind} message: {exc}") from None


class _Mismatch(Exception):
    """A field of a received message that its dataclass does not allow."""


# Reads a JSON value as a type says: (the value, where it sits in the message) -> the value,
# or _Mismatch naming that place. Made once per type: a report is read every step.
Reader = Callable[[Any, str], Any]
NoneType = type(None)


@cache
def _reader(hint: Any) -> Reader:
    if dataclasses.is_dataclass(hint):
        return _object_reader(hint)
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        nullable, options = NoneType in args, [_reader(a) for a in args if a is not NoneType]

        def read_either(value: Any, where: str) -> Any:
            if value is None and nullable:
                return None
            for read in options:
                with contextlib.suppress(_Mismatch):
                    return read(value, where)
            raise _mismatch(hint, value, where)

        return read_either
    if origin is dict and args[1] is not Any:  # dict[str, X]: each value read as X
        read_value = _reader(args[1])

        def read_mapping(value: Any, where: str) -> dict:
            if type(value) is not dict:
                raise _mismatch(hint, value, where)
            return {k: read_value(v, f"{where}.{k}") for k, v in value.items()}

        return read_mapping
    if origin is tuple:  # tuple[X, ...] travels as a list
        read_item = _reader(args[0])

        def read_list(value: Any, where: str) -> tuple:
            if type(value) is not list:
                raise _mismatch(hint, value, where)
            return tuple(read_item(v, f"{where}[{i}]") for i, v in enumerate(value))

        return read_list
    if hint is Any:
        return lambda value, where: value
    # exact JSON types (a bool is no integer here), but an integer is a fine float
    accepted = {float: (int, float)}.get(hint, (origin or hint,))

    def read_plain(value: Any, where: str) -> Any:
        if type(value) not in accepted:
            raise _mismatch(hint, value, where)
        return float(value) if hint is float else value

    return read_plain


def _object_reader(cls: Any) -> Reader:
    hints = get_type_hints(cls)
    missing = dataclasses.MISSING
    fields = [
        (f.name, _reader(hints[f.name]), f.default is missing and f.default_factory is missing)
        for f in dataclasses.fields(cls)
        if f.name != "extras"
    ]
    names = {name for name, _, _ in fields}
    keeps_extras = "extras" in hints  # a Reply: the keys it does not name

    def read_object(value: Any, where: str) -> Any:
        if type(value) is not dict:
            raise _mismatch(dict, value, where)
        prefix = f"{where}." if where else ""
        values = {}
        for name, read, required in fields:
            if name in value:
                values[name] = read(value[name], prefix + name)
            elif required:
                raise _Mismatch(f"{prefix + name!r} is missing")
        if keeps_extras:
            values["extras"] = {k: v for k, v in value.items() if k != "type" and k not in names}
        return cls(**values)

    return read_object


_MESSAGE_READERS = {kind: _object_reader(cls) for kind, cls in MESSAGE_TYPES.items()}


def _mismatch(hint: Any, value: Any, where: str) -> _Mismatch:
    return _Mismatch(f"{where!r} must be {_describe(hint)}, got {type(value).__name__}")


_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
          NoneType: "null"}  # fmt: skip


def _describe(hint: Any) -> str:
    if get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_describe(option) for option in get_args(hint))
    if get_origin(hint) is tuple:
        return "a list"
    return _KINDS.get(hint, "an object")


def parse_command(line: bytes | str) -> dict[str, Any]:
    """Validate a monitor's command; raise ProtocolError for anything outside the closed set."""
    message = decode(line)
    cmd, command_id = message.get("cmd"), message.get("id")
    echo = {
        "id": command_id if valid_id(command_id) else None,
        "cmd": cmd if isinstance(cmd, str) else None,
    }
    if cmd not in COMMANDS:
        allowed = ", ".join(COMMANDS)
        raise ProtocolError(f"unknown command {reprlib.repr(cmd)}; allowed: {allowed}", echo)
    if not valid_id(command_id):
        raise ProtocolError(ID_RULE, echo)
    if "path" in message and not isinstance(message["path"], str):
        raise ProtocolError("'path' must be a string", echo)
    return message
