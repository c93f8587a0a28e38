"""Checkpoints: one safetensors file with outer weights, fast weights, optimizer state, and the
config/step/stream position in its metadata.

Written to a temporary file in the target's directory, flushed to disk, then renamed over the
target, so a reader sees the old file or the new one, never half of one. A SHA-256 over every
tensor, kept in the metadata, turns a truncated or corrupted file into a clear error instead of
a silent load of wrong weights.

The header alone (no MLX) is read by `config.checkpoint_config`, so that `--resume` is checked
before a run starts and the run starts from the checkpoint's config.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

FORMAT = "xltop-ttt-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read whole; the message names the file."""


@dataclass
class Checkpoint:
    arrays: dict[str, Any]  # mx.array  # "model.*", "optimizer.*", "cache.<block>.<i>"
    config: dict[str, Any]
    step: int
    tokens: int
    stream_position: int
    conversation: int
    cache_offsets: list[int]

    def group(self, prefix: str) -> dict[str, Any]:
        """The arrays under `prefix.` with the prefix removed."""
        cut = len(prefix) + 1
        return {k[cut:]: v for k, v in self.arrays.items() if k.startswith(prefix + ".")}


def _digest(arrays: dict[str, Any]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        value = np.asarray(arrays[name])
        digest.update(f"{name}:{value.dtype}:{value.shape};".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def save(path: str, checkpoint: Checkpoint) -> str:
    """Write atomically; returns the absolute path."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create {folder}: {exc.strerror}") from None
    mx.eval(list(checkpoint.arrays.values()))
    metadata = {
        "format": FORMAT,
        "config": json.dumps(checkpoint.config),
        "step": str(checkpoint.step),
        "tokens": str(checkpoint.tokens),
        "stream_position": str(checkpoint.stream_position),
        "conversation": str(checkpoint.conversation),
        "cache_offsets": json.dumps(checkpoint.cache_offsets),
        "sha256": _digest(checkpoint.arrays),
    }
    temp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp.safetensors")
    try:
        mx.save_safetensors(temp, checkpoint.arrays, metadata=metadata)
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise CheckpointError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from None
    return path


def load(path: str) -> Checkpoint:
    """Read and verify a checkpoint; CheckpointError if it is missing, truncated or altered."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        arrays, metadata = mx.load(path, format="safetensors", return_metadata=True)
    except Exception as exc:  # MLX raises RuntimeError/ValueError for a broken file
        raise CheckpointError(
            f"checkpoint {path} is truncated or not a safetensors file ({exc})"
        ) from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not an xltop TTT checkpoint")
    if _digest(arrays) != metadata.get("sha256"):
        raise CheckpointError(f"checkpoint {path} is corrupted: its tensors fail the checksum")
    try:
        return Checkpoint(
            arrays=arrays,
            config=json.loads(metadata["config"]),
            step=int(metadata["step"]),
            tokens=int(metadata["tokens"]),
            stream_position=int(metadata["stream_position"]),
            conversation=int(metadata["conversation"]),
            cache_offsets=[int(o) for o in json.loads(metadata["cache_offsets"])],
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} has bad metadata ({exc})") from None
