"""Checkpoint files: atomic, verified, and never loaded when incomplete or altered."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from ttt_runtime.checkpoint import Checkpoint, CheckpointError, load, save
from ttt_runtime.config import CHECKPOINT_FORMAT, ConfigError, checkpoint_config


def make_checkpoint() -> Checkpoint:
    rng = np.random.default_rng(0)
    arrays = {
        "model.w": mx.array(rng.normal(size=(8, 8)).astype(np.float32)),
        "optimizer.step": mx.array(3, dtype=mx.uint64),
        "cache.0.0": mx.array(rng.normal(size=(1, 2, 5, 4)).astype(np.float32)),
    }
    config = {"preset": "tiny", "seq_len": 32, "lr": 0.003}
    return Checkpoint(arrays, config, 7, 224, 224, 2, [224])


def change_a_digit(path: Path, field: str) -> None:
    """Edit the last digit of metadata `field` in place, as a user editing the header would:
    one digit for the next, the file's length unchanged (step 7 -> 8, lr 0.003 -> 0.004)."""
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    text = bytes(data[8 : 8 + length])
    value = re.search(rb'"%s":"((?:[^"\\]|\\.)*)"' % field.encode(), text)
    at = 8 + value.start(1) + max(i for i, c in enumerate(value.group(1)) if chr(c).isdigit())
    data[at] = ord(str((int(chr(data[at])) + 1) % 10))
    path.write_bytes(bytes(data))


def test_round_trip_keeps_everything(tmp_path):
    original = make_checkpoint()
    path = save(str(tmp_path / "sub" / "c.safetensors"), original)
    assert os.listdir(tmp_path / "sub") == ["c.safetensors"]  # no temporary left behind
    loaded = load(path)
    assert (loaded.step, loaded.tokens, loaded.stream_position) == (7, 224, 224)
    assert (loaded.conversation, loaded.cache_offsets, loaded.config) == (2, [224], original.config)
    for name, value in original.arrays.items():
        assert mx.array_equal(loaded.arrays[name], value).item()
    assert loaded.group("model").keys() == {"w"}
    assert checkpoint_config(path) == original.config  # the header alone, without MLX


def test_a_failed_save_leaves_the_old_file_alone(tmp_path):
    path = tmp_path / "c.safetensors"
    save(str(path), make_checkpoint())
    before = path.read_bytes()
    bad = make_checkpoint()
    bad.arrays["model.w"] = object()  # cannot be written
    with pytest.raises(Exception):  # noqa: B017 - whatever MLX raises, the old file stays
        save(str(path), bad)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.safetensors"]


@pytest.mark.parametrize("keep", [0.5, 0.99, 0.02])
def test_truncated_file_is_refused(tmp_path, keep):
    path = Path(save(str(tmp_path / "c.safetensors"), make_checkpoint()))
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="truncated"):
        load(str(path))


def test_flipped_byte_in_a_tensor_is_refused(tmp_path):
    path = Path(save(str(tmp_path / "c.safetensors"), make_checkpoint()))
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # inside the last tensor's bytes: a well-formed file with wrong numbers
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load(str(path))


METADATA_FIELDS = ["format", "config", "step", "tokens", "stream_position", "conversation",
                   "cache_offsets", "sha256"]  # fmt: skip


@pytest.mark.parametrize("field", METADATA_FIELDS)
def test_a_changed_digit_in_any_metadata_field_is_refused(tmp_path, field):
    path = Path(save(str(tmp_path / "c.safetensors"), make_checkpoint()))
    change_a_digit(path, field)
    with pytest.raises(CheckpointError, match="format" if field == "format" else "checksum"):
        load(str(path))


def crafted(tmp_path: Path, field: str, value: str | None) -> str:
    """A checkpoint whose metadata `field` says `value` (None: it has no such field)."""
    arrays, metadata = mx.load(save(str(tmp_path / "c.safetensors"), make_checkpoint()),
                               return_metadata=True)  # fmt: skip
    metadata[field] = value
    if value is None:
        del metadata[field]
    path = str(tmp_path / "crafted.safetensors")
    mx.save_safetensors(path, arrays, metadata=metadata)
    return path


