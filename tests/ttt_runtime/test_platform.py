"""The macOS (Apple silicon) paths, run here on Linux by choosing them through explicit seams:
Metal's device description, Accelerate as the BLAS, and a channel with no peer credentials."""

from __future__ import annotations

import os
import socket
import tempfile

import mlx.core as mx
import pytest
from messages import HELLO, telemetry

from ttt_runtime import channel
from ttt_runtime.blas import find_optimized_blas, loaded_blas
from ttt_runtime.channel import ChannelClient, ChannelServer, peer_uid
from ttt_runtime.device import backend_name, describe_device, device_info, memory_counters
from ttt_runtime.launch import private_socket_path
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
