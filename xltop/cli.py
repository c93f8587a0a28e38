"""`xltop`: the command line. Every mode is the same Monitor feeding different sinks.

xltop                      the TUI, hosting the default TTT run
xltop --headless --csv F   no screen: a CSV row and a status line (stderr) per tick
xltop --once | --json      one snapshot as a text table / as JSON, then exit
xltop --json-stream        one JSON line per tick on stdout
xltop --no-run | --attach SOCKET   watch the machine only / a run started elsewhere
xltop --ray ADDR           watch a Ray cluster too (and start no run unless run options ask)
xltop --replay FILE.csv    play a CSV log in the TUI (with --once: sum it up)
xltop --serve              serve the TUI to a browser (textual-serve), on loopback unless --expose
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import shlex
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, NoReturn

import psutil

from xltop import __version__, units
from xltop.csvlog import CsvLogError, CsvSink, check_writable
from xltop.jsonout import snapshot_to_line
from xltop.monitor import (
    MAX_INTERVAL_S,
    MIN_INTERVAL_S,
    ClusterUnavailable,
    Monitor,
    RuntimeSource,
)
from xltop.snapshot import RunState, Snapshot
from xltop.sources import SystemSource
from xltop.table import format_snapshot, status_line
from xltop.units import printable
from xltop.watchdog import Threshold, Watchdog

if TYPE_CHECKING:  # imported where a cluster is watched: urllib's import is not light
    from xltop.raycluster import RayCluster
    from xltop.replay import Recording, ReplayPlayer
    from xltop.tui.app import XltopApp  # imported for the TUI only: Textual is not light

RUN_FLAGS = (
    "mode", "preset", "config", "data", "seed", "resume", "adapt_method", "stages", "replicas",
)  # fmt: skip
DEFAULT_INTERVAL_S = 1.0
MAX_DURATION_S = 365 * 86400.0  # longer: leave --duration out
READY_TIMEOUT_S = 120.0  # a run's first step includes importing MLX and building the model
ATTACHED_READY_TIMEOUT_S = 10.0  # an attached run is up already (it may be paused and silent)
# A cluster that does not answer: one line and exit 1 within 5 s, the interpreter's start included.
RAY_CHECK_TIMEOUT_S = 4.0
RAY_READY_TIMEOUT_S = 10.0  # the first whole poll: the lists, then each node's stats in turn
SERVE_HOST, SERVE_PORT = "127.0.0.1", 8000


class UsageError(Exception):
    """A bad flag or value: one line on stderr, exit 2."""


def _to_stderr(line: str) -> None:
    """One line on stderr. A closed stderr (2>&-: sys.stderr is None) or a broken one (its
    reader gone) never stops xltop's logging or its run, and nothing goes to stdout instead."""
    if sys.stderr is not None:
        with contextlib.suppress(OSError):  # BrokenPipeError, or EIO from a closed terminal
            print(line, file=sys.stderr, flush=True)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        _to_stderr(f"xltop: {message} (see xltop --help)")
        raise SystemExit(2)


def _number(kind: type, low: float, high: float, unit: str = "") -> Callable[[str], float]:
    """An argparse type: a `kind` from `low` to `high` (NaN and infinities are in no range)."""
    what = "an integer" if kind is int else "a number"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"{text!r} must be between {low:.10g} and {high:.10g}{unit}"
            )
        return value

    return parse


_SECONDS = _number(float, MIN_INTERVAL_S, MAX_INTERVAL_S, " seconds")


