"""SWAR: bit-exactness against plain Python integers, quantization bounds, the exact accumulator."""

from fractions import Fraction

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ttt_runtime.swar import (
    FORMS,
    ExactAccumulator,
    QuantizedMomentum,
    QuantizedTensor,
    avg_u8_round,
    avg_u8_trunc,
    avg_u16_round,
    avg_u16_trunc,
    dequantize,
    pack_u8,
    pack_u16,
    quantize,
    unpack_u8,
    unpack_u16,
)

AVERAGES = {  # function: (lane bits, rounding term), per the definitions in the issue
    avg_u8_trunc: (8, 0),
    avg_u8_round: (8, 1),
    avg_u16_trunc: (16, 0),
    avg_u16_round: (16, 1),
}
EDGE_WORDS = [
    0, 1, 0xFFFFFFFF, 0xFEFEFEFE, 0x80808080, 0x7F7F7F7F, 0x01010101, 0xFFFEFFFE, 0x80008000,
    0x7FFF7FFF, 0x00010001, 0xFFFF0000, 0x0000FFFF, 0xFF00FF00, 0x55555555, 0xAAAAAAAA,
]  # fmt: skip
words = st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=64)
BACKENDS = {"numpy": lambda v: np.array(v, np.uint32), "mlx": lambda v: mx.array(v, mx.uint32)}


def lanes_of(word: int, bits: int) -> list[int]:
    return [(word >> (bits * i)) % (1 << bits) for i in range(32 // bits)]


def word_of(lanes: list[int], bits: int) -> int:
    return sum(lane << (bits * i) for i, lane in enumerate(lanes))


def reference_average(a: int, b: int, bits: int, rounding: int) -> int:
    return word_of(
        [
            (x + y + rounding) // 2
            for x, y in zip(lanes_of(a, bits), lanes_of(b, bits), strict=True)
        ],
        bits,
    )


def check_average(function, a: list[int], b: list[int]):
    bits, rounding = AVERAGES[function]
    expected = [reference_average(x, y, bits, rounding) for x, y in zip(a, b, strict=True)]
    for backend, make in BACKENDS.items():
        for form in FORMS:
            out = function(make(a), make(b), form=form)
            assert isinstance(out, type(make(a))), (backend, form)
            assert np.array(out).tolist() == expected, (function.__name__, backend, form)


@pytest.mark.parametrize("function", AVERAGES, ids=lambda f: f.__name__)
@settings(max_examples=150, deadline=None)
@given(pairs=st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)), min_size=1))
def test_averages_are_bit_exact_to_the_lane_definition(function, pairs):
    a, b = zip(*pairs, strict=True)
    check_average(function, list(a), list(b))


@pytest.mark.parametrize("function", AVERAGES, ids=lambda f: f.__name__)
def test_averages_are_bit_exact_on_edge_words(function):
    a, b = zip(*[(x, y) for x in EDGE_WORDS for y in EDGE_WORDS], strict=True)
    check_average(function, list(a), list(b))


