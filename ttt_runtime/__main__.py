"""`python -m ttt_runtime run --socket PATH ...` (console script `ttt-run`): a TTT run that
streams telemetry to any monitor that attaches (`xltop --attach PATH`).

Exit codes: 0 after `stop` (or SIGTERM, SIGHUP, or Ctrl-C), 2 with a one-line message for a bad
configuration, 1 after sending an "error" message when the run raises.

Without --socket the run listens in a private folder it makes; that folder, or the socket's
folder given with --remove-socket-dir, is removed at every exit the process lives through.
"""

from __future__ import annotations

import os
import signal
import sys

from ttt_runtime.blas import BLAS_DECIDED, preload_environment
from ttt_runtime.config import ConfigError, parse_run_args, placement_from_args
from ttt_runtime.console import say
from ttt_runtime.launch import STOP_SIGNALS, private_socket_path, remove_private_socket


def _fail(message: str) -> int:
    say(f"ttt-run: error: {message}")
    return 2


BUNDLED_BLAS_NOTE = (
    "ttt-run: the run uses MLX's bundled BLAS, ~40x slower at GEMM than OpenBLAS: none was "
    "found that runs on this machine (apt-get install libopenblas0-pthread)"
)


def _reexecute_with_blas_preload() -> None:
    """Run this command again, in this process, with the optimized BLAS preloaded (LD_PRELOAD
    acts only at exec), unless whoever started it decided already (xltop's launcher, a Ray
    actor, a first re-execution) or there is nothing to preload."""
    if BLAS_DECIDED in os.environ:
        return
    env = {**os.environ, **preload_environment(os.environ)}
    if env.get("LD_PRELOAD", "") == os.environ.get("LD_PRELOAD", ""):
        return  # none found, or it is preloaded already
    try:  # the same interpreter, options and script: sys.orig_argv is the command line itself
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError as exc:  # the run goes on, on the bundled BLAS (its header says so)
        say(f"ttt-run: could not re-execute with OpenBLAS preloaded: {exc}")


def _stdin_is_open() -> bool:
    try:
        os.fstat(0)
    except OSError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    """The `ttt-run` command, with `sys.argv` unless `argv` is given (and then, called from
    another program, it never re-executes that program)."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:  # `python -m ttt_runtime run ...`; `ttt-run ...` works too
        argv = argv[1:]
    try:
        args, config = parse_run_args(argv)
        placement = placement_from_args(args, config)
    except ConfigError as exc:
        return _fail(str(exc))
    if args.exit_with_parent and not _stdin_is_open():
        # else the lifeline would watch whatever file is opened next as fd 0 (our socket)
        return _fail("--exit-with-parent: stdin is closed; it must be the starting process's pipe")
    if from_command_line and not args.no_blas_preload:
        _reexecute_with_blas_preload()  # a run started by hand gets the fast BLAS too
    socket_path, private = args.socket, args.remove_socket_dir
    if socket_path is None:
        socket_path, private = private_socket_path(), True

    def stop_during_setup(_signum, _frame) -> None:
        # Until the loop takes these signals over (stop after the step), stop at once. Not by
        # raising SystemExit: landing amid MLX's import or setup, the interpreter's teardown
        # can abort (SIGABRT was seen); nothing is open yet that needs more than this cleanup.
        if private:
            remove_private_socket(socket_path)
        os._exit(0)

    for signum in STOP_SIGNALS:
        signal.signal(signum, stop_during_setup)
    try:
        return _run(args, config, placement, socket_path)
    finally:
        if private:
            remove_private_socket(socket_path)


def _run(args, config, placement, socket_path: str) -> int:
    from ttt_runtime.run import SetupError, TTTRun  # MLX only from here on

    try:
        run = TTTRun(config, socket_path=socket_path, resume=args.resume, placement=placement)
    except SetupError as exc:
        return _fail(str(exc))
    if run.blas == "bundled" and not args.no_blas_preload:
        say(BUNDLED_BLAS_NOTE)
    if args.socket is None:
        say(f"ttt-run: listening on {socket_path} (xltop --attach {socket_path})")
    if args.exit_with_parent:
        run.stop_when_stdin_closes()
    return run.serve()


if __name__ == "__main__":
    sys.exit(main())
