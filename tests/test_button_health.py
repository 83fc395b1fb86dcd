"""Button health alerts: a flat or silent button opens ``<alert key>/health`` on the platform.

Battery through the flicd simulator (real protocol) into a running bridge delivering to a
real receiver; silence on the time-accelerated loop of the fault suite, so a one-hour
``silent_after`` passes in moments of real time.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from flicbridge.app import Bridge
from flicbridge.config import Config
from flicbridge.health import BATTERY_HYSTERESIS
from flicbridge.sources.simulator import Simulator
from tests.conftest import A, make_config, running
from tests.receiver import Receiver
from tests.test_faults import accelerated, eventually, loop


def config(tmp_path: Path, port: int, url: str, **alerts: Any) -> Config:
    return make_config(
        tmp_path,
        flicd={"port": port, "reconnect_max": 1, "ping_interval": 10},
        alerts={"battery_warn_percent": 15, **alerts},
        buttons=[{"id": "alpha", "address": A, "name": "Alpha", "sinks": ["main"]}],
        sinks=[
            {"id": "main", "type": "webhook", "url": f"{url}/main"},
            {"id": "pd", "type": "pagerduty", "url": f"{url}/pd", "routing_key": "R" * 32},
        ],
    )


def health_events(receiver: Receiver) -> list[tuple[str, str, str]]:
    """(event_action, severity, summary) of every health message PagerDuty received."""
    out = []
    for r in receiver.requests:
        if r.path == "/pd" and r.body["dedup_key"] == "alpha/health":
            payload = r.body.get("payload", {})
            out.append((r.body["event_action"], payload.get("severity"), payload.get("summary")))
    return out


async def settle(bridge: Bridge, sim: Simulator, percent: int) -> None:
    """Report ``percent`` and wait until the bridge has heard it."""
    sim.battery(A, percent)
    async with asyncio.timeout(10):
        while bridge.buttons["alpha"].battery != percent:
            await asyncio.sleep(0.01)


async def test_battery_dip_opens_once_recovers_with_hysteresis_and_reopens(
    tmp_path: Path, receiver: Receiver, sim: Simulator
) -> None:
    """≤ 15 % opens the health alert once at health_sinks; it closes only at 20 %; a new
    dip opens a new one; the button's own alert and sinks are untouched."""
    cfg = config(tmp_path, sim.port, receiver.url, health_sinks=["pd"])
    async with asyncio.timeout(60), running(cfg) as bridge:
        await settle(bridge, sim, 100)
        await settle(bridge, sim, 12)
        await receiver.wait_for(1, where=lambda r: r.path == "/pd")
        assert health_events(receiver) == [
            ("trigger", "warning", health_events(receiver)[0][2]),
        ]
        summary = health_events(receiver)[0][2]
        assert summary.startswith("Alpha: battery 12 %"), summary
        warnings = [a for a in bridge.alerts_bus.recent if a.type == "WARNING"]
        assert any("12 %" in a.message for a in warnings)  # the local warning stays

        # Flapping around the threshold pages nobody again.
        for percent in (16, 14, 15, 17, 19, 13):
            await settle(bridge, sim, percent)
        assert bridge.states["alpha/health"].is_open
        await settle(bridge, sim, 15 + BATTERY_HYSTERESIS)  # recovered
        await receiver.wait_for(2, where=lambda r: r.path == "/pd")
        await settle(bridge, sim, 9)  # a new dip
        await receiver.wait_for(3, where=lambda r: r.path == "/pd")
        await asyncio.sleep(0.3)  # anything extra would have arrived by now
        actions = [e[0] for e in health_events(receiver)]
        assert actions == ["trigger", "resolve", "trigger"]
        assert not [r for r in receiver.requests if r.path == "/main"]  # health_sinks only
        assert not bridge.states.get("alpha") or not bridge.states["alpha"].is_open


async def test_health_alert_survives_a_restart_and_closes_on_recovery(
    tmp_path: Path, receiver: Receiver, sim: Simulator
) -> None:
    """Open at shutdown, still open after restart (no second trigger); a good report closes it.

    Without health_sinks the button's own sinks get it.
    """
    cfg = config(tmp_path, sim.port, receiver.url)
    async with asyncio.timeout(60), running(cfg) as bridge:
        await settle(bridge, sim, 100)
        await settle(bridge, sim, 5)
        await receiver.wait_for(1, where=lambda r: r.path == "/main")
    sim.battery(A, 5)  # still flat when the bridge comes back
    async with asyncio.timeout(60), running(cfg) as bridge:
        assert bridge.states["alpha/health"].is_open
        await settle(bridge, sim, 5)
        await asyncio.sleep(0.3)
        assert len([r for r in receiver.requests if r.path == "/main"]) == 1
        await settle(bridge, sim, 90)
        await receiver.wait_for(2, where=lambda r: r.path == "/main")
        assert not bridge.states["alpha/health"].is_open
    bodies = [r.body for r in receiver.requests if r.path == "/main"]
    assert [b["alert_key"] for b in bodies] == ["alpha/health", "alpha/health"]
    assert [b["state"] for b in bodies] == ["On", "Off"]
    assert not health_events(receiver)  # pd is not a sink of this button


def test_silence_opens_after_silent_after_and_a_press_closes_it(tmp_path: Path) -> None:
    """Nothing heard for silent_after (1 h, loop time) opens the alert; a press closes it."""

    async def main() -> None:
        receiver = Receiver()
        await receiver.start()
        sim = Simulator(host="127.0.0.1", port=0, buttons={A: "Alpha"})
        await sim.start()
        cfg = config(tmp_path, sim.port, receiver.url, silent_after="1h", health_sinks=["pd"])
        try:
            async with running(cfg, clock=loop().wall) as bridge:
                await eventually(lambda: bridge.buttons["alpha"].battery == 100, 30)
                start = loop().time()

                def health() -> list[Any]:
                    return [a for a in receiver.delivered() if a.path == "/pd"]

                async with asyncio.timeout(2 * 3600):
                    await receiver.wait_until(lambda: len(health()) >= 1)
                waited = loop().time() - start
                assert 3599 <= waited <= 3600 + 60 + 30, waited  # heard just before start
                body = health()[0].body
                assert body["event_action"] == "trigger"
                assert "not heard from for 1 h" in body["payload"]["summary"]
                assert any("not heard" in a.message for a in bridge.alerts_bus.recent)

                sim.press(A, "single")
                async with asyncio.timeout(60):
                    await receiver.wait_until(lambda: len(health()) >= 2)
                assert health()[1].body["event_action"] == "resolve"
        finally:
            await sim.stop()
            await receiver.stop()

    accelerated(main())
