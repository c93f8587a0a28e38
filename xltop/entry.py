"""The `xltop` command's entry: it takes SIGTERM before anything heavy is imported.

Importing xltop.cli (Textual, the sources, the CSV sink) takes a few hundred milliseconds, and
the command's own SIGTERM handling (stop the run, close the CSV, restore the terminal) starts
only once there is something to clean up. A SIGTERM before that ends the process at once with
exit 0, as a quit would: nothing has been started that needs more.
"""

import os
import signal


def _quit_before_start(signum: int, frame: object) -> None:
    os._exit(0)


def main() -> int:
    signal.signal(signal.SIGTERM, _quit_before_start)
    from xltop.cli import main as run_command

    return run_command()
