"""SWAR: packed-lane integer arithmetic, gradient quantization and an exact accumulator.

Every array function takes MLX or NumPy arrays and returns the same kind it was given.
`ExactAccumulator` sums float32/float64 arrays in 128-bit fixed point (Q64.64) without rounding
error, so a run can measure how far its float32 fast weights drift from the exact ones.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

# --- packed lanes ---------------------------------------------------------------------------
# A uint32 word holds 4 unsigned 8-bit lanes or 2 unsigned 16-bit lanes, lane 0 least significant.

# Clears, in each lane, the top bit that `>> 1` shifted in from the lane above.
_HIGH_CLEAR = {8: 0x7F7F7F7F, 16: 0x7FFF7FFF}
FORMS = ("bitwise", "arith")
DEFAULT_FORM = "bitwise"  # faster in NumPy and MLX: benchmarks/bench_swar.py
_BLOCK_WORDS = 1 << 15


def _words(x):
    """x as uint32 words of its own kind (MLX or NumPy)."""
    if isinstance(x, mx.array):
        return x if x.dtype == mx.uint32 else x.astype(mx.uint32)
    return np.asarray(x, dtype=np.uint32)


def _pack(lanes, bits: int):
    mask = (1 << bits) - 1
    word = _words(lanes[0]) & mask
    for i, lane in enumerate(lanes[1:], start=1):
        word = word | ((_words(lane) & mask) << (bits * i))
    return word


def _unpack(w, bits: int):
    w = _words(w)
    mask = (1 << bits) - 1
    return tuple((w >> (bits * i)) & mask for i in range(32 // bits))


def pack_u8(l0, l1, l2, l3):
    """Four lanes (values taken modulo 256) into uint32 words, l0 least significant."""
    return _pack((l0, l1, l2, l3), 8)


def unpack_u8(w):
    """uint32 words into their four 8-bit lanes (uint32 arrays), lane 0 first."""
    return _unpack(w, 8)


def pack_u16(l0, l1):
    """Two lanes (values taken modulo 65536) into uint32 words, l0 least significant."""
    return _pack((l0, l1), 16)


def unpack_u16(w):
    """uint32 words into their two 16-bit lanes (uint32 arrays), lane 0 first."""
    return _unpack(w, 16)


def _average_arith(a, b, bits: int, round_up: bool):
    """Lane by lane with division and modulo only (the seeds' cross-platform form)."""
    a, b = _words(a), _words(b)
    base = 1 << bits
    out = 0
    for i in range(32 // bits):
        place = base**i
        x, y = (a // place) % base, (b // place) % base
        out = out + ((x + y + int(round_up)) // 2) * place
    return out


def _average_bitwise(a, b, bits: int, round_up: bool):
    """All lanes at once: a + b = 2(a & b) + (a ^ b), and no lane can carry into the next.

    floor((a+b)/2) = (a & b) + ((a ^ b) >> 1); floor((a+b+1)/2) = (a | b) - ((a ^ b) >> 1),
    the same plus the rounding term (a ^ b) & 1, in one operation fewer.
    """
    a, b = _words(a), _words(b)
    half_diff = ((a ^ b) >> 1) & _HIGH_CLEAR[bits]
    return (a | b) - half_diff if round_up else (a & b) + half_diff


@functools.cache
def _compiled(average, bits: int, round_up: bool):
    # one fused kernel instead of a pass over memory per operation (2-3x on MLX's CPU backend)
    return mx.compile(lambda a, b: average(a, b, bits, round_up), shapeless=True)


def _blockwise(average, a, b, bits: int, round_up: bool):
    """NumPy evaluates one operation at a time: on L2-sized blocks the temporaries never
    travel to memory (about 2x on 64 MiB inputs)."""
    if a.shape != b.shape or a.size <= _BLOCK_WORDS:
        return average(a, b, bits, round_up)
    out = np.empty(a.shape, np.uint32)
    flat_a, flat_b, flat_out = a.reshape(-1), b.reshape(-1), out.reshape(-1)
    for start in range(0, a.size, _BLOCK_WORDS):
        block = slice(start, start + _BLOCK_WORDS)
        flat_out[block] = average(flat_a[block], flat_b[block], bits, round_up)
    return out


def _average(a, b, bits: int, round_up: bool, form: str):
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    average = _average_bitwise if form == "bitwise" else _average_arith
    a, b = _words(a), _words(b)
    if isinstance(a, mx.array) or isinstance(b, mx.array):
        return _compiled(average, bits, round_up)(a, b)
    return _blockwise(average, a, b, bits, round_up)


def avg_u8_trunc(a, b, form: str = DEFAULT_FORM):
    """Each 8-bit lane: floor((x + y) / 2)."""
    return _average(a, b, 8, False, form)


def avg_u8_round(a, b, form: str = DEFAULT_FORM):
    """Each 8-bit lane: floor((x + y + 1) / 2) (biased by +1/4 LSB on uniform inputs)."""
    return _average(a, b, 8, True, form)


def avg_u16_trunc(a, b, form: str = DEFAULT_FORM):
    """Each 16-bit lane: floor((x + y) / 2)."""
    return _average(a, b, 16, False, form)


def avg_u16_round(a, b, form: str = DEFAULT_FORM):
    """Each 16-bit lane: floor((x + y + 1) / 2) (biased by +1/4 LSB on uniform inputs)."""
    return _average(a, b, 16, True, form)


# --- quantization ---------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizedTensor:
    """A float tensor as `bits`-bit levels packed 32 // bits per uint32 word.

    Element i = offset + scale * level_i. Levels are laid out in planes: lane j of word w holds
    element j * len(words) + w, so packing and unpacking touch contiguous slices only.
    """

    words: Any  # uint32, MLX or NumPy (the kind that was quantized)
    bits: int
    scale: float
    offset: float
    shape: tuple[int, ...]
    dtype: Any  # the original dtype, restored by dequantize

    @property
    def nbytes(self) -> int:
        return int(self.words.size) * 4


def _float_kind(x):
    """x flattened, as a float array of its own kind (float32 unless it is float64 NumPy)."""
    if isinstance(x, mx.array):
        flat = x.reshape(-1)
        return flat if flat.dtype == mx.float32 else flat.astype(mx.float32)
    flat_np = np.asarray(x).reshape(-1)
    return flat_np if flat_np.dtype in (np.float32, np.float64) else flat_np.astype(np.float32)


def quantize(x, bits: int = 8, value_range: tuple[float, float] | None = None) -> QuantizedTensor:
    """Round x to the nearest of 2**bits evenly spaced levels from min(x) to max(x) (or over
    `value_range`, which must hold them: tensors quantized to one range can be averaged as
    packed words) and pack.

    Each element comes back from `dequantize` within half a step, (max - min) / (2**bits - 1)
    / 2, plus a few ulps of max(|min|, |max|, max - min) for the float arithmetic itself (done in
    float32, or float64 for float64 NumPy input); a constant tensor comes back exactly.
    """
    if bits not in (8, 16):
        raise ValueError(f"quantize: bits must be 8 or 16, got {bits}")
    is_mlx = isinstance(x, mx.array)
    flat = _float_kind(x)
    if is_mlx:
        if not mx.all(mx.isfinite(flat)).item():
            raise ValueError("quantize: input has NaN or Inf")
        lo, hi = (float(mx.min(flat)), float(mx.max(flat))) if flat.size else (0.0, 0.0)
    else:
        lo, hi = (float(flat.min()), float(flat.max())) if flat.size else (0.0, 0.0)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("quantize: input has NaN or Inf")
    if value_range is not None:
        if not value_range[0] <= lo <= hi <= value_range[1]:
            raise ValueError(f"quantize: values from {lo} to {hi} are outside {value_range}")
        lo, hi = (float(v) for v in value_range)
    if hi - lo > float(np.finfo(np.float32 if is_mlx else flat.dtype).max):
        raise ValueError("quantize: max - min overflows the input's float type")
    levels = (1 << bits) - 1
    scale = (hi - lo) / levels
    lanes = 32 // bits
    n_words = -(-flat.size // lanes)
    q: mx.array | np.ndarray  # the levels, of the input's kind (NumPy for a subnormal step)
    if _subnormal_step(scale):
        # float32 cannot hold such a step (or its reciprocal): this rare case runs in float64
        q = np.rint((np.array(flat, np.float64) - lo) / scale)
    elif is_mlx:
        q = mx.round((flat - lo) * (1 / scale)) if scale else mx.zeros_like(flat)
    else:
        q = np.rint((flat - lo) * (1 / scale)) if scale else np.zeros_like(flat)
    pad = n_words * lanes - flat.size
    if isinstance(q, mx.array):
        q = mx.pad(q.astype(mx.uint32), (0, pad))
    else:
        q = np.pad(q.astype(np.uint32), (0, pad))
    words = _pack(q.reshape(lanes, n_words), bits)
    words = mx.array(words) if is_mlx and not isinstance(words, mx.array) else words
    return QuantizedTensor(words, bits, scale, lo, tuple(x.shape), x.dtype)


def _subnormal_step(scale: float) -> bool:
    return 0 < scale < float(np.finfo(np.float32).tiny)


def dequantize(q: QuantizedTensor):
    """The float tensor a QuantizedTensor stands for, in its original kind, shape and dtype."""
    size = math.prod(q.shape)
    subnormal = _subnormal_step(q.scale)  # such a step is only exact in float64 (see quantize)
    if isinstance(q.words, mx.array) and not subnormal:
        levels = mx.concatenate(_unpack(q.words, q.bits))[:size].astype(mx.float32)
        return (levels * q.scale + q.offset).reshape(q.shape).astype(q.dtype)
    dtype: type[np.floating[Any]] = np.float64 if subnormal or q.dtype == np.float64 else np.float32
    np_levels = np.concatenate(_unpack(np.asarray(q.words), q.bits))[:size].astype(dtype)
    values = (np_levels * q.scale + q.offset).reshape(q.shape)
    if isinstance(q.words, mx.array):
        return mx.array(values.astype(np.float32)).astype(q.dtype)
    return values.astype(q.dtype, copy=False)


class QuantizedMomentum:
    """Exponential moving average m <- beta * m + (1 - beta) * g, held quantized between steps.

    The average lives as `bits`-bit levels (u16 by default: 2 per uint32 word, half of float32);
    gradients may arrive quantized too (what Ray workers send). Requantizing every step adds at
    most half a step of error, which the average then damps by beta.
    """

    def __init__(self, shape, beta: float = 0.9, bits: int = 16):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"QuantizedMomentum: beta must be in [0, 1), got {beta}")
        if bits not in (8, 16):
            raise ValueError(f"QuantizedMomentum: bits must be 8 or 16, got {bits}")
        self.shape, self.beta, self.bits = tuple(shape), beta, bits
        self.state: QuantizedTensor | None = None

    def update(self, grad) -> None:
        g = dequantize(grad) if isinstance(grad, QuantizedTensor) else grad
        if tuple(g.shape) != self.shape:
            raise ValueError(f"QuantizedMomentum{self.shape}: gradient has shape {g.shape}")
        m = (1 - self.beta) * g
        if self.state is not None:
            m = m + self.beta * dequantize(self.state)
        self.state = quantize(m, self.bits)

    def value(self):
        """The average (zeros before the first update: NumPy float32 then)."""
        return np.zeros(self.shape, np.float32) if self.state is None else dequantize(self.state)


# --- exact accumulator ----------------------------------------------------------------------

_LIMB_BITS = 16
_N_LIMBS = 8  # 8 x 16 = 128 bits: two's complement Q64.64
_FRAC_BITS = 64
_LIMB_MASK = (1 << _LIMB_BITS) - 1
_ADDEND_LIMIT = 2.0**63  # the Q64.64 range is [-2**63, 2**63)
_MAX_ROWS = 1 << 15  # n limbs (< 2**16 each) plus carries stay below 2**32
_MAX_CHUNK = 1 << 22  # elements converted at once: bounds temporary memory


def _as_float_numpy(x) -> np.ndarray:
    """x as a float32 or float64 NumPy array (MLX arrays are copied out, exactly)."""
    if isinstance(x, mx.array):
        if x.dtype not in (mx.float32, mx.float64):
            x = x.astype(mx.float32)  # float16/bfloat16 widen exactly
        x = np.array(x)
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"ExactAccumulator adds float arrays, got {x.dtype}")
        x = x.astype(np.float32)
    return x


def _to_limbs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (finite, |x| < 2**63) as two's complement Q64.64 limbs, shape (8, *x.shape), uint32,
    and where the (rounded) value is negative.

    Works in x's own float type and is exact: scaling by powers of two, floor, and a difference
    whose exact value is a small integer never round. Only bits below 2**-64 are rounded (to
    nearest), which float32 addends with |x| >= 2**-40 do not have.
    """
    r = np.rint(x * 2.0**_FRAC_BITS)  # an integer-valued float, |r| < 2**127
    limbs = np.empty((_N_LIMBS, *x.shape), np.uint32)
    floor_k = r  # floor(r / 2**(16k)) for k = 0
    for k in range(_N_LIMBS):
        if k + 1 < _N_LIMBS:
            floor_next = np.floor(r * 2.0 ** (-_LIMB_BITS * (k + 1)))
        else:  # floor(r / 2**128) is -1 or 0; computed from the sign, safe from underflow
            floor_next = -(r < 0).astype(r.dtype)
        limbs[k] = floor_k - floor_next * float(1 << _LIMB_BITS)
        floor_k = floor_next
    return limbs, r < 0


def _bit_length(v: np.ndarray) -> np.ndarray:
    """Number of significant bits of each uint64 (0 for 0)."""
    n = np.zeros(v.shape, np.int64)
    for shift in (32, 16, 8, 4, 2, 1):
        big = (v >> np.uint64(shift)) != 0
        n += big * shift
        v = np.where(big, v >> np.uint64(shift), v)
    return n + (v != 0)


class ExactAccumulator:
    """Exact running sum of float arrays, one 128-bit Q64.64 value per element.

    Each value is held as 8 x 16-bit limbs (least significant first) with carries propagated
    on every add. For float32 addends with |x| in [2**-40, 2**40] and sums below 2**62 nothing is
    ever rounded: `value()` is the exact sum rounded once to float64. float64 addends are first
    rounded to the nearest multiple of 2**-64. A sum leaving [-2**63, 2**63) raises
    OverflowError and leaves the accumulator as it was.
    """

    def __init__(self, shape):
        self.shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(s) for s in shape)
        self._limbs = np.zeros((_N_LIMBS, *self.shape), np.uint16)

    @property
    def limbs(self) -> np.ndarray:
        """A copy of the limbs, shape (8, *shape), uint16, least significant limb first."""
        return self._limbs.copy()

    def reset(self) -> None:
        self._limbs[...] = 0

    def add(self, x) -> None:
        """Add x (shape `shape`), or each row of a stack x (shape (n, *shape)), exactly."""
        x = _as_float_numpy(x)
        if x.shape == self.shape:
            x = x[None]
        elif x.shape[1:] != self.shape:
            raise ValueError(f"ExactAccumulator{self.shape}: cannot add shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("ExactAccumulator: addend has NaN or Inf")
        if (np.abs(x) >= _ADDEND_LIMIT).any():
            raise OverflowError("ExactAccumulator: addend outside the Q64.64 range (2**63)")
        rows = max(1, min(_MAX_ROWS, _MAX_CHUNK // max(1, int(np.prod(self.shape)))))
        limbs = self._limbs
        for start in range(0, x.shape[0], rows):
            limbs = self._added(limbs, x[start : start + rows])
        self._limbs = limbs  # committed only when every chunk fitted

    @staticmethod
    def _added(limbs: np.ndarray, x: np.ndarray) -> np.ndarray:
        addend, negative = _to_limbs(x)
        addend = addend.sum(axis=1, dtype=np.uint32)  # per-limb column sums, no carries
        out = np.empty_like(limbs)
        carry = np.uint32(0)
        for k in range(_N_LIMBS):
            total = limbs[k].astype(np.uint32) + addend[k] + carry
            out[k] = total & _LIMB_MASK
            carry = total >> _LIMB_BITS
        # The sum is exact modulo 2**144 when each operand is sign-extended by a ninth limb
        # (0xFFFF = -1 mod 2**16 per negative operand); it fits 128 bits iff that ninth limb
        # is the sign extension of the result.
        negatives = negative.sum(axis=0) + (limbs[-1] >> (_LIMB_BITS - 1))
        ninth = (carry.astype(np.int64) - negatives) & _LIMB_MASK
        if (ninth != np.where(out[-1] >> (_LIMB_BITS - 1), _LIMB_MASK, 0)).any():
            raise OverflowError("ExactAccumulator: sum left the Q64.64 range [-2**63, 2**63)")
        return out

    def value(self) -> np.ndarray:
        """The exact sums, each rounded once (to nearest even) to float64."""
        limbs = self._limbs.reshape(_N_LIMBS, -1).astype(np.uint64)  # 1-d: array ops wrap quietly
        half = _N_LIMBS // 2
        lo = sum(limbs[k] << np.uint64(_LIMB_BITS * k) for k in range(half))
        hi = sum(limbs[half + k] << np.uint64(_LIMB_BITS * k) for k in range(half))
        negative = (hi >> np.uint64(63)).astype(bool)
        # magnitude = two's complement negation of the negative ones
        lo, hi = np.where(negative, ~lo + np.uint64(1), lo), np.where(negative, ~hi + (lo == 0), hi)
        n = _bit_length(hi)
        shift = np.maximum(n, 1).astype(np.uint64)
        # the top 64 bits of the 128-bit magnitude, OR-ed with a sticky bit for all bits below:
        # converting that to float64 rounds exactly as rounding the whole magnitude would
        top = (hi << (np.uint64(64) - shift)) | ((lo >> (shift - np.uint64(1))) >> np.uint64(1))
        top |= ((lo << (np.uint64(64) - shift)) != 0).astype(np.uint64)
        magnitude = np.where(
            n == 0,
            np.ldexp(lo.astype(np.float64), -_FRAC_BITS),
            np.ldexp(top.astype(np.float64), shift.astype(np.int64) - _FRAC_BITS),
        )
        return np.where(negative, -magnitude, magnitude).reshape(self.shape)
