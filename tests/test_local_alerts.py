"""Local alerts: the SSE stream, subscriptions, action_exec, failing-sink alerts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from flicbridge import subscriptions
from flicbridge.app import Bridge
from flicbridge.domain import Signal, SignalState, utcnow
from flicbridge.server import local
from flicbridge.tokens import TOKEN_LIFETIME
from tests.conftest import TOKEN, auth, make_config, running
from tests.receiver import Receiver


class Stream:
    """A Server-Sent Events reader over a real HTTP response."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.comments: list[str] = []

    async def event(self) -> tuple[str | None, dict[str, Any]]:
        """The next event: its ``id:`` and its ``data:`` parsed as JSON."""
        event_id: str | None = None
        data: list[str] = []
        while True:
            raw = await self.response.content.readline()
            if not raw:
                raise EOFError("the stream ended")
            line = raw.decode().rstrip("\n")
            if line == "":
                if data:
                    return event_id, json.loads("\n".join(data))
                continue
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "id":
                event_id = value
            elif name == "data":
                data.append(value)

    async def drain(self) -> None:
        """Read events until the stream ends (EOFError)."""
        while True:
            await self.event()

    async def alert(self, **match: Any) -> dict[str, Any]:
        """The next alert whose fields equal ``match``; checks ``id:`` = the alert id."""
        while True:
            event_id, alert = await self.event()
            assert event_id == str(alert["id"])
            if all(alert.get(k) == v for k, v in match.items()):
                return alert


@contextlib.asynccontextmanager
async def stream(
    http: aiohttp.ClientSession, bridge: Bridge, query: str = "", **headers: str
) -> AsyncIterator[Stream]:
    """The alert stream as a browser's EventSource opens it: the token in the query."""
    url = f"{bridge.url}/api/v1/alerts/stream?token={TOKEN}{query}"
    async with http.get(url, headers=headers) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        yield Stream(response)


@pytest.fixture
async def bridge(tmp_path: Path) -> AsyncIterator[Bridge]:
    async with running(make_config(tmp_path)) as running_bridge:
        yield running_bridge


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    async with http.request(
        method, url, json=body, headers=auth() if headers is None else headers
    ) as response:
        raw = await response.read()
        return response.status, json.loads(raw) if raw else None


async def signal(http: aiohttp.ClientSession, bridge: Bridge, state: str) -> dict[str, Any]:
    status, body = await call(
        http, "POST", f"{bridge.url}/api/v1/buttons/desk/signal", {"state": state}
    )
    assert status == 202
    return dict(body)


async def execute(http: aiohttp.ClientSession, bridge: Bridge, token: str) -> tuple[int, Any]:
    return await call(
        http, "POST", f"{bridge.url}/api/v1/actions/exec", {"action_exec_token": token}
    )


