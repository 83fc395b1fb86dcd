"""kill -9 campaign: a real daemon process is killed at random moments and restarted.

Presses arrive all the time, through the flicd simulator (acknowledged by the daemon's
``"event": "accepted"`` log line) and through ``POST /api/v1/buttons/{id}/signal``
(acknowledged by its 202). The receiver fails 30 % of requests with 503 and sometimes
hangs past the delivery timeout. After the last cycle the receiver heals, the daemon
drains, and the checker proves: every acknowledged press reached each of its sinks at
least once; a press arrived twice only when a kill fell between the two arrivals; per
(sink, alert key) the arrivals follow event order; the alert state the daemon reports
after each restart is the one in the store, and the store's decisions replay cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sqlite3
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from flicbridge.sources.simulator import Simulator
from tests.daemon import Daemon
from tests.receiver import Received, Receiver

TOKEN = "crash-token"
FLICD = {"f1": "80:e4:da:70:00:01", "f2": "80:e4:da:70:00:02", "f3": "80:e4:da:70:00:03"}
INGEST = ("api1", "api2", "api3")
SINKS = ("s1", "s2")
BODY = {
    "key": "{alert_key}",
    "state": "{state}",
    "action": "{action}",
    "at": "{pressed_at}",
    "info": "{info}",
}
OPEN_AFTER = {"open": True, "resent": True, "appended": True, "close": False, "ignored": False}


@dataclass
class Ack:
    """A press the daemon said it accepted."""

    event_id: int
    button: str
    decision: str
    rows: int
    state: str = ""
    tag: str = ""  # the info an API signal carried


@dataclass
class Report:
    cycles: int
    acked: int = 0
    expected_deliveries: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: int = 0  # (sink, event) pairs that arrived more than once, across a kill
    unexplained_duplicates: list[str] = field(default_factory=list)
    out_of_order: list[str] = field(default_factory=list)
    state_mismatches: list[str] = field(default_factory=list)
    replay_errors: list[str] = field(default_factory=list)
    dead: int = 0

    def line(self) -> str:
        return (
            f"crash campaign: {self.cycles} kills, {self.acked} acknowledged presses, "
            f"{self.expected_deliveries} deliveries expected; lost {len(self.lost)}, "
            f"duplicated {self.duplicated} (unexplained {len(self.unexplained_duplicates)}), "
            f"out of order {len(self.out_of_order)}, state mismatches "
            f"{len(self.state_mismatches)}, replay errors {len(self.replay_errors)}, "
            f"dead {self.dead}"
        )


def config(workdir: Path, sim_port: int, receiver_url: str) -> dict[str, Any]:
    return {
        "flicd": {"host": "127.0.0.1", "port": sim_port, "reconnect_max": 0.3, "ping_interval": 1},
        "store": {"path": str(workdir / "flicbridge.db")},
        "server": {"host": "127.0.0.1", "port": 0, "token": TOKEN},
        "delivery": {"timeout": 1, "backoff_initial": 0.02, "backoff_max": 0.25},
        "alerts": {"suppress_repeat_for": 0},
        "buttons": [{"id": b, "address": a} for b, a in FLICD.items()]
        + [{"id": b, "source": "ingest"} for b in INGEST],
        "sinks": [
            {
                "id": s,
                "type": "webhook",
                "url": f"{receiver_url}/{s}",
                "body": BODY,
                "rate": 1000,
                "burst": 100,
            }
            for s in SINKS
        ],
    }


def read_store(db: Path) -> tuple[list[sqlite3.Row], dict[str, sqlite3.Row], Counter[str]]:
    """(events in id order, alert rows by key, outbox counts by status) from the file."""
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        events = conn.execute("SELECT * FROM events ORDER BY id").fetchall()
        alerts = {r["alert_key"]: r for r in conn.execute("SELECT * FROM alerts")}
        counts = Counter(
            {
                r[0]: r[1]
                for r in conn.execute("SELECT status, COUNT(*) FROM outbox GROUP BY status")
            }
        )
    finally:
        conn.close()
    return events, alerts, counts


class Campaign:
    def __init__(self, workdir: Path, cycles: int, seed: int) -> None:
        self.workdir = workdir
        self.cycles = cycles
        self.rng = random.Random(seed)
        self.healthy = False
        self.kills: list[float] = []  # perf_counter() of every SIGKILL
        self.api_acks: dict[int, Ack] = {}
        self.log_acks: dict[int, Ack] = {}
        self.report = Report(cycles)
        self.running = True
        self.api_paused = asyncio.Event()
        self.receiver = Receiver(self.respond)
        self.sim = Simulator(buttons={a: b for b, a in FLICD.items()})
        self.daemon: Daemon | None = None
        self.tag = 0

    async def respond(self, request: Any, body: Any) -> tuple[int, Any, dict[str, str]]:
        if self.healthy:
            return 200, {"ok": True}, {}
        roll = self.rng.random()
        if roll < 0.03:
            await asyncio.sleep(2.0)  # past the daemon's 1 s timeout: it gave up on this one
            return 503, {"error": "hung"}, {}
        if roll < 0.33:
            return 503, "<html>busy</html>", {}
        return 200, {"ok": True}, {}

    # -- load ---------------------------------------------------------------------------

    async def press_flicd(self) -> None:
        """Gestures all the time; while the daemon is down the buttons keep them (queued)."""
        while self.running:
            self.sim.press(
                self.rng.choice(list(FLICD.values())), self.rng.choice(("single", "double"))
            )
            await asyncio.sleep(self.rng.uniform(0.005, 0.03))

    async def signal_api(self, session: aiohttp.ClientSession) -> None:
        while self.running:
            await self.api_paused.wait()
            assert self.daemon is not None
            button = self.rng.choice(INGEST)
            state = self.rng.choice(("On", "Off"))
            self.tag += 1
            tag = f"p{self.tag}"
            try:
                async with session.post(
                    f"{self.daemon.url}/api/v1/buttons/{button}/signal",
                    json={"state": state, "info": tag},
                    headers={"Authorization": f"Bearer {TOKEN}"},
                ) as resp:
                    if resp.status == 202:
                        data = await resp.json()
                        self.api_acks[data["event"]] = Ack(
                            data["event"], button, data["decision"], data["rows"], state, tag
                        )
            except (aiohttp.ClientError, OSError, TimeoutError):
                await asyncio.sleep(0.01)  # the daemon is down (or was killed mid-answer)
            await asyncio.sleep(self.rng.uniform(0.0, 0.02))

    # -- the campaign ---------------------------------------------------------------------

    async def run(self) -> Report:
        await self.receiver.start()
        await self.sim.start()
        db = self.workdir / "flicbridge.db"
        self.daemon = Daemon(config(self.workdir, self.sim.port, self.receiver.url), self.workdir)
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            load = [asyncio.create_task(self.press_flicd())]
            load += [asyncio.create_task(self.signal_api(session)) for _ in range(3)]
            try:
                for cycle in range(self.cycles + 1):
                    if cycle > 0:
                        self.check_store_consistency(db, cycle)
                    last = cycle == self.cycles
                    if last:
                        self.healthy = True
                    await self.daemon.start()
                    await self.check_reported_state(db, session, cycle)
                    self.api_paused.set()
                    if last:
                        break
                    await asyncio.sleep(self.rng.uniform(0.2, 1.2))
                    self.daemon.kill()
                    self.kills.append(time.perf_counter())
                    self.api_paused.clear()
                    await self.daemon.wait()
                    self.collect_log_acks()
                # The end: no more presses; the healed receiver gets everything.
                self.running = False
                self.api_paused.set()
                await asyncio.gather(*load)
                await self.drain(db)
                assert await self.daemon.stop() == 0
                self.collect_log_acks()
            finally:
                self.running = False
                self.api_paused.set()
                for task in load:
                    task.cancel()
                await asyncio.gather(*load, return_exceptions=True)
                self.daemon.close()
                await self.sim.stop()
                await self.receiver.stop()
        self.check(db)
        return self.report

    def collect_log_acks(self) -> None:
        assert self.daemon is not None
        for line in self.daemon.log_events():
            if line.get("event") == "accepted":
                self.log_acks[line["event_id"]] = Ack(
                    line["event_id"], line["button"], line["decision"], line["rows"], line["state"]
                )

    async def drain(self, db: Path) -> None:
        """Wait until nothing is pending; fail only if the backlog stops shrinking for 30 s
        (what is checked is that everything arrives, not how fast a large backlog drains)."""
        loop = asyncio.get_running_loop()
        best, progressed = None, loop.time()
        while True:
            _, _, counts = read_store_ro(db)
            pending = counts.get("pending", 0)
            if pending == 0:
                return
            if best is None or pending < best:
                best, progressed = pending, loop.time()
            assert loop.time() - progressed < 30, f"{pending} rows stopped draining"
            await asyncio.sleep(0.1)

    # -- checks -----------------------------------------------------------------------------

    def check_store_consistency(self, db: Path, cycle: int) -> None:
        """After a kill: each alert row was written with its last event (one transaction)."""
        events, alerts, _ = read_store(db)
        last: dict[str, sqlite3.Row] = {}
        for e in events:
            last[e["alert_key"]] = e
        for key, event in last.items():
            alert = alerts.get(key)
            if alert is None or alert["last_event"] != event["id"]:
                self.report.state_mismatches.append(
                    f"cycle {cycle}: {key} alert row not at event {event['id']}"
                )
            elif bool(alert["is_open"]) != OPEN_AFTER[event["decision"]]:
                self.report.state_mismatches.append(
                    f"cycle {cycle}: {key} is_open={alert['is_open']} after {event['decision']}"
                )

    async def check_reported_state(
        self, db: Path, session: aiohttp.ClientSession, cycle: int
    ) -> None:
        """Right after a restart the daemon reports the stored state (API buttons: no load yet)."""
        assert self.daemon is not None
        _, alerts, _ = read_store_ro(db)
        async with session.get(
            f"{self.daemon.url}/api/v1/status", headers={"Authorization": f"Bearer {TOKEN}"}
        ) as resp:
            status = await resp.json()
        for button in status["buttons"]:
            if button["id"] not in INGEST:
                continue
            stored = alerts.get(button["alert_key"])
            expected = "open" if stored is not None and stored["is_open"] else "closed"
            if button["state"] != expected:
                self.report.state_mismatches.append(
                    f"cycle {cycle}: daemon says {button['id']} {button['state']}, store {expected}"
                )

    def epoch(self, arrival: Received) -> int:
        # A request whose bytes were in before the kill may be handled just after it.
        return sum(1 for k in self.kills if arrival.at > k + 0.1)

    def check(self, db: Path) -> None:
        report = self.report
        events, _, counts = read_store(db)
        report.dead = counts.get("dead", 0)
        by_id = {e["id"]: e for e in events}
        # Deliveries → events: an alert key's presses have distinct timestamps.
        by_key_time: dict[tuple[str, str], int] = {}
        for e in events:
            assert (e["alert_key"], e["pressed_at"]) not in by_key_time, "ambiguous timestamps"
            by_key_time[(e["alert_key"], e["pressed_at"])] = e["id"]
        arrivals: dict[tuple[str, int], list[Received]] = defaultdict(list)
        lanes: dict[tuple[str, str], list[int]] = defaultdict(list)
        for a in self.receiver.delivered():
            sink = a.path.strip("/")
            event_id = by_key_time[(a.body["key"], a.body["at"])]
            arrivals[(sink, event_id)].append(a)
            lanes[(sink, a.body["key"])].append(event_id)
        # Every acknowledged press is in the store as acknowledged, and reached its sinks.
        acks = {**self.log_acks, **self.api_acks}
        report.acked = len(acks)
        for event_id, ack in sorted(acks.items()):
            stored = by_id.get(event_id)
            if (
                stored is None
                or stored["button_id"] != ack.button
                or stored["decision"] != ack.decision
            ):
                report.lost.append(f"event {event_id} ({ack}) not in the store as acknowledged")
                continue
            if ack.tag and ack.tag not in stored["info"]:
                report.lost.append(
                    f"event {event_id}: stored info {stored['info']!r}, sent {ack.tag}"
                )
            if ack.rows:
                for sink in SINKS:
                    report.expected_deliveries += 1
                    if not arrivals.get((sink, event_id)):
                        report.lost.append(
                            f"event {event_id} ({ack.decision}) never reached {sink}"
                        )
        # Twice only across a kill.
        for (sink, event_id), got in arrivals.items():
            if len(got) > 1:
                report.duplicated += 1
                epochs = [self.epoch(a) for a in got]
                if len(set(epochs)) != len(epochs):
                    report.unexplained_duplicates.append(f"{sink} event {event_id} epochs {epochs}")
        # FIFO per (sink, alert key): never an older event after a newer one.
        for (sink, key), ids in lanes.items():
            newest = 0
            for event_id in ids:
                if event_id < newest:
                    report.out_of_order.append(f"{sink}/{key}: event {event_id} after {newest}")
                newest = max(newest, event_id)
        # The stored decisions replay: state survived every restart.
        is_open: dict[str, bool] = {}
        for e in events:
            was = is_open.get(e["alert_key"], False)
            if e["state"] == "On":
                expected = "resent" if was else "open"
            else:
                expected = "close" if was else "ignored"
            if e["decision"] != expected:
                report.replay_errors.append(
                    f"event {e['id']} {e['alert_key']}: {e['decision']}, expected {expected}"
                )
            is_open[e["alert_key"]] = OPEN_AFTER[e["decision"]]


def read_store_ro(db: Path) -> tuple[list[sqlite3.Row], dict[str, sqlite3.Row], Counter[str]]:
    with contextlib.suppress(sqlite3.OperationalError):
        return read_store(db)
    return [], {}, Counter()


async def campaign(tmp_path: Path, cycles: int) -> Report:
    seed = int(os.environ.get("FLICBRIDGE_CAMPAIGN_SEED", random.randrange(1 << 30)))
    print(f"campaign seed {seed} (FLICBRIDGE_CAMPAIGN_SEED={seed} repeats it)")
    report = await Campaign(tmp_path, cycles, seed).run()
    print(report.line())
    return report


def assert_clean(report: Report) -> None:
    assert report.acked > report.cycles, report.line()
    assert not report.lost, report.lost[:10]
    assert not report.unexplained_duplicates, report.unexplained_duplicates[:10]
    assert not report.out_of_order, report.out_of_order[:10]
    assert not report.state_mismatches, report.state_mismatches[:10]
    assert not report.replay_errors, report.replay_errors[:10]
    assert report.dead == 0, report.line()


@pytest.mark.timeout(240)
async def test_kill_9_campaign(tmp_path: Path) -> None:
    """20 kill -9 cycles under load and a flaky receiver: nothing acknowledged is lost,
    duplicates only across a kill, per-(sink, key) order kept, state as stored."""
    assert_clean(await campaign(tmp_path, 20))


@pytest.mark.slow
@pytest.mark.timeout(3600)
async def test_kill_9_campaign_long(tmp_path: Path) -> None:
    """The same campaign over 200 kill -9 cycles."""
    assert_clean(await campaign(tmp_path, 200))


# -- disk-full phase -------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_kill_9_while_the_disk_is_full_loses_no_press(tmp_path: Path) -> None:
    """The store on a small real filesystem that fills up; flicd presses arrive and are held;
    the daemon is killed with SIGKILL; space is freed and the daemon restarted: every held
    press is committed (from the spill file, in order) and delivered."""
    import json
    import signal
    import subprocess
    import sys

    from tests.conftest import free_port

    mnt = tmp_path / "disk"
    mnt.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)]
    mounted = await asyncio.to_thread(subprocess.run, mount, capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    received = Receiver()
    await received.start()
    sim = Simulator(host="127.0.0.1", port=0, buttons={FLICD["f1"]: "F1"})
    await sim.start()
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'[store]\npath = "{mnt / "fb.db"}"\nspill = "{tmp_path / "held.jsonl"}"\n'
        f'[server]\nhost = "127.0.0.1"\nport = {free_port()}\ntoken = "{TOKEN}"\n'
        f"[flicd]\nport = {sim.port}\nreconnect_max = 0.5\nping_interval = 1\n"
        "[delivery]\ntimeout = 2\nbackoff_initial = 0.05\nbackoff_max = 0.2\n"
        f'[[buttons]]\nid = "f1"\naddress = "{FLICD["f1"]}"\n'
        'on = ["single_click", "hold"]\noff = ["double_click"]\n'
        f'[[sinks]]\nid = "s1"\ntype = "webhook"\nurl = "{received.url}/hook"\n'
    )
    lines: list[dict[str, Any]] = []

    async def start() -> tuple[asyncio.subprocess.Process, asyncio.Task[None]]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "flicbridge", "run", "--config", str(cfg),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip

        async def read() -> None:
            assert proc.stderr is not None
            async for raw in proc.stderr:
                with contextlib.suppress(ValueError):
                    lines.append(json.loads(raw))

        return proc, asyncio.create_task(read())

    async def seen(event: str, count: int) -> None:
        async with asyncio.timeout(30):
            while sum(1 for e in lines if e.get("event") == event) < count:
                await asyncio.sleep(0.05)

    ballast = mnt / "ballast"
    try:
        proc, reader = await start()
        await seen("button_link", 1)
        # Fill the filesystem: the store cannot grow its WAL any more.
        with contextlib.suppress(OSError), ballast.open("wb") as f:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        clicks = ["single", "double", "single", "hold", "double"]
        for click in clicks:
            sim.press(FLICD["f1"], click)
            await asyncio.sleep(0.05)
        await seen("press_spilled", len(clicks))
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        await reader
        assert not [e for e in lines if e.get("event") == "press_lost"]
        ballast.unlink()  # space is back
        proc, reader = await start()
        await seen("held_presses_replayed", 1)
        async with asyncio.timeout(30):
            while len(received.requests) < 4 or (tmp_path / "held.jsonl").exists():
                await asyncio.sleep(0.05)
        proc.terminate()
        await proc.wait()
        await reader
        assert proc.returncode == 0
        conn = sqlite3.connect(mnt / "fb.db")
        events = conn.execute("SELECT click, decision FROM events ORDER BY id").fetchall()
        conn.close()
        assert events == [
            ("single_click", "open"),
            ("double_click", "close"),
            ("single_click", "open"),
            ("hold", "appended"),
            ("double_click", "close"),
        ]
        states = [r.body["state"] for r in received.requests]
        assert states == ["On", "Off", "On", "Off"]
    finally:
        await sim.stop()
        await received.stop()
        await asyncio.to_thread(subprocess.run, ["umount", "-l", str(mnt)], check=False)
