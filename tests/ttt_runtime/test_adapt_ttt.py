"""adapt_method 'ttt': the fast weights learn the stream while the base's weights stay."""

from __future__ import annotations

from adapt_helpers import chunks, learner, same_arrays


def inner_loss(adapter, chunk) -> float:
    """The layers' self-supervised loss over the chunk, before each mini-batch's update."""
    layers = adapter.step(*chunk, sampled=True).sample.layers
    return sum(layer["inner_loss_before"] for layer in layers)


def test_its_fast_weights_learn_a_repeated_chunk_while_the_base_stays(small_base):
    adapter = learner(small_base, "ttt")
    base = dict(adapter.state().arrays)
    (chunk,) = chunks("prose", 1)
    losses = [inner_loss(adapter, chunk) for _ in range(4)]
    assert losses[-1] < 0.9 * losses[0], losses
    after = adapter.state().arrays
    model = {k: v for k, v in after.items() if k.startswith("model.")}
    assert same_arrays(model, {k: v for k, v in base.items() if k.startswith("model.")})
    assert not same_arrays(after, base)  # the caches moved
    assert not any(name.startswith("adapt.") for name in after)  # nothing else to keep
