"""Every configuration, validated on construction: a TTT layer's (TTTLayerConfig), the model's
(ModelConfig, which holds its layers' config) and a run's (RunConfig: flat, one flag per setting).

Each setting has one rule, by name, whichever configuration holds it (`check_fields`: the type
from the annotation, the range from INT_RANGES); RunConfig checks the rules between model
settings by building its ModelConfig. A run's settings come from a preset, a TOML file and
flags; precedence, lowest first: the preset (`--preset`, else the TOML file's `preset`, else
`default`), then the TOML file, then command-line flags (`--seq-len 64`). Bad values raise
ConfigError with one line naming the field and what is allowed. No MLX here: xltop imports this
module to check a run's flags before starting it, and the layers and model import their configs.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import re
import stat
import struct
import sys
from dataclasses import dataclass, fields
from types import UnionType
from typing import Any, Literal, NoReturn, Union, get_args, get_origin, get_type_hints

from ttt_runtime.files import NotARegularFile, read_bounded
from ttt_runtime.stream import StreamError, check_data

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

Mode = Literal["train", "adapt"]  # train: outer loop learns; adapt: outer weights frozen
LayerType = Literal["linear", "mlp"]  # TTT-Linear or TTT-MLP
# adapt mode's test-time methods (ttt_runtime/adapt, docs/adaptation.md)
AdaptMethod = Literal["ttt", "reset", "dynamic", "lora", "tent", "ttt++"]
LoraInit = Literal["random", "qr", "svd"]  # the adapters' start: random, or the weight's own


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the field."""


CONFIG_MAX_BYTES = 1 << 20  # a settings file is a few lines; /dev/zero would never end
INT_MAX = 2**31 - 1  # MLX shapes are 32-bit; no count needs more
# a path's most (Linux's PATH_MAX); the run's hello, which holds them, must fit a channel line
MAX_STRING = 4096

# The rule of each setting, by name: a name means the same in every configuration that has it.
# The type is the field's annotation; an integer is also in its range (smallest, largest),
INT_RANGES = {
    "hidden_size": (2, INT_MAX),
    "num_heads": (1, INT_MAX),
    "mini_batch_size": (1, INT_MAX),
    "mlp_expansion": (1, INT_MAX),
    "vocab_size": (1, INT_MAX),
    "num_blocks": (1, INT_MAX),
    "intermediate_size": (1, INT_MAX),
    "seq_len": (1, INT_MAX),
    "batch_size": (1, INT_MAX),
    "seed": (0, 2**32 - 1),  # a larger seed was a TypeError inside mx.random.seed
    "sample_every": (0, INT_MAX),
    "max_steps": (0, INT_MAX),
    "stages": (1, 64),
    "replicas": (1, 64),
    "micro_batches": (0, 1024),
    "checkpoint_every": (1, INT_MAX),
    "max_restarts": (0, 100),
    "adapt_steps": (1, 100),  # gradient steps per chunk: each is a forward and a backward
    "lora_rank": (1, INT_MAX),
}
# and a number (float) is finite and above 0, or at least 0 where named here.
ZERO_ALLOWED = {"weight_decay"}


_FIELD_TYPES: dict[type, dict[str, Any]] = {}


def field_types(config_class: type) -> dict[str, Any]:
    """Each field's annotation as a type: int, float, bool, str, `str | None`, a Literal, a
    configuration (evaluated once per class: it is most of a check's time)."""
    if config_class not in _FIELD_TYPES:
        _FIELD_TYPES[config_class] = get_type_hints(config_class)
    return _FIELD_TYPES[config_class]


def check_fields(config: object) -> None:
    """ConfigError naming the first field of a config dataclass that breaks its setting's rule."""
    for name, kind in field_types(type(config)).items():
        value = getattr(config, name)
        if get_origin(kind) in (Union, UnionType):  # `str | None`: None, or what str allows
            if value is None:
                continue
            (kind,) = (arg for arg in get_args(kind) if arg is not type(None))
        allowed, must = _rule(name, kind, value)
        if not allowed:
            # a string may be a whole file's worth: its start names it well enough
            shown = (
                repr(value[:40] + "...")
                if isinstance(value, str) and len(value) > 60
                else repr(value)
            )
            raise ConfigError(f"{name}={shown}: must be {must}")


