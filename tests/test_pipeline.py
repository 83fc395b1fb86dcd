"""End to end through real sockets: simulator → flicd source → bridge → store → sinks."""

import asyncio
from pathlib import Path
from typing import Any

from flicbridge.config import Config
from flicbridge.sources.simulator import Simulator
from tests.conftest import A, B, make_config, running
from tests.receiver import Receiver


def flicd_config(tmp_path: Path, sim: Simulator, receiver: Receiver, **extra: Any) -> Config:
    sections: dict[str, Any] = {
        "flicd": {"port": sim.port, "reconnect_max": 0.5, "ping_interval": 1},
        "buttons": [
            {"id": "alpha", "address": A, "name": "Alpha", "info": "Lab A"},
            {"id": "bravo", "address": B, "name": "Bravo"},
        ],
        "sinks": [
            {"id": "ao", "type": "alertops", "url": f"{receiver.url}/POSTAlert/SECRETKEY/Flic"},
            {"id": "hook", "type": "webhook", "url": f"{receiver.url}/hook"},
        ],
    }
    sections.update(extra)
    return make_config(tmp_path, **sections)


async def connected(bridge: Any, *buttons: str) -> None:
    async with asyncio.timeout(5):
        while not bridge.health.source_up.get("flicd") or not all(
            bridge.buttons[b].connected for b in buttons
        ):
            await asyncio.sleep(0.01)


async def test_press_open_append_close(tmp_path: Path, sim: Simulator, receiver: Receiver) -> None:
    """Single opens (sent to both sinks), a repeat is appended (not sent), double closes."""
    async with running(flicd_config(tmp_path, sim, receiver)) as bridge:
        await connected(bridge, "alpha")
        sim.press(A, "single")
        got = await receiver.wait_for(2)
        ao = next(r for r in got if "POSTAlert" in r.path)
        assert ao.body["flic_nameId"] == "alpha"
        assert ao.body["flic_state"] == "On"
        assert ao.body["info"] == "Lab A"
        assert ao.body["click"] == "single_click"
        sim.press(A, "single")
        sim.press(A, "double")
        got = await receiver.wait_for(4)
        assert len(got) == 4
        assert [r.body["flic_state"] for r in got if "POSTAlert" in r.path] == ["On", "Off"]
        assert [r.body["state"] for r in got if r.path == "/hook"] == ["On", "Off"]
        decisions = [e["decision"] for e in reversed(await bridge.store.recent_events())]
        assert decisions == ["open", "appended", "close"]


async def test_outage_is_retried_in_order(
    tmp_path: Path, sim: Simulator, receiver: Receiver
) -> None:
    """During a 5xx outage open and close stay queued; afterwards they arrive open first."""
    receiver.default = (503, "<html>down</html>", {})
    config = flicd_config(tmp_path, sim, receiver)
    async with running(config) as bridge:
        await connected(bridge, "alpha")
        sim.press(A, "single")
        sim.press(A, "double")
        await receiver.wait_for(4)
        receiver.default = (202, {"ok": True}, {})
        async with asyncio.timeout(10):
            while await bridge.store.rows("pending"):
                await asyncio.sleep(0.05)
        # Per sink, no Off was ever sent before the On had been delivered.
        ao_states = [r.body["flic_state"] for r in receiver.requests if "POSTAlert" in r.path]
        first_off = ao_states.index("Off")
        assert ao_states[:first_off] and all(s == "On" for s in ao_states[:first_off])
        assert set(ao_states[first_off:]) == {"Off"}
        delivered = await bridge.store.rows("delivered")
        assert sorted(r.message.action for r in delivered) == ["close", "close", "open", "open"]


async def test_permanent_failure_dead_letters_and_lane_moves_on(
    tmp_path: Path, sim: Simulator, receiver: Receiver
) -> None:
    """A 400 dead-letters the row (with the platform's message) and the close still goes."""
    receiver.script.extend([(400, {"message": "bad flic_nameId"}, {})])
    config = flicd_config(
        tmp_path,
        sim,
        receiver,
        sinks=[
            {"id": "ao", "type": "alertops", "url": f"{receiver.url}/POSTAlert/SECRETKEY/Flic"},
        ],
    )
    async with running(config) as bridge:
        await connected(bridge, "alpha")
        sub = bridge.alerts_bus.subscribe("HIGH")
        sim.press(A, "single")
        sim.press(A, "double")
        await receiver.wait_for(2)
        async with asyncio.timeout(5):
            while not await bridge.store.rows("dead"):
                await asyncio.sleep(0.02)
        dead = await bridge.store.rows("dead")
        assert len(dead) == 1 and dead[0].message.action == "open"
        assert "bad flic_nameId" in (dead[0].last_error or "")
        assert "SECRETKEY" not in (dead[0].last_error or "")
        errors = []
        while not sub.queue.empty():
            alert = sub.queue.get_nowait()
            if alert.type == "ERROR":
                errors.append(alert)
        assert errors and "could not be delivered" in errors[0].message
        assert receiver.requests[1].body["flic_state"] == "Off"