@pytest.mark.parametrize("round_up", [False, True])
def test_u8_averages_bitwise_equals_arith_for_every_lane_pair_in_every_lane(round_up):
    # lanes cannot interact (the proof in swar._average_bitwise), so every (x, y) pair in
    # every lane position, next to changing neighbours, covers all inputs
    x, y = (v.ravel().astype(np.uint32) for v in np.meshgrid(np.arange(256), np.arange(256)))
    a, b = pack_u8(x, y, 255 - x, y ^ 0x5A), pack_u8(y, x, 255 - y, x ^ 0xA5)
    average = avg_u8_round if round_up else avg_u8_trunc
    bitwise, arith = average(a, b, form="bitwise"), average(a, b, form="arith")
    np.testing.assert_array_equal(bitwise, arith)
    for lane, lane_a, lane_b in zip(unpack_u8(bitwise), unpack_u8(a), unpack_u8(b), strict=True):
        np.testing.assert_array_equal(lane, (lane_a + lane_b + round_up) // 2)
    np.testing.assert_array_equal(average(mx.array(a), mx.array(b)), bitwise)


def test_rounded_average_is_biased_by_a_quarter_lsb():
    # the seeds call round-half-up averaging unbiased: over all lane pairs it is +1/4 LSB
    x, y = (v.ravel().astype(np.float64) for v in np.meshgrid(np.arange(256), np.arange(256)))
    word = avg_u8_round(x.astype(np.uint32), y.astype(np.uint32))
    bias = np.mean(unpack_u8(word)[0] - (x + y) / 2)
    assert bias == 0.25
    assert np.mean(unpack_u8(avg_u8_trunc(x, y))[0] - (x + y) / 2) == -0.25


def test_average_rejects_an_unknown_form():
    with pytest.raises(ValueError, match="form"):
        avg_u8_trunc(np.zeros(1, np.uint32), np.zeros(1, np.uint32), form="simd")


@settings(max_examples=150, deadline=None)
@given(words)
def test_pack_unpack_round_trip_matches_python_integers(values):
    for backend, make in BACKENDS.items():
        for bits, pack, unpack in ((8, pack_u8, unpack_u8), (16, pack_u16, unpack_u16)):
            lanes = unpack(make(values))
            assert all(isinstance(lane, type(make(values))) for lane in lanes), backend
            expected = list(zip(*[lanes_of(v, bits) for v in values], strict=True))
            assert [np.array(lane).tolist() for lane in lanes] == [list(e) for e in expected]
            assert np.array(pack(*lanes)).tolist() == values
            assert np.array(pack(*lanes)).tolist() == [
                word_of(list(e), bits) for e in zip(*expected, strict=True)
            ]


def test_pack_takes_lanes_modulo_their_width():
    assert int(pack_u8(256 + 1, 2, 3, 0x1FF)) == 0xFF030201
    assert int(pack_u16(0x10001, 0xFFFF)) == 0xFFFF0001


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


def quantization_bound(x: np.ndarray, q: QuantizedTensor) -> float:
    """Half a step, plus a few ulps of the value range for the float arithmetic itself."""
    lo, hi = float(x.min()), float(x.max())
    ulp = np.spacing(np.array(max(abs(lo), abs(hi), hi - lo), dtype=x.dtype))
    return q.scale / 2 + 4 * float(ulp)


finite_floats = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@pytest.mark.parametrize("bits", [8, 16])
@settings(max_examples=100, deadline=None)
@given(x=hnp.arrays(np.float32, hnp.array_shapes(max_dims=3, max_side=9), elements=finite_floats))
@example(x=np.array([1.1754944e-38, 0.0], np.float32))  # a step below float32's normal range
@example(x=np.array([3e-42, -1e-44, 0.0], np.float32))
def test_quantize_error_is_at_most_half_a_step(bits, x):
    q = quantize(x, bits)
    assert q.words.dtype == np.uint32 and q.nbytes == 4 * -(-x.size // (32 // bits))
    assert q.scale == pytest.approx((float(x.max()) - float(x.min())) / (2**bits - 1))
    back = dequantize(q)
    assert back.shape == x.shape and back.dtype == x.dtype and isinstance(back, np.ndarray)
    assert np.abs(back.astype(np.float64) - x).max() <= quantization_bound(x, q)
    # MLX computes the same float32 operations: the same words, the same values back
    q_mlx = quantize(mx.array(x), bits)
    assert isinstance(q_mlx.words, mx.array) and (q_mlx.scale, q_mlx.offset) == (q.scale, q.offset)
    np.testing.assert_array_equal(np.array(q_mlx.words), q.words)
    np.testing.assert_array_equal(np.array(dequantize(q_mlx)), back)


@pytest.mark.parametrize("bits", [8, 16])
def test_quantize_keeps_float64_and_bfloat16_inputs_in_their_dtype(bits):
    x = np.random.default_rng(0).standard_normal((5, 7))
    back = dequantize(quantize(x, bits))
    assert back.dtype == np.float64
    assert np.abs(back - x).max() <= quantization_bound(x, quantize(x, bits))
    back_bf16 = dequantize(quantize(mx.array(x).astype(mx.bfloat16), bits))
    assert back_bf16.dtype == mx.bfloat16 and back_bf16.shape == (5, 7)


@pytest.mark.parametrize("make", [np.array, mx.array], ids=["numpy", "mlx"])
def test_quantize_returns_a_constant_tensor_exactly(make):
    for value in (0.1, -3.5e7, 0.0):
        x = make(np.full((3, 5), value, np.float32))
        np.testing.assert_array_equal(np.array(dequantize(quantize(x, 8))), np.array(x))
    assert dequantize(quantize(np.zeros((0, 4), np.float32))).shape == (0, 4)


@pytest.mark.parametrize("make", [np.array, mx.array], ids=["numpy", "mlx"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_quantize_rejects_nan_and_inf(make, bad):
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(make(np.array([1.0, bad, 2.0], np.float32)))


def test_quantize_rejects_other_bit_widths_and_overflowing_ranges():
    with pytest.raises(ValueError, match="bits"):
        quantize(np.ones(3, np.float32), bits=4)
    with pytest.raises(ValueError, match="overflows"):
        quantize(np.array([-3e38, 3e38], np.float32))


def test_u16_momentum_tracks_a_float32_ema_within_its_error_bound(record_property):
    rng = np.random.default_rng(7)
    shape, beta, steps = (64, 32), 0.9, 300
    momentum, reference = QuantizedMomentum(shape, beta=beta), np.zeros(shape, np.float32)
    bound, errors = 0.0, []
    for t in range(steps):
        grad = (rng.standard_normal(shape) * 0.01 + 0.002 * np.sin(t / 20)).astype(np.float32)
        sent = quantize(grad, 16)  # as a Ray worker would send it
        momentum.update(sent)
        reference = np.float32(beta) * reference + np.float32(1 - beta) * grad
        # error recursion e_t = beta e_(t-1) + (1 - beta) * gradient error + requantization
        bound = beta * bound + (1 - beta) * quantization_bound(grad, sent)
        bound += quantization_bound(momentum.value(), momentum.state) + 1e-9
        errors.append(float(np.abs(momentum.value() - reference).max()))
    rms = float(np.sqrt(np.mean((momentum.value() - reference) ** 2)))
    relative = rms / float(np.sqrt(np.mean(reference**2)))
    record_property("u16_momentum_max_abs_error", max(errors))
    record_property("u16_momentum_relative_rms_error", relative)
    print(f"u16 momentum vs float32 EMA over {steps} steps: max |error| {max(errors):.3g}, "
          f"relative RMS error {relative:.3g}, state {momentum.state.nbytes} B vs "
          f"{reference.nbytes} B")  # fmt: skip
    assert max(errors) <= bound
    assert momentum.state.nbytes == reference.nbytes // 2
    assert isinstance(momentum.value(), np.ndarray)


def test_momentum_rejects_bad_beta_bits_and_shape():
    with pytest.raises(ValueError, match="beta"):
        QuantizedMomentum((2,), beta=1.0)
    with pytest.raises(ValueError, match="bits"):
        QuantizedMomentum((2,), bits=32)
    with pytest.raises(ValueError, match="shape"):
        QuantizedMomentum((2,)).update(np.zeros(3, np.float32))
    np.testing.assert_array_equal(QuantizedMomentum((2,)).value(), np.zeros(2))
