"""`xltop --serve`: the TUI in a real headless Chromium, driven over its DevTools protocol.

A real tiny run, a real `xltop --serve --attach` (textual-serve starts one xltop per page), a
real browser loading the page: what the browser receives over the page's websocket is the TUI's
own output, keys go in as the browser's key events, and the screenshot is the browser's.
Skipped where Chromium is not installed (CI installs Debian's `chromium`).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from polling import wait_until
from xltop_helpers import run_xltop

from xltop import __version__

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TIMEOUT_S = 120.0  # generous: a browser, a server, a TUI and a run share a small machine
# Set by scripts/screenshots.py: where the browser's screenshot is kept (screenshots/browser.png).
KEEP_SCREENSHOT = os.environ.get("XLTOP_BROWSER_SCREENSHOT")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def page_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


class Browser:
    """A headless Chromium of the test's own (profile in tmp_path), stopped by pid."""

    def __init__(self, profile: Path):
        # its scratch (org.chromium.Chromium.* folders, Unix sockets: a short path) in a folder
        # of its own rather than /tmp, removed with it
        self.scratch = tempfile.mkdtemp(prefix="cr-")
        self.proc = subprocess.Popen(
            [
                CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                f"--user-data-dir={profile}", "--remote-debugging-port=0",
                "--window-size=1400,900", "about:blank",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=True, env={**os.environ, "TMPDIR": self.scratch},
        )  # fmt: skip
        assert self.proc.stderr is not None
        for line in self.proc.stderr:  # it says where its DevTools listen, then goes on
            if match := re.search(r"DevTools listening on (ws://\S+)", line):
                self.devtools = match[1]
                break
        else:
            raise AssertionError(f"chromium exited {self.proc.wait()} before its DevTools came up")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        shutil.rmtree(self.scratch, ignore_errors=True)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


class Page:
    """One page over the DevTools protocol: commands, and the text the page's websockets carry
    (the TUI's output, escape sequences and all)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.ids = itertools.count(1)
        self.replies: dict[int, asyncio.Future] = {}
        self.received = ""
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            data = json.loads(message.data)
            if "id" in data:
                self.replies.pop(data["id"]).set_result(data)
            elif data.get("method") == "Network.webSocketFrameReceived":
                frame = data["params"]["response"]
                payload = frame["payloadData"]
                if frame["opcode"] != 1:  # binary frames come base64-encoded
                    payload = base64.b64decode(payload).decode(errors="replace")
                self.received += payload

    async def send(self, method: str, **params) -> dict:
        id_ = next(self.ids)
        self.replies[id_] = asyncio.get_running_loop().create_future()
        await self.ws.send_json({"id": id_, "method": method, "params": params})
        reply = await asyncio.wait_for(self.replies[id_], TIMEOUT_S)
        assert "error" not in reply, reply
        return reply.get("result", {})

    async def until_received(self, *texts: str) -> None:
        async def wait() -> None:
            while not all(text in self.received for text in texts):
                await asyncio.sleep(0.1)

        try:
            await asyncio.wait_for(wait(), TIMEOUT_S)
        except TimeoutError:
            raise AssertionError(f"the page never showed {texts}") from None

    async def press(self, key: str) -> None:
        """Type `key` into the terminal (its input is xterm.js's hidden textarea)."""
        focus = "document.querySelector('.xterm-helper-textarea').focus()"
        await self.send("Runtime.evaluate", expression=focus)
        for kind in ("keyDown", "keyUp"):
            await self.send("Input.dispatchKeyEvent", type=kind, key=key, text=key)

    async def distinct_colours(self, png: str) -> int:
        """How many colours a sample of the PNG's pixels holds (the browser decodes it)."""
        script = """new Promise(done => {
            const image = new Image();
            image.onload = () => {
                const canvas = document.createElement("canvas");
                canvas.width = image.width; canvas.height = image.height;
                const context = canvas.getContext("2d");
                context.drawImage(image, 0, 0);
                const pixels = context.getImageData(0, 0, image.width, image.height).data;
                const colours = new Set();
                for (let i = 0; i < pixels.length; i += 4 * 31)
                    colours.add(pixels[i] << 16 | pixels[i + 1] << 8 | pixels[i + 2]);
                done(colours.size);
            };
            image.src = "data:image/png;base64,PNG";
        })""".replace("PNG", png)
        result = await self.send("Runtime.evaluate", expression=script, awaitPromise=True)
        return result["result"]["value"]


async def open_page(devtools: str, url: str, screenshot: Path) -> str:
    """Load `url`, wait for the TUI's header to show the run, press ? for the help screen, save
    a screenshot to `screenshot`; what the page received."""
    port = re.search(r":(\d+)/", devtools)[1]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/json/list") as reply:
            target = next(t for t in await reply.json() if t["type"] == "page")
        async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            page = Page(ws)
            await page.send("Network.enable")
            await page.send("Page.enable")
            await page.send("Page.navigate", url=url)
            await page.until_received(f"xltop {__version__}", "running", "tok/s")
            await page.press("?")
            await page.until_received("xltop keys")  # the help screen: the key got through
            await asyncio.sleep(1.0)  # the page draws what it received
            png = (await page.send("Page.captureScreenshot", format="png"))["data"]
            screenshot.write_bytes(base64.b64decode(png))
            assert await page.distinct_colours(png) > 8, "the screenshot is blank"
            page.reader.cancel()
            return page.received


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium)")
def test_the_tui_shows_a_run_in_a_real_browser(tiny_run, xltop_process, tmp_path):
    run = tiny_run()
    port = free_port()
    server = xltop_process("--serve", "--port", str(port), "--attach", run.socket_path)
    url = f"http://127.0.0.1:{port}/"
    wait_until(lambda: page_answers(url) or server.poll() is not None, TIMEOUT_S, "the server")
    assert server.poll() is None, server.communicate()
    browser = Browser(tmp_path / "profile")
    try:
        screenshot = tmp_path / "browser.png"
        received = asyncio.run(open_page(browser.devtools, url, screenshot))
    finally:
        browser.stop()
    assert f"pid {run.pid}" in received  # the header's run line: the attached run's own pid
    if KEEP_SCREENSHOT:
        shutil.copyfile(screenshot, KEEP_SCREENSHOT)


def test_a_host_other_than_loopback_needs_expose():
    result = run_xltop("--serve", "--host", "0.0.0.0", timeout=30)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "xltop: --host 0.0.0.0 is not a loopback address: whoever reaches it gets the TUI, its "
        "run commands and kill included; add --expose to mean it (and --readonly to keep "
        "those off)"
    ]