def _threshold(text: str) -> Threshold:
    try:
        return Threshold.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="xltop", description="top for test-time training on MLX")
    parser.add_argument("--version", action="version", version=f"xltop {__version__}")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--headless", action="store_true", help="no screen: status lines on stderr")
    out.add_argument("--once", action="store_true", help="print one snapshot as a table, exit")
    out.add_argument("--json", action="store_true", help="print one snapshot as JSON, exit")
    out.add_argument("--json-stream", action="store_true", help="one JSON line per tick")
    out.add_argument(
        "--poll",
        nargs="?",
        const=1.0,
        type=_SECONDS,
        metavar="S",
        help="the old memory monitor's flag: --headless every S seconds (default 1)",
    )
    parser.add_argument("--csv", metavar="PATH", help="log one CSV row per tick to PATH")
    parser.add_argument(
        "--interval",
        type=_SECONDS,
        metavar="S",
        help=f"seconds between ticks (default {DEFAULT_INTERVAL_S:g}, {MIN_INTERVAL_S:g} to "
        f"{MAX_INTERVAL_S:g})",
    )
    stop = parser.add_mutually_exclusive_group()
    stop.add_argument(
        "--count", type=_number(int, 1, 10**9), metavar="N", help="stop after N ticks"
    )
    stop.add_argument(
        "--duration",
        type=_number(float, MIN_INTERVAL_S, MAX_DURATION_S, " seconds"),
        metavar="S",
        help="stop after S seconds",
    )
    parser.add_argument("--quiet", action="store_true", help="no status lines in headless mode")
    parser.add_argument(
        "--top",
        type=_number(int, 1, 10**6),
        default=30,
        metavar="N",
        help="processes to list (default 30)",
    )
    parser.add_argument(
        "--mem-soft",
        type=_threshold,
        metavar="LIMIT",
        help="run memory (70%% or 8GiB) at which to clear its MLX cache",
    )
    parser.add_argument(
        "--mem-hard", type=_threshold, metavar="LIMIT", help="run memory at which to pause the run"
    )
    parser.add_argument("--readonly", action="store_true", help="TUI without kill/run commands")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--no-run", action="store_true", help="watch the machine, start no run")
    target.add_argument("--attach", metavar="SOCKET", help="watch a run started elsewhere")
    target.add_argument(
        "--replay",
        metavar="FILE.csv",
        help="play a CSV log that xltop wrote (keys: space, n, x); with --once, sum it up",
    )
    ray = parser.add_argument_group("Ray cluster")
    ray.add_argument(
        "--ray",
        metavar="ADDR",
        help="watch a Ray cluster: its dashboard (http://HOST:8265) or auto (the local one); "
        "starts no run unless run options or --attach are given",
    )
    ray.add_argument(
        "--ray-token-file",
        metavar="FILE",
        help="the cluster's token (else RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)",
    )
    serve = parser.add_argument_group("browser view")
    serve.add_argument(
        "--serve",
        action="store_true",
        help="serve the TUI to a browser: each page load starts its own xltop with these flags",
    )
    serve.add_argument("--host", help=f"address to serve on (default {SERVE_HOST})")
    serve.add_argument(
        "--port", type=_number(int, 1, 65535), help=f"port to serve on (default {SERVE_PORT})"
    )
    serve.add_argument(
        "--expose",
        action="store_true",
        help="allow a --host other than loopback: whoever reaches it gets the TUI, its run "
        "commands and kill included (add --readonly to keep those off)",
    )
    run = parser.add_argument_group("run options (passed to the hosted TTT run)")
    run.add_argument("--mode", choices=("train", "adapt"))
    run.add_argument("--preset", metavar="NAME")
    run.add_argument("--config", metavar="FILE.toml")
    run.add_argument("--data", metavar="PATH", help="text file or folder to stream")
    run.add_argument("--seed", metavar="N")  # checked with the other run flags, as ttt-run does
    run.add_argument("--resume", metavar="CKPT", help="resume from a checkpoint")
    run.add_argument(
        "--adapt-method",
        metavar="METHOD",
        help="adapt mode: ttt, reset, dynamic, lora, tent or ttt++ (docs/adaptation.md)",
    )
    run.add_argument(
        "--ray-run",
        action="store_true",
        help="spread the run over Ray actors on a private local cluster (its Ray panel shows)",
    )
    run.add_argument("--stages", metavar="N", help="--ray-run: pipeline stages (default 2)")
    run.add_argument("--replicas", metavar="N", help="--ray-run: copies of each stage (default 1)")
    run.add_argument(
        "--no-blas-preload",
        action="store_true",
        help="run with MLX's bundled BLAS (no OpenBLAS preload)",
    )
    return parser


