"""`xltop --replay`: a CSV that a real headless xltop wrote, read back and played.

The log comes from a real `xltop --headless --csv` hosting a real tiny run; the replay is read by
the real CLI in a child process, and played in the real app under Pilot.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path

import pytest
from test_app import events, pilot_test, until
from test_reporter_e2e import _first_report, _xltop_rows, user_loop
from xltop_helpers import read_rows, run_xltop

from ttt_runtime.protocol import WorkerFigures
from xltop import units
from xltop.csvlog import CsvLog
from xltop.replay import Recording, ReplayPlayer, load
from xltop.snapshot import RunState, Snapshot
from xltop.tui.app import XltopApp
from xltop.tui.widgets.header import RunHeader
from xltop.tui.widgets.help_screen import HelpScreen
from xltop.tui.widgets.memory import MemoryPanel

TICKS = 10
INTERVAL_S = 0.5  # a 1x replay of TICKS ticks takes 4.5 s: time to press keys mid-way


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> Path:
    """A CSV log written by a real headless xltop hosting a real tiny run (read-only: tests
    that change it work on a copy)."""
    path = tmp_path_factory.mktemp("replay") / "run.csv"
    result = run_xltop(
        "--headless", "--quiet", "--preset", "tiny", "--csv", str(path),
        "--count", str(TICKS), "--interval", str(INTERVAL_S),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(read_rows(path)) == TICKS
    return path


def rewritten(path: Path, to: Path, drop: str, add: str) -> Path:
    """The log at `path` as another xltop version might write it: column `drop` gone, a column
    `add` this version does not know added before the event column."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = [c for c in rows[0] if c != drop]
    columns.insert(len(columns) - 1, add)
    with open(to, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows({**row, add: "42"} for row in rows)
    return to


__all__ = ["user_loop"]  # a fixture of test_reporter_e2e.py's


def write_log(snapshots: tuple[Snapshot, ...], path: Path) -> None:
    """Log `snapshots` to `path` with the CSV sink."""
    log = CsvLog(path, snapshots[0])
    for snapshot in snapshots:
        log.write(snapshot)
    log.close()


def assert_logs_the_same_file(recording: Recording, logged: Path, copy: Path) -> None:
    """Written again by the CSV sink, the replayed Snapshots make the very same file: every
    value read back equals the file's."""
    write_log(recording.snapshots, copy)
    assert copy.read_bytes() == logged.read_bytes()


def test_a_replay_gives_back_exactly_what_a_real_headless_run_logged(logged, tmp_path):
    recording = load(str(logged))
    assert recording.skipped == ()
    rows = read_rows(logged)
    assert len(recording.snapshots) == len(rows)
    assert_logs_the_same_file(recording, logged, tmp_path / "copy.csv")
    last, row = recording.snapshots[-1], rows[-1]
    assert last.run is not None and last.run.state == RunState(row["run_state"])
    assert last.run.step == int(row["step"]) > 0
    assert last.run.loss_bpb == float(row["loss_bpb"])
    assert len(last.run.blocks) == len(last.run.layers) == 2  # the tiny preset's blocks
    assert "run running" in " ".join(recording.snapshots[0].events)


def test_a_replay_gives_back_a_ray_runs_actors_and_an_adapt_runs_gain(logged, tmp_path):
    # A Ray run's stage actors and an adapt run's base figures added to the real run's ticks
    # (a Ray run is tested where it runs: tests/ttt_runtime/test_ray_run.py)
    actors = [
        WorkerFigures(stage, 0, blocks=(), node_id="", node_ip="", pid=4000 + stage, restarts=1,
                      rss=(60 + stage) << 20, active=3 << 20, cache=0, peak=5 << 20, fwd_ms=2.5,
                      bwd_ms=None if stage else 4.25, wait_ms=0.5,
                      sync_ms=None if stage else 12.5, sent=123456, received=7890)
        for stage in range(2)
    ]  # fmt: skip
    ticks = tuple(
        dataclasses.replace(
            s, run=dataclasses.replace(s.run, workers=tuple(actors), baseline_bpb=4.5, gain=-0.25)
        )
        for s in load(str(logged)).snapshots
    )
    ray_log = tmp_path / "ray.csv"
    write_log(ticks, ray_log)
    recording = load(str(ray_log))
    assert recording.skipped == ()
    run = recording.snapshots[-1].run
    assert (run.baseline_bpb, run.gain) == (4.5, -0.25)
    assert [(w.stage, w.pid, w.rss, w.bwd_ms, w.sent) for w in run.workers] == [
        (0, 4000, 60 << 20, 4.25, 123494),  # sent: 120.6 KiB as the CSV keeps it
        (1, 4001, 61 << 20, None, 123494),
    ]
    assert_logs_the_same_file(recording, ray_log, tmp_path / "copy.csv")


@pytest.mark.slow
def test_a_replay_gives_back_a_user_loops_scalars(user_loop, tmp_path):
    sock, finish = user_loop()
    _first_report(sock)
    logged = tmp_path / "loop.csv"
    rows = _xltop_rows(sock, logged)
    assert finish()[0] == 0
    recording = load(str(logged))
    assert recording.skipped == ()
    assert [s.run.user for s in recording.snapshots] == [{"lr": float(r["user_lr"])} for r in rows]
    assert_logs_the_same_file(recording, logged, tmp_path / "copy.csv")


def test_once_sums_the_log_up(logged):
    result = run_xltop("--replay", str(logged), "--once")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    rows = read_rows(logged)
    rates = [float(r["tokens_per_s"]) for r in rows if r["tokens_per_s"]]
    rss = [float(r["rss_mib"]) * units.MIB for r in rows]
    final = [r for r in rows if r["loss_bpb"]][-1]
    duration = round(float(rows[-1]["ts"]) - float(rows[0]["ts"]))
    out = result.stdout
    assert f"{TICKS} ticks" in out
    assert f"duration 0m {duration:02d}s" in out
    assert f"steps: {rows[0]['step']} to {rows[-1]['step']}" in out
    assert f"mean tok/s: {sum(rates) / len(rates):.1f} (over the {len(rates)} ticks" in out
    assert f"run RSS: min {units.size(min(rss))}, max {units.size(max(rss))}" in out
    assert f"final loss: {float(final['loss_bpb']):.4g} bpb at step {final['step']}" in out


def test_a_torn_log_replays_its_whole_rows_and_says_what_it_skipped(logged, tmp_path):
    torn = tmp_path / "torn.csv"
    lines = logged.read_text().splitlines(keepends=True)
    lines[3] = lines[3].replace(",running,", ",runnin,", 1)  # a row that does not parse
    torn.write_text("".join(lines)[:-30])  # cut mid-way through the last row
    recording = load(str(torn))
    assert len(recording.snapshots) == TICKS - 2
    assert recording.skipped == (
        "skipped 1 rows that do not parse: line 4 (run_state is 'runnin')",
        f"skipped the torn last line (line {TICKS + 1}, cut mid-row)",
    )
    result = run_xltop("--replay", str(torn), "--once")
    assert result.returncode == 0
    assert result.stderr.splitlines() == [f"xltop: replay: {note}" for note in recording.skipped]
    assert f"{TICKS - 2} ticks" in result.stdout


def test_a_log_of_another_version_replays_what_this_one_knows(logged, tmp_path):
    other = rewritten(logged, tmp_path / "other.csv", drop="sampled_step", add="gpu_temp_c")
    recording = load(str(other))
    assert recording.skipped == (
        "ignored 1 columns it does not know: gpu_temp_c",
        "columns absent from the file, shown unknown: sampled_step",
    )
    assert len(recording.snapshots) == TICKS
    rows = read_rows(logged)
    assert [s.run.step for s in recording.snapshots] == [int(r["step"]) for r in rows]
    assert all(s.run.sampled_step is None for s in recording.snapshots)
    result = run_xltop("--replay", str(other), "--once")
    assert result.returncode == 0
    assert len(result.stderr.splitlines()) == 2


def test_a_log_saved_again_by_a_spreadsheet_replays(logged, tmp_path):
    # "CSV UTF-8" begins the file with a byte order mark, and ends its lines with CRLF
    saved = tmp_path / "saved.csv"
    saved.write_bytes(b"\xef\xbb\xbf" + logged.read_bytes().replace(b"\n", b"\r\n"))
    recording = load(str(saved))
    assert recording.skipped == ()
    assert recording.snapshots == load(str(logged)).snapshots


def foreign_files(tmp_path: Path) -> list[tuple[str, str]]:
    """(path, the words its one-line refusal must hold) for files that are no xltop log."""
    spreadsheet, binary, empty, header_only = (
        tmp_path / name for name in ("sales.csv", "image.png", "empty.csv", "header.csv")
    )
    spreadsheet.write_text("date,amount\n2026-01-01,3\n")
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\xff\xfe")
    empty.write_text("")
    header_only.write_text("ts,interval_s,total_mib,used_mib,avail_mib,cpu_pct,event\n")
    torn_header = tmp_path / "torn.csv"  # a monitor killed before its first row's newline
    torn_header.write_text("ts,interval_s,total_mib,used_mib,avail_mib,cpu_pct")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    lacks = "is not an xltop CSV log (its header lacks"
    return [
        (str(spreadsheet), f"{spreadsheet} {lacks} ts, interval_s, total_mib"),
        (str(binary), f"{binary} {lacks} ts"),
        (str(empty), f"{empty} is not an xltop CSV log (it holds no header line)"),
        (str(header_only), f"{header_only} holds no whole row to replay"),
        (str(torn_header), f"{torn_header} holds no whole row to replay"),
        (str(fifo), f"cannot replay {fifo}: not a regular file"),
        (str(tmp_path), f"cannot replay {tmp_path}: Is a directory"),
        (str(tmp_path / "nowhere.csv"), "No such file or directory"),
    ]


def test_a_file_that_is_no_xltop_log_is_one_line_and_exit_2(tmp_path):
    for path, words in foreign_files(tmp_path):
        for mode in (["--once"], []):
            result = run_xltop("--replay", path, *mode, timeout=30)
            assert result.returncode == 2, (path, result)
            assert result.stdout == ""
            assert len(result.stderr.splitlines()) == 1, result.stderr
            assert result.stderr.startswith("xltop: ") and words in result.stderr


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--csv", "out.csv"], "--replay plays a log; not with --csv"),
        (["--headless", "--ray", "auto"], "not with --ray, --headless"),
        (["--preset", "tiny"], "--preset configure a hosted run; not with --replay"),
        (["--no-run"], "argument --no-run: not allowed with argument --replay"),
        # the log sets the pace and the count of ticks
        (["--interval", "0.2"], "--replay plays a log; not with --interval"),
        (["--count", "3"], "--replay plays a log; not with --count"),
        (["--duration", "5"], "--replay plays a log; not with --duration"),
    ],
)
def test_live_flags_do_not_go_with_a_replay(logged, flags, words):
    result = run_xltop("--replay", str(logged), *flags, timeout=30)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and words in result.stderr


