"""The macOS (Apple silicon) paths, run here on Linux by choosing them through explicit seams:
Metal's device description, Accelerate as the BLAS, and a channel with no peer credentials. And
a Linux machine without the system's OpenBLAS (hidden from the finder's search path): the run
gets the cmeel-openblas wheel's, also when started by hand."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import tempfile

import mlx.core as mx
import pytest
from messages import HELLO, telemetry
from polling import run_client
from test_run import report

from ttt_runtime import channel
from ttt_runtime.blas import (
    BLAS_DECIDED,
    find_blas_preload,
    find_optimized_blas,
    loaded_blas,
    openblas_runs_here,
    preload_environment,
)
from ttt_runtime.channel import ChannelClient, ChannelServer, peer_uid
from ttt_runtime.device import backend_name, describe_device, device_info, memory_counters
from ttt_runtime.launch import RunProcess, private_socket_path
from ttt_runtime.protocol import MlxReport
from xltop.runsources import run_info_from_telemetry

# mx.device_info() on an Apple M1 Pro with 16 GB, as MLX's Metal backend describes it
METAL_DEVICE_INFO = {
    "architecture": "applegpu_g13s",
    "device_name": "Apple M1 Pro",
    "memory_size": 17179869184,
    "max_buffer_length": 9663676416,
    "max_recommended_working_set_size": 11453251584,
    "resource_limit": 499000,
}


def test_metal_backends_are_named_apart_from_the_cpu():
    assert backend_name(mx.Device(mx.cpu), cuda_available=False) == "cpu"
    assert backend_name(mx.Device(mx.gpu), cuda_available=False) == "gpu"  # Metal
    assert backend_name(mx.Device(mx.gpu), cuda_available=True) == "cuda"


def test_a_metal_device_gives_its_working_set_as_the_runs_ceiling():
    device = describe_device(METAL_DEVICE_INFO, "gpu")
    assert device == {
        "backend": "gpu",
        "device": "Apple M1 Pro",
        "memory_size": 17179869184,
        "working_set": 11453251584,
    }
    # What the monitor makes of it: the working set, not the machine's memory, is the limit.
    report = telemetry(3, mlx=MlxReport(**device, **memory_counters()))
    mlx = run_info_from_telemetry(report).mlx
    assert mlx.limit == 11453251584 and (mlx.backend, mlx.device) == ("gpu", "Apple M1 Pro")


def test_the_cpu_device_here_has_no_working_set_and_the_machines_memory():
    device = device_info()
    assert device["backend"] == "cpu" and device["working_set"] is None
    assert device["memory_size"] == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert device["device"] == mx.device_info()["device_name"]


def test_macos_reports_accelerate_and_preloads_nothing(tmp_path):
    # macOS has neither /proc nor LD_PRELOAD: no search, and MLX's own Accelerate is named.
    assert find_optimized_blas(system="darwin") is None
    assert find_blas_preload(system="darwin") is None
    assert loaded_blas(str(tmp_path / "no-such-maps"), system="darwin") == "accelerate"
    assert loaded_blas(str(tmp_path / "no-such-maps"), system="linux") == "unknown"


def test_peer_uid_is_none_where_the_os_has_no_so_peercred(monkeypatch):
    near, far = socket.socketpair(socket.AF_UNIX)
    with near, far:
        assert peer_uid(near) == os.getuid()
        monkeypatch.setattr(channel, "PEERCRED_OPTION", None)  # what macOS's socket module has
        assert peer_uid(near) is None


def _knock(path: str) -> str:
    """What another user gets from the socket at `path` (run in the child that is nobody)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except PermissionError:
        return "denied"
    sock.settimeout(10)
    return "greeted" if sock.recv(100) else "closed"


def _greets_its_own_user(path: str) -> bool:
    client = ChannelClient.connect(path, timeout=5)
    try:
        return client.hello == HELLO
    finally:
        client.close()


