"""adapt_method 'reset': the no-memory baseline scores every chunk as the base does."""

from __future__ import annotations

from adapt_helpers import chunks, learner


def test_every_chunk_scores_as_the_base_from_fresh_fast_weights(small_base):
    adapter = learner(small_base, "reset")
    (repeated,) = chunks("prose", 1)
    for chunk in [repeated, *chunks("tables", 2), repeated]:
        baseline = adapter.baseline_loss(*chunk).item()
        assert adapter.step(*chunk, sampled=False).loss.item() == baseline