@pilot_test
async def test_a_replayed_pause_is_said_without_the_key_that_is_off(logged, tmp_path):
    paused = tmp_path / "paused.csv"
    paused.write_text(logged.read_text().replace(",running,", ",paused,"))
    app = XltopApp(ReplayPlayer(load(str(paused))))
    async with app.run_test(size=(140, 40)) as pilot:
        await until(pilot, lambda: app.snapshots_shown >= 1, "the first tick")
        assert "RUN PAUSED |" in header_text(app)  # not "(p resumes)": p is off in a replay


def header_text(app: XltopApp) -> str:
    return str(app.main_screen.query_one(RunHeader).render())


def shown_step(app: XltopApp) -> int | None:
    return app.last.run.step if app.last is not None and app.last.run is not None else None


@pilot_test
async def test_replay_keys_play_pause_step_and_speed_up(logged):
    recording: Recording = load(str(logged))
    steps = [s.run.step for s in recording.snapshots]
    app = XltopApp(ReplayPlayer(recording))
    async with app.run_test(size=(140, 40)) as pilot:
        await until(pilot, lambda: app.snapshots_shown >= 1, "the first tick")
        assert "REPLAY run.csv" in header_text(app)
        # The CSV keeps no MLX backend or device: nothing shows an empty one.
        memory = app.main_screen.query_one(MemoryPanel).text
        assert "MLX ceiling" in memory and "()" not in memory
        await pilot.press("space")
        assert "replay paused" in events(app)
        shown = app.snapshots_shown
        assert shown < TICKS and "paused" in header_text(app)
        await pilot.pause(3 * INTERVAL_S)
        assert app.snapshots_shown == shown  # paused: no tick goes by
        await pilot.press("n")
        await until(pilot, lambda: app.snapshots_shown == shown + 1, "one step")
        assert shown_step(app) == steps[shown]
        await pilot.pause(3 * INTERVAL_S)
        assert app.snapshots_shown == shown + 1  # a step leaves the replay paused
        # There is no run to command and nothing to kill in a replay; nor a CSV to log to.
        for key in ("p", "c", "s", "k", "R", "plus", "l"):
            await pilot.press(key)
        assert not {"sent", "kill", "interval", "CSV"} & set(events(app).split())
        assert app.screen is app.main_screen  # no kill dialog
        await pilot.press("question_mark")  # the help screen offers the replay's keys instead
        await until(pilot, lambda: isinstance(app.screen, HelpScreen), "the help screen")
        table = app.screen.query_one("#help-table")
        keys = {str(table.get_row_at(i)[0]) for i in range(table.row_count)}
        assert {"Space", "n", "x"} <= keys and not {"p", "k F9", "+"} & keys
        await pilot.press("escape")
        await pilot.press("x", "space")
        assert "replay speed 10x" in events(app)
        await until(pilot, lambda: app.snapshots_shown == TICKS, "the replay's end at 10x")
        assert shown_step(app) == steps[-1]
        assert "end of the replay: 10 ticks" in events(app)
        assert f"{TICKS}/{TICKS} end" in header_text(app)


