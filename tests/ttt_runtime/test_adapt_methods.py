"""What every adapt method (ttt_runtime/adapt) keeps to: it scores a chunk before it learns
from it, its state round-trips through a checkpoint, `reset` brings the base back exactly, and
on a small real base it learns (a repeated chunk's bpb falls). Each method's own behaviour is
tested in its test_adapt_<method>.py."""

from __future__ import annotations

import math

import pytest
from adapt_helpers import (
    GRADIENT,
    METHODS,
    adapt_config,
    bpb,
    chunks,
    learner,
    same_arrays,
)
from polling import run_client, wait_until
from test_run import READY_S

from ttt_runtime import checkpoint as ckpt
from ttt_runtime.config import ConfigError, RayConfig, RunConfig
from ttt_runtime.corpora import corpus_files
from ttt_runtime.run import TTTRun


@pytest.mark.parametrize("method", GRADIENT)
def test_a_chunks_loss_does_not_depend_on_its_own_update(small_base, method):
    one_step, three_steps = (learner(small_base, method, adapt_steps=n) for n in (1, 3))
    first, second = chunks("prose", 2)
    assert bpb(one_step, first) == bpb(three_steps, first)  # scored before either learned
    assert bpb(one_step, second) != bpb(three_steps, second)  # and the updates did differ


@pytest.mark.parametrize("method", METHODS)
def test_a_methods_state_round_trips_through_a_checkpoint(small_base, tmp_path, method):
    original = learner(small_base, method)
    batches = chunks("prose", 3)
    for chunk in batches[:2]:
        bpb(original, chunk)
    state = original.state()
    config = adapt_config(small_base, method)
    path = ckpt.save(
        str(tmp_path / "adapted.safetensors"),
        ckpt.Checkpoint(state.arrays, config.as_dict(), 2, 0, 0, 0, state.cache_offsets),
    )
    restored = learner(path, method)
    assert same_arrays(restored.state().arrays, state.arrays)
    assert bpb(restored, batches[2]) == bpb(original, batches[2])
    assert same_arrays(restored.state().arrays, original.state().arrays)


@pytest.mark.parametrize("method", METHODS)
def test_reset_brings_back_the_base_exactly(small_base, method):
    adapted, fresh = learner(small_base, method), learner(small_base, method)
    batches = chunks("prose", 4)
    for chunk in batches[:3]:
        bpb(adapted, chunk)
    adapted.reset([])
    assert same_arrays(adapted.state().arrays, fresh.state().arrays)
    assert bpb(adapted, batches[3]) == bpb(fresh, batches[3])


@pytest.mark.parametrize("method", ("dynamic", "lora", "ttt++"))
def test_each_method_learning_next_bytes_lowers_the_bpb_of_a_repeated_chunk(small_base, method):
    # ttt and tent learn other objectives: their own signals are in their own tests
    adapter = learner(small_base, method)
    (chunk,) = chunks("prose", 1)
    scores = [bpb(adapter, chunk) for _ in range(4)]
    assert scores[-1] < scores[0] - 0.1, scores


def test_the_baseline_is_the_base_from_fresh_fast_weights_whatever_was_learned(small_base):
    adapted, reset = learner(small_base, "dynamic"), learner(small_base, "reset")
    batches = chunks("prose", 3)
    for chunk in batches[:2]:
        bpb(adapted, chunk)
    assert adapted.baseline_loss(*batches[2]).item() == reset.step(*batches[2], False).loss.item()
    assert adapted.baseline_loss(*batches[2]).item() != adapted.step(*batches[2], False).loss.item()


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"adapt_method": "lora"}, "adapt_method='lora': only in mode 'adapt'"),
        ({"mode": "adapt", "adapt_method": "sgd"}, "adapt_method='sgd': must be one of ttt,"),
        ({"mode": "adapt", "lora_rank": 300}, "lora_rank=300: must be at most hidden_size=256"),
        ({"mode": "adapt", "adapt_steps": 0}, "adapt_steps=0: must be an integer from 1 to 100"),
        ({"mode": "adapt", "adapt_lr": -1.0}, "adapt_lr=-1.0: must be a positive finite number"),
        (
            {"mode": "adapt", "adapt_method": "reset", "exact_accumulate": True},
            "exact_accumulate=true: not with adapt_method 'reset'",
        ),
    ],
)
def test_adapt_settings_out_of_their_rules_are_one_line(settings, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace("+", r"\+")):
        RunConfig(**settings)


def test_an_adapt_run_reports_the_base_beside_the_adapted_bpb_and_their_mean_gap(
    small_base, tmp_path
):
    prose = str(corpus_files("prose")[1])  # pydoc_data/topics.py: the reference's prose
    config = adapt_config(small_base, "dynamic", sample_every=2, data=prose)
    run = TTTRun(config, str(tmp_path / "s.sock"), resume=small_base)
    try:
        reports = []
        for _ in range(9):
            run.run_step()
            reports.append(run.telemetry())
    finally:
        run.close()
    start = reports[0].step - 1  # a resumed run counts on from the base's steps
    assert reports[0].baseline_bpb is None and reports[0].gain is None  # not sampled yet
    sampled = [m for m in reports if m.sampled_step == m.step]
    # the base is scored on the sampled steps only: after the warm-up, then every 2
    assert [m.step - start for m in sampled] == [2, 4, 6, 8]
    gaps = [m.loss_bpb - m.baseline_bpb for m in sampled]
    for i, m in enumerate(sampled):
        assert m.gain == pytest.approx(sum(gaps[: i + 1]) / (i + 1), abs=1e-9)
    assert reports[-1].baseline_bpb == sampled[-1].baseline_bpb  # held between samples
    assert sampled[-1].gain < 0  # dynamic evaluation already beats the base on prose


def test_a_run_spread_over_ray_actors_refuses_a_method_other_than_ttt():
    run = RunConfig(mode="adapt", adapt_method="dynamic")
    with pytest.raises(ConfigError, match="^adapt_method='dynamic': a run spread over Ray actors"):
        RayConfig("local").check(run)
    RayConfig("local").check(run.with_overrides(adapt_method="ttt"))


@pytest.mark.slow
def test_a_spawned_adapt_run_sends_its_gain_over_the_channel(spawned_run, small_base):
    run = spawned_run("--resume", small_base, "--mode", "adapt", "--adapt-method", "dynamic",
                      "--sample-every", "2")  # fmt: skip
    client = run_client(run, READY_S)
    try:
        last = wait_until(
            lambda: (m := client.latest()) is not None and m.gain is not None and m,
            READY_S, "a report with the gain",
        )  # fmt: skip
    finally:
        client.close()
    assert last.mode == "adapt" and last.baseline_bpb > 0 and math.isfinite(last.gain)
