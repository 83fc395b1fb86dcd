"""A backlog lives on disk: lanes page rows in, keep id order, and count what waits."""

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest

from flicbridge.config import Config
from flicbridge.dispatcher import WINDOW
from flicbridge.domain import Signal, SignalState, utcnow
from tests.conftest import make_config, running
from tests.receiver import Receiver


def config(tmp_path: Path, receiver: Receiver) -> Config:
    return make_config(
        tmp_path,
        buttons=[{"id": "a", "source": "ingest"}, {"id": "b", "source": "ingest"}],
        sinks=[
            {
                "id": "hook",
                "type": "webhook",
                "url": f"{receiver.url}/hook",
                "rate": 1000,
                "burst": 100,
                "body": {"key": "{alert_key}", "state": "{state}", "event": "{event}"},
            }
        ],
        alerts={"suppress_repeat_for": 0},
    )


async def test_large_lane_drains_in_order_with_a_bounded_window(
    tmp_path: Path, receiver: Receiver
) -> None:
    """Ten windows' worth of one key's rows arrive in commit order; memory holds one window."""
    receiver.default = (503, "down", {})
    n = WINDOW * 10
    async with running(config(tmp_path, receiver)) as bridge:
        for i in range(n):
            state = SignalState.ON if i % 2 == 0 else SignalState.OFF
            await bridge.submit(Signal("a", state, origin="api", received_at=utcnow()))
        assert bridge.dispatcher.depth()["hook"] == n
        in_memory = sum(len(lane.rows) for lane in bridge.dispatcher.lanes.values())
        assert in_memory <= WINDOW
        receiver.default = (202, {}, {})
        peak = 0
        async with asyncio.timeout(30):
            while bridge.dispatcher.depth()["hook"]:
                peak = max(peak, sum(len(x.rows) for x in bridge.dispatcher.lanes.values()))
                await asyncio.sleep(0.005)
        assert peak <= WINDOW
    # After the outage every row went out once, exactly in event (commit) order.
    events = [int(r.body["event"]) for r in receiver.requests[-n:]]
    assert events == sorted(events) and len(set(events)) == n


async def test_backlog_survives_restart_in_order(tmp_path: Path, receiver: Receiver) -> None:
    """Rows pending at shutdown are found again at start (counted, not loaded) and delivered."""
    receiver.default = (503, "down", {})
    cfg = config(tmp_path, receiver)
    async with running(cfg) as bridge:
        for i in range(WINDOW * 3):
            button = "a" if i % 3 else "b"
            state = SignalState.ON if (i // 3) % 2 == 0 else SignalState.OFF
            await bridge.submit(Signal(button, state, origin="api", received_at=utcnow()))
        total = bridge.dispatcher.depth()["hook"]
    receiver.default = (202, {}, {})
    before = len(receiver.requests)
    async with running(cfg) as bridge:
        assert bridge.dispatcher.depth()["hook"] == total
        async with asyncio.timeout(30):
            while bridge.dispatcher.depth()["hook"]:
                await asyncio.sleep(0.01)
        assert not await bridge.store.rows("pending")
    after = receiver.requests[before:]
    for key in ("a", "b"):
        events = [int(r.body["event"]) for r in after if r.body["key"] == key]
        assert events == sorted(events)
    assert len({int(r.body["event"]) for r in after}) >= total - 2  # in-flight repeats only


async def test_a_row_read_from_disk_before_its_add_goes_out_once(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bridge hands a committed row to the dispatcher (``add``) a moment after the store
    made it visible. A lane reading a page from disk in that moment must not read it too,
    or it is sent twice (once from the page, once from the add). Here every add comes
    0.2 s late while a backlog drains and new presses keep arriving."""
    receiver.default = (503, "down", {})
    async with running(config(tmp_path, receiver)) as bridge:
        for i in range(WINDOW * 2):
            state = SignalState.ON if i % 2 == 0 else SignalState.OFF
            await bridge.submit(Signal("a", state, origin="api", received_at=utcnow()))
        dispatcher = bridge.dispatcher
        real_add = dispatcher.add
        loop = asyncio.get_running_loop()

        def late_add(rows: Any, *, since: int | None = None) -> None:
            loop.call_later(0.2, lambda: real_add(rows, since=since))

        monkeypatch.setattr(dispatcher, "add", late_add)
        receiver.default = (202, {}, {})
        for i in range(40):
            state = SignalState.ON if i % 2 == 0 else SignalState.OFF
            await bridge.submit(Signal("a", state, origin="api", received_at=utcnow()))
            await asyncio.sleep(0.01)
        with contextlib.suppress(TimeoutError):  # what went out is asserted below
            async with asyncio.timeout(15):
                while await bridge.store.rows("pending"):
                    await asyncio.sleep(0.02)
    delivered = [int(r.body["event"]) for r in receiver.requests if r.body and "event" in r.body]
    sent = delivered[-(WINDOW * 2 + 40) :]
    assert len(sent) == len(set(sent)) == WINDOW * 2 + 40  # each once
    assert sent == sorted(sent)  # in commit order