@pytest.mark.parametrize(
    "peercred", [getattr(socket, "SO_PEERCRED", None), None], ids=["linux", "macos"]
)
def test_without_peer_credentials_the_files_modes_keep_other_users_out(
    monkeypatch, as_nobody, peercred
):
    monkeypatch.setattr(channel, "PEERCRED_OPTION", peercred)
    # Where a run listens by default: a folder of its own that only its user can enter.
    private = ChannelServer(private_socket_path(), HELLO)
    try:
        assert _greets_its_own_user(private.path)
        os.chmod(private.path, 0o666)
        assert as_nobody(lambda: _knock(private.path)) == "denied"
    finally:
        private.close()
        os.rmdir(os.path.dirname(private.path))
    # A --socket in a folder others may enter: the socket's own mode 0600 still refuses them.
    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o755)
        shared = ChannelServer(os.path.join(folder, "run.sock"), HELLO)
        try:
            assert as_nobody(lambda: _knock(shared.path)) == "denied"
            # Widened on purpose: only the peer-credential check is left, and macOS has none.
            os.chmod(shared.path, 0o666)
            expected = "closed" if peercred is not None else "greeted"
            assert as_nobody(lambda: _knock(shared.path)) == expected
        finally:
            shared.close()


# The wheel's pkg-config line (cmeel-openblas 0.3.31 and 0.3.23 were built for SKYLAKEX: on a
# CPU without AVX-512, such as this machine's EPYC, their first GEMM died of SIGILL)
WHEEL_CONFIG = "USE_64BITINT= NO_CBLAS= DYNAMIC_ARCH=OFF NO_AFFINITY=ON {} MAX_THREADS=4"
AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma"})
AVX512 = AVX2 | {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}
WHEEL_HERE = sys.platform == "linux" and platform.machine() == "x86_64"


def test_a_wheels_openblas_is_used_only_on_a_cpu_that_runs_its_build_target():
    assert openblas_runs_here(WHEEL_CONFIG.format("ZEN"), AVX2)
    assert not openblas_runs_here(WHEEL_CONFIG.format("SKYLAKEX"), AVX2)
    assert openblas_runs_here(WHEEL_CONFIG.format("SKYLAKEX"), AVX512)
    assert not openblas_runs_here(WHEEL_CONFIG.format("ZEN"), frozenset({"sse4_2", "avx"}))
    assert not openblas_runs_here(WHEEL_CONFIG.format("NEOVERSEN2"), AVX512)  # unknown: not risked
    dynamic = WHEEL_CONFIG.format("HASWELL").replace("DYNAMIC_ARCH=OFF", "DYNAMIC_ARCH=ON")
    assert openblas_runs_here(dynamic, frozenset())  # it picks its kernels when it loads


def test_a_dangling_link_is_no_system_openblas(tmp_path):
    # Debian's alternatives link stays behind when its package is removed
    (tmp_path / "libopenblas.so.0").symlink_to(tmp_path / "removed" / "libopenblas.so.0")
    (tmp_path / "libblas.so.3").write_bytes(b"")
    candidates = (str(tmp_path / "libopenblas.so.0"), str(tmp_path / "libblas.so.3"))
    assert find_optimized_blas("linux", candidates) == str(tmp_path / "libblas.so.3")
    assert find_optimized_blas("linux", candidates[:1]) is None


