"""An adapt run's gain over its base (telemetry baseline_bpb and gain) wherever xltop shows a
run: the snapshot, the CSV row, the JSON snapshot, the header line and the loss chart."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
from messages import telemetry
from xltop_helpers import run_xltop

from xltop.csvlog import snapshot_to_row
from xltop.jsonout import snapshot_to_json
from xltop.monitor import Monitor
from xltop.runsources import run_info_from_telemetry
from xltop.snapshot import Snapshot
from xltop.sources import SystemSource
from xltop.tui.widgets.charts import SERIES
from xltop.tui.widgets.header import RunHeader

SCHEMA = json.loads((Path(__file__).parent / "snapshot_schema.json").read_text())


def snapshot_of(**changes) -> Snapshot:
    machine = Monitor(SystemSource(top_n=3), interval=0.2).tick()
    run = run_info_from_telemetry(telemetry(8, mode="adapt", **changes))
    return Snapshot(time=machine.time, interval=1.0, system=machine.system, run=run)


def test_the_gain_reaches_the_csv_the_json_the_header_and_the_loss_chart():
    snapshot = snapshot_of(loss_bpb=2.5, baseline_bpb=2.875, gain=-0.4217)
    assert (snapshot.run.baseline_bpb, snapshot.run.gain) == (2.875, -0.4217)
    row = snapshot_to_row(snapshot, 2, 2)
    assert (row["baseline_bpb"], row["gain"]) == (2.875, -0.4217)
    data = snapshot_to_json(snapshot)
    jsonschema.validate(data, SCHEMA)
    assert (data["run"]["baseline_bpb"], data["run"]["gain"]) == (2.875, -0.4217)
    assert "loss 2.5 bpb  -0.42 bpb vs base  inner lr" in str(RunHeader._run_line(snapshot.run))
    loss_series = dict(SERIES["loss"][1])
    assert loss_series["base bpb"](snapshot) == 2.875
    assert loss_series["outer bpb"](snapshot) == 2.5


def test_a_run_without_a_base_shows_no_gain():
    snapshot = snapshot_of()  # train mode, or adapt before its first sampled step
    row = snapshot_to_row(snapshot, 2, 2)
    assert row["baseline_bpb"] is None and row["gain"] is None
    jsonschema.validate(snapshot_to_json(snapshot), SCHEMA)
    assert "vs base" not in str(RunHeader._run_line(snapshot.run))
    assert dict(SERIES["loss"][1])["base bpb"](snapshot) is None


def test_xltop_passes_the_adapt_method_to_the_run_it_hosts():
    refused = run_xltop("--json", "--preset", "tiny", "--mode", "adapt", "--adapt-method", "sgd")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "adapt_method='sgd': must be one of ttt, reset, dynamic" in refused.stderr
    hosted = run_xltop("--json", "--preset", "tiny", "--mode", "adapt", "--adapt-method", "reset")
    assert hosted.returncode == 0, hosted.stderr
    assert json.loads(hosted.stdout)["run"]["mode"] == "adapt"
