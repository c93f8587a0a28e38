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
import psutil
import pytest
from polling import wait_until
from xltop_helpers import run_xltop

from xltop import __version__
from xltop.serve import MAX_PAGES

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
        # two pages' xltops appended their rows (of two runs) to the one file, interleaved
        (["--serve", "--csv", "run.csv"], "xltop: --serve starts an xltop a page; not with "
                                          "--csv (log beside it: xltop --attach SOCKET "
                                          "--headless --csv FILE)"),
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


async def open_pages(url: str, n: int) -> list[int]:
    """Open `n` page websockets at once, as many browser tabs would; the HTTP status of each
    (101: a page, with its own xltop), after reading the first page's output."""
    async with aiohttp.ClientSession() as session:
        opened, statuses = [], []
        for _ in range(n):
            try:
                opened.append(await session.ws_connect(url))
                statuses.append(101)
            except aiohttp.WSServerHandshakeError as exc:
                statuses.append(exc.status)
        await opened[0].receive(timeout=TIMEOUT_S)  # a page's xltop is up and drawing
        for ws in opened:
            await ws.close()
        return statuses


def test_pages_beyond_the_limit_are_refused(xltop_process):
    # each page starts an xltop (and, by default, a TTT run): a client opening websockets in a
    # loop filled the machine's memory
    port = free_port()
    server = xltop_process("--serve", "--port", str(port), "--no-run")
    wait_until(lambda: page_answers(f"http://127.0.0.1:{port}/") or server.poll() is not None,
               TIMEOUT_S, "the server")  # fmt: skip
    assert server.poll() is None, server.communicate()
    statuses = asyncio.run(open_pages(f"http://127.0.0.1:{port}/ws", MAX_PAGES + 2))
    assert statuses == [101] * MAX_PAGES + [503, 503]
    # a closed page frees its place
    wait_until(lambda: len(psutil.Process(server.pid).children()) == 0, TIMEOUT_S, "pages gone")
    assert asyncio.run(open_pages(f"http://127.0.0.1:{port}/ws", 1)) == [101]


async def handshake(url: str, **headers: str) -> int:
    """The HTTP status of a websocket handshake to `url` (101: a page's xltop started)."""
    async with aiohttp.ClientSession() as session:
        try:
            async with session.ws_connect(url, headers=headers):
                return 101
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status


def test_a_page_of_another_site_may_not_open_xltop(xltop_process):
    # a browser lets any site's page open a websocket to 127.0.0.1 (or, rebinding its name, a
    # page of its own there): it would drive xltop, kill included, and read the screen
    port = free_port()
    server = xltop_process("--serve", "--port", str(port), "--no-run")
    wait_until(lambda: page_answers(f"http://127.0.0.1:{port}/") or server.poll() is not None,
               TIMEOUT_S, "the server")  # fmt: skip
    url = f"http://127.0.0.1:{port}/ws"
    assert asyncio.run(handshake(url, Origin="https://attacker.example")) == 403
    # DNS rebinding: the attacker's name made to resolve to 127.0.0.1, the page its own origin
    rebound = f"attacker.example:{port}"
    assert asyncio.run(handshake(url, Host=rebound, Origin=f"http://{rebound}")) == 403
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        assert asyncio.run(handshake(url, Host=host, Origin=f"http://{host}")) == 101


def test_the_page_opens_its_websocket_where_the_browser_found_it(xltop_process):
    # textual-serve built the page's URLs from the address served on: ws://::1:PORT/ws (no
    # brackets) and, for --host 0.0.0.0, ws://0.0.0.0:PORT/ws, where no browser can connect
    port = free_port()
    server = xltop_process("--serve", "--host", "::1", "--port", str(port), "--no-run")
    page = f"http://[::1]:{port}/"
    wait_until(lambda: page_answers(page) or server.poll() is not None, TIMEOUT_S, "the server")
    assert server.poll() is None, server.communicate()
    with urllib.request.urlopen(page, timeout=10) as reply:
        html = reply.read().decode()
    assert f'data-session-websocket-url="ws://[::1]:{port}/ws"' in html
    assert f'src="http://[::1]:{port}/static/js/textual.js"' in html