async def test_stream_carries_a_press_whose_token_closes_it(
    tmp_path: Path, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    """An open shows on the stream with an EXECUTE token; exec closes everywhere, once."""
    config = make_config(
        tmp_path, sinks=[{"id": "hook", "type": "webhook", "url": f"{receiver.url}/hook"}]
    )
    async with asyncio.timeout(10), running(config) as bridge, stream(http, bridge) as alerts:
        opened = await signal(http, bridge, "On")
        shown = await alerts.alert(action="SHOW_EVENT")
        assert (shown["type"], shown["priority"], shown["event"]) == (
            "INFO",
            "NORMAL",
            opened["event"],
        )
        ask = await alerts.alert(action="EXECUTE")
        assert (ask["type"], ask["priority"], ask["event"]) == ("INFO", "HIGH", opened["event"])
        token = ask["action_exec_token"]
        status, body = await execute(http, bridge, token)
        assert status == 200
        assert (body["button"], body["decision"], body["rows"]) == ("desk", "close", 1)
        closed = await alerts.alert(action="SHOW_EVENT")
        assert "exec" in closed["message"]
        got = await receiver.wait_for(2)
        assert [r.body["state"] for r in got] == ["On", "Off"]
        newest = (await bridge.store.recent_events(1))[0]
        assert (newest["origin"], newest["actor"]) == ("exec", "action_exec from 127.0.0.1")
        status, body = await execute(http, bridge, token)
        assert status == 409
        assert body["error"] == "action_exec_token already used"


async def test_a_token_dies_when_its_alert_closes(
    bridge: Bridge, http: aiohttp.ClientSession
) -> None:
    """Closed another way, the alert's token is spent: 409."""
    async with asyncio.timeout(10), stream(http, bridge) as alerts:
        await signal(http, bridge, "On")
        token = (await alerts.alert(action="EXECUTE"))["action_exec_token"]
        await signal(http, bridge, "Off")
        status, _ = await execute(http, bridge, token)
        assert status == 409


async def test_an_expired_token_is_410(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """A token older than 24 hours (on the monotonic token clock) is gone; the alert stays open."""
    now = [time.monotonic()]
    config = make_config(tmp_path)
    async with asyncio.timeout(10), running(config, mono=lambda: now[0]) as bridge:
        async with stream(http, bridge) as alerts:
            await signal(http, bridge, "On")
            token = (await alerts.alert(action="EXECUTE"))["action_exec_token"]
        now[0] += TOKEN_LIFETIME + 1
        status, body = await execute(http, bridge, token)
        assert status == 410
        assert body["error"] == "action_exec_token expired"
        assert bridge.states["desk"].is_open


async def test_a_token_survives_wall_clock_steps(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """The wall clock steps +25 h (NTP on a Pi without a clock) a minute after the token was
    issued, then back by two days: the token still closes its alert."""
    wall = [time.time()]
    mono = [1000.0]
    config = make_config(tmp_path)
    async with (
        asyncio.timeout(10),
        running(config, clock=lambda: wall[0], mono=lambda: mono[0]) as bridge,
    ):
        async with stream(http, bridge) as alerts:
            await signal(http, bridge, "On")
            token = (await alerts.alert(action="EXECUTE"))["action_exec_token"]
        wall[0] += 25 * 3600 + 60
        mono[0] += 60
        wall[0] -= 2 * 86400
        status, body = await execute(http, bridge, token)
        assert (status, body["decision"]) == (200, "close")
        assert not bridge.states["desk"].is_open


async def test_a_token_is_kept_when_the_store_refuses_its_action(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """The store refuses the close (503): the token is not spent, and once the store works
    again the same token closes the alert, once."""
    config = make_config(
        tmp_path,
        buttons=[{"id": "desk", "source": "ingest"}, {"id": "lab", "source": "ingest"}],
    )
    async with asyncio.timeout(20), running(config) as bridge:
        async with stream(http, bridge) as alerts:
            await signal(http, bridge, "On")
            token = (await alerts.alert(action="EXECUTE"))["action_exec_token"]
        # The disk fills: a first signal is held, then the store refuses more.
        other = sqlite3.connect(config.store.path, isolation_level=None)
        try:
            other.execute("CREATE TABLE ballast (b BLOB)")
            other.execute("INSERT INTO ballast VALUES (zeroblob(1048576))")
            await bridge.store.run(pin_size)
            bridge.store.max_held = 1
            big = "x" * 200_000  # needs pages the file may not grow by
            held = bridge.submit(Signal("lab", SignalState.ON, "api", utcnow(), info=big))
            while bridge.health.store_ok:
                await asyncio.sleep(0.02)
            status, body = await execute(http, bridge, token)
            assert (status, body["error"]) == (503, "store unavailable")
            assert bridge.states["desk"].is_open
            other.execute("DELETE FROM ballast")  # space is freed
        finally:
            other.close()
        await held
        status, body = await execute(http, bridge, token)
        assert (status, body["decision"]) == (200, "close")
        status, body = await execute(http, bridge, token)
        assert (status, body["error"]) == (409, "action_exec_token already used")


def pin_size(conn: sqlite3.Connection) -> None:
    """On the writer connection: the file may not grow (a full disk)."""
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")


async def test_exec_rejects_bad_input(bridge: Bridge, http: aiohttp.ClientSession) -> None:
    """Unknown token 404; no token, not JSON or extra keys 400; 65 KiB 413."""
    async with asyncio.timeout(10):
        url = f"{bridge.url}/api/v1/actions/exec"
        assert (await execute(http, bridge, "never-issued"))[0] == 404
        for body in ({}, {"action_exec_token": ""}, {"action_exec_token": "x", "more": 1}, []):
            assert (await call(http, "POST", url, body))[0] == 400, body
        headers = {**auth(), "Content-Type": "application/json"}
        async with http.post(url, data=b"{nope", headers=headers) as response:
            assert response.status == 400
            assert (await response.json())["error"] == "body is not valid JSON"
        big = json.dumps({"action_exec_token": "x" * (65 * 1024)}).encode()
        async with http.post(url, data=big, headers=headers) as response:
            assert response.status == 413


async def test_min_priority_filters_the_stream(bridge: Bridge, http: aiohttp.ClientSession) -> None:
    """?min_priority=HIGH skips the NORMAL SHOW_EVENT; an unknown priority is a 400."""
    async with asyncio.timeout(10):
        async with stream(http, bridge, "&min_priority=high") as alerts:
            await signal(http, bridge, "On")
            _, first = await alerts.event()
            assert (first["action"], first["priority"]) == ("EXECUTE", "HIGH")
        url = f"{bridge.url}/api/v1/alerts/stream?min_priority=URGENT"
        assert (await call(http, "GET", url))[0] == 400


async def test_last_event_id_replays_what_was_missed(
    bridge: Bridge, http: aiohttp.ClientSession
) -> None:
    """A client reconnecting with Last-Event-ID gets the recent alerts after that id."""
    async with asyncio.timeout(10):
        async with stream(http, bridge) as alerts:
            await signal(http, bridge, "On")
            shown = await alerts.alert(action="SHOW_EVENT")
        async with stream(http, bridge, **{"Last-Event-ID": str(shown["id"])}) as alerts:
            replayed = await alerts.alert()
            assert replayed["action"] == "EXECUTE"
            assert replayed["id"] > shown["id"]
            await signal(http, bridge, "Off")
            assert (await alerts.alert())["id"] == replayed["id"] + 1  # then live, no repeats
        # An id from before a restart (ids start again at 1): everything recent is new.
        async with stream(http, bridge, **{"Last-Event-ID": "99999"}) as alerts:
            assert (await alerts.alert())["id"] == shown["id"]


async def test_heartbeat_keeps_an_idle_stream_open(
    bridge: Bridge, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle stream gets comment lines, which EventSource ignores."""
    monkeypatch.setattr(local, "HEARTBEAT", 0.05)
    async with asyncio.timeout(10), stream(http, bridge) as alerts:
        while "heartbeat" not in alerts.comments:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    await alerts.event()


async def test_an_open_stream_does_not_hold_up_shutdown(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Stopping the bridge ends its streams instead of waiting for them."""
    async with asyncio.timeout(10):
        bridge = Bridge(make_config(tmp_path))
        task = asyncio.create_task(bridge.run())
        await bridge.wait_ready()
        async with stream(http, bridge) as alerts:
            await signal(http, bridge, "On")
            await alerts.alert(action="EXECUTE")
            bridge.stop()
            with pytest.raises((EOFError, aiohttp.ClientPayloadError)):
                await alerts.drain()
        await task


async def test_sse_subscription_lifecycle(bridge: Bridge, http: aiohttp.ClientSession) -> None:
    """Subscribe (201 with its stream), list, stream at its priority, delete (204, then 404)."""
    async with asyncio.timeout(10):
        base = f"{bridge.url}/api/v1/subscriptions"
        body = {"channel": "sse", "min_priority": "HIGH"}
        status, sub = await call(http, "POST", base, body)
        assert status == 201
        assert sub["channel"] == "sse"
        assert sub["stream"] == f"/api/v1/alerts/stream?subscription={sub['id']}"
        status, listed = await call(http, "GET", base)
        assert (status, [s["id"] for s in listed["subscriptions"]]) == (200, [sub["id"]])
        async with http.get(f"{bridge.url}{sub['stream']}", headers=auth()) as response:
            assert response.status == 200
            await signal(http, bridge, "On")
            _, first = await Stream(response).event()
            assert first["action"] == "EXECUTE"  # the subscription's HIGH applies
        assert (await call(http, "DELETE", f"{base}/{sub['id']}"))[0] == 204
        assert (await call(http, "DELETE", f"{base}/{sub['id']}"))[0] == 404
        assert (await call(http, "GET", base))[1] == {"subscriptions": []}
        url = f"{bridge.url}/api/v1/alerts/stream?subscription={sub['id']}"
        assert (await call(http, "GET", url))[0] == 404


async def test_subscription_bodies_are_validated(
    bridge: Bridge, http: aiohttp.ClientSession
) -> None:
    """A webhook needs an http(s) URL; unknown channels, priorities or keys are 400."""
    async with asyncio.timeout(10):
        url = f"{bridge.url}/api/v1/subscriptions"
        bad: list[Any] = [
            {"channel": "webhook"},
            {"channel": "webhook", "url": "ftp://example.com/x"},
            {"channel": "webhook", "url": "not a url"},
            {"channel": "email"},
            {"channel": "sse", "min_priority": "URGENT"},
            {"channel": "sse", "colour": "red"},
            "sse",
        ]
        for body in bad:
            status, answer = await call(http, "POST", url, body)
            assert status == 400, body
            assert answer["error"] == "invalid body"
        headers = {**auth(), "Content-Type": "application/json"}
        async with http.post(url, data=b"\x00", headers=headers) as response:
            assert response.status == 400
        big = json.dumps({"channel": "sse", "url": "x" * (65 * 1024)}).encode()
        async with http.post(url, data=big, headers=headers) as response:
            assert response.status == 413


async def test_local_api_needs_the_token(bridge: Bridge, http: aiohttp.ClientSession) -> None:
    """Without the bearer token (or with a wrong one) every local alert route answers 401."""
    async with asyncio.timeout(10):
        routes = [
            ("POST", "/api/v1/subscriptions", {"channel": "sse"}),
            ("GET", "/api/v1/subscriptions", None),
            ("DELETE", "/api/v1/subscriptions/x", None),
            ("GET", "/api/v1/alerts/stream", None),
            ("POST", "/api/v1/actions/exec", {"action_exec_token": "x"}),
        ]
        for method, path, body in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                status, answer = await call(http, method, f"{bridge.url}{path}", body, headers)
                assert status == 401, (method, path, headers)
                assert answer["error"]


async def test_webhook_subscription_gets_alerts_with_retries(
    bridge: Bridge, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    """Alerts at or above min_priority are POSTed as JSON; a 503 is retried."""
    async with asyncio.timeout(10):
        receiver.script.append((503, {"error": "busy"}, {}))
        body = {"channel": "webhook", "url": f"{receiver.url}/alerts", "min_priority": "HIGH"}
        status, sub = await call(http, "POST", f"{bridge.url}/api/v1/subscriptions", body)
        assert (status, sub["stream"]) == (201, None)
        await signal(http, bridge, "On")
        got = await receiver.wait_for(2)
        assert [r.path for r in got] == ["/alerts", "/alerts"]
        assert got[0].body == got[1].body
        assert got[1].body["action"] == "EXECUTE"
        assert got[1].body["action_exec_token"]
        assert got[1].headers["Content-Type"] == "application/json"


async def test_webhook_subscription_survives_a_restart(
    tmp_path: Path, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    """Subscriptions are stored: a restarted bridge keeps posting to them."""
    config = make_config(tmp_path)
    async with asyncio.timeout(20):
        async with running(config) as first:
            body = {"channel": "webhook", "url": f"{receiver.url}/alerts", "min_priority": "HIGH"}
            status, sub = await call(http, "POST", f"{first.url}/api/v1/subscriptions", body)
            assert status == 201
        async with running(config) as second:
            status, listed = await call(http, "GET", f"{second.url}/api/v1/subscriptions")
            assert [s["id"] for s in listed["subscriptions"]] == [sub["id"]]
            await signal(http, second, "On")
            got = await receiver.wait_for(1)
            assert got[0].body["action"] == "EXECUTE"


async def test_a_dead_letter_raises_an_error_alert(
    tmp_path: Path, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    """A sink refusing a message for good shows as an ERROR alert on the stream."""
    receiver.default = (400, {"error": "bad key"}, {})
    config = make_config(
        tmp_path, sinks=[{"id": "hook", "type": "webhook", "url": f"{receiver.url}/hook"}]
    )
    async with (
        asyncio.timeout(10),
        running(config) as bridge,
        stream(http, bridge, "&min_priority=HIGH") as alerts,
    ):
        await signal(http, bridge, "On")
        error = await alerts.alert(type="ERROR")
        assert error["priority"] == "HIGH"
        assert "could not be delivered to hook" in error["message"]


async def test_a_long_failing_sink_raises_one_error_alert(
    tmp_path: Path,
    http: aiohttp.ClientSession,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sink whose oldest pending row is older than FAILING_AFTER raises one ERROR alert."""
    monkeypatch.setattr(subscriptions, "FAILING_AFTER", 0.3)  # five minutes in production
    receiver.default = (503, {"error": "down"}, {})
    config = make_config(
        tmp_path, sinks=[{"id": "hook", "type": "webhook", "url": f"{receiver.url}/hook"}]
    )
    async with (
        asyncio.timeout(10),
        running(config) as bridge,
        stream(http, bridge) as alerts,
    ):
        await signal(http, bridge, "On")
        await alerts.alert(action="EXECUTE")
        error = await alerts.alert(type="ERROR")
        assert error["priority"] == "HIGH"
        assert error["message"].startswith("sink hook has delivered nothing for 0 s (1 pending)")
        assert "HTTP 503" in error["message"]
        await asyncio.sleep(1)  # more looks at the same failing sink
        await signal(http, bridge, "Off")
        _, following = await alerts.event()
        assert following["action"] == "SHOW_EVENT"  # no second ERROR for the same outage
        receiver.default = (202, {"ok": True}, {})  # the sink recovers, then fails again
        await receiver.wait_for(1, where=lambda r: r.body.get("state") == "Off")
        receiver.default = (503, {"error": "down again"}, {})
        await signal(http, bridge, "On")
        again = await alerts.alert(type="ERROR")
        assert "down again" in again["message"]
