"""The wheel carries every module and the kernel sources (as data, not a `kernels` package)."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_has_every_module_and_kernel(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = tmp_path.glob("xltop-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    expected = {
        p.relative_to(ROOT).as_posix()
        for pkg in ("xltop", "ttt_runtime")
        for p in (ROOT / pkg).rglob("*")
        if p.suffix in {".py", ".tcss"} and "__pycache__" not in p.parts
    }
    kernels = [p for p in (ROOT / "kernels").rglob("*") if p.suffix in {".metal", ".cu", ".md"}]
    expected |= {
        "ttt_runtime/_kernels/" + p.relative_to(ROOT / "kernels").as_posix() for p in kernels
    }

    assert kernels, "kernels/ holds no kernel sources"
    assert expected - names == set()
    assert not any(n.startswith("kernels/") for n in names), "kernels/ must not be top-level"
