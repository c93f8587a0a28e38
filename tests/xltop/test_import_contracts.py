"""The import arrows of docs/architecture.md are enforced by lint-imports, and contracts bite."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
VERDICT = re.compile(r"^(.+) (KEPT|BROKEN)(?: \(.*\))?$", re.MULTILINE)
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CONTRACTS = {c["name"]: c for c in PYPROJECT["tool"]["importlinter"]["contracts"]}
ONLY_TUI = next(c for c in CONTRACTS.values() if "textual" in c.get("protected_modules", []))
NO_MLX = next(c for c in CONTRACTS.values() if c.get("forbidden_modules") == ["mlx"])
NO_XLTOP = next(c for c in CONTRACTS.values() if c.get("forbidden_modules") == ["xltop"])


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(root))  # the packages under `root` shadow the repo's
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True,
        timeout=180,
    )  # fmt: skip


def test_the_repository_keeps_every_contract():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_each_contract_fails_on_a_deliberate_violation(tmp_path):
    for package in ("xltop", "ttt_runtime"):
        shutil.copytree(REPO / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    # A new core module, named nowhere, that imports textual; and Textual reached indirectly: a
    # core module imports a widget.
    (tmp_path / "xltop" / "sneaky_ui.py").write_text("import textual.widget\n")
    with open(tmp_path / "xltop" / "table.py", "a") as f:
        f.write("\nimport xltop.tui.widgets.header\n")
    with open(tmp_path / "xltop" / "jsonout.py", "a") as f:
        f.write("\nimport mlx.core\n")
    with open(tmp_path / "ttt_runtime" / "protocol.py", "a") as f:
        f.write("\nimport xltop.snapshot\n")

    result = lint_imports(tmp_path)
    assert result.returncode != 0
    verdicts = dict(VERDICT.findall(result.stdout))
    for contract, culprit in ((ONLY_TUI, "xltop.sneaky_ui -> textual"),
                              (ONLY_TUI, "xltop.table -> xltop.tui.widgets.header"),
                              (NO_MLX, "xltop.jsonout"),
                              (NO_XLTOP, "ttt_runtime.protocol")):  # fmt: skip
        assert verdicts[contract["name"]] == "BROKEN", result.stdout
        assert culprit in result.stdout


def test_headless_paths_load_neither_mlx_nor_textual(tmp_path):
    # The static contracts above, checked once more at run time: a whole --once with a hosted
    # run's flags validated, in a fresh interpreter, must not have loaded either.
    code = (
        "import sys\n"
        "from xltop.cli import main\n"
        "from xltop.runsources import validate_run_args\n"
        "assert validate_run_args(['--preset', 'tiny', '--mode', 'adapt']) is None\n"
        "main(['--once', '--no-run'])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'textual')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