@pytest.mark.parametrize(
    "flags, line",
    [
        (["--port", "8000"], "xltop: --port: only with --serve"),
        (["--host", "::1", "--expose"], "xltop: --host, --expose: only with --serve"),
        (["--serve", "--once"], "xltop: --serve serves the TUI; not with --once, --json, "
                                "--headless or --poll"),
        (["--serve", "--port", "0"], "xltop: argument --port: '0' must be between 1 and 65535 "
                                     "(see xltop --help)"),
        # an unset variable (--host "$HOST"): aiohttp would listen on every address
        (["--serve", "--host", "", "--expose"], "xltop: --host is empty: give the address to "
                                                 "serve on"),
    ],
)  # fmt: skip
def test_serve_flags_are_checked_before_anything_starts(flags, line):
    result = run_xltop(*flags, timeout=30)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [line]


def test_a_port_in_use_is_one_line_and_exit_1():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_xltop("--serve", "--port", str(port), "--no-run", timeout=60)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"xltop: cannot serve on 127.0.0.1:{port}: Address already in use"
    )


def test_a_host_that_does_not_resolve_is_one_line_naming_why():
    # getaddrinfo's errors are negative: os.strerror said "Unknown error -2"
    port = str(free_port())
    result = run_xltop(
        "--serve", "--host", "no-such-host.invalid", "--expose", "--port", port, "--no-run",
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    line = result.stderr.splitlines()[-1]
    assert line.startswith(f"xltop: cannot serve on no-such-host.invalid:{port}: "), line
    assert "Unknown error" not in line and line.count(":") == 3, line


def test_a_replay_that_cannot_play_is_refused_before_serving(tmp_path):
    # else the server came up and every page it served failed on the file
    sales = tmp_path / "sales.csv"
    sales.write_text("date,amount\n2026-01-01,3\n")
    result = run_xltop("--serve", "--port", str(free_port()), "--replay", str(sales), timeout=30)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"xltop: {sales} is not an xltop CSV log (its header lacks ts, interval_s, total_mib, "
        "used_mib, avail_mib, cpu_pct)"
    ]
