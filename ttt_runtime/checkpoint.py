"""Checkpoints: one safetensors file with outer weights, fast weights, optimizer state, and the
config/step/stream position in its metadata.

Written to a temporary file in the target's directory, flushed to disk, then renamed over the
target, so a reader sees the old file or the new one, never half of one; a write that fails
(full disk, no permission) removes the temporary file and leaves the target as it was. A
SHA-256 over every metadata field and every tensor, kept in the metadata, turns a truncated,
corrupted or edited file into a clear error instead of a silent load of wrong weights or a
wrong step.

The header alone (no MLX) is read and its fields checked by `config.checkpoint_config`, so that
`--resume` is checked before a run starts and the run starts from the checkpoint's config.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, cast

import mlx.core as mx
import numpy as np

from ttt_runtime.config import CHECKPOINT_FORMAT, ConfigError, checkpoint_metadata


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read whole; the message names the file."""


@dataclass
class Checkpoint:
    arrays: dict[str, mx.array]  # "model.*", "optimizer.*", "cache.<block>.<i>"
    config: dict[str, Any]
    step: int
    tokens: int
    stream_position: int
    conversation: int
    cache_offsets: list[int]

    def group(self, prefix: str) -> dict[str, mx.array]:
        """The arrays under `prefix.` with the prefix removed."""
        cut = len(prefix) + 1
        return {k[cut:]: v for k, v in self.arrays.items() if k.startswith(prefix + ".")}


def _digest(arrays: dict[str, mx.array], fields: dict[str, str]) -> str:
    """Over every metadata field but the digest itself, then every tensor."""
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    for name in sorted(arrays):
        value = np.asarray(arrays[name])
        digest.update(f"{name}:{value.dtype}:{value.shape};".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def check_writable(path: str) -> None:
    """CheckpointError (as `save` would give it) unless a checkpoint can be written at `path`
    now: for a caller with a long job before its save. A full disk can still refuse it later."""
    target = os.path.abspath(path)
    if os.path.exists(target) and not os.path.isfile(target):
        raise CheckpointError(f"cannot write checkpoint {target}: not a regular file")
    folder = os.path.dirname(target)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise CheckpointError(f"cannot write checkpoint {target}: {folder} is not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise CheckpointError(f"cannot write checkpoint {target}: {reason}") from None


def save(path: str, checkpoint: Checkpoint) -> str:
    """Write atomically; returns the absolute path. CheckpointError, in one line naming the
    path and the reason, if it cannot be written; the target is then untouched."""
    try:
        path = os.path.abspath(path)
    except FileNotFoundError:  # os.getcwd() of a deleted folder; the run goes on without it
        raise CheckpointError(
            f"cannot write checkpoint {path}: the path is relative and the run's working "
            "folder no longer exists; give an absolute path"
        ) from None
    if os.path.exists(path) and not os.path.isfile(path):  # never rename over a device or FIFO
        raise CheckpointError(f"cannot write checkpoint {path}: not a regular file")
    mx.eval(list(checkpoint.arrays.values()))
    fields = {
        "format": CHECKPOINT_FORMAT,
        "config": json.dumps(checkpoint.config),
        "step": str(checkpoint.step),
        "tokens": str(checkpoint.tokens),
        "stream_position": str(checkpoint.stream_position),
        "conversation": str(checkpoint.conversation),
        "cache_offsets": json.dumps(checkpoint.cache_offsets),
    }
    metadata = {**fields, "sha256": _digest(checkpoint.arrays, fields)}
    try:
        _write_atomically(path, checkpoint.arrays, metadata)
    except (OSError, RuntimeError, ValueError) as exc:
        # MLX raises RuntimeError for its own I/O; os raises ValueError for a path it cannot
        # encode (a NUL byte, a lone surrogate)
        reason = getattr(exc, "strerror", None) or exc
        where = getattr(exc, "filename", None)
        if where and where != path:  # e.g. the temporary file, which the folder refused
            reason = f"{reason} ({where})"
        raise CheckpointError(f"cannot write checkpoint {path}: {reason}") from None
    return path


def _write_atomically(path: str, arrays: dict[str, mx.array], metadata: dict[str, str]) -> None:
    folder = os.path.dirname(path)
    temp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp.safetensors")
    os.makedirs(folder, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp)  # left by a killed process that had our pid
    try:
        with open(temp, "xb") as handle:  # exclusive: never through a link or into a FIFO
            mx.save_safetensors(handle, arrays, metadata=metadata)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temp)  # still there only if the write or the rename failed
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load(path: str) -> Checkpoint:
    """Read and verify a checkpoint; CheckpointError if it is missing, truncated or altered."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        # MLX's stub gives one union for every format; safetensors with metadata is this pair
        arrays, metadata = cast(
            tuple[dict[str, mx.array], dict[str, str]],
            mx.load(path, format="safetensors", return_metadata=True),
        )
    except Exception as exc:  # MLX raises RuntimeError/ValueError for a broken file
        raise CheckpointError(
            f"checkpoint {path} is truncated or not a safetensors file ({exc})"
        ) from None
    try:
        values = checkpoint_metadata(path, metadata)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    fields = {name: text for name, text in metadata.items() if name != "sha256"}
    if _digest(arrays, fields) != metadata.get("sha256"):
        raise CheckpointError(
            f"checkpoint {path} is corrupted: its metadata or tensors fail the checksum"
        )
    return Checkpoint(arrays=arrays, **values)
