"""`python -m ttt_runtime run --socket PATH ...` (console script `ttt-run`): a TTT run that
streams telemetry to any monitor that attaches (`xltop --attach PATH`).

Exit codes: 0 after `stop` (or SIGTERM), 2 with a one-line message for a bad configuration,
1 after sending an "error" message when the run raises.
"""

from __future__ import annotations

import sys

from ttt_runtime.config import ConfigError, parse_run_args


def _fail(message: str) -> int:
    print(f"ttt-run: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:  # `python -m ttt_runtime run ...`; `ttt-run ...` works too
        argv = argv[1:]
    try:
        args, config = parse_run_args(argv)
    except ConfigError as exc:
        return _fail(str(exc))

    from ttt_runtime.run import SetupError, TTTRun  # MLX only from here on

    try:
        run = TTTRun(config, socket_path=args.socket, resume=args.resume)
    except SetupError as exc:
        return _fail(str(exc))
    if args.exit_with_parent:
        run.stop_when_stdin_closes()
    return run.serve()


if __name__ == "__main__":
    sys.exit(main())
