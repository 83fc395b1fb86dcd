"""Fault suite: flicd, sink and store failures, each followed by a press that must arrive.

Most scenarios run on a time-accelerated event loop (``VirtualTimeLoop``): sockets,
threads and SQLite are real, but when nothing has happened for a few real milliseconds
the loop's clock jumps to its next timer, so backoffs, ping timeouts and a six-hour
sink outage pass in moments. The bridge gets the matching wall clock. Every bound
asserted here is in that loop time (or read from the daemon's log), never wall-clock.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import linecache
import os
import queue
import re
import selectors
import shutil
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from flicbridge.app import Bridge
from flicbridge.config import Config
from flicbridge.dispatcher import WINDOW
from flicbridge.domain import Signal, SignalState, utcnow
from flicbridge.sources.simulator import Simulator
from flicbridge.store import Store
from tests.conftest import free_port, make_config, running
from tests.daemon import toml_dumps
from tests.receiver import Receiver

A = "80:e4:da:70:00:01"
IDLE_JUMP = 0.005  # real seconds of silence before the clock jumps to the next timer

# -- a time-accelerated event loop ------------------------------------------------------------


_IDLE_LINES = ("get(", "acquire(", "wait(")  # a thread parked on a queue, lock or event


def _work_queued(frame: Any) -> bool:
    """Whether a parked thread's own queue (a local, or ``self._queue``) holds work."""
    for value in list(frame.f_locals.values()):
        for candidate in (value, getattr(value, "_queue", None)):
            if isinstance(candidate, queue.SimpleQueue | queue.Queue) and not candidate.empty():
                return True
    return False


def _threads_at_work() -> bool:
    """Whether a thread other than the loop's has work (a commit in the store's writer, a
    ``to_thread`` call), running or handed over and not yet picked up: then the loop is
    waiting for real work, not idling."""
    me = threading.get_ident()
    for ident, frame in sys._current_frames().items():
        if ident == me:
            continue
        line = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
        if not any(idle in line for idle in _IDLE_LINES) or _work_queued(frame):
            return True
    return False


