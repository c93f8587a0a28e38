"""The header: who and where (version, host, MLX backend, BLAS) and the run's state."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from xltop import units
from xltop.snapshot import RunInfo, RunState, Snapshot

_STATE_STYLE = {
    RunState.RUNNING: "bold green",
    RunState.PAUSED: "bold yellow",
    RunState.STALLED: "bold magenta",  # alive but silent: neither paused's yellow nor dead's red
    RunState.DEAD: "bold red",
}


def _state_text(run: RunInfo | None, keys: bool) -> Text:
    """The run's state; with `keys`, the key that acts on it (none under --readonly or in a
    replay, where the run commands are off)."""
    if run is None:
        return Text("no run", style="dim")
    if run.state == RunState.DEAD:
        code = "?" if run.exit_code is None else run.exit_code
        hint = " (R restarts)" if keys else ""
        return Text(f"DEAD exit {code}{hint}", style=_STATE_STYLE[run.state])
    if run.state == RunState.PAUSED:
        hint = " (p resumes)" if keys else ""
        return Text(f"RUN PAUSED{hint}", style=_STATE_STYLE[run.state])
    if run.state == RunState.STALLED:  # the events line says for how long and the pid
        return Text("RUN STALLED (no report)", style=_STATE_STYLE[run.state])
    return Text(str(run.state), style=_STATE_STYLE.get(run.state, "bold"))


class RunHeader(Static):
    def show(
        self,
        snapshot: Snapshot,
        *,
        version: str,
        host: str,
        frozen: bool,
        readonly: bool,
        csv: str | None,
        replay: str | None = None,  # the file and where its replay stands
    ) -> None:
        # Most important first: a narrow terminal crops each line, it never wraps it.
        run = snapshot.run
        line = Text.assemble((f"xltop {version}", "bold"), " | ", no_wrap=True, overflow="crop")
        if replay is not None:
            line.append(units.printable(f"REPLAY {replay}"), style="reverse")
            line.append(" | ")
        line.append_text(_state_text(run, keys=not readonly and replay is None))
        if run is not None and (run.mode or run.preset):
            line.append(units.printable(f" | {run.mode or '?'}/{run.preset or '?'}"))
        if run is not None and run.mlx is not None and run.mlx.backend:  # a replay has none
            device = "" if run.mlx.device in ("", run.mlx.backend) else f" {run.mlx.device}"
            line.append(units.printable(f" | MLX {run.mlx.backend}{device}"))
        if run is not None and run.blas:
            line.append(units.printable(f" | BLAS {run.blas}"))
        line.append(f" | {snapshot.interval:g}s")
        if replay is None:
            line.append(units.printable(f" | CSV {csv}") if csv else " | CSV off")
        if frozen:
            line.append(" | FROZEN", style="reverse")
        if readonly:
            line.append(" | readonly", style="italic")
        line.append(units.printable(f" | {host}"))
        line.append("\n")
        line.append_text(self._run_line(run))
        self.update(line, layout=False)  # fixed size: no re-layout

    @staticmethod
    def _run_line(run: RunInfo | None) -> Text:
        if run is None:
            return Text("")
        if run.state == RunState.DEAD:
            error = units.printable(run.last_error or "none reported")
            return Text(f"last error: {error}", style="red")
        gain = f"{run.gain:+.2f} bpb vs base  " if run.gain is not None else ""  # adapt mode
        return Text(
            f"pid {run.pid or '-'}  step {run.step}  {units.rate(run.tokens_per_s)} tok/s  "
            f"{units.ms(run.step_ms)} ms/step  loss {units.number(run.loss_bpb)} bpb  {gain}"
            f"inner lr {units.number(run.inner_lr)}  conv {run.conversation}  "
            f"tokens {run.tokens}"
        )