@pytest.fixture
def run_by_hand(tmp_path):
    """Factory: `run_by_hand(*args, env=ENV) -> RunProcess`: `python -m ttt_runtime run
    --preset tiny --socket PATH ARGS` started as a person would (no launcher), in `env`.
    Every run is stopped at teardown."""
    runs: list[RunProcess] = []

    def start(*args: str, env: dict[str, str]) -> RunProcess:
        socket_path = str(tmp_path / f"{len(runs)}.sock")
        command = [sys.executable, "-m", "ttt_runtime", "run", "--preset", "tiny"]
        popen = subprocess.Popen(
            [*command, "--socket", socket_path, *args], env=env, text=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        runs.append(RunProcess(popen, socket_path, private=False))
        return runs[-1]

    yield start
    for run in runs:
        run.stop(timeout=10.0)


def _blas_in_use(run: RunProcess) -> tuple[str, set[str]]:
    """The BLAS the run reports once it steps, and the BLAS-related libraries it has mapped."""
    client = run_client(run, 90.0)
    try:
        blas = report(client, lambda m: m.step >= 2).blas
    finally:
        client.close()
    with open(f"/proc/{run.pid}/maps") as handle:
        paths = {line.split(maxsplit=5)[-1].strip() for line in handle if "/" in line}
    return blas, {p for p in paths if "blas" in p or "gfortran" in p}


@pytest.mark.slow
@pytest.mark.skipif(not WHEEL_HERE, reason="the cmeel-openblas wheel is for x86-64 Linux")
def test_without_a_system_openblas_the_run_preloads_the_wheels_with_mlxs_gfortran(
    run_by_hand, tmp_path, monkeypatch
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the libgfortran.so.5 link
    preload = find_blas_preload(candidates=())  # no system OpenBLAS is found
    assert preload is not None and "cmeel.prefix" in preload.library
    base = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    env = {**base, **preload_environment(base, candidates=())}
    assert env["LD_PRELOAD"].split(":")[0] == preload.library
    assert env["OPENBLAS_NUM_THREADS"] == "1"  # its threads spin: a busy core stalls each GEMM
    mine = preload_environment({**base, "OPENBLAS_NUM_THREADS": "2"}, candidates=())
    assert "OPENBLAS_NUM_THREADS" not in mine  # the user's choice stands
    blas, mapped = _blas_in_use(run_by_hand(env=env))
    assert blas == "openblas"
    assert preload.library in mapped  # first in LD_PRELOAD: MLX's GEMM calls resolve to it
    # its libgfortran.so.5 is MLX's own copy, found through the link (a fresh machine has no
    # other), never the system's (CI's is there: installed with the system OpenBLAS). Only
    # wheels' private copies are mapped (NumPy brings its own, for its own OpenBLAS).
    gfortran = {p for p in mapped if "gfortran" in p}
    assert all(".libs/libgfortran-" in p for p in gfortran), gfortran
    assert any("/mlx_cpu.libs/" in p for p in gfortran), gfortran
    assert os.path.islink(tmp_path / "cache" / "xltop" / os.path.basename(
        preload.library_path[0]) / "libgfortran.so.5")  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(find_blas_preload() is None, reason="no optimized BLAS to preload here")
def test_a_run_started_by_hand_reexecutes_itself_once_with_the_optimized_blas(run_by_hand):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", BLAS_DECIDED)}
    run = run_by_hand(env=env)
    blas, mapped = _blas_in_use(run)
    assert blas == "openblas" and find_blas_preload().library in mapped
    with open(f"/proc/{run.pid}/environ", "rb") as handle:  # the pid's environment at its exec
        assert f"{BLAS_DECIDED}=1".encode() in handle.read().split(b"\0")
    assert run.stop() == 0 and "bundled BLAS" not in run.stderr_tail()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["--no-blas-preload", "decided"])
def test_a_run_told_not_to_preload_stays_on_the_bundled_blas(run_by_hand, how):
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if how == "decided":  # as a launcher that found no optimized BLAS starts it
        run = run_by_hand(env={**env, BLAS_DECIDED: "1"})
    else:
        run = run_by_hand("--no-blas-preload", env=env)
    assert _blas_in_use(run)[0] == "bundled"
    assert run.stop() == 0
    # said once, on stderr, unless the bundled BLAS was asked for
    expected = 0 if how == "--no-blas-preload" else 1
    assert run.stderr_tail().count("the run uses MLX's bundled BLAS") == expected
