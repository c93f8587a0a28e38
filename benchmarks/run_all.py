"""Every benchmark, one after another, each in its own interpreter (`make bench`).

Each script prints its own figures side by side; this only runs them in turn and says which
ones failed. Extra arguments after `--only` pick scripts by name (e.g. `--only swar layers`).
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = sorted(HERE.glob("bench_*.py"))


def main() -> int:
    names = [script.stem.removeprefix("bench_") for script in SCRIPTS]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=names, metavar="NAME", help=", ".join(names))
    args = parser.parse_args()
    failed = []
    for script, name in zip(SCRIPTS, names, strict=True):
        if args.only and name not in args.only:
            continue
        print(f"\n=== {script.name} ===", flush=True)
        start = time.monotonic()
        code = subprocess.call([sys.executable, str(script)])
        print(f"--- {script.name}: exit {code}, {time.monotonic() - start:.0f} s", flush=True)
        if code:
            failed.append(script.name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
