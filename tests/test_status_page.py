"""The status page (``GET /``) in a real headless Chromium, driven over the DevTools protocol.

The browser is Debian's ``chromium`` (``.ci/run`` installs it); it is driven through the
Chrome DevTools Protocol over a websocket with aiohttp, so the suite needs no selenium or
playwright. The bridge, the flicd simulator and the sink are real, on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from flicbridge.sources.simulator import Simulator
from tests.conftest import TOKEN, A, auth, make_config, running
from tests.receiver import Receiver

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
]


class Page:
    """One browser tab over CDP: send commands, evaluate JavaScript, click like a mouse."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.session: str | None = None
        self.ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            data = json.loads(message.data)
            future = self.waiting.pop(data.get("id", -1), None)
            if future is None:
                self.events.append(data)
            elif "error" in data:
                future.set_exception(RuntimeError(f"CDP error: {data['error']}"))
            else:
                future.set_result(data.get("result", {}))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        message_id = next(self.ids)
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting[message_id] = future
        await self.ws.send_str(json.dumps(message))
        async with asyncio.timeout(10):
            return await future

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 10.0) -> Any:
        """Poll ``expression`` until it is truthy (a DOM node comes back as ``{}``: use !!)."""
        async with asyncio.timeout(timeout):
            while not (value := await self.evaluate(expression)):
                await asyncio.sleep(0.1)
        return value

    async def open(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete'")

    async def click(self, selector: str) -> None:
        """A real left click in the middle of the element (mouse down, mouse up)."""
        box = await self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            " return {x: r.x + r.width / 2, y: r.y + r.height / 2}; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            await self.send(
                "Input.dispatchMouseEvent",
                type=kind,
                x=box["x"],
                y=box["y"],
                button="left",
                clickCount=1,
            )

    def problems(self) -> list[str]:
        """JavaScript exceptions and console errors (a CSP violation is one) so far."""
        found = []
        for event in self.events:
            params = event.get("params", {})
            if event.get("method") == "Runtime.exceptionThrown":
                found.append(json.dumps(params["exceptionDetails"])[:500])
            elif event.get("method") == "Log.entryAdded" and params["entry"]["level"] == "error":
                text = params["entry"]["text"]
                if "favicon" not in text:
                    found.append(text)
        return found


@contextlib.asynccontextmanager
async def chromium(tmp_path: Path) -> AsyncIterator[Page]:
    """A headless Chromium with a fresh profile and one attached tab."""
    profile = tmp_path / "chromium-profile"
    proc = await asyncio.create_subprocess_exec(
        str(CHROMIUM),
        *FLAGS,
        f"--user-data-dir={profile}",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,  # the Debian wrapper is a shell: stop its whole group
    )
    try:
        port_file = profile / "DevToolsActivePort"
        async with asyncio.timeout(30):
            while not port_file.exists() or len(port_file.read_text().split()) < 2:
                assert proc.returncode is None, "chromium exited at start"
                await asyncio.sleep(0.05)
        port, path = port_file.read_text().split()[:2]
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=0) as ws,
        ):
            page = Page(ws)
            try:
                target = await page.send("Target.createTarget", url="about:blank")
                attached = await page.send(
                    "Target.attachToTarget", targetId=target["targetId"], flatten=True
                )
                page.session = attached["sessionId"]
                for domain in ("Page", "Runtime", "Log", "Network"):
                    await page.send(f"{domain}.enable")
                yield page
            finally:
                page.reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await page.reader
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


def page_config(tmp_path: Path, sim: Simulator, receiver: Receiver) -> Any:
    return make_config(
        tmp_path,
        flicd={"port": sim.port, "reconnect_max": 0.5, "ping_interval": 1},
        buttons=[{"id": "alpha", "address": A, "name": "Alpha", "info": "Lab A"}],
        sinks=[{"id": "hook", "type": "webhook", "url": f"{receiver.url}/hook"}],
    )


async def connected(bridge: Any) -> None:
    async with asyncio.timeout(5):
        while not (bridge.health.source_up.get("flicd") and bridge.buttons["alpha"].connected):
            await asyncio.sleep(0.01)