def _flag(name: str) -> str:
    """A run option's flag, as both xltop and ttt-run spell it."""
    return "--" + name.replace("_", "-")


def _given_run_flags(args: argparse.Namespace) -> list[str]:
    given = [_flag(f) for f in RUN_FLAGS if getattr(args, f) is not None]
    return given + (["--ray-run"] if args.ray_run else [])


def _hosts_no_run(args: argparse.Namespace) -> bool:
    """--no-run, or --ray without run options or --attach: watching a cluster starts no run."""
    watches_cluster_only = args.ray is not None and not args.attach
    return args.no_run or (watches_cluster_only and not _given_run_flags(args))


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: it may resolve anywhere
        return False


def _check_serve(args: argparse.Namespace) -> None:
    if not args.serve:
        given = [f"--{f}" for f in ("host", "port") if getattr(args, f) is not None]
        if args.expose:
            given.append("--expose")
        if given:
            raise UsageError(f"{', '.join(given)}: only with --serve")
        return
    if args.once or args.json or args.json_stream or args.headless or args.poll:
        raise UsageError("--serve serves the TUI; not with --once, --json, --headless or --poll")
    if args.csv is not None:  # every page's xltop would append its own rows to the one file
        raise UsageError("--serve starts an xltop a page; not with --csv (log beside it: xltop "
                         "--attach SOCKET --headless --csv FILE)")  # fmt: skip
    host = args.host if args.host is not None else SERVE_HOST
    if not host.strip():  # aiohttp would listen on every address
        raise UsageError("--host is empty: give the address to serve on")
    if not _is_loopback(host) and not args.expose:
        raise UsageError(
            f"--host {host} is not a loopback address: whoever reaches it gets the TUI, its run "
            "commands and kill included; add --expose to mean it (and --readonly to keep those off)"
        )


def _check_replay(args: argparse.Namespace) -> None:
    """A replay shows a log in the TUI or sums it up: nothing live goes with it, and the log
    sets the pace and the count of ticks."""
    live = [
        flag
        for flag, given in (
            ("--ray", args.ray),
            ("--csv", args.csv),
            ("--mem-soft/--mem-hard", args.mem_soft or args.mem_hard),
            ("--headless", args.headless or args.poll),
            ("--json", args.json),
            ("--json-stream", args.json_stream),
            ("--interval", args.interval),
            ("--count", args.count),
            ("--duration", args.duration),
        )
        if given
    ]
    if live:
        raise UsageError(f"--replay plays a log; not with {', '.join(live)}")


def _check_combinations(args: argparse.Namespace) -> None:
    _check_serve(args)
    given = _given_run_flags(args)
    if given and (args.no_run or args.attach or args.replay):
        other = "--no-run" if args.no_run else "--attach" if args.attach else "--replay"
        raise UsageError(f"{', '.join(given)} configure a hosted run; not with {other}")
    if args.ray_token_file is not None and args.ray is None and not args.ray_run:
        raise UsageError("--ray-token-file needs --ray or --ray-run")
    if args.ray_run:  # read at the run's hello, its cluster started: a bad one must fail first
        _check_ray_token(args.ray_token_file)
    placement = [f"--{f}" for f in ("stages", "replicas") if getattr(args, f) is not None]
    if placement and not args.ray_run:
        raise UsageError(f"{', '.join(placement)}: only with --ray-run")
    if args.ray_run and args.ray is not None:
        raise UsageError("--ray-run starts a cluster of its own; not with --ray")
    if args.replay is not None:
        _check_replay(args)
    watchdog = args.mem_soft or args.mem_hard
    if watchdog and _hosts_no_run(args):
        why = "not with --no-run" if args.no_run else "--ray alone starts none"
        raise UsageError(f"--mem-soft/--mem-hard act on a run; {why} (add --attach or run options)")
    if watchdog and args.readonly:
        raise UsageError("--mem-soft/--mem-hard send commands to the run; not with --readonly")
    if args.mem_soft and args.mem_hard:
        total = psutil.virtual_memory().total
        if args.mem_soft.bytes_of(total) >= args.mem_hard.bytes_of(total):
            raise UsageError(f"--mem-soft {args.mem_soft} must be below --mem-hard {args.mem_hard}")
    if args.attach and not os.path.exists(args.attach):
        raise UsageError(f"--attach {args.attach}: no such socket")
    if args.attach and not stat.S_ISSOCK(os.stat(args.attach).st_mode):
        raise UsageError(f"--attach {args.attach}: not a socket")
    if args.csv is not None:
        try:
            check_writable(args.csv)
        except CsvLogError as exc:
            raise UsageError(str(exc)) from None