class _JumpingSelector(selectors.BaseSelector):
    """The default selector, except that an idle wait is cut short by a clock jump.

    The loop's clock jumps to its next timer only when nothing arrived for ``IDLE_JUMP``
    real seconds and no other thread is at work, so a slow fsync is never mistaken for
    idleness.
    """

    def __init__(self, loop: VirtualTimeLoop) -> None:
        self._inner = selectors.DefaultSelector()
        self._loop = loop

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._inner.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None or timeout <= IDLE_JUMP:
            return self._inner.select(timeout)
        ready = self._inner.select(IDLE_JUMP)
        if ready or _threads_at_work():
            return ready
        # A thread may have handed its result over just after the wait: look once more.
        ready = self._inner.select(0)
        if not ready:
            self._loop.offset += timeout - IDLE_JUMP  # nothing happens until the next timer
        return ready

    def get_key(self, fileobj: Any) -> selectors.SelectorKey:
        return self._inner.get_key(fileobj)

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._inner.get_map()

    def close(self) -> None:
        self._inner.close()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock jumps over idle waits; ``wall`` is the matching epoch clock."""

    def __init__(self) -> None:
        self.offset = 0.0
        super().__init__(_JumpingSelector(self))

    def time(self) -> float:
        return time.monotonic() + self.offset

    def wall(self) -> float:
        return time.time() + self.offset


def accelerated(main: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        runner.run(main)


def loop() -> VirtualTimeLoop:
    current = asyncio.get_running_loop()
    assert isinstance(current, VirtualTimeLoop)
    return current


async def eventually(predicate: Callable[[], bool], within: float) -> float:
    """Wait (loop time) until ``predicate()``; return how long it took.

    Polls every 0.1 s of loop time: a poll closer than ``IDLE_JUMP`` would keep the
    clock from ever jumping. Long waits should wait for an event instead (``arrived``).
    """
    start = loop().time()
    async with asyncio.timeout(within):
        while not predicate():
            await asyncio.sleep(0.1)
    return loop().time() - start


async def arrived(receiver: Receiver, count: int, within: float) -> None:
    """Wait (loop time, event-driven, so the clock can jump) for ``count`` 2xx answers."""
    async with asyncio.timeout(within):
        await receiver.wait_until(lambda: len(receiver.delivered()) >= count)


# -- helpers ------------------------------------------------------------------------------


def hook_config(tmp_path: Path, url: str, **sections: Any) -> Config:
    defaults: dict[str, Any] = {
        "delivery": {"timeout": 5, "backoff_initial": 0.5, "backoff_max": 10},
        "alerts": {"suppress_repeat_for": 0},
        "buttons": [{"id": "desk", "source": "ingest"}, {"id": "door", "source": "ingest"}],
        "sinks": [
            {"id": "hook", "type": "webhook", "url": f"{url}/hook", "rate": 1000, "burst": 100}
        ],
    }
    defaults.update(sections)
    return make_config(tmp_path, **defaults)


async def signal(bridge: Bridge, button: str, state: str) -> int:
    accepted = await bridge.submit(
        Signal(button_id=button, state=SignalState(state), origin="api", received_at=utcnow())
    )
    return accepted.event_id


async def pending_and_dead(bridge: Bridge) -> tuple[int, int]:
    counts = await bridge.store.counts()
    pending = sum(c.get("pending", 0) for c in counts.values())
    dead = sum(c.get("dead", 0) for c in counts.values())
    return pending, dead


async def settled(bridge: Bridge) -> tuple[int, int]:
    """(pending, dead) once the last outcome is committed (it follows the answer closely)."""
    async with asyncio.timeout(30):
        while True:
            counts = await pending_and_dead(bridge)
            if counts[0] == 0:
                return counts
            await asyncio.sleep(0.1)


def retry_delays(logs: list[dict[str, Any]]) -> list[float]:
    return [float(e["retry_in"]) for e in logs if e["event"] == "delivery_failed"]


# -- flicd faults ---------------------------------------------------------------------------

FLICD = {"reconnect_max": 2, "ping_interval": 1}


def flicd_config(tmp_path: Path, port: int, url: str) -> Config:
    return hook_config(
        tmp_path,
        url,
        flicd={"port": port, **FLICD},
        buttons=[{"id": "alpha", "address": A}],
    )


def button_up(bridge: Bridge) -> bool:
    return bool(bridge.health.source_up.get("flicd")) and bool(bridge.buttons["alpha"].connected)


async def presses_arrive(sim: Simulator, receiver: Receiver, count: int = 4) -> None:
    """Open/close presses after recovery: every one of them arrives."""
    before = len(receiver.delivered())
    for i in range(count):
        sim.press(A, "single" if i % 2 == 0 else "double")
        await eventually(lambda i=i: len(receiver.delivered()) >= before + i + 1, 30)
    states = [a.body["state"] for a in receiver.delivered()[before:]]
    assert states == ["On", "Off"] * (count // 2)


def disconnects(logs: list[dict[str, Any]]) -> list[str]:
    return [str(e.get("detail")) for e in logs if e["event"] == "flicd_disconnected"]


def reconnect_delays(logs: list[dict[str, Any]]) -> list[float]:
    return [float(e["delay_s"]) for e in logs if e["event"] == "flicd_reconnect_scheduled"]


def test_flicd_refused_at_start_then_appears(tmp_path: Path, logs: list[dict[str, Any]]) -> None:
    """flicd not there at start: the bridge runs, not ready, retries within the cap, and
    connects once flicd listens; presses after that arrive."""

    async def main() -> None:
        receiver = Receiver()
        await receiver.start()
        port = free_port()
        async with running(flicd_config(tmp_path, port, receiver.url), clock=loop().wall) as bridge:
            await asyncio.sleep(30)  # thirty seconds of refused connections
            assert bridge.health.source_up["flicd"] is False
            assert len(reconnect_delays(logs)) >= 10
            sim = Simulator(port=port, buttons={A: "Alpha"})
            await sim.start()
            try:
                await eventually(lambda: button_up(bridge), FLICD["reconnect_max"] + 5)
                await presses_arrive(sim, receiver)
            finally:
                await sim.stop()
        await receiver.stop()
        assert max(reconnect_delays(logs)) <= FLICD["reconnect_max"]

    accelerated(main())


def test_flicd_dropped_mid_stream_recovers_each_time(
    tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    """Five drops (as a flicd restart does): each time the bridge is back within the cap,
    a press made during the gap arrives late, and presses after recovery arrive."""

    async def main() -> None:
        receiver = Receiver()
        await receiver.start()
        sim = Simulator(buttons={A: "Alpha"})
        await sim.start()
        async with running(
            flicd_config(tmp_path, sim.port, receiver.url), clock=loop().wall
        ) as bridge:
            await eventually(lambda: button_up(bridge), 10)
            for _ in range(5):
                before = len(disconnects(logs))
                sim.drop()
                # The link may be back before a poll could see it down: count the drops.
                await eventually(lambda before=before: len(disconnects(logs)) > before, 5)
                sim.press(A, "single")  # kept by the button (or sent, if already back)
                took = await eventually(lambda: button_up(bridge), 30)
                assert took <= FLICD["reconnect_max"] + 1
                await eventually(lambda: len(receiver.delivered()) % 2 == 1, 30)
                sim.press(A, "double")
                await eventually(lambda: len(receiver.delivered()) % 2 == 0, 30)
            await presses_arrive(sim, receiver)
        await sim.stop()
        await receiver.stop()
        delivered = receiver.delivered()
        assert [a.body["state"] for a in delivered] == ["On", "Off"] * (len(delivered) // 2)
        assert len(delivered) == 14
        assert max(reconnect_delays(logs)) <= FLICD["reconnect_max"]

    accelerated(main())


def test_flicd_silent_hang_is_noticed_and_recovered(
    tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    """A flicd that keeps its socket open but says nothing fails its ping; the bridge drops
    it, reconnects within the cap, and presses after flicd answers again arrive."""

    async def main() -> None:
        receiver = Receiver()
        await receiver.start()
        sim = Simulator(buttons={A: "Alpha"})
        await sim.start()
        async with running(
            flicd_config(tmp_path, sim.port, receiver.url), clock=loop().wall
        ) as bridge:
            await eventually(lambda: button_up(bridge), 10)
            sim.hang()
            # A ping every ping_interval, answered within 5 s or the connection is dead.
            noticed = await eventually(
                lambda: any("did not answer a ping" in d for d in disconnects(logs)), 60
            )
            assert noticed <= FLICD["ping_interval"] + 5 + 1
            sim.unhang()
            await eventually(lambda: button_up(bridge), 60)
            await presses_arrive(sim, receiver)
        await sim.stop()
        await receiver.stop()
        assert max(reconnect_delays(logs)) <= FLICD["reconnect_max"]

    accelerated(main())


def test_flicd_restart_reannounces_buttons(tmp_path: Path, logs: list[dict[str, Any]]) -> None:
    """flicd restarts (a new process on the same port): channels are made again on the new
    one and its buttons' presses arrive."""

    async def main() -> None:
        receiver = Receiver()
        await receiver.start()
        sim = Simulator(buttons={A: "Alpha"})
        await sim.start()
        port = sim.port
        async with running(flicd_config(tmp_path, port, receiver.url), clock=loop().wall) as bridge:
            await eventually(lambda: button_up(bridge), 10)
            await presses_arrive(sim, receiver, 2)
            await sim.stop()
            await eventually(lambda: not button_up(bridge), 5)
            await asyncio.sleep(10)  # flicd is away for a while
            sim = Simulator(port=port, buttons={A: "Alpha"})
            await sim.start()
            await eventually(lambda: button_up(bridge), FLICD["reconnect_max"] + 5)
            assert sim.channel_count(A) == 1
            await presses_arrive(sim, receiver)
        await sim.stop()
        await receiver.stop()
        assert max(reconnect_delays(logs)) <= FLICD["reconnect_max"]

    accelerated(main())


