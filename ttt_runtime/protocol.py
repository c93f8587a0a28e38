"""The wire format between a TTT run and its monitors: one JSON object per line.

Plain JSON only, so nothing a peer sends is ever evaluated as code. This module must not import
MLX: the monitor (`xltop`) imports it.

Monitor -> run (a command):
    {"cmd": "pause" | "resume" | "clear_cache" | "reset" | "save" | "stop" | "hello",
     "id": <echoed back: null, a string (at most 100 characters) or an integer within
            +-2**53>, "path": <str, optional, for "save">}

Run -> monitor, each message has a "type":
    "hello"      once per connection: {"pid", "run_id", "mode", "preset", "config": {...}}
    "telemetry"  once per step (see TELEMETRY_FIELDS), pushed to every connected monitor
    "reply"      {"id", "cmd", "ok": bool, "error": str | None, ...extra (e.g. "path")}, one per
                 line received, in the order of the lines
    "error"      the run raised: {"exc_type", "message", "traceback"}; the run then exits non-zero
    "bye"        the run is exiting cleanly: {"exit_code": 0}
"""

from __future__ import annotations

import json
import math
import reprlib
from typing import Any

COMMANDS = ("pause", "resume", "clear_cache", "reset", "save", "stop", "hello")

# One telemetry message per step. Sizes are bytes, times milliseconds, losses bits per byte
# (outer) or the inner loss (docs/ttt-maths.md). Per-block and per-layer fields: the last step on
# the sampling schedule; "sampled_step" says which step that was.
TELEMETRY_FIELDS = {
    "t": "unix time of the report (s)",
    "pid": "the run's process id",
    "run_id": "random id of this run process",
    "mode": "'train' or 'adapt'",
    "preset": "preset name the config came from",
    "paused": "true while the run is paused",
    "step": "steps completed",
    "tokens": "tokens (bytes) seen",
    "tokens_per_s": "throughput over the last step",
    "step_ms": "wall time of the last step",
    "loss_bpb": "outer loss of the last step, bits per byte",
    "warmup_ms": "wall time of this process's first step, which compiles (null before it); "
    "that step's step_ms and tokens_per_s are null, and it is never the sampled step",
    "inner_lr": "mean inner learning rate (eta) over the last sampled step",
    "conversation": "conversation id; bumped by reset",
    "sampled_step": "step whose per-block/per-layer figures are reported (null before one)",
    "blocks": "list per block: {'fwd_ms', 'bwd_ms' (null in adapt mode)}",
    "layers": "list per TTT layer: {'w_norm', 'update_norm', 'drift', 'inner_loss_before', "
    "'inner_loss_after', 'exact_drift' (null unless exact accumulation is on)}",
    "mlx": "{'active', 'cache', 'peak', 'limit', 'backend', 'device', 'memory_size', "
    "'working_set' (Metal's recommended working set, null elsewhere)}",
    "blas": "BLAS library the run's process has loaded, e.g. 'openblas' or 'bundled'",
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


def _finite(value: Any) -> Any:
    # JSON has no NaN/Inf; a diverged loss travels as null rather than breaking the stream.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def encode(message: dict[str, Any]) -> bytes:
    """One message as a newline-terminated UTF-8 JSON line (non-finite floats become null)."""
    return (json.dumps(_finite(message), separators=(",", ":"), allow_nan=False) + "\n").encode()


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