def _check_ray_token(token_file: str | None) -> None:
    from xltop.raycluster import RayClusterError, find_token

    try:
        find_token(token_file)
    except RayClusterError as exc:
        raise UsageError(str(exc)) from None


def _run_args(args: argparse.Namespace) -> list[str]:
    """The pass-through flags, validated here so a bad value fails before a run starts."""
    from xltop.runsources import validate_run_args

    argv = ["--ray", "local", "--dashboard", "true"] if args.ray_run else []
    for flag in RUN_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            argv += [_flag(flag), str(value)]
    error = validate_run_args(argv)
    if error:
        raise UsageError(error)
    return argv


def _say(text: str) -> None:
    # the text may carry a run's error or a process's name: printed, never obeyed by a terminal
    _to_stderr(f"xltop: {printable(text)}")


def _make_cluster(args: argparse.Namespace, interval: float) -> RayCluster | None:
    """The watched cluster; a cluster that does not answer (or refuses the token) is one line
    and exit 1, before any run starts."""
    if args.ray is None:
        return None
    from xltop.raycluster import RayCluster, RayClusterError, check_reachable

    try:
        problem = check_reachable(args.ray, args.ray_token_file, timeout=RAY_CHECK_TIMEOUT_S)
        if problem is None:
            return RayCluster(args.ray, args.ray_token_file, interval=interval)
    except RayClusterError as exc:  # a malformed address, an unreadable token file
        raise UsageError(str(exc)) from None
    _say(problem)
    raise SystemExit(1)


def _cluster_for(args: argparse.Namespace, interval: float) -> Callable[[str], RayCluster]:
    """The watcher of the cluster a watched run says it runs on (a Ray run's hello)."""

    def watch(url: str) -> RayCluster:
        from xltop.raycluster import RayCluster, RayClusterError

        try:
            return RayCluster(url, args.ray_token_file, interval=interval)
        except RayClusterError as exc:
            raise ClusterUnavailable(str(exc)) from None

    return watch


def _wait_cluster(cluster: RayCluster | None) -> None:
    """Hold the first tick until the cluster's lists and node stats are in."""
    if cluster is not None and not cluster.wait_polled(RAY_READY_TIMEOUT_S):
        _say(f"the Ray cluster did not answer in whole in {RAY_READY_TIMEOUT_S:g} s; going on")


def _make_runtime(args: argparse.Namespace) -> RuntimeSource | None:
    if _hosts_no_run(args):
        return None
    from xltop.runsources import AttachedRun, HostedRun, RunSourceError

    try:
        if args.attach:
            return AttachedRun(args.attach)
        return HostedRun(_run_args(args), preload_blas=not args.no_blas_preload)
    except RunSourceError as exc:
        _say(str(exc))
        raise SystemExit(1) from None


