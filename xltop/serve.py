"""`xltop --serve`: textual-serve's server, with what it leaves open closed.

Each page's websocket starts an xltop (and, unless --attach/--no-run/--replay, a TTT run) that
obeys the page's keys, kill included. So a websocket is refused when it comes from a page of
another site (browsers let any site open one to 127.0.0.1), when it names a host that is not
loopback while serving on loopback (a site's name made to resolve to 127.0.0.1: DNS rebinding),
and beyond MAX_PAGES at once (a loop of them filled the machine's memory). The page's own URLs
(its scripts, its websocket) go back to the address the browser used: textual-serve builds them
from the address served on, which for 0.0.0.0 or ::1 is no address a browser can open.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from aiohttp import web
from textual_serve.server import Server

MAX_PAGES = 8  # pages served at once: each holds an xltop, and by default a run


class XltopServer(Server):
    def __init__(
        self, command: str, host: str, port: int, host_allowed: Callable[[str], bool] | None
    ):
        """`host_allowed`: the test a page's host name must pass (None: any host)."""
        self.host_allowed = host_allowed
        shown = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL: bracketed
        super().__init__(command, host, port, title="xltop", public_url=f"http://{shown}:{port}")
        self.pages = 0

    async def handle_index(self, request: web.Request) -> web.StreamResponse:
        self.public_url = f"http://{request.host}"  # read as the page is built, with no await
        return await super().handle_index(request)

    async def handle_websocket(self, request: web.Request) -> web.WebSocketResponse:
        origin = request.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != request.host:
            raise web.HTTPForbidden(text="xltop: a page of another site may not open xltop\n")
        if self.host_allowed is not None and not self.host_allowed(request.url.host or ""):
            raise web.HTTPForbidden(text="xltop: served on loopback: open it as 127.0.0.1\n")
        if self.pages >= MAX_PAGES:
            raise web.HTTPServiceUnavailable(
                text=f"xltop: {MAX_PAGES} pages are open, the most served at once: close one\n"
            )
        self.pages += 1
        try:
            return await super().handle_websocket(request)
        finally:
            self.pages -= 1
