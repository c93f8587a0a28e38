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
