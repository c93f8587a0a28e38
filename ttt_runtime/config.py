"""The run's configuration: a validated dataclass filled from a preset, a TOML file and flags.

Precedence, lowest first: the preset (`--preset`, else the TOML file's `preset`, else
`default`), then the TOML file, then command-line flags. Every field has a flag of its own name
(`--seq-len 64`). Bad values raise ConfigError with one line naming the field and what is
allowed. No MLX here: xltop imports this module to check a run's flags before starting it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import stat
import struct
import sys
from dataclasses import dataclass, fields
from typing import Any

from ttt_runtime.stream import StreamError, check_data

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

MODES = ("train", "adapt")
LAYER_TYPES = ("linear", "mlp")


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the field."""


CONFIG_MAX_BYTES = 1 << 20  # a settings file is a few lines; /dev/zero would never end
_INT_MAX = 2**31 - 1  # MLX shapes are 32-bit; no count needs more
# (smallest, largest) value of each integer field
_INT_RANGES = {
    "num_blocks": (1, _INT_MAX),
    "hidden_size": (2, _INT_MAX),
    "num_heads": (1, _INT_MAX),
    "mini_batch_size": (1, _INT_MAX),
    "intermediate_size": (1, _INT_MAX),
    "seq_len": (1, _INT_MAX),
    "batch_size": (1, _INT_MAX),
    "seed": (0, 2**32 - 1),  # a larger seed was a TypeError inside mx.random.seed
    "sample_every": (0, _INT_MAX),
    "max_steps": (0, _INT_MAX),
}
_FILE_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def check_regular_file(path: str, label: str) -> None:
    """ConfigError unless `path` is a regular file (or a link to one), found by stat without
    opening it: opening a FIFO blocks until someone writes, and a device may never end."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ConfigError(f"{label} {path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{label} {path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = next((name for is_kind, name in _FILE_KINDS if is_kind(mode)), "special")
        raise ConfigError(f"{label} {path} is {kind}, not a regular file")


def _read_settings_file(path: str) -> bytes:
    check_regular_file(path, "config")
    try:
        # O_NONBLOCK: a FIFO put in the file's place since the check cannot block either
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            data = f.read(CONFIG_MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"config {path}: {exc.strerror}") from None
    if len(data) > CONFIG_MAX_BYTES:
        raise ConfigError(
            f"config {path} is over {CONFIG_MAX_BYTES >> 20} MiB: not a settings file"
        )
    return data


@dataclass(frozen=True)
class RunConfig:
    mode: str = "train"  # train: outer loop learns; adapt: outer weights frozen
    preset: str = "default"
    layer_type: str = "linear"  # TTT-Linear or TTT-MLP
    num_blocks: int = 4
    hidden_size: int = 256
    num_heads: int = 4
    mini_batch_size: int = 16
    intermediate_size: int = 512
    ttt_base_lr: float = 1.0  # inner learning rate scale
    use_gate: bool = False
    seq_len: int = 64  # bytes per row per step
    batch_size: int = 2
    lr: float = 3e-3  # outer (AdamW) learning rate
    weight_decay: float = 0.0
    data: str | None = None  # None: the embedded standard-library text
    seed: int = 0
    sample_every: int = 20  # per-block timing and layer stats on step 1 and every N (0: never)
    exact_accumulate: bool = False  # adapt mode: exact fast-weight sums (SWAR accumulator)
    checkpoint_dir: str = "checkpoints"
    max_steps: int = 0  # 0: run until stopped
    start_paused: bool = False  # wait for a `resume` command before the first step
    compile: bool = True  # mx.compile the unsampled steps

    @classmethod
    def from_preset(cls, name: str) -> RunConfig:
        if name not in PRESETS:
            raise ConfigError(f"preset={name!r}: must be one of {', '.join(PRESETS)}")
        return cls(preset=name, **PRESETS[name]).validate()

    @classmethod
    def from_toml(cls, path: str, preset: str | None = None) -> RunConfig:
        """The file's preset (or `preset`, which wins) overlaid with the file's other keys."""
        data = _read_settings_file(path)
        try:
            table = tomllib.loads(data.decode())
        # TOMLDecodeError, not UTF-8, an integer over int()'s digit limit, or nested too deep
        except (ValueError, RecursionError) as exc:
            raise ConfigError(f"config {path}: not valid TOML ({exc})") from None
        base = cls.from_preset(preset or str(table.pop("preset", "default")))
        table.pop("preset", None)
        return base.with_overrides(**table)

    # self positional-only: a setting named "self" (in a file) is unknown, not a TypeError
    def with_overrides(self, /, **values: Any) -> RunConfig:
        known = {f.name for f in fields(self)}
        for name in values:
            if name not in known:
                raise ConfigError(f"unknown setting {name!r}; known: {', '.join(sorted(known))}")
        return dataclasses.replace(self, **values).validate()

    def validate(self) -> RunConfig:
        for f in fields(self):
            value = getattr(self, f.name)
            _check_type(f.name, value, f.type)
            if f.type == "int":
                low, high = _INT_RANGES[f.name]  # every integer field has its range
                if not low <= value <= high:
                    raise ConfigError(
                        f"{f.name}={value!r}: must be an integer from {low} to {high}"
                    )
        _choice("mode", self.mode, MODES)
        _choice("layer_type", self.layer_type, LAYER_TYPES)
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"num_heads={self.num_heads}: must divide hidden_size={self.hidden_size}"
            )
        if (self.hidden_size // self.num_heads) % 2:
            raise ConfigError(
                f"hidden_size={self.hidden_size}: hidden_size/num_heads must be even (RoPE pairs)"
            )
        for name in ("ttt_base_lr", "lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name}={value!r}: must be a positive finite number")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay={self.weight_decay!r}: must be a finite number >= 0")
        if self.exact_accumulate and self.mode != "adapt":
            raise ConfigError("exact_accumulate=true: only in mode 'adapt' (fast weights persist)")
        return self

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Presets override the dataclass defaults (which are the `default` preset: what `xltop` runs).
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # very small and fast, for tests: a step takes a few milliseconds
    "tiny": dict(
        num_blocks=2,
        hidden_size=32,
        num_heads=2,
        mini_batch_size=8,
        intermediate_size=64,
        seq_len=32,
        batch_size=1,
        sample_every=5,
    ),
    "mlp": dict(layer_type="mlp", hidden_size=128, num_heads=4),
    "adapt": dict(mode="adapt", batch_size=1, seq_len=128),
}


_TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _check_type(name: str, value: Any, annotation: str) -> None:
    optional = annotation.endswith("| None")
    kind = annotation.split("|")[0].strip()
    if value is None and optional:
        return
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
    }[kind]
    if not ok:
        raise ConfigError(f"{name}={value!r}: must be {_TYPE_NAMES[kind]}")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r}: must be one of {', '.join(allowed)}")


# -- command line --------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, raised, never sys.exit from a library
        raise ConfigError(message)


def _parse_value(name: str, annotation: str, text: str) -> Any:
    kind = annotation.split("|")[0].strip()
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r}: must be {_TYPE_NAMES[kind]}") from None
    if kind == "bool":
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"{name}={text!r}: must be true or false")
        return lowered in ("true", "1", "yes")
    return text


def run_arg_parser() -> argparse.ArgumentParser:
    """`ttt-run run` flags: --socket, --config, --resume and one flag per RunConfig field."""
    parser = _Parser(prog="ttt-run run", description="a TTT run that streams telemetry")
    parser.add_argument("--socket", metavar="PATH", help="Unix socket for monitors")
    parser.add_argument("--config", metavar="FILE.toml", help="settings file")
    parser.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint")
    parser.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="stop when stdin closes (the process that started the run is gone)",
    )
    parser.add_argument(
        "--remove-socket-dir",
        action="store_true",
        help="remove the socket's folder when the run exits (it was made for this run)",
    )
    for f in fields(RunConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, metavar="VALUE")
    return parser


def config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None) -> RunConfig:
    """Preset (or `base`, a resumed checkpoint's config, when neither --preset nor --config is
    given), then TOML file, then flags; validated."""
    overrides = {
        f.name: _parse_value(f.name, f.type, getattr(args, f.name))
        for f in fields(RunConfig)
        if getattr(args, f.name) is not None and f.name != "preset"
    }
    if args.config:
        config = RunConfig.from_toml(args.config, preset=args.preset)
    elif base is not None and not args.preset:
        config = RunConfig().with_overrides(**base)
    else:
        config = RunConfig.from_preset(args.preset or "default")
    return config.with_overrides(**overrides)


def parse_run_args(argv: list[str]) -> tuple[argparse.Namespace, RunConfig]:
    """Parse `ttt-run run` flags; ConfigError (one line) for anything wrong."""
    args = run_arg_parser().parse_args(argv)
    if args.resume:
        check_regular_file(args.resume, "checkpoint")
    base = checkpoint_config(args.resume) if args.resume else None
    config = config_from_args(args, base)
    if config.data is not None:
        try:
            check_data(config.data)  # before MLX is imported or anything is built
        except StreamError as exc:
            raise ConfigError(str(exc)) from None
    return args, config


CHECKPOINT_FORMAT = "xltop-ttt-checkpoint/2"
CHECKPOINT_COUNTS = ("step", "tokens", "stream_position", "conversation")


def checkpoint_config(path: str) -> dict[str, Any]:
    """The run config in a checkpoint's header (safetensors: u64 length, JSON), without MLX,
    after every metadata field is checked (checkpoint_metadata). The checksum over tensors and
    metadata is verified when the run loads the file (ttt_runtime.checkpoint.load), before
    its first step: checking it here would read every tensor twice."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(min(length, 1 << 26)))
        metadata = header["__metadata__"]
    except FileNotFoundError:
        raise ConfigError(f"checkpoint {path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"checkpoint {path}: {exc.strerror}") from None
    except (struct.error, ValueError, KeyError, TypeError, RecursionError):
        raise ConfigError(f"checkpoint {path} is truncated or not a checkpoint") from None
    return checkpoint_metadata(path, metadata)["config"]


def checkpoint_metadata(path: str, metadata: Any) -> dict[str, Any]:
    """A checkpoint's metadata (safetensors keeps strings) as values: `config` a dict that
    RunConfig accepts, the CHECKPOINT_COUNTS non-negative integers, `cache_offsets` a list of
    them. ConfigError with one line naming the file and the field for anything else."""
    found = metadata.get("format") if isinstance(metadata, dict) else None
    if found != CHECKPOINT_FORMAT:
        if isinstance(found, str) and found.startswith("xltop-ttt-checkpoint/"):
            raise ConfigError(f"checkpoint {path} has format {found}; this version reads only "
                              f"{CHECKPOINT_FORMAT}")  # fmt: skip
        raise ConfigError(f"checkpoint {path} is not an xltop TTT checkpoint")
    config = _metadata_json(path, metadata, "config")
    if not isinstance(config, dict):
        raise ConfigError(f"checkpoint {path}: config must be a JSON object")
    try:
        RunConfig().with_overrides(**config)
    except ConfigError as exc:
        raise ConfigError(f"checkpoint {path}: config {exc}") from None
    counts = {}
    for name in CHECKPOINT_COUNTS:
        text = metadata.get(name)
        # up to 20 digits: any count fits in 64 bits, and int() of thousands of digits raises
        if not (isinstance(text, str) and re.fullmatch("[0-9]{1,20}", text)):
            raise ConfigError(f"checkpoint {path}: {name}={text!r:.40}: must be an integer >= 0")
        counts[name] = int(text)
    offsets = _metadata_json(path, metadata, "cache_offsets")
    if not (isinstance(offsets, list) and all(
        isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets
    )):  # fmt: skip
        raise ConfigError(f"checkpoint {path}: cache_offsets must be a list of integers >= 0")
    return {"config": config, **counts, "cache_offsets": offsets}


def _metadata_json(path: str, metadata: dict[str, Any], name: str) -> Any:
    try:
        return json.loads(metadata[name])
    except (KeyError, TypeError, ValueError, RecursionError):
        raise ConfigError(f"checkpoint {path}: {name} is missing or not JSON") from None
