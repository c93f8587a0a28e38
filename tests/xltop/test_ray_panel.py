"""The Ray panel fed by a recorded cluster (fake_cluster.py): its snapshot, its sorting, the
unreachable line, and that it shows only while a cluster is watched. The same panel against a
real cluster is tested in test_ray_watch.py.
"""

from __future__ import annotations

import dataclasses

from fake_cluster import UNREACHABLE, FakeClusterMonitor, fake_cluster
from fake_source import FakeMonitor, fake_snapshot
from test_app import pilot_test, until
from test_app_snapshots import all_ticks_shown

from xltop.tui.app import XltopApp
from xltop.tui.widgets.processes import ProcessTable
from xltop.tui.widgets.ray_panel import RayPanel

TICKS = 30


def test_main_screen_watching_a_cluster(snap_compare):
    monitor = FakeClusterMonitor(ticks=TICKS)
    try:
        app = XltopApp(monitor, host="testhost")
        assert snap_compare(app, terminal_size=(160, 50), run_before=all_ticks_shown)
    finally:
        monitor.close()


def cells(table, column: str) -> list[str]:
    return [str(table.get_cell(row.key, column)) for row in table.ordered_rows]


@pilot_test
async def test_the_panel_sorts_by_a_header_click_and_says_when_the_cluster_is_unreachable():
    app = XltopApp(FakeMonitor(ticks=0), host="testhost")
    async with app.run_test(size=(160, 50)) as pilot:
        panel = app.main_screen.query_one(RayPanel)
        processes = app.main_screen.query_one(ProcessTable)
        app.show_snapshot(fake_snapshot(0))
        await pilot.pause()
        assert not panel.display and not processes.border_title  # no cluster: no panel

        app.show_snapshot(dataclasses.replace(fake_snapshot(1), ray=fake_cluster(1)))
        await pilot.pause()
        assert panel.display and "this machine" in str(processes.border_title)
        title = str(panel.query_one("#ray-title").content)
        assert "nodes 2/3 | actors 5/7 | restarts 2" in title, title
        nodes, actors = panel.tables()
        assert cells(nodes, "node") == ["a1a1a1a1 head", "b2b2b2b2", "c3c3c3c3"]
        assert cells(nodes, "state") == ["alive", "alive", "dead"]
        # Largest RSS first; actors without a figure (pending, dead) last.
        assert cells(actors, "actor")[:5] == [
            "StageWorker stage3", "StageWorker stage2", "StageWorker stage1",
            "StageWorker stage0", "Phoenix phoenix",
        ]  # fmt: skip
        assert cells(actors, "rss")[-2:] == ["-", "-"]
        assert "NODE_DIED: The actor died because its node has died" in cells(actors, "death")

        await pilot.click(actors, offset=(2, 0))  # the "actor" header
        await until(pilot, lambda: actors.sort_column == "actor", "a sort by actor")
        assert cells(actors, "actor")[:2] == ["Loader e1e1e1e1", "Phoenix phoenix"]

        app.show_snapshot(dataclasses.replace(fake_snapshot(2), ray=UNREACHABLE))
        await pilot.pause()
        title = str(panel.query_one("#ray-title").content)
        assert title == UNREACHABLE.error and "unreachable since 09:15:00" in title
        assert nodes.row_count == 0 and actors.row_count == 0  # nothing stale is shown
