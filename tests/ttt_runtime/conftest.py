"""Fixtures for the runtime's tests (the spawned run itself is in tests/conftest.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest


@pytest.fixture
def private_tmpdir(tmp_path) -> Path:
    """A TMPDIR of the test's own, so that it sees only the private folders of its own runs.
    MLX keeps its compiled CPU kernels in TMPDIR/mlx: that one is linked to the usual one, or
    every run would compile them again (a minute on a small machine)."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    kernels = Path(tempfile.gettempdir()) / "mlx"
    kernels.mkdir(exist_ok=True)
    (tmpdir / "mlx").symlink_to(kernels)
    return tmpdir


@pytest.fixture(scope="session")
def small_base(tmp_path_factory) -> str:
    """A small real base to adapt (`make base` at the tiny preset and a tiny budget): trained on
    the code corpus, with the feature statistics ttt++ needs. Its checkpoint's path."""
    from ttt_runtime.adapt.make_base import train_base
    from ttt_runtime.config import RunConfig

    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    return train_base(RunConfig.from_preset("tiny"), steps=150, path=str(path)).path