def _wait_ready(monitor: Monitor, attached: bool, quiet: bool) -> None:
    """Hold the first tick until the run reports, so every row has the run's columns."""
    runtime = monitor.runtime
    if runtime is None or runtime.wait_ready(0):
        return
    if not quiet:
        _say("waiting for the run's first step ...")
    timeout = ATTACHED_READY_TIMEOUT_S if attached else READY_TIMEOUT_S
    if runtime.wait_ready(timeout):
        return
    info = runtime.sample()
    if info.state == RunState.DEAD:
        _say(f"the run stopped ({units.ending(info.exit_code)}): {info.last_error or 'no message'}")
        raise SystemExit(1)
    _say(f"no report from the run after {timeout:g} s; monitoring it anyway")


def _ticks(monitor: Monitor, count: int | None, duration: float | None) -> Iterator[Snapshot]:
    start = time.monotonic()
    n = 0
    while True:
        yield monitor.tick()
        n += 1
        if count is not None and n >= count:
            return
        if duration is not None and time.monotonic() - start + monitor.interval > duration:
            return


class _Sinks:
    """Everything one Snapshot goes to outside the TUI."""

    def __init__(self, args: argparse.Namespace, monitor: Monitor, mode: str):
        self.args, self.monitor, self.mode = args, monitor, mode
        self.csv = CsvSink(args.csv, on_error=self._csv_failed)

    def consume(self, snapshot: Snapshot) -> None:
        self.csv.write(snapshot)
        if self.mode == "headless":  # stdout unused: it may be closed
            for event in snapshot.events:
                _say(event)
            if not self.args.quiet:
                _to_stderr(status_line(snapshot))
            return
        if self.mode == "once":
            sys.stdout.write(format_snapshot(snapshot))
        else:
            sys.stdout.write(snapshot_to_line(snapshot) + "\n")
        sys.stdout.flush()

    def _csv_failed(self, message: str) -> None:
        _say(message)
        # Headless mode prints events to stderr too: posting there as well would say it twice.
        if self.mode != "headless":
            self.monitor.post_event(message)

    def close(self) -> None:
        self.csv.stop()


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # the same clean path as Ctrl-C


def _output_mode(args: argparse.Namespace, once: str = "one snapshot") -> str:
    headless = args.headless or args.poll
    if sys.stdout is None and not headless:  # started with >&-
        raise UsageError(
            "stdout is closed: --once, --json, --json-stream and the TUI write there"
            " (--headless does not)"
        )
    if args.once or args.json or args.json_stream:
        return "once" if args.once else "json" if args.json else "json-stream"
    if headless:
        return "headless"
    # A TUI served to a browser (--serve) draws through the driver textual-serve names.
    if not sys.stdout.isatty() and not os.environ.get("TEXTUAL_DRIVER"):
        _say(f"stdout is not a terminal: printing {once} (as --once)")
        return "once"
    return "tui"