# -- sink faults --------------------------------------------------------------------------------

Step = tuple[int, Any, dict[str, str]] | str  # an answer, or "hang"


def scripted(
    steps: list[Step], hang: float = 120.0
) -> Callable[[Any, Any], Awaitable[tuple[int, Any, dict[str, str]]]]:
    """Answers from ``steps`` first (``hang`` = answer only after ``hang`` s), then 200."""
    queue = deque(steps)

    async def respond(request: Any, body: Any) -> tuple[int, Any, dict[str, str]]:
        step = queue.popleft() if queue else (200, {"ok": True}, {})
        if step == "hang":
            await asyncio.sleep(hang)
            return 200, {"late": True}, {}
        assert not isinstance(step, str)
        if callable(step[2]):  # headers made at answer time (an HTTP-date)
            return step[0], step[1], step[2]()
        return step

    return respond


async def one_signal_through(tmp_path: Path, receiver: Receiver, **sections: Any) -> Bridge:
    bridge_holder: list[Bridge] = []
    async with running(
        hook_config(tmp_path, receiver.url, **sections), clock=loop().wall
    ) as bridge:
        bridge_holder.append(bridge)
        await signal(bridge, "desk", "On")
        await arrived(receiver, 1, 3600)
        assert await settled(bridge) == (0, 0)
    return bridge_holder[0]


