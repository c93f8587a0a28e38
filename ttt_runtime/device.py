"""The device the run computes on and its MLX memory, as this process sees them (MLX's
counters are per process: only the run can report its own)."""

from __future__ import annotations

import mlx.core as mx

from ttt_runtime.config import physical_memory


def device_info() -> dict:
    """The run's device as MLX describes it in this process (see `describe_device`)."""
    backend = backend_name(mx.default_device(), mx.cuda.is_available())
    return describe_device(mx.device_info(), backend)


def backend_name(device: mx.Device, cuda_available: bool) -> str:
    """'cpu', 'cuda', or 'gpu' for Metal (MLX's GPU is one or the other)."""
    if device.type == mx.DeviceType.cpu:
        return "cpu"
    return "cuda" if cuda_available else "gpu"


def describe_device(info: dict, backend: str) -> dict:
    """Backend, name, memory size and (Metal) recommended working set, from `mx.device_info()`.

    Metal reports the memory size and the working set; MLX's CPU backend only names the device,
    so the memory size is the machine's there and the working set None."""
    return {
        "backend": backend,
        "device": str(info.get("device_name", "")),
        "memory_size": int(info.get("memory_size") or physical_memory() or 0),
        "working_set": info.get("max_recommended_working_set_size"),
    }


def memory_counters() -> dict:
    """This process's MLX memory in bytes (MLX counters are per process)."""
    return {
        "active": mx.get_active_memory(),
        "cache": mx.get_cache_memory(),
        "peak": mx.get_peak_memory(),
        "limit": mx.get_memory_limit(),
    }