def _run_tui(monitor: Monitor | ReplayPlayer, args: argparse.Namespace) -> int | None:
    """Run the TUI: its exit status (1 if it ended on an error: Textual printed it), or None
    if it is not installed (headless status lines instead).

    SIGTERM quits as `q` does, from the moment Textual starts importing: a KeyboardInterrupt
    raised wherever the interpreter stands (a class being built by the import, a widget half
    mounted) comes out as Textual's or Python's traceback."""
    app: XltopApp | None = None
    stop_requested = False

    def on_sigterm(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True
        if app is not None:
            app.exit_soon()

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        from xltop.tui.app import XltopApp
    except ModuleNotFoundError as exc:
        if exc.name != "xltop.tui.app":
            raise
        return None
    app = XltopApp(monitor, readonly=args.readonly, csv_path=args.csv)
    if stop_requested:  # before `app` was there to hear it
        app.exit_soon()
    app.run()
    return app.return_code or 0


def _stdout_gone() -> None:
    """A reader such as `head` went away: stop quietly, without a second error at exit."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _recording(path: str) -> Recording:
    """The log `--replay` names; one that cannot be replayed is a usage error."""
    from xltop.replay import ReplayError, load

    try:
        return load(path)
    except ReplayError as exc:
        raise UsageError(str(exc)) from None


def _replay(args: argparse.Namespace) -> int:
    from xltop.replay import ReplayPlayer, summary

    recording = _recording(args.replay)
    if _output_mode(args, once="its summary") == "tui":
        status = _run_tui(ReplayPlayer(recording), args)
        if status is not None:
            return status
    for note in recording.skipped:
        _say(f"replay: {note}")
    try:
        sys.stdout.write("".join(f"{line}\n" for line in summary(recording)))
        sys.stdout.flush()
    except BrokenPipeError:
        _stdout_gone()
    return 0


def _served_argv(argv: list[str]) -> list[str]:
    """`argv` without the flags that serve: what each browser page's own xltop runs with."""
    serving = argparse.ArgumentParser(add_help=False)
    for flag in ("--serve", "--expose"):
        serving.add_argument(flag, action="store_true")
    for flag in ("--host", "--port"):
        serving.add_argument(flag)
    return serving.parse_known_args(argv)[1]


def _serve(args: argparse.Namespace, argv: list[str]) -> int:
    try:
        from xltop.serve import XltopServer
    except ModuleNotFoundError:
        raise UsageError("--serve needs textual-serve: pip install 'xltop[serve]'") from None
    if args.replay is not None:  # said once here, rather than by every page served
        _recording(args.replay)
    host = args.host if args.host is not None else SERVE_HOST
    port = args.port if args.port is not None else SERVE_PORT
    command = shlex.join([sys.executable, "-m", "xltop", *_served_argv(argv)])
    try:
        host_allowed = None if args.expose else _is_loopback
        XltopServer(command, host, port, host_allowed).serve()
    except OSError as exc:  # the port is taken, the address is not this machine's
        # aiohttp's message repeats the address: its errno says it all; a name that does not
        # resolve has a resolver's errno, which os.strerror does not know, and words of its own
        if isinstance(exc, socket.gaierror) or not exc.errno:
            why = exc.strerror or exc
        else:
            why = os.strerror(exc.errno)
        _say(f"cannot serve on {host}:{port}: {why}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        _check_combinations(args)
        if args.serve:
            return _serve(args, sys.argv[1:] if argv is None else argv)
        if args.replay is not None:
            return _replay(args)
        mode = _output_mode(args)
        interval = args.poll or args.interval or DEFAULT_INTERVAL_S
        count = 1 if mode in ("once", "json") else args.count
        limits = (args.mem_soft, args.mem_hard)
        watchdog = Watchdog(*limits) if any(limits) else None
        cluster = _make_cluster(args, interval)
        runtime = _make_runtime(args)
    except UsageError as exc:  # it may name a path the user gave: its control characters escaped
        _say(str(exc))
        return 2
    monitor = Monitor(
        SystemSource(top_n=args.top),
        runtime,
        interval=interval,
        watchdog=watchdog,
        cluster=cluster,
        cluster_for=_cluster_for(args, interval),
    )
    sinks = None
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if mode == "tui" and args.csv:
            _wait_ready(monitor, bool(args.attach), args.quiet)  # the CSV's columns need it
        if mode == "tui":
            status = _run_tui(monitor, args)
            if status is not None:
                return status
            mode = "headless"
            _say("the TUI is not installed here: headless status lines instead")
        sinks = _Sinks(args, monitor, mode)
        _wait_ready(monitor, bool(args.attach), args.quiet or mode != "headless")
        _wait_cluster(cluster)
        for snapshot in _ticks(monitor, count, args.duration):
            sinks.consume(snapshot)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        _stdout_gone()
    finally:
        # A second Ctrl-C must not cut the cleanup short: files close, the run stops.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with contextlib.suppress(Exception):
            if sinks is not None:
                sinks.close()
        monitor.close(on_wait=_say)
    return 0
