"""adapt_method 'ttt++': next-byte loss plus feature alignment with the base's training
statistics, which must be in the checkpoint."""

from __future__ import annotations

import subprocess
import sys

import pytest
from adapt_helpers import adapt_config, chunks, learner

from ttt_runtime import checkpoint as ckpt
from ttt_runtime.adapt import MethodUnavailable
from ttt_runtime.adapt.ttt_plus import feature_statistics
from ttt_runtime.steps import next_byte_loss


def test_its_objective_is_the_next_byte_loss_when_the_features_match_training(small_base):
    adapter = learner(small_base, "ttt++")
    (chunk,) = chunks("prose", 1)
    method = adapter.method
    features = adapter.model.features(chunk[0], adapter.model.make_cache(1))
    logits = adapter.model.head(features)
    nll = next_byte_loss(logits, chunk[1]).item()
    assert method.objective(features, logits, chunk[1]).item() > nll  # prose is not code
    own = feature_statistics(adapter.model, [chunk])
    method.train_mean, method.train_cov = own["feature_mean"], own["feature_cov"]
    assert method.objective(features, logits, chunk[1]).item() == pytest.approx(nll, abs=1e-6)


def test_a_base_without_training_statistics_is_refused_naming_them(small_base, tmp_path):
    base = ckpt.load(small_base)
    without = {k: v for k, v in base.arrays.items() if not k.startswith("stats.")}
    path = ckpt.save(str(tmp_path / "plain.safetensors"), ckpt.Checkpoint(
        without, base.config, base.step, base.tokens, 0, 0, [],
    ))  # fmt: skip
    with pytest.raises(MethodUnavailable, match=r"needs .*\(stats.feature_mean, stats.feature_cov"):
        learner(path, "ttt++")
    result = subprocess.run(
        [sys.executable, "-m", "ttt_runtime", "run", "--socket", str(tmp_path / "s.sock"),
         "--resume", path, "--mode", "adapt", "--adapt-method", "ttt++"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "ttt-run: error: adapt_method 'ttt++' needs the training data's feature statistics "
        "(stats.feature_mean, stats.feature_cov) in the checkpoint: resume from a base made by "
        "`make base`"
    ]
    assert adapt_config(small_base, "ttt++").adapt_method == "ttt++"