def test_slow_sink_past_the_timeout_is_retried(tmp_path: Path, logs: list[dict[str, Any]]) -> None:
    """An answer slower than the timeout counts as a failure: abandoned at the timeout,
    retried, delivered; nothing dead-lettered."""

    async def main() -> None:
        receiver = Receiver(scripted(["hang", "hang"], hang=60))
        await receiver.start()
        await one_signal_through(tmp_path, receiver)
        await receiver.stop()
        failures = [e for e in logs if e["event"] == "delivery_failed"]
        assert len(failures) == 2 and all("timed out" in e["detail"] for e in failures)
        assert max(retry_delays(logs)) <= 10
        assert [e["event"] for e in logs if e["event"] in ("delivered", "dead_lettered")] == [
            "delivered"
        ]

    accelerated(main())


def test_retry_after_seconds_is_a_minimum_and_pauses_the_sink(
    tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    """429 with Retry-After: 120 (above backoff_max): the next attempt of that row and of
    another key on the same sink waits at least 120 s; both are then delivered."""

    async def main() -> None:
        receiver = Receiver(scripted([(429, {"error": "slow down"}, {"Retry-After": "120"})]))
        await receiver.start()
        async with running(hook_config(tmp_path, receiver.url), clock=loop().wall) as bridge:
            await signal(bridge, "desk", "On")
            await eventually(lambda: len(receiver.arrivals) == 1, 30)
            await signal(bridge, "door", "On")
            await arrived(receiver, 2, 3600)
            assert await settled(bridge) == (0, 0)
        await receiver.stop()
        first, *later = receiver.arrivals
        assert first.status == 429
        assert all(a.loop_at - first.loop_at >= 120 for a in later)
        assert {a.body["alert_key"] for a in later} == {"desk", "door"}
        assert retry_delays(logs) and min(retry_delays(logs)) >= 120

    accelerated(main())


def test_retry_after_http_date_is_honoured(tmp_path: Path, logs: list[dict[str, Any]]) -> None:
    """429 with Retry-After as an HTTP-date two minutes ahead: no retry before then."""

    def in_two_minutes() -> dict[str, str]:
        return {"Retry-After": email.utils.formatdate(time.time() + 120, usegmt=True)}

    async def main() -> None:
        receiver = Receiver(scripted([(429, "", in_two_minutes)]))  # type: ignore[list-item]
        await receiver.start()
        await one_signal_through(tmp_path, receiver)
        await receiver.stop()
        first, second = receiver.arrivals
        assert first.status == 429 and second.status == 200
        assert second.loop_at - first.loop_at >= 118  # the date has one-second resolution

    accelerated(main())


def test_429_without_retry_after_backs_off_under_the_cap(
    tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    """429 with no Retry-After: plain capped backoff, then delivered."""

    async def main() -> None:
        receiver = Receiver(scripted([(429, {"error": "slow"}, {})] * 6))
        await receiver.start()
        await one_signal_through(tmp_path, receiver)
        await receiver.stop()
        assert len(receiver.arrivals) == 7
        assert len(retry_delays(logs)) == 6 and max(retry_delays(logs)) <= 10

    accelerated(main())


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirect_is_dead_lettered_loudly_and_the_lane_moves_on(
    tmp_path: Path, logs: list[dict[str, Any]], status: int
) -> None:
    """A 3xx is permanent (the URL is wrong): dead after one attempt, an ERROR alert, and
    the close behind it in the same lane still goes."""

    async def main() -> None:
        receiver = Receiver(scripted([(status, "", {"Location": "http://elsewhere.invalid/"})]))
        await receiver.start()
        async with running(hook_config(tmp_path, receiver.url), clock=loop().wall) as bridge:
            alerts = bridge.alerts_bus.subscribe("HIGH")
            await signal(bridge, "desk", "On")
            await signal(bridge, "desk", "Off")
            await arrived(receiver, 1, 600)
            await settled(bridge)
            dead = await bridge.store.rows("dead")
            assert len(dead) == 1 and dead[0].message.action == "open"
            assert "redirect" in (dead[0].last_error or "")
            assert (await pending_and_dead(bridge))[0] == 0
            raised = []
            while not alerts.queue.empty():
                raised.append(alerts.queue.get_nowait())
            assert any(a.type == "ERROR" for a in raised)
        await receiver.stop()
        assert [a.body["state"] for a in receiver.arrivals] == ["On", "Off"]

    accelerated(main())


def test_garbage_bodies_do_not_confuse_the_outcome(
    tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    """A 503 with a binary body is retried; a 200 with a binary body is delivered once."""

    async def main() -> None:
        junk = bytes(range(256)) * 300  # 76 KiB of non-UTF-8, past the body read limit
        receiver = Receiver(scripted([(503, junk, {"Content-Type": "text/html"}), (200, junk, {})]))
        await receiver.start()
        await one_signal_through(tmp_path, receiver)
        await receiver.stop()
        assert [a.status for a in receiver.arrivals] == [503, 200]
        (failed,) = [e for e in logs if e["event"] == "delivery_failed"]
        assert len(failed["detail"]) < 400

    accelerated(main())


class RawPeer:
    """A TCP server speaking just enough HTTP: per request, a step from the script:
    ``reset`` (RST), ``garbage`` (bytes that are not HTTP, then close) or ``ok``."""

    def __init__(self, steps: list[str]) -> None:
        self.steps = deque(steps)
        self.seen: list[str] = []
        self.answered = asyncio.Event()  # set at every "ok"
        self.server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()

    async def wait_ok(self, count: int, within: float) -> None:
        async with asyncio.timeout(within):
            while self.seen.count("ok") < count:
                self.answered.clear()
                await self.answered.wait()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"content-length:\s*(\d+)", head, re.IGNORECASE)
                await reader.readexactly(int(length.group(1)) if length else 0)
                step = self.steps.popleft() if self.steps else "ok"
                self.seen.append(step)
                if step == "reset":
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                if step == "garbage":
                    writer.write(b"\x00\x9f\x92\x96 this is not HTTP\r\n\r\n")
                    await writer.drain()
                    writer.close()
                    return
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 2\r\n\r\n{}"
                )
                await writer.drain()
                self.answered.set()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


@pytest.mark.parametrize("fault", ["reset", "garbage"])
def test_connection_reset_and_non_http_answers_are_retried(
    tmp_path: Path, logs: list[dict[str, Any]], fault: str
) -> None:
    """A connection reset mid-request, or an answer that is not HTTP at all, is a network
    error: retried under the cap until delivered, never dead-lettered."""

    async def main() -> None:
        peer = RawPeer([fault] * 3)
        await peer.start()
        async with running(hook_config(tmp_path, peer.url), clock=loop().wall) as bridge:
            await signal(bridge, "desk", "On")
            await signal(bridge, "desk", "Off")
            await peer.wait_ok(2, 3600)
            assert await settled(bridge) == (0, 0)
        await peer.stop()
        assert peer.seen == [fault] * 3 + ["ok", "ok"]
        assert len(retry_delays(logs)) == 3 and max(retry_delays(logs)) <= 10

    accelerated(main())


def test_two_hour_outage_loses_nothing(tmp_path: Path, logs: list[dict[str, Any]]) -> None:
    """A sink down for two (accelerated) hours: presses made during it are all delivered
    afterwards, in order per key, none dead-lettered, every retry under backoff_max, and
    the last lane is through within backoff_max of the sink coming back."""
    backoff_max = 300

    async def main() -> None:
        back_at = [float("inf")]

        def respond(request: Any, body: Any) -> tuple[int, Any, dict[str, str]]:
            if loop().time() < back_at[0]:
                return 503, {"error": "maintenance"}, {}
            return 200, {"ok": True}, {}

        receiver = Receiver(respond)
        await receiver.start()
        buttons = [{"id": f"b{i}", "source": "ingest"} for i in range(4)]
        delivery = {"timeout": 10, "backoff_initial": 1, "backoff_max": backoff_max}
        config = hook_config(tmp_path, receiver.url, buttons=buttons, delivery=delivery)
        async with running(config, clock=loop().wall) as bridge:
            start = loop().time()
            back_at[0] = start + 2 * 3600
            for b in buttons:
                await signal(bridge, b["id"], "On")
            await asyncio.sleep(1800)
            for b in buttons:
                await signal(bridge, b["id"], "Off")
                await signal(bridge, b["id"], "On")
            await arrived(receiver, 3 * len(buttons), 4 * 3600)
            done = loop().time()
            assert await settled(bridge) == (0, 0)
        await receiver.stop()
        assert done - back_at[0] <= backoff_max + 30
        delays = retry_delays(logs)
        assert len(delays) > 100 and max(delays) <= backoff_max
        delivered = receiver.delivered()
        for b in buttons:
            states = [a.body["state"] for a in delivered if a.body["alert_key"] == b["id"]]
            assert states == ["On", "Off", "On"]
        assert not [e for e in logs if e["event"] == "dead_lettered"]

    accelerated(main())


# -- store faults at start-up ------------------------------------------------------------------


def run_daemon(
    workdir: Path, *, preexec_fn: Callable[[], None] | None = None
) -> subprocess.CompletedProcess[str]:
    """``flicbridge run`` on a config whose store is ``workdir/store/flicbridge.db``; it must
    exit by itself (a daemon that starts is stopped after a few seconds)."""
    config = {
        "store": {"path": str(workdir / "store" / "flicbridge.db")},
        "server": {"host": "127.0.0.1", "port": 0},
        "buttons": [{"id": "desk", "source": "ingest"}],
    }
    path = workdir / "flicbridge.toml"
    path.write_text(toml_dumps(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLICBRIDGE_", "NOTIFY_"))}
    return subprocess.run(
        [sys.executable, "-m", "flicbridge", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=20,
        env=env,
        preexec_fn=preexec_fn,
        check=False,
    )


def make_store(path: Path) -> None:
    async def create() -> None:
        store = Store(path)
        await store.open()
        await store.close()

    path.parent.mkdir(parents=True, exist_ok=True)
    asyncio.run(create())


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def assert_clear_failure(result: subprocess.CompletedProcess[str], db: Path) -> None:
    assert result.returncode == 1, result.stderr
    assert str(db) in result.stderr
    assert "Traceback" not in result.stderr


def damaged_store(path: Path) -> None:
    """A real store whose b-tree pages were overwritten (the header still says SQLite)."""
    make_store(path)
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO meta VALUES ('x', ?)", ("y" * 20_000,))
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    data = bytearray(path.read_bytes())
    for page in range(1, len(data) // 4096):
        data[page * 4096 + 8 : page * 4096 + 4000] = b"\xa5" * 3992
    path.write_bytes(bytes(data))
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda p: p.write_bytes(b"this is not a database\n" * 200), id="garbage"),
        pytest.param(
            lambda p: p.write_bytes(b""[:0] + b"SQLite format 3\x00" + b"\x00" * 84), id="truncated"
        ),
        pytest.param(damaged_store, id="damaged-pages"),
    ],
)
def test_corrupt_store_exits_1_naming_the_file_and_leaves_it(
    tmp_path: Path, make: Callable[[Path], None]
) -> None:
    """A corrupt store file at start: exit 1, one clear line naming the file, no traceback,
    and the file exactly as it was."""
    db = tmp_path / "store" / "flicbridge.db"
    db.parent.mkdir()
    make(db)
    before = snapshot(db.parent)
    result = run_daemon(tmp_path)
    assert_clear_failure(result, db)
    assert snapshot(db.parent) == before


def _immutable(paths: list[Path], on: bool) -> bool:
    flag = "+i" if on else "-i"
    done = subprocess.run(["chattr", flag, *map(str, paths)], capture_output=True, check=False)
    return done.returncode == 0


@pytest.fixture
def read_only_store(tmp_path: Path) -> Iterator[Path]:
    """An existing store in a folder nobody may write to (root included: chattr +i)."""
    db = tmp_path / "store" / "flicbridge.db"
    make_store(db)
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    paths = [db, db.parent]
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or not _immutable(paths, True):
            pytest.skip("running as root without chattr +i: cannot make a read-only store")
    else:
        db.chmod(0o444)
        db.parent.chmod(0o555)
    try:
        yield db
    finally:
        if os.geteuid() == 0:
            _immutable(paths, False)
        db.parent.chmod(0o755)
        db.chmod(0o644)


def test_read_only_store_at_start_exits_1_naming_the_file(
    tmp_path: Path, read_only_store: Path
) -> None:
    """A store the daemon cannot write at start: exit 1 naming the file, no traceback,
    the file unchanged."""
    before = snapshot(read_only_store.parent)
    result = run_daemon(tmp_path)
    assert_clear_failure(result, read_only_store)
    assert snapshot(read_only_store.parent) == before


def test_read_only_store_is_not_called_damaged(tmp_path: Path, read_only_store: Path) -> None:
    """The message for a store the daemon may not write says so, instead of telling the
    operator to move the (healthy) file aside or restore a backup."""
    result = run_daemon(tmp_path)
    assert result.returncode == 1
    assert "backup" not in result.stderr
    assert re.search(r"read-only|permission|cannot write", result.stderr, re.IGNORECASE)


def _no_room() -> None:
    import resource

    # A file may not grow past 8 KiB: a disk that is full for this process.
    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))