def _rule(name: str, kind: Any, value: Any) -> tuple[bool, str]:
    """Whether `value` keeps the rule of setting `name` of type `kind`, and what the rule asks."""
    if get_origin(kind) is Literal:
        return value in get_args(kind), "one of " + ", ".join(get_args(kind))
    if kind is int:
        low, high = INT_RANGES[name]  # every integer setting has its range
        integer = isinstance(value, int) and not isinstance(value, bool)  # True is not 1 head
        return integer and low <= value <= high, f"an integer from {low} to {high}"
    if kind is float:
        zero_ok = name in ZERO_ALLOWED
        must = "a finite number >= 0" if zero_ok else "a positive finite number"
        return _finite_number(value, zero_ok), must
    if kind is str:  # an empty path or name is a mistake: data '' would stream the cwd
        fits = isinstance(value, str) and 0 < len(value.encode(errors="replace")) <= MAX_STRING
        return fits, f"a non-empty string of at most {MAX_STRING} bytes"
    if kind is bool:
        return isinstance(value, bool), "true or false"
    return isinstance(value, kind), f"a {kind.__name__}"  # a nested configuration


def _finite_number(value: Any, zero_ok: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        number = float(value)  # an integer beyond a float's range overflows
    except OverflowError:
        return False
    return math.isfinite(number) and (number >= 0 if zero_ok else number > 0)


def _settings_for(config_class: type, source: Any) -> dict[str, Any]:
    """The fields of `config_class` that `source` (a config dataclass) has, with its values."""
    have = {f.name for f in fields(source)}
    return {f.name: getattr(source, f.name) for f in fields(config_class) if f.name in have}


@dataclass(frozen=True)
class TTTLayerConfig:
    """Sizes and inner-loop settings of a TTT-Linear or TTT-MLP layer (see docs/ttt-maths.md).

    `compile` only chooses how the mini-batch scan runs (mx.compile or plain ops), never the maths.
    """

    hidden_size: int
    num_heads: int
    mini_batch_size: int = 16
    ttt_base_lr: float = 1.0  # inner learning rate scale
    use_gate: bool = False
    rope_theta: float = 10000.0
    mlp_expansion: int = 4  # TTT-MLP's hidden width, in multiples of the head dim
    compile: bool = True

    def __post_init__(self) -> None:
        check_fields(self)
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"num_heads={self.num_heads}: must divide hidden_size={self.hidden_size}"
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"hidden_size={self.hidden_size}: hidden_size/num_heads={self.head_dim} is odd; "
                "RoPE rotates pairs, so it must be even"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class ModelConfig:
    """A TTTModel: byte embedding, `num_blocks` blocks (a `layer_type` TTT layer sized by `layer`,
    then a SwiGLU of `intermediate_size`), norm and head."""

    layer: TTTLayerConfig
    layer_type: LayerType = "linear"
    num_blocks: int = 2
    intermediate_size: int = 512
    vocab_size: int = 256
    rms_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        check_fields(self)

    def parameter_count(self) -> int:
        """How many numbers the model's weights hold (model.py's layout; a test counts the real
        model's): per block the TTT layer and a SwiGLU, then the embedding, norm and head."""
        layer = self.layer
        d, f, wide = layer.hidden_size, layer.head_dim, layer.mlp_expansion
        # the fast weights' initial values, [W; b] per map: W1 (f, f) or W1 (f, wide f), W2 back
        fast = d * f + d if self.layer_type == "linear" else 2 * wide * d * f + (wide + 1) * d
        projections = (5 if layer.use_gate else 4) * d * d  # q, k, v, o (and the gate)
        # the inner learning rate's weights and bias, token factors, inner and post norms
        small = layer.num_heads * (d + 1) + layer.mini_batch_size + 4 * d
        block = projections + small + fast + 3 * d * self.intermediate_size + 2 * d
        return self.num_blocks * block + 2 * self.vocab_size * d + d


@dataclass(frozen=True)
class RunConfig:
    """A run's settings, flat (one flag or TOML key each): the model's under their own names,
    and the run's. Validated on construction; `model_config()` is the model they describe."""

    mode: Mode = "train"
    preset: str = "default"
    layer_type: LayerType = "linear"
    num_blocks: int = 4
    hidden_size: int = 256
    num_heads: int = 4
    mini_batch_size: int = 16
    intermediate_size: int = 512
    ttt_base_lr: float = 1.0
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
    adapt_method: AdaptMethod = "ttt"  # adapt mode: how the model learns from the stream
    adapt_lr: float = 1e-3  # Adam's, for the methods' steps (bench_adapt: 1e-3 beat 1e-4)
    adapt_steps: int = 1  # gradient steps on each chunk, after it is scored
    lora_rank: int = 4  # lora: the adapters' rank
    lora_init: LoraInit = "svd"  # lora: random A and zero B, or A from the weight's QR or SVD

    def __post_init__(self) -> None:
        check_fields(self)
        # the rules between model settings (num_heads divides hidden_size), and its size
        model = self.model_config()
        if self.exact_accumulate and self.mode != "adapt":
            raise ConfigError("exact_accumulate=true: only in mode 'adapt' (fast weights persist)")
        if self.adapt_method != "ttt" and self.mode != "adapt":
            raise ConfigError(f"adapt_method={self.adapt_method!r}: only in mode 'adapt'")
        if self.exact_accumulate and self.adapt_method == "reset":
            raise ConfigError("exact_accumulate=true: not with adapt_method 'reset' (fast weights "
                              "do not persist)")  # fmt: skip
        if self.lora_rank > self.hidden_size:
            raise ConfigError(f"lora_rank={self.lora_rank}: must be at most "
                              f"hidden_size={self.hidden_size}")  # fmt: skip
        self._check_fits_in_memory(model)

    def _check_fits_in_memory(self, model: ModelConfig) -> None:
        """A model whose float32 weights alone outgrow this machine's memory (a typo such as
        hidden_size=1000000) would end the run in MLX's allocator, as a segfault."""
        weights = 4 * model.parameter_count()
        memory = physical_memory()
        if memory is not None and weights > memory:
            raise ConfigError(
                f"hidden_size={self.hidden_size}, num_blocks={self.num_blocks}, "
                f"intermediate_size={self.intermediate_size}: the model's weights alone are "
                f"{weights / 2**30:,.1f} GiB, more than this machine's {memory / 2**30:,.1f} GiB"
            )

    def model_config(self) -> ModelConfig:
        """The model of these settings, taken by name. With `compile`, a train step is one
        mx.compile around the whole step (steps.make_train_step), which beats compiling each
        layer's scan inside it: the layers compile their own scans only in adapt mode."""
        layer_compile = self.compile and self.mode != "train"
        layer = TTTLayerConfig(**{**_settings_for(TTTLayerConfig, self), "compile": layer_compile})
        return ModelConfig(layer=layer, **_settings_for(ModelConfig, self))

    @classmethod
    def from_preset(cls, name: str) -> RunConfig:
        if name not in PRESETS:
            raise ConfigError(f"preset={name!r}: must be one of {', '.join(PRESETS)}")
        return cls(preset=name, **PRESETS[name])

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
                close = difflib.get_close_matches(str(name), known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else " (ttt-run --help lists them)"
                raise ConfigError(f"unknown setting {str(name)[:60]!r}{hint}")
        return dataclasses.replace(self, **values)

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
    # the base `make base` trains to adapt (ttt_runtime/adapt/make_base.py): TTT-Linear, small
    # enough to train on a CPU (800 steps took 19 minutes on a loaded 2-core machine)
    "base": dict(
        num_blocks=2,
        hidden_size=64,
        num_heads=4,
        intermediate_size=256,
        seq_len=128,
        batch_size=4,
    ),
}


GradCompression = Literal["none", "u8", "u16"]  # replicas' gradients on the wire
GradAverage = Literal["exact", "swar"]  # how replicas average them (see RayConfig)


@dataclass(frozen=True)
class RayConfig:
    """Where a run's model runs when it is spread over Ray actors (ttt_runtime.ray_workers):
    placement, not maths, so it is not part of RunConfig nor of a checkpoint, which any
    placement can resume. `check(run)` states the rules between the two."""

    address: str  # "local" (a private cluster on 127.0.0.1) or a cluster's GCS host:port
    stages: int = 2  # pipeline stages, each a contiguous run of blocks
    replicas: int = 1  # data-parallel copies of each stage, each on batch_size/replicas rows
    # train: micro-batches per step; adapt: pieces of each chunk; 0: 2 where there is room
    micro_batches: int = 0
    grad_compression: GradCompression = "u16"
    # exact: dequantize and sum exactly (ExactAccumulator); swar: average the packed words
    # pairwise (avg_u8_round/avg_u16_round) after quantizing to the replicas' shared range
    grad_average: GradAverage = "exact"
    checkpoint_every: int = 10  # steps between the in-memory checkpoints restarts go back to
    # each of them also saved as <checkpoint_dir>/safe-step-N.safetensors (the last one kept)
    checkpoint_to_disk: bool = False
    max_restarts: int = 3  # per actor; then the run stops with an error
    dashboard: bool = False  # a "local" cluster also serves Ray's dashboard (xltop's Ray panel)

    def __post_init__(self) -> None:
        check_fields(self)
        host, _, port = self.address.rpartition(":")
        if self.address != "local" and not (host and port.isdigit() and 0 < int(port) < 65536):
            raise ConfigError(f"ray={self.address!r:.60}: must be 'local' or a cluster's "
                              "host:port")  # fmt: skip
        if self.grad_average == "swar" and self.grad_compression == "none":
            raise ConfigError("grad_average='swar': needs grad_compression 'u8' or 'u16'")
        if self.grad_average == "swar" and self.replicas & (self.replicas - 1):
            raise ConfigError(f"grad_average='swar': replicas={self.replicas} must be a power "
                              "of 2 (the words are averaged in pairs)")  # fmt: skip

    def check(self, run: RunConfig) -> None:
        """ConfigError unless `run`'s model and batch can be placed this way."""
        if run.adapt_method != "ttt":  # the methods learn in the run's process (ttt_runtime.adapt)
            raise ConfigError(f"adapt_method={run.adapt_method!r}: a run spread over Ray actors "
                              "adapts with 'ttt' only")  # fmt: skip
        if self.stages > run.num_blocks:
            raise ConfigError(f"stages={self.stages}: at most num_blocks={run.num_blocks} "
                              "(each stage owns at least one block)")  # fmt: skip
        if run.batch_size % self.replicas:
            raise ConfigError(f"replicas={self.replicas}: must divide batch_size="
                              f"{run.batch_size} (each replica takes as many rows)")  # fmt: skip
        rows, split = self._room(run)
        if self.micro_batches > rows:
            raise ConfigError(f"micro_batches={self.micro_batches}: at most the {split} "
                              f"({rows})")  # fmt: skip

    def _room(self, run: RunConfig) -> tuple[int, str]:
        """How many micro-batches `run` has room for, and what bounds it."""
        if run.mode == "adapt":  # adapt splits each chunk along time, in order
            return run.seq_len, "seq_len"
        return run.batch_size // self.replicas, "rows per replica"

    def micro_count(self, run: RunConfig) -> int:
        return self.micro_batches or min(2, self._room(run)[0])


# -- settings files ------------------------------------------------------------------------------


_FILE_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def physical_memory() -> int | None:
    """This machine's memory in bytes (Linux and macOS), None where the system does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


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
        raise _not_regular(path, label, mode)


def _not_regular(path: str, label: str, mode: int) -> ConfigError:
    kind = next((name for is_kind, name in _FILE_KINDS if is_kind(mode)), "special")
    return ConfigError(f"{label} {path} is {kind}, not a regular file")


def _read_settings_file(path: str) -> bytes:
    check_regular_file(path, "config")
    try:  # a FIFO put in the file's place since the check cannot block it either
        data = read_bounded(path, CONFIG_MAX_BYTES)
    except NotARegularFile as exc:
        raise _not_regular(path, "config", exc.mode) from None
    except OSError as exc:
        raise ConfigError(f"config {path}: {exc.strerror}") from None
    if len(data) > CONFIG_MAX_BYTES:
        raise ConfigError(
            f"config {path} is over {CONFIG_MAX_BYTES >> 20} MiB: not a settings file"
        )
    return data


# -- command line --------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, raised, never sys.exit from a library
        raise ConfigError(message)


_FLAG_TRUE, _FLAG_FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _parse_flag(name: str, text: str) -> Any:
    """A flag's text as its field's type; text that is not one is left for that field's check
    to refuse, with the field's one message."""
    return _parse_value(field_types(RunConfig)[name], text)


def _parse_value(kind: Any, text: str) -> Any:
    try:
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        return text
    if kind is bool and text.lower() in _FLAG_TRUE + _FLAG_FALSE:
        return text.lower() in _FLAG_TRUE
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
    parser.add_argument(
        "--no-blas-preload",
        action="store_true",
        help="run on MLX's bundled BLAS (do not re-execute with OpenBLAS preloaded)",
    )
    for f in fields(RunConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, metavar="VALUE")
    ray = parser.add_argument_group("a run spread over Ray actors (needs --ray)")
    ray.add_argument("--ray", metavar="ADDRESS", help="'local', or a cluster's host:port")
    for f in fields(RayConfig):
        if f.name != "address":
            ray.add_argument("--" + f.name.replace("_", "-"), dest=f.name, metavar="VALUE")
    return parser


def placement_from_args(args: argparse.Namespace, run: RunConfig) -> RayConfig | None:
    """The Ray placement the flags ask for (None: a one-process run), checked against `run`."""
    given = {
        f.name: _parse_value(field_types(RayConfig)[f.name], value)
        for f in fields(RayConfig)
        if f.name != "address" and (value := getattr(args, f.name)) is not None
    }
    if args.ray is None:
        if given:
            raise ConfigError(f"--{next(iter(given)).replace('_', '-')}: needs --ray")
        return None
    placement = RayConfig(address=args.ray, **given)
    placement.check(run)
    return placement


def config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None) -> RunConfig:
    """Preset (or `base`, a resumed checkpoint's config, when neither --preset nor --config is
    given), then TOML file, then flags; validated."""
    overrides = {
        f.name: _parse_flag(f.name, getattr(args, f.name))
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
    for name, value in vars(args).items():
        if value == "":  # `--data ''` would stream the current folder, `--config ''` be ignored
            raise ConfigError(f"--{name.replace('_', '-')}: empty value")
    if args.resume:
        check_regular_file(args.resume, "checkpoint")
    base = checkpoint_config(args.resume) if args.resume else None
    config = config_from_args(args, base)
    if args.resume and base is not None:
        _check_same_shapes(args.resume, RunConfig().with_overrides(**base), config)
    if config.data is not None:
        try:
            check_data(config.data)  # before MLX is imported or anything is built
        except StreamError as exc:
            raise ConfigError(str(exc)) from None
    return args, config


# The settings that shape a checkpoint's arrays: a resumed run cannot change them. An adapt
# run's caches are also shaped by batch_size (one fast weight per row).
SHAPE_SETTINGS = (
    "layer_type", "num_blocks", "hidden_size", "num_heads", "mini_batch_size",
    "intermediate_size", "use_gate",
)  # fmt: skip


def _check_same_shapes(path: str, saved: RunConfig, config: RunConfig) -> None:
    """ConfigError naming the first setting by which `config` would need other arrays than
    those the checkpoint at `path` (saved with `saved`) holds."""
    caches = saved.mode == config.mode == "adapt"
    for name in SHAPE_SETTINGS + (("batch_size",) if caches else ()):
        before, after = getattr(saved, name), getattr(config, name)
        if before != after:
            raise ConfigError(
                f"checkpoint {path} was saved with {name}={before!r}; {name}={after!r} needs "
                "arrays of other shapes (resume with its settings, or start a new run)"
            )


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
