"""Which BLAS the run uses, and where an optimized one is to be found for preloading.

MLX's Linux CPU wheel links a reference BLAS ~40x slower than OpenBLAS at GEMM. A process
started with an optimized BLAS in LD_PRELOAD resolves the BLAS symbols to it instead. No MLX
here: the launcher (imported by xltop) uses `find_optimized_blas`.
"""

from __future__ import annotations

import glob
import platform
import sys

# Debian/Ubuntu, Fedora/RHEL and Arch layouts; the pthread variant first (it uses both cores)
_CANDIDATES = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

# substrings of a mapped library's path -> the name reported, in order of precedence
_KNOWN = (
    ("openblas", "openblas"),
    ("libmkl", "mkl"),
    ("blis", "blis"),
    ("mlx_cpu.libs/libblas", "bundled"),
)
# NumPy's private OpenBLAS exports prefixed symbols only (scipy_cblas_*): MLX never calls it
_PRIVATE = ("numpy.libs", "scipy_openblas")


def find_optimized_blas(system: str = sys.platform) -> str | None:
    """Path of a system OpenBLAS to LD_PRELOAD, or None (not Linux, or none installed)."""
    if not system.startswith("linux"):
        return None
    arch = platform.machine()
    for pattern in _CANDIDATES:
        found = glob.glob(pattern.format(arch=arch))
        if found:
            return found[0]
    return None


def loaded_blas(maps_path: str = "/proc/self/maps", system: str = sys.platform) -> str:
    """The BLAS this process has mapped ('openblas', 'bundled', ...), from /proc/self/maps.

    A preloaded library comes first in symbol resolution, so an optimized one found beside
    MLX's bundled one is the one in use. 'accelerate' on macOS, where MLX always links Apple's
    Accelerate and there is no /proc to read; 'unknown' if nothing known is mapped.
    """
    if system == "darwin":
        return "accelerate"
    try:
        with open(maps_path) as handle:
            paths = {line.split(maxsplit=5)[-1].strip() for line in handle if "/" in line}
        paths = {p for p in paths if not any(private in p for private in _PRIVATE)}
    except OSError:
        return "unknown"
    for needle, name in _KNOWN:
        if any(needle in path for path in paths):
            return name
    return "unknown"
