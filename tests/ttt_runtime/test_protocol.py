"""The typed wire: each message of a run as its dataclass, encoded and decoded in one place and
checked on receipt."""

from __future__ import annotations

import json
import math

import pytest
from messages import HELLO, telemetry, worker

from ttt_runtime.protocol import (
    Bye,
    ErrorReport,
    ProtocolError,
    Reply,
    decode_message,
    encode,
)

MESSAGES = [
    HELLO,
    telemetry(3),
    telemetry(0, tokens_per_s=None, step_ms=None, sampled_step=None, blocks=(), layers=()),
    telemetry(4, workers=(worker(0, 4321), worker(1, 4322, restarts=1))),
    Reply(id=7, cmd="save", ok=True, extras={"path": "/tmp/a.safetensors"}),
    Reply(id=None, cmd=None, ok=False, error="not JSON: Expecting value"),
    ErrorReport(exc_type="RuntimeError", message="boom", traceback="Traceback ..."),
    Bye(exit_code=0, step=12),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_comes_back_as_it_was_sent(message):
    line = encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_message(line) == message
    assert json.loads(line)["type"] == message.TYPE


def test_the_json_on_the_wire_keeps_its_names():
    report = json.loads(encode(telemetry(3)))
    assert list(report) == [
        "type", "t", "pid", "run_id", "mode", "preset", "paused", "step", "tokens",
        "tokens_per_s", "step_ms", "loss_bpb", "warmup_ms", "inner_lr", "conversation",
        "sampled_step", "blocks", "layers", "mlx", "blas", "user", "baseline_bpb", "gain",
        "workers",
    ]  # fmt: skip
    assert report["blocks"][0] == {"fwd_ms": 1.5, "bwd_ms": 3.0}
    assert set(report["layers"][0]) == {
        "w_norm", "update_norm", "drift", "inner_loss_before", "inner_loss_after", "exact_drift",
    }  # fmt: skip
    assert set(report["mlx"]) == {
        "active", "cache", "peak", "limit", "backend", "device", "memory_size", "working_set",
    }  # fmt: skip
    reply = json.loads(encode(Reply(id=1, cmd="save", ok=True, extras={"path": "/x"})))
    assert reply == {"type": "reply", "id": 1, "cmd": "save", "ok": True, "error": None,
                     "path": "/x"}  # fmt: skip


def test_a_figure_that_diverged_travels_as_null():
    line = encode(telemetry(3, loss_bpb=math.nan, inner_lr=math.inf))
    assert b"NaN" not in line and b"Infinity" not in line
    report = decode_message(line)
    assert report.loss_bpb is None and report.inner_lr is None


def test_an_integer_is_a_fine_number_and_unknown_keys_are_ignored():
    data = json.loads(encode(telemetry(3)))
    data.update(t=1_700_000_003, added_later="ignored")
    assert decode_message(json.dumps(data)) == telemetry(3)


def mutated(mutate) -> str:
    data = json.loads(encode(telemetry(3)))
    mutate(data)
    return json.dumps(data)


@pytest.mark.parametrize(
    "line, expected",
    [
        (mutated(lambda d: d.update(step="3")), "'step' must be an integer, got str"),
        (mutated(lambda d: d.update(step=True)), "'step' must be an integer, got bool"),
        (mutated(lambda d: d.update(paused=0)), "'paused' must be true or false, got int"),
        (mutated(lambda d: d.update(tokens_per_s="fast")),
         "'tokens_per_s' must be a number or null, got str"),
        (mutated(lambda d: d.pop("conversation")), "'conversation' is missing"),
        (mutated(lambda d: d.update(blocks={})), "'blocks' must be a list, got dict"),
        (mutated(lambda d: d["blocks"].append(3)), "'blocks[2]' must be an object, got int"),
        (mutated(lambda d: d["layers"][1].update(w_norm=[1.0])),
         "'layers[1].w_norm' must be a number or null, got list"),
        (mutated(lambda d: d["mlx"].pop("active")), "'mlx.active' is missing"),
        (mutated(lambda d: d.update(mlx=None)), "'mlx' must be an object, got NoneType"),
    ],
)  # fmt: skip
def test_a_malformed_telemetry_message_is_refused_naming_the_field(line, expected):
    with pytest.raises(ProtocolError) as refused:
        decode_message(line)
    assert str(refused.value) == f"telemetry message: {expected}"


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"type":"hello","pid":1,"run_id":"a","mode":"train","preset":"tiny","config":[],'
         '"socket":"s"}', "hello message: 'config' must be an object, got list"),
        ('{"type":"reply","id":1.5,"cmd":"x","ok":true}',
         "reply message: 'id' must be an integer or a string or null, got float"),
        ('{"type":"bye","exit_code":0}', "bye message: 'step' is missing"),
        ('{"type":"launch"}', "unknown message type 'launch'"),
        ('{"step":3}', "unknown message type None"),
        ("[1]", "expected a JSON object, got list"),
    ],
)  # fmt: skip
def test_any_malformed_message_is_refused_in_one_line(line, expected):
    with pytest.raises(ProtocolError) as refused:
        decode_message(line)
    assert str(refused.value) == expected


def test_a_reply_cannot_hide_a_field_under_its_extras():
    with pytest.raises(ValueError, match=r"may not be named \['ok'\]"):
        Reply(id=1, cmd="save", ok=True, extras={"ok": False})