def test_full_disk_at_start_exits_1_naming_the_file(tmp_path: Path) -> None:
    """No room to create the store: exit 1 with one line naming the file, no traceback."""
    result = run_daemon(tmp_path, preexec_fn=_no_room)
    assert_clear_failure(result, tmp_path / "store" / "flicbridge.db")


def test_bridge_logs_nothing_secret_on_faults(tmp_path: Path, logs: list[dict[str, Any]]) -> None:
    """Across resets and 5xx answers, the sink URL's path (its key) is never logged."""

    async def main() -> None:
        peer = RawPeer(["reset", "garbage"])
        await peer.start()
        url = f"{peer.url}/POSTAlert/SECRETKEY123/Flic"
        sinks = [{"id": "ao", "type": "alertops", "url": url}]
        async with running(
            hook_config(tmp_path, peer.url, sinks=sinks), clock=loop().wall
        ) as bridge:
            await signal(bridge, "desk", "On")
            await peer.wait_ok(1, 600)
        await peer.stop()
        assert "SECRETKEY123" not in repr(logs)

    accelerated(main())


# -- a large backlog at start-up ------------------------------------------------------------


def prefill(db: Path, rows: int) -> None:
    """A store holding ``rows`` pending rows for sink "hook" (key "door"), as a long
    outage leaves it."""
    from datetime import UTC, datetime

    from flicbridge.domain import Message
    from flicbridge.store import SCHEMA, connect

    db.parent.mkdir(parents=True, exist_ok=True)
    conn = connect(db)
    conn.executescript(SCHEMA)
    stamp = datetime.now(UTC)
    message = Message(
        "door",
        "door",
        "door",
        "door",
        "",
        SignalState.ON,
        "open",
        "",
        stamp,
        0.0,
        "",
        "critical",
        1,
    )
    payload = json.dumps(message.to_json())
    now = time.time()
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO outbox (event_id, sink_id, alert_key, payload, created_at, next_attempt_at)"
        " VALUES (1, 'hook', 'door', ?, ?, ?)",
        [(payload, now, now + 3600)] * rows,
    )
    conn.execute("COMMIT")
    conn.close()


async def test_a_press_at_start_is_not_queued_behind_the_backlog_load(tmp_path: Path) -> None:
    """A press made as the daemon starts is committed without the backlog being read into
    memory first (a panic press is never queued behind other buttons'
    backlog, on disk or on the wire). An order, not a speed, is asserted: the backlog
    stays on disk, a window per lane in memory, and is still counted as pending."""
    backlog = 50_000
    config = hook_config(tmp_path, "http://127.0.0.1:9", delivery={"timeout": 1})
    prefill(config.store.path, backlog)
    async with running(config) as bridge:
        await signal(bridge, "desk", "On")
        in_memory = sum(len(lane.rows) for lane in bridge.dispatcher.lanes.values())
        pending = sum(bridge.dispatcher.depth().values())
    assert in_memory <= WINDOW * len(bridge.dispatcher.lanes) < backlog
    assert pending >= backlog