def test_a_checkpoint_of_the_previous_format_is_refused_naming_it(tmp_path):
    old = crafted(tmp_path, "format", "xltop-ttt-checkpoint/1")
    needle = f"{old} has format xltop-ttt-checkpoint/1.*{CHECKPOINT_FORMAT}"
    with pytest.raises(CheckpointError, match=needle):
        load(old)
    with pytest.raises(ConfigError, match=needle):
        checkpoint_config(old)


@pytest.mark.parametrize(
    "field, value",
    [
        ("config", "[1]"),
        ("config", '"tiny"'),
        ("config", "{not json"),
        ("config", '{"seq_len": 0}'),
        ("config", '{"warp_factor": 9}'),
        ("config", '{"lr": "fast"}'),
        ("config", '{"self": 1}'),
        ("config", "[" * 100_000),
        ("step", "-1"),
        ("tokens", "1.5"),
        ("stream_position", ""),
        ("conversation", "2" * 5000),
        ("cache_offsets", "[true]"),
        ("cache_offsets", "[-1]"),
        ("cache_offsets", '{"0": 1}'),
        ("cache_offsets", "[1e3]"),
        ("cache_offsets", None),  # missing
    ],
    ids=lambda value: repr(value)[:24],
)
def test_metadata_of_the_wrong_type_is_refused_naming_the_file_and_field(tmp_path, field, value):
    # a crafted file (its author can recompute the checksum too): every field is checked
    path = crafted(tmp_path, field, value)
    named = re.escape(path) + ".*" + ("seq_len" if "seq_len" in str(value) else field)
    with pytest.raises(CheckpointError, match=named) as from_load:
        load(path)
    with pytest.raises(ConfigError, match=named) as from_header:
        checkpoint_config(path)
    for error in (from_load.value, from_header.value):
        assert "\n" not in str(error) and len(str(error)) < 400


def test_a_header_whose_metadata_is_not_an_object_is_refused(tmp_path):
    text = json.dumps({"__metadata__": [1], "x": {"dtype": "F32", "shape": [1],
                                                  "data_offsets": [0, 4]}}).encode()  # fmt: skip
    path = tmp_path / "c.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(4))
    with pytest.raises(ConfigError, match="not an xltop TTT checkpoint"):
        checkpoint_config(str(path))


def unwritable_targets(tmp_path: Path) -> dict[str, str]:
    """Places a checkpoint cannot go, even for root: name -> path."""
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "file").write_text("")
    return {
        "a directory": str(tmp_path / "folder"),
        "a FIFO": str(tmp_path / "fifo"),
        "a device": "/proc/self/mem",
        "a folder that takes no new files": "/proc/self/c.safetensors",
        "a path under a file": str(tmp_path / "file" / "c.safetensors"),
        "a NUL byte": str(tmp_path / "c\0.safetensors"),
    }


def test_a_save_that_cannot_be_written_is_one_line_naming_the_path_and_leaves_nothing(tmp_path):
    for what, target in unwritable_targets(tmp_path).items():
        before = sorted(os.listdir(tmp_path))
        with pytest.raises(CheckpointError) as error:
            save(target, make_checkpoint())
        message = str(error.value)
        assert message.startswith(f"cannot write checkpoint {target}: "), what
        assert "\n" not in message, what
        assert sorted(os.listdir(tmp_path)) == before, what  # no temporary file left
    assert os.path.isdir(tmp_path / "folder") and not os.listdir(tmp_path / "folder")
    assert not os.path.isfile(tmp_path / "fifo")  # still the FIFO, not replaced by a file


def test_missing_or_foreign_file_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load(str(tmp_path / "none.safetensors"))
    foreign = str(tmp_path / "other.safetensors")
    mx.save_safetensors(foreign, {"x": mx.zeros(3)})
    with pytest.raises(CheckpointError, match="not an xltop TTT checkpoint"):
        load(foreign)