def with_cells(path: Path, to: Path, cells: dict[int, tuple[str, str]]) -> Path:
    """The log at `path` with one cell changed on each line in `cells`: {line: (column, text)}."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for line, (column, text) in cells.items():
        rows[line - 2][column] = text  # line 1 is the header
    with open(to, "w", newline="") as f:
        writer = csv.DictWriter(f, rows[0].keys(), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return to


def test_rows_with_numbers_xltop_never_writes_are_skipped_and_named(logged, tmp_path):
    # NaN and infinities (the runtime's protocol sends none), a time the clock cannot show, an
    # interval the replay could not wait out: each crashed the summary or the TUI's tick
    hostile = {
        2: ("ts", "nan"),
        3: ("loss_bpb", "inf"),
        4: ("rss_mib", "-inf"),
        5: ("ts", "1e300"),
        6: ("interval_s", "1e12"),
    }
    path = with_cells(logged, tmp_path / "hostile.csv", hostile)
    recording = load(str(path))
    assert len(recording.snapshots) == TICKS - len(hostile)
    assert recording.skipped == (
        "skipped 5 rows that do not parse: line 2 (ts is 'nan'), line 3 (loss_bpb is 'inf'), "
        "line 4 (rss_mib is '-inf'), line 5 (ts is '1e300', out of range), "
        "line 6 (interval_s is '1e12', out of range)",
    )
    result = run_xltop("--replay", str(path), "--once", timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [f"xltop: replay: {recording.skipped[0]}"]
    assert f"{TICKS - len(hostile)} ticks" in result.stdout


def test_a_path_with_control_characters_is_named_escaped_on_one_line(tmp_path):
    path = tmp_path / "no\nsuch\x1b[31m.csv"
    result = run_xltop("--replay", str(path), "--once", timeout=30)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"xltop: cannot replay {tmp_path}/no\\nsuch\\x1b[31m.csv: No such file or directory"
    ]
