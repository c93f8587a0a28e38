"""Which BLAS the run uses, and which optimized one a child process preloads.

MLX's Linux CPU wheel links a reference BLAS ~40x slower than OpenBLAS at GEMM. A process
started with an optimized BLAS in LD_PRELOAD resolves the BLAS symbols to it instead. The
system's OpenBLAS comes first; without one (no root, a fresh machine), the `cmeel-openblas`
wheel's, whose `libgfortran.so.5` is MLX's own bundled copy. No MLX here: the launcher
(imported by xltop) uses `preload_environment`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import platform
import sys
from collections.abc import Mapping
from typing import NamedTuple

# Debian/Ubuntu, Fedora/RHEL and Arch layouts; the pthread variant first (it uses both cores)
SYSTEM_OPENBLAS = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

# Set in the environment of a process whose BLAS preload was decided when it was started:
# ttt-run then does not re-execute itself to preload one (nor loop doing so).
BLAS_DECIDED = "TTT_RUN_BLAS_DECIDED"

# The CPU features the kernels of an OpenBLAS built for one target (DYNAMIC_ARCH=OFF, as the
# cmeel wheels are) execute: on a CPU without them the first GEMM dies of SIGILL.
_AVX512 = frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})
_TARGET_FLAGS = {
    "HASWELL": frozenset({"avx2", "fma"}),
    "ZEN": frozenset({"avx2", "fma"}),
    "SKYLAKEX": _AVX512,
    "COOPERLAKE": _AVX512 | {"avx512_bf16"},
}

# substrings of a mapped library's path -> the name reported, in order of precedence
_KNOWN = (
    ("openblas", "openblas"),
    ("libmkl", "mkl"),
    ("blis", "blis"),
    ("mlx_cpu.libs/libblas", "bundled"),
)
# NumPy's private OpenBLAS exports prefixed symbols only (scipy_cblas_*): MLX never calls it
_PRIVATE = ("numpy.libs", "scipy_openblas")


class BlasPreload(NamedTuple):
    """An optimized BLAS to LD_PRELOAD, the folders its own libraries are found in, and its
    OPENBLAS_NUM_THREADS unless the user set one (None: OpenBLAS's own choice)."""

    library: str
    library_path: tuple[str, ...] = ()
    threads: int | None = None


def find_optimized_blas(
    system: str = sys.platform, candidates: tuple[str, ...] = SYSTEM_OPENBLAS
) -> str | None:
    """Path of a system OpenBLAS to LD_PRELOAD, or None (not Linux, or none installed)."""
    if not system.startswith("linux"):
        return None
    arch = platform.machine()
    # exists() follows links: a package's link left dangling (Debian's alternatives) is passed
    return next((p for p in (c.format(arch=arch) for c in candidates) if os.path.exists(p)), None)


def find_blas_preload(
    system: str = sys.platform, candidates: tuple[str, ...] = SYSTEM_OPENBLAS
) -> BlasPreload | None:
    """The optimized BLAS a run preloads: the system's OpenBLAS (the first of `candidates`
    found), else the cmeel-openblas wheel's where it runs on this CPU, else None."""
    system_openblas = find_optimized_blas(system, candidates)
    if system_openblas:
        return BlasPreload(system_openblas)
    if not system.startswith("linux"):
        return None
    return _wheel_openblas(_cpu_flags())


def preload_environment(
    base_env: Mapping[str, str], enabled: bool = True, candidates: tuple[str, ...] = SYSTEM_OPENBLAS
) -> dict[str, str]:
    """The environment variables to set for a child process of `base_env` (a Ray actor's
    runtime_env env_vars, a run's launch) so it runs on the optimized BLAS: LD_PRELOAD with it
    first (an inherited BLAS entry dropped; without one found or when not `enabled`, MLX's
    bundled BLAS is used), LD_LIBRARY_PATH with its libraries' folders, OPENBLAS_NUM_THREADS
    for the wheel's, and BLAS_DECIDED."""
    preload = find_blas_preload(candidates=candidates) if enabled else None
    inherited = [p for p in base_env.get("LD_PRELOAD", "").split(":") if p and "blas" not in p]
    env = {BLAS_DECIDED: "1"}
    libraries = ([preload.library] if preload else []) + inherited
    if libraries or "LD_PRELOAD" in base_env:
        env["LD_PRELOAD"] = ":".join(libraries)
    if preload and preload.library_path:
        inherited_path = [p for p in base_env.get("LD_LIBRARY_PATH", "").split(":") if p]
        env["LD_LIBRARY_PATH"] = ":".join([*preload.library_path, *inherited_path])
    if preload and preload.threads and "OPENBLAS_NUM_THREADS" not in base_env:
        env["OPENBLAS_NUM_THREADS"] = str(preload.threads)
    return env


def openblas_runs_here(openblas_config: str, cpu_flags: frozenset[str]) -> bool:
    """Whether an OpenBLAS built with `openblas_config` (its pkg-config line: options and the
    target) can run on a CPU with `cpu_flags`. A target not known here is not risked."""
    words = openblas_config.split()
    if "DYNAMIC_ARCH=ON" in words:  # it picks its kernels for the CPU it runs on
        return True
    needs = [_TARGET_FLAGS[word] for word in words if word in _TARGET_FLAGS]
    return len(needs) == 1 and needs[0] <= cpu_flags


def _cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    try:
        with open(cpuinfo) as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def _wheel_openblas(cpu_flags: frozenset[str]) -> BlasPreload | None:
    """The cmeel-openblas wheel's library with MLX's bundled libgfortran, if both are
    installed and the wheel's build target runs on this CPU."""
    try:
        wheel = importlib.metadata.distribution("cmeel-openblas")
        mlx_cpu = importlib.metadata.distribution("mlx-cpu")
    except importlib.metadata.PackageNotFoundError:
        return None
    library = str(wheel.locate_file("cmeel.prefix/lib/libopenblas.so.0"))
    try:
        with open(str(wheel.locate_file("cmeel.prefix/lib/pkgconfig/openblas.pc"))) as handle:
            config = next((line for line in handle if line.startswith("openblas_config=")), "")
    except OSError:
        return None
    bundled = (f for f in mlx_cpu.files or () if f.parent.name == "mlx_cpu.libs")
    gfortran = next((str(mlx_cpu.locate_file(f)) for f in bundled if "libgfortran" in f.name), None)
    if not (os.path.exists(library) and gfortran and openblas_runs_here(config, cpu_flags)):
        return None
    link_folder = _gfortran_link_folder(gfortran)
    if link_folder is None:
        return None
    # MLX's libgfortran looks for its libquadmath beside it ($ORIGIN): that is the link's
    # folder, so MLX's own folder is on the path too. One thread: the wheel's build waits for
    # its threads by spinning on nops (Debian's calls sched_yield), and with another process
    # on the cores each GEMM then waits out a time slice (a step took 5 s instead of 0.4 s).
    return BlasPreload(library, (link_folder, os.path.dirname(gfortran)), threads=1)


def _gfortran_link_folder(gfortran: str) -> str | None:
    """A folder in the user's cache holding `libgfortran.so.5` -> `gfortran`, or None if it
    cannot be made. The wheel's OpenBLAS needs that name; MLX's copy was renamed (and its
    soname with it) when its wheel was built, so only a link of that name can answer."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    digest = hashlib.sha256(gfortran.encode()).hexdigest()[:16]  # one folder per MLX install
    folder = os.path.join(cache, "xltop", f"gfortran-{digest}")
    link = os.path.join(folder, "libgfortran.so.5")
    if os.path.realpath(link) == os.path.realpath(gfortran):
        return folder
    staged = f"{link}.{os.getpid()}"  # then renamed: a run starting now sees no half link
    try:
        os.makedirs(folder, exist_ok=True)
        os.symlink(gfortran, staged)
        os.replace(staged, link)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(staged)
        return None
    return folder


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