async def test_a_hanging_key_does_not_block_another(
    tmp_path: Path, sim: Simulator, receiver: Receiver
) -> None:
    """One alert key's hung attempt does not delay another key's press on the same sink."""
    receiver.script.append("hang")
    receiver.hang_for = 5
    config = flicd_config(
        tmp_path,
        sim,
        receiver,
        sinks=[
            {"id": "hook", "type": "webhook", "url": f"{receiver.url}/hook"},
        ],
    )
    async with running(config) as bridge:
        await connected(bridge, "alpha", "bravo")
        sim.press(A, "single")
        await receiver.wait_for(1)
        sim.press(B, "single")
        got = await receiver.wait_for(2, timeout=2)
        assert got[1].body["alert_key"] == "bravo"


async def test_retry_after_pauses_the_sink(
    tmp_path: Path, sim: Simulator, receiver: Receiver
) -> None:
    """A 429 with Retry-After holds every lane of the sink at least that long."""
    receiver.script.append((429, {"error": "slow down"}, {"Retry-After": "1"}))
    config = flicd_config(
        tmp_path,
        sim,
        receiver,
        sinks=[
            {"id": "hook", "type": "webhook", "url": f"{receiver.url}/hook"},
        ],
    )
    async with running(config) as bridge:
        await connected(bridge, "alpha", "bravo")
        loop = asyncio.get_running_loop()
        sim.press(A, "single")
        await receiver.wait_for(1)
        t429 = loop.time()
        sim.press(B, "single")
        await receiver.wait_for(3, timeout=5)
        assert loop.time() - t429 >= 0.9


async def test_late_press_keeps_its_real_time(
    tmp_path: Path, sim: Simulator, receiver: Receiver
) -> None:
    """A press flicd queued out of range arrives stamped with its delay and real time."""
    async with running(flicd_config(tmp_path, sim, receiver)) as bridge:
        await connected(bridge, "alpha")
        sim.press(A, "single", queued_age=120)
        got = await receiver.wait_for(2)
        ao = next(r for r in got if "POSTAlert" in r.path)
        assert float(ao.body["delay_s"]) >= 120
        events = await bridge.store.recent_events(1)
        assert events[0]["queued"] == 1 and events[0]["delay_s"] >= 120


async def test_max_press_age_drops_old_presses(
    tmp_path: Path, sim: Simulator, receiver: Receiver
) -> None:
    """With max_press_age set, a press queued for longer is dropped with a warning."""
    config = flicd_config(tmp_path, sim, receiver, alerts={"max_press_age": 60})
    async with running(config) as bridge:
        await connected(bridge, "alpha")
        sim.press(A, "single", queued_age=3600)
        sim.press(A, "hold")
        got = await receiver.wait_for(2)
        assert all(r.body.get("click", "hold") != "single_click" for r in got)
        events = await bridge.store.recent_events()
        assert [e["click"] for e in events] == ["hold"]


async def test_state_survives_restart(tmp_path: Path, sim: Simulator, receiver: Receiver) -> None:
    """An alert opened before a restart is closed (not ignored) by a press after it."""
    config = flicd_config(tmp_path, sim, receiver)
    async with running(config) as bridge:
        await connected(bridge, "alpha")
        sim.press(A, "single")
        await receiver.wait_for(2)
    async with running(config) as bridge:
        await connected(bridge, "alpha")
        sim.press(A, "double")
        await receiver.wait_for(4)
        events = await bridge.store.recent_events(1)
        assert events[0]["decision"] == "close"


async def test_max_age_dead_letters_old_rows(
    tmp_path: Path, sim: Simulator, receiver: Receiver
) -> None:
    """A row still undelivered after max_age is dead-lettered, never silently dropped.

    Two hours pass on both clocks (a step of the wall clock alone ages nothing: see
    test_clock_steps.py)."""
    receiver.default = (503, "down", {})
    offset = [0.0]
    import time

    config = flicd_config(
        tmp_path,
        sim,
        receiver,
        delivery={
            "timeout": 1,
            "backoff_initial": 0.05,
            "backoff_max": 0.1,
            "max_age": 3600,
        },
        sinks=[{"id": "hook", "type": "webhook", "url": f"{receiver.url}/hook"}],
    )
    async with running(
        config,
        clock=lambda: time.time() + offset[0],
        mono=lambda: asyncio.get_running_loop().time() + offset[0],
    ) as bridge:
        await connected(bridge, "alpha")
        sim.press(A, "single")
        await receiver.wait_for(2)
        offset[0] = 7200.0
        async with asyncio.timeout(5):
            while not await bridge.store.rows("dead"):
                await asyncio.sleep(0.02)
        dead = await bridge.store.rows("dead")
        assert "max_age" in (dead[0].last_error or "")
        assert not await bridge.store.rows("pending")
