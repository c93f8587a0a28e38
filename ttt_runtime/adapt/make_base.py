"""`python -m ttt_runtime.adapt.make_base OUT.safetensors` (`make base`): train a base worth
adapting, reproducibly. The model of `--preset` (default: the default TTT-Linear byte model)
is trained for `--steps` steps on the `code` corpus (ttt_runtime.corpora: the standard
library's Python sources, nothing downloaded), then the statistics ttt++ needs are taken over
the chunks that follow, and one train checkpoint is written: resume it in adapt mode
(`xltop --mode adapt --resume OUT --data my_text/`). It prints the time, the steps, the final
bits per byte (training and held-out code) and the machine.
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ttt_runtime import checkpoint as ckpt
from ttt_runtime.adapt.ttt_plus import feature_statistics
from ttt_runtime.config import ConfigError, RunConfig, _Parser
from ttt_runtime.corpora import CorpusStream
from ttt_runtime.learners import TrainLearner
from ttt_runtime.model import TTTModel
from ttt_runtime.steps import LN2, fresh_cache_loss

STATS_CHUNKS = 64  # training chunks the feature statistics are taken over
FINAL_STEPS = 100  # the final training bpb: the mean of the last this many steps
HELD_OUT_CHUNKS = 32  # chunks of code-heldout the held-out bpb is the mean of


@dataclass
class BaseReport:
    path: str
    steps: int
    seconds: float
    train_bpb: float  # the mean over the last FINAL_STEPS steps
    held_out_bpb: float  # code-heldout, from fresh fast weights per chunk

    def describe(self) -> str:
        machine = f"{platform.machine()} {platform.system()}, {mx.default_device()}"
        return (
            f"base {self.path}: {self.steps} steps in {self.seconds:.0f} s on {machine}; "
            f"final bpb {self.train_bpb:.3f} (training code), {self.held_out_bpb:.3f} "
            "(held-out code)"
        )


def _batches(stream: CorpusStream, count: int) -> list[tuple[mx.array, mx.array]]:
    batches = []
    for _ in range(count):
        inputs, targets = next(stream)
        batches.append((mx.array(inputs), mx.array(targets)))
    return batches


def train_base(config: RunConfig, steps: int, path: str) -> BaseReport:
    """Train `config`'s model on the code corpus for `steps` steps and save it with its
    feature statistics at `path` (CheckpointError if it cannot be written)."""
    mx.random.seed(config.seed)
    model = TTTModel(config.model_config())
    learner = TrainLearner(model, config)
    stream = CorpusStream("code", config.seq_len, config.batch_size)
    start = time.perf_counter()
    losses = []
    for _ in range(steps):
        (batch,) = _batches(stream, 1)
        losses.append(learner.step(*batch, sampled=False).loss.item())
    seconds = time.perf_counter() - start
    stats = feature_statistics(model, _batches(stream, STATS_CHUNKS))
    held_out = CorpusStream("code-heldout", config.seq_len, config.batch_size)
    held_out_loss = [
        fresh_cache_loss(model, *b).item() for b in _batches(held_out, HELD_OUT_CHUNKS)
    ]
    state = learner.state()
    arrays = {**state.arrays, **{f"stats.{k}": v for k, v in stats.items()}}
    saved = ckpt.save(path, ckpt.Checkpoint(
        arrays=arrays, config=config.as_dict(), step=steps, tokens=steps * config.batch_size *
        config.seq_len, stream_position=0, conversation=0, cache_offsets=[],
    ))  # fmt: skip
    return BaseReport(
        saved,
        steps,
        seconds,
        float(np.mean(losses[-FINAL_STEPS:])) / LN2 if losses else float("nan"),
        float(np.mean(held_out_loss)) / LN2,
    )


def main(argv: list[str] | None = None) -> int:
    # config's parser: a usage error is a ConfigError, one line, like every other
    parser = _Parser(prog="make_base", description=__doc__.splitlines()[0])
    parser.add_argument("out", metavar="OUT.safetensors")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    try:
        args = parser.parse_args(argv)
        if args.steps < 1:
            raise ConfigError(f"--steps {args.steps}: must be at least 1")
        config = RunConfig.from_preset(args.preset).with_overrides(mode="train", seed=args.seed)
        ckpt.check_writable(args.out)  # before the training, not after it
        report = train_base(config, args.steps, args.out)
    except (ConfigError, ckpt.CheckpointError) as exc:
        print(f"make_base: error: {exc}", file=sys.stderr)
        return 2
    print(report.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
