"""SWAR: bit-exactness against plain Python integers, quantization bounds, the exact accumulator."""

from fractions import Fraction

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ttt_runtime.swar import ExactAccumulator

# float32 values with |x| in [2**-40, 2**40]: 24-bit mantissa times a power of two
float32_in_range = st.builds(
    lambda m, e, neg: float(np.float32((-1) ** neg * m * 2.0**e)),
    st.integers(1 << 23, (1 << 24) - 1),
    st.integers(-63, 16),
    st.booleans(),
)


def exact_sum_rounded_once(values) -> float:
    return float(sum((Fraction(float(v)) for v in values), Fraction(0)))


@settings(max_examples=200, deadline=None)
@given(st.lists(float32_in_range, min_size=1, max_size=60))
def test_exact_accumulator_equals_exact_sum_rounded_once(values):
    acc = ExactAccumulator(())
    for v in values:
        acc.add(np.float32(v))
    assert acc.value() == exact_sum_rounded_once(values)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(float32_in_range, min_size=3, max_size=3), min_size=1, max_size=40))
def test_exact_accumulator_stacked_add_equals_one_by_one(rows):
    stacked, one_by_one = ExactAccumulator(3), ExactAccumulator(3)
    stacked.add(np.array(rows, np.float32))
    for row in rows:
        one_by_one.add(mx.array(row, dtype=mx.float32))
    np.testing.assert_array_equal(stacked.limbs, one_by_one.limbs)
    expected = [exact_sum_rounded_once(col) for col in zip(*rows, strict=True)]
    np.testing.assert_array_equal(stacked.value(), expected)


def test_exact_accumulator_beats_float32_where_float32_loses_everything():
    # 1 + 1e6 * 2**-30: float32 rounds every small addend away, the exact sum keeps them
    updates = np.concatenate([[1.0], np.full(10**6, 2.0**-30)]).astype(np.float32)
    acc = ExactAccumulator(())
    acc.add(updates)
    assert acc.value() == 1.0 + 10**6 * 2.0**-30
    assert np.float32(1.0) + np.float32(2.0**-30) == np.float32(1.0)


def test_exact_accumulator_holds_a_cancelling_sum_exactly():
    acc = ExactAccumulator(2)
    acc.add(np.array([2.0**40, -(2.0**-40)], np.float32))
    acc.add(np.array([2.0**-40, 2.0**40], np.float32))
    acc.add(np.array([-(2.0**40), -(2.0**40)], np.float32))
    np.testing.assert_array_equal(acc.value(), [2.0**-40, -(2.0**-40)])


def test_exact_accumulator_limbs_are_twos_complement_q64_64():
    acc = ExactAccumulator(2)
    acc.add(np.array([1.5, -(2.0**-64)]))
    ones = 0xFFFF
    np.testing.assert_array_equal(acc.limbs[:, 0], [0, 0, 0, 0x8000, 1, 0, 0, 0])
    np.testing.assert_array_equal(acc.limbs[:, 1], [ones] * 8)
    assert acc.limbs.dtype == np.uint16


def test_exact_accumulator_rounds_float64_addends_to_the_q64_64_grid():
    acc = ExactAccumulator(())
    acc.add(np.float64(1.0 + 2.0**-52))  # representable: exact
    acc.add(np.float64(2.0**-66))  # a quarter of the grid step: rounds to 0
    acc.add(np.float64(-(2.0**-65) * 3))  # -1.5 steps: rounds to nearest even, -2 steps
    assert acc.value() == 1.0 + 2.0**-52 - 2.0**-63


def test_exact_accumulator_raises_on_overflow_and_keeps_its_value():
    acc = ExactAccumulator(2)
    acc.add(np.array([2.0**62, -(2.0**62)], np.float32))
    before = acc.limbs
    with pytest.raises(OverflowError, match="Q64.64"):
        acc.add(np.array([[1.0, -1.0], [2.0**62, 0.0]], np.float32))
    np.testing.assert_array_equal(acc.limbs, before)
    acc.add(np.array([2.0**62 - 2.0**40, -(2.0**62)], np.float32))  # still in range: -2**63
    np.testing.assert_array_equal(acc.value(), [2.0**63 - 2.0**40, -(2.0**63)])
    with pytest.raises(OverflowError, match="Q64.64"):
        acc.add(np.array([0.0, -(2.0**-64)]))
    with pytest.raises(OverflowError, match="addend"):
        ExactAccumulator(1).add(np.array([2.0**63]))


@pytest.mark.parametrize(
    "addend, error",
    [
        (np.array([np.nan]), ValueError),
        (np.array([np.inf]), ValueError),
        (np.zeros(2), ValueError),
        (np.zeros(1, np.int32), TypeError),
    ],
)
def test_exact_accumulator_rejects_bad_addends(addend, error):
    with pytest.raises(error):
        ExactAccumulator(1).add(addend)


def test_exact_accumulator_reset_and_float16_input():
    acc = ExactAccumulator((2, 2))
    acc.add(mx.ones((2, 2), dtype=mx.bfloat16))
    acc.add(np.full((2, 2), 0.5, np.float16))
    np.testing.assert_array_equal(acc.value(), np.full((2, 2), 1.5))
    acc.reset()
    np.testing.assert_array_equal(acc.value(), np.zeros((2, 2)))
