"""`make base` (python -m ttt_runtime.adapt.make_base): a base with ttt++'s statistics, or one
line and exit 2."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from ttt_runtime import checkpoint as ckpt


def make_base(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ttt_runtime.adapt.make_base", *args],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_it_trains_and_saves_a_base_with_the_statistics_and_says_how_it_went(tmp_path):
    out = tmp_path / "base.safetensors"
    result = make_base(str(out), "--preset", "tiny", "--steps", "5")
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    assert line.startswith(f"base {out}: 5 steps in ") and "(held-out code)" in line
    base = ckpt.load(str(out))
    assert base.step == 5 and base.config["mode"] == "train"
    assert {"stats.feature_mean", "stats.feature_cov"} <= set(base.arrays)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "0"], "--steps 0: must be at least 1"),
        (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
        (["--preset", "huge"], "preset='huge': must be one of"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(tmp_path, args, message):
    result = make_base(str(tmp_path / "base.safetensors"), *args)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("make_base: error: ") and message in line
    assert not list(tmp_path.iterdir())


def test_an_unwritable_target_is_one_line_and_exit_2(tmp_path):
    target = tmp_path / "a-folder"
    target.mkdir()
    result = make_base(str(target), "--preset", "tiny", "--steps", "1")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"make_base: error: cannot write checkpoint {target}: not a regular file"
    ]


def test_a_target_it_could_not_write_is_refused_before_the_training(tmp_path):
    """A folder that cannot be made is found at once, not after the minutes of training."""
    (tmp_path / "a-file").write_text("not a folder")
    target = tmp_path / "a-file" / "base.safetensors"
    start = time.monotonic()
    result = make_base(str(target), "--preset", "tiny", "--steps", "100000")
    assert time.monotonic() - start < 60 and result.returncode == 2
    assert result.stderr.splitlines() == [
        f"make_base: error: cannot write checkpoint {target}: {target.parent} is not a folder"
    ]
