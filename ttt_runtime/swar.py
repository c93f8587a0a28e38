"""SWAR: packed-lane integer arithmetic, gradient quantization and an exact accumulator.

Every array function takes MLX or NumPy arrays and returns the same kind it was given.
`ExactAccumulator` sums float32/float64 arrays in 128-bit fixed point (Q64.64) without rounding
error, so a run can measure how far its float32 fast weights drift from the exact ones.
"""

from __future__ import annotations

import numpy as np

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
    if not isinstance(x, np.ndarray) and type(x).__module__.startswith("mlx"):
        import mlx.core as mx

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
