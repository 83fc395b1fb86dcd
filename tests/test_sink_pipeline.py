"""Every sink type through the whole pipeline: HTTP signal → state → store → dispatcher → sink."""

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from flicbridge.app import Bridge
from flicbridge.domain import Signal, SignalState, utcnow
from tests.conftest import auth, make_config, running
from tests.receiver import Receiver


def sink_config(kind: str, url: str) -> dict[str, Any]:
    base: dict[str, Any] = {"id": kind, "type": kind}
    if kind == "alertops":
        return {**base, "url": f"{url}/POSTAlert/SECRET/Flic"}
    if kind == "webhook":
        return {**base, "url": f"{url}/hook"}
    if kind == "pagerduty":
        return {**base, "url": f"{url}/v2/enqueue", "routing_key": "R" * 32}
    if kind == "ilert":
        return {**base, "url": f"{url}/api/events", "integration_key": "il-SECRET"}
    return {**base, "url": f"{url}/event/push/alert/standard", "integration_key": "fd-SECRET"}


KINDS = ["alertops", "webhook", "pagerduty", "ilert", "flashduty"]
OPEN_CLOSE = {
    "alertops": ("flic_state", "On", "Off"),
    "webhook": ("state", "On", "Off"),
    "pagerduty": ("event_action", "trigger", "resolve"),
    "ilert": ("eventType", "ALERT", "RESOLVE"),
    "flashduty": ("event_status", "Critical", "Ok"),
}
KEY_FIELD = {
    "alertops": "flic_nameId",
    "webhook": "alert_key",
    "pagerduty": "dedup_key",
    "ilert": "alertKey",
    "flashduty": "alert_key",
}


async def signal(bridge: Bridge, state: str, button: str = "desk") -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{bridge.url}/api/v1/buttons/{button}/signal", json={"state": state}, headers=auth()
        ) as response,
    ):
        assert response.status == 202, await response.text()
        body: dict[str, Any] = await response.json()
        return body


async def settled(bridge: Bridge) -> None:
    async with asyncio.timeout(10):
        while await bridge.store.rows("pending"):
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("kind", KINDS)
async def test_open_close_with_retry_on_429_and_5xx(
    tmp_path: Path, receiver: Receiver, kind: str
) -> None:
    """Open and close reach the platform with the alert key as dedup key, after a 429 and a 503."""
    receiver.script.extend(
        [(429, {"error": "slow"}, {"Retry-After": "0"}), (503, "<html>oops</html>", {})]
    )
    config = make_config(tmp_path, site="hq", sinks=[sink_config(kind, receiver.url)])
    async with running(config) as bridge:
        await signal(bridge, "On")
        await signal(bridge, "Off")
        got = await receiver.wait_for(4)
        await settled(bridge)
        field, on, off = OPEN_CLOSE[kind]
        assert [r.body[field] for r in got] == [on, on, on, off]
        assert {r.body[KEY_FIELD[kind]] for r in got} == {"hq/desk"}
        assert len(await bridge.store.rows("delivered")) == 2
        metrics = bridge.metrics.render().decode()
        assert f'flicbridge_retries_total{{sink="{kind}"}} 2.0' in metrics


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("status", [400, 401, 403, 404])
async def test_permanent_refusal_dead_letters_loudly(
    tmp_path: Path, receiver: Receiver, kind: str, status: int
) -> None:
    """A 4xx dead-letters the row with the platform's message, alerts, counts; others flow."""
    receiver.script.append((status, {"message": f"platform says {status}"}, {}))
    config = make_config(tmp_path, sinks=[sink_config(kind, receiver.url)])
    async with running(config) as bridge:
        alerts = bridge.alerts_bus.subscribe("HIGH")
        await signal(bridge, "On")
        await signal(bridge, "Off")
        await receiver.wait_for(2)
        await settled(bridge)
        dead = await bridge.store.rows("dead")
        assert [r.message.action for r in dead] == ["open"]
        assert f"platform says {status}" in (dead[0].last_error or "")
        assert "SECRET" not in (dead[0].last_error or "")
        assert [r.message.action for r in await bridge.store.rows("delivered")] == ["close"]
        errors = [a for a in list(alerts.queue._queue) if a.type == "ERROR"]  # type: ignore[attr-defined]
        assert len(errors) == 1
        assert f'flicbridge_dead_letters_total{{sink="{kind}"}} 1.0' in (
            bridge.metrics.render().decode()
        )


async def test_pacing_under_a_500_row_backlog(tmp_path: Path, receiver: Receiver) -> None:
    """A 500-row backlog drains no faster than the sink's rate allows (plus its burst)."""
    rate, burst = 200.0, 5
    sinks = [{**sink_config("webhook", receiver.url), "rate": rate, "burst": burst}]
    buttons = [{"id": f"b{i}", "source": "ingest"} for i in range(10)]
    config = make_config(tmp_path, sinks=sinks, buttons=buttons, alerts={"suppress_repeat_for": 0})
    async with running(config) as bridge:
        futures = [
            bridge.submit(Signal(f"b{i % 10}", SignalState.ON, origin="api", received_at=utcnow()))
            for i in range(500)
        ]
        await asyncio.gather(*futures)
        got = await receiver.wait_for(500, timeout=30)
    arrivals = [r.at for r in got]
    start = arrivals[0]
    # Arrivals are timed at the receiver, which shares the loop with the dispatcher: a
    # stall there delivers several paced requests at once. So each window gets 0.1 s of
    # slack and one extra burst for such a bunch; unpaced, the 500 requests would all
    # arrive within about half a second and fail both checks. (test_fair_pacing.py checks
    # the pace exactly, on loop time.)
    for i, t in enumerate(arrivals):
        allowed = 2 * burst + rate * (t - start + 0.1) + 1
        assert i + 1 <= allowed, f"request {i + 1} at +{t - start:.3f}s exceeds the pace"
    assert arrivals[-1] - start >= (len(arrivals) - 3 * burst) / rate - 0.1
