"""Custom device kernels from `kernels/` (Metal, CUDA), compiled by MLX at run time.

The sources are data: the wheel carries them as `ttt_runtime/_kernels/`, a checkout has them in
the top-level `kernels/`. On a backend without custom kernels (MLX's CPU backend) the loaders
return None. Nothing calls them: the layers use plain MLX ops on every backend, and no GPU has
run these kernels yet (kernels/README.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache
from pathlib import Path

import mlx.core as mx

_INSTALLED = Path(__file__).resolve().parent / "_kernels"
_CHECKOUT = Path(__file__).resolve().parent.parent / "kernels"


def kernel_dir() -> Path:
    """Where the kernel sources are: inside the installed wheel, else the checkout."""
    return _INSTALLED if _INSTALLED.is_dir() else _CHECKOUT


def kernel_source(relative: str) -> str:
    path = kernel_dir() / relative
    if not path.is_file():
        raise FileNotFoundError(f"kernel source {relative!r} not found under {kernel_dir()}")
    return path.read_text()


def custom_kernel_backend() -> str | None:
    """'metal' or 'cuda' when MLX can compile custom kernels here, else None."""
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return None


@cache
def _ln_l2_grad_kernel(backend: str):
    make_kernel = mx.fast.metal_kernel if backend == "metal" else mx.fast.cuda_kernel
    source = "metal/ln_l2_grad.metal" if backend == "metal" else "cuda/ln_l2_grad.cu"
    return make_kernel(
        name="ttt_ln_l2_grad",
        input_names=["z", "target", "gamma", "beta"],
        output_names=["grad"],
        source=kernel_source(source),
    )


def fused_ln_l2_grad(backend: str | None = None) -> Callable | None:
    """The fused `ln_l2_grad(z, target, gamma, beta)` for this backend, or None on the CPU.

    z, target: (..., nh, R, N) with the head axis third from the end; gamma, beta: nh x N values
    (any shape that reshapes to (nh, N)). Returns G with z's shape and dtype.
    """
    backend = backend or custom_kernel_backend()
    if backend is None:
        return None
    kernel = _ln_l2_grad_kernel(backend)

    def ln_l2_grad(z: mx.array, target: mx.array, gamma: mx.array, beta: mx.array) -> mx.array:
        nh, rows_per_head, n = z.shape[-3:]
        rows = math.prod(z.shape[:-1])
        (grad,) = kernel(
            inputs=[z, mx.broadcast_to(target, z.shape), gamma.reshape(nh, n), beta.reshape(nh, n)],
            template=[
                ("T", z.dtype),
                ("N", n),
                ("ROWS", rows),
                ("ROWS_PER_HEAD", rows_per_head),
                ("NH", nh),
            ],
            grid=(rows, 1, 1),
            threadgroup=(min(256, rows), 1, 1),
            output_shapes=[z.shape],
            output_dtypes=[z.dtype],
        )
        return grad

    return ln_l2_grad