def cell(button: str, name: str) -> str:
    return f"document.querySelector('#buttons tr[data-button=\"{button}\"] .{name}')?.textContent"


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
async def test_page_follows_presses_and_requeues_a_dead_letter(
    tmp_path: Path, sim: Simulator, receiver: Receiver
) -> None:
    """In a real browser: battery and link show, a signal and a press appear, a dead letter's
    re-queue button sends it again, and the cookie carries the token on the next visit."""
    hostile = "<img src=x onerror=window.pwned=1> unknown integration key"
    receiver.script.append((400, {"message": hostile}, {}))
    async with (
        asyncio.timeout(60),
        running(page_config(tmp_path, sim, receiver)) as bridge,
        chromium(tmp_path) as page,
        aiohttp.ClientSession(bridge.url, headers=auth()) as http,
    ):
        await connected(bridge)
        sim.battery(A, 42)
        await page.open(f"{bridge.url}/?token={TOKEN}")
        assert await page.evaluate("location.search") == ""  # the token left the address bar
        await page.wait_for(f"{cell('alpha', 'battery')} === '42 %'")
        assert await page.evaluate(cell("alpha", "link")) == "in range"
        assert await page.wait_for("document.getElementById('ready').textContent") == "ready"
        assert await page.evaluate(cell("alpha", "state")) == "closed"

        async with http.post("/api/v1/buttons/alpha/signal", json={"state": "On"}) as r:
            assert r.status == 202
        await page.wait_for(f"{cell('alpha', 'state')}.startsWith('OPEN')")
        assert await page.evaluate(cell("alpha", "decision")) == "open"

        sim.press(A, "single")  # a real press: appended (pages once), with its time
        await page.wait_for(f"{cell('alpha', 'decision')} === 'appended'")
        assert (await page.evaluate(cell("alpha", "last-press"))).endswith("s ago")

        await page.wait_for("!!document.querySelector('#dead button[data-requeue]')")
        dead = await bridge.store.rows("dead")
        assert len(dead) == 1
        row_id = dead[0].id
        text = await page.evaluate(
            f"document.querySelector('#dead tr[data-row=\"{row_id}\"]').textContent"
        )
        assert hostile in text  # the platform's words, shown as text
        assert await page.evaluate("document.querySelector('#dead img') === null")
        assert await page.evaluate("window.pwned === undefined")
        sink_error = await page.evaluate(
            "document.querySelector('#sinks tr[data-sink=\"hook\"] .last-error').textContent"
        )
        assert hostile in sink_error and "HTTP 400" in sink_error

        await page.click(f'#dead button[data-requeue="{row_id}"]')
        await page.wait_for("document.getElementById('flash').textContent.includes('re-queued')")
        await page.wait_for("!!document.querySelector('#dead tr.empty')")
        await receiver.wait_for(2)
        assert receiver.requests[1].body["state"] == "On"
        await page.wait_for(
            "!!document.querySelector('#sinks tr[data-sink=\"hook\"] .last-success time')"
        )
        assert await page.wait_for(
            "document.querySelector('#sinks tr[data-sink=\"hook\"] .pending').textContent === '0'"
        )
        delivered = await bridge.store.rows("delivered")
        assert [r.id for r in delivered] == [row_id]

        cookies = (await page.send("Network.getCookies", urls=[bridge.url]))["cookies"]
        [cookie] = [c for c in cookies if c["name"] == "flicbridge_token"]
        assert cookie["value"] == TOKEN and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert await page.evaluate("document.cookie") == ""  # scripts cannot read it

        # A later visit without ?token= works on the cookie alone.
        await page.open(f"{bridge.url}/")
        await page.wait_for(f"{cell('alpha', 'battery')} === '42 %'")
        status_line = await page.evaluate("document.getElementById('conn').textContent")
        assert status_line.startswith("updated")
        assert page.problems() == []


async def test_page_needs_the_token_and_sets_a_strict_cookie(tmp_path: Path) -> None:
    """No token: 401; a wrong one: 401 and no cookie; the right one: HttpOnly strict cookie."""
    async with (
        asyncio.timeout(20),
        running(make_config(tmp_path)) as bridge,
        aiohttp.ClientSession(bridge.url) as http,
    ):
        async with http.get("/") as r:
            assert r.status == 401
        async with http.get("/", params={"token": "wrong"}) as r:
            assert r.status == 401
            assert "Set-Cookie" not in r.headers
        async with http.get("/", params={"token": TOKEN}) as r:
            assert r.status == 200
            assert r.content_type == "text/html"
            cookie = r.headers["Set-Cookie"]
            assert cookie.startswith(f"flicbridge_token={TOKEN};")
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
            csp = r.headers["Content-Security-Policy"]
            assert "default-src 'none'" in csp and "script-src 'nonce-" in csp
            assert r.headers["Cache-Control"] == "no-store"
            html = await r.text()
            assert TOKEN not in html
            nonce = csp.split("'nonce-")[1].split("'")[0]
            assert f'<script nonce="{nonce}">' in html
        # The cookie alone opens the page and the API (a browser's later visits and fetches).
        async with http.get("/", headers={"Cookie": f"flicbridge_token={TOKEN}"}) as r:
            assert r.status == 200
        async with http.get("/api/v1/status", headers={"Cookie": f"flicbridge_token={TOKEN}"}) as r:
            assert r.status == 200
        async with http.get("/", headers=auth()) as r:
            assert r.status == 200
            assert "Set-Cookie" not in r.headers  # only a token in the URL is turned into one
        # A cookie kept from before the token changed does not lock the page: the URL wins
        # and the cookie is replaced.
        stale = {"Cookie": "flicbridge_token=old-token"}
        async with http.get("/", params={"token": TOKEN}, headers=stale) as r:
            assert r.status == 200
            assert r.headers["Set-Cookie"].startswith(f"flicbridge_token={TOKEN};")
        async with http.get("/api/v1/status", headers=stale) as r:
            assert r.status == 401


async def test_page_without_a_configured_token_is_closed(tmp_path: Path) -> None:
    """With no [server] token the page answers 403 like the API."""
    config = make_config(tmp_path, server={"host": "127.0.0.1", "port": 0})
    async with (
        asyncio.timeout(20),
        running(config) as bridge,
        aiohttp.ClientSession(bridge.url) as http,
        http.get("/", params={"token": "anything"}) as r,
    ):
        assert r.status == 403
        assert "Set-Cookie" not in r.headers
