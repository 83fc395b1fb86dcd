"""The four benchmarks. Each returns a dict of numbers with a baseline from the same run.

The daemon always runs as a real subprocess (``python -m flicbridge run --config X``);
this process hosts the flicd simulator (presses arrive over the real fliclib protocol)
and the loopback receiver standing in for the platforms, so a press and its arrival
are timed on one clock.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.stats import summary_ms
from flicbridge.sources.simulator import Simulator
from tests.daemon import Daemon
from tests.receiver import Receiver

TOKEN = "bench-token"
FAST_PACING = {"rate": 100_000.0, "burst": 10_000}  # pacing is not what is measured


def address(i: int) -> str:
    return f"80:e4:da:70:{i // 256:02x}:{i % 256:02x}"


def base_config(workdir: Path, sim_port: int, **sections: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "flicd": {"host": "127.0.0.1", "port": sim_port, "reconnect_max": 1},
        "store": {"path": str(workdir / "flicbridge.db")},
        "server": {"host": "127.0.0.1", "port": 0, "token": TOKEN},
        "delivery": {"timeout": 5, "backoff_initial": 0.1, "backoff_max": 1},
        "alerts": {"suppress_repeat_for": 0},
    }
    config.update(sections)
    return config


def flicd_buttons(n: int, **extra: Any) -> list[dict[str, Any]]:
    return [
        {"id": f"b{i:03d}", "address": address(i), "name": f"Button {i}", **extra} for i in range(n)
    ]


async def start_sim(n: int) -> Simulator:
    sim = Simulator(buttons={address(i): f"Button {i}" for i in range(n)})
    await sim.start()
    return sim


async def until(predicate: Callable[[], bool], timeout: float, every: float = 0.005) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(every)


async def channels_ready(sim: Simulator, n: int, timeout: float = 20) -> None:
    await until(lambda: all(sim.channel_count(address(i)) for i in range(n)), timeout)


async def api(daemon: Daemon, path: str) -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.get(daemon.url + path, headers={"Authorization": f"Bearer {TOKEN}"}) as resp,
    ):
        return await resp.json()


# -- press-to-sink latency ------------------------------------------------------------------


async def press_latencies(
    sim: Simulator, receiver: Receiver, buttons: int, n: int, spacing: float, warmup: int
) -> list[float]:
    """Press one button at a time (round robin, single = On then double = Off, so every press
    is sent) and time each press to its arrival at the receiver."""
    latencies: list[float] = []
    for i in range(warmup + n):
        b = i % buttons
        click = "single" if (i // buttons) % 2 == 0 else "double"
        seen = len(receiver.arrivals)
        start = time.perf_counter()
        sim.press(address(b), click)

        def arrived(seen: int = seen) -> bool:
            return len(receiver.arrivals) > seen

        async with asyncio.timeout(30):
            await receiver.wait_until(arrived)
        if i >= warmup:
            latencies.append(receiver.arrivals[seen].at - start)
        await asyncio.sleep(spacing)
    return latencies


async def baseline_latencies(
    receiver: Receiver, workdir: Path, n: int, spacing: float, warmup: int
) -> list[float]:
    """The floor: one SQLite commit (WAL, synchronous=FULL) then one loopback aiohttp POST."""
    conn = sqlite3.connect(workdir / "baseline.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, payload TEXT)")
    payload = json.dumps({"alert_key": "b000", "state": "On", "info": "x" * 40})
    latencies: list[float] = []
    async with aiohttp.ClientSession() as session:
        for i in range(warmup + n):
            seen = len(receiver.arrivals)
            start = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t (payload) VALUES (?)", (payload,))
            conn.execute("COMMIT")
            async with session.post(receiver.url + "/baseline", data=payload) as resp:
                await resp.read()
            if i >= warmup:
                latencies.append(receiver.arrivals[seen].at - start)
            await asyncio.sleep(spacing)
    conn.close()
    return latencies


async def latency(quick: bool) -> dict[str, Any]:
    n = 300 if quick else 1000
    buttons, spacing, warmup = 10, 0.02, 20
    with tempfile.TemporaryDirectory(prefix="fb-bench-") as tmp:
        workdir = Path(tmp)
        receiver = Receiver()
        await receiver.start()
        sim = await start_sim(buttons)
        config = base_config(
            workdir,
            sim.port,
            buttons=flicd_buttons(buttons),
            sinks=[{"id": "hook", "type": "webhook", "url": receiver.url + "/hook", **FAST_PACING}],
        )
        daemon = Daemon(config, workdir)
        try:
            await daemon.start()
            await channels_ready(sim, buttons)
            measured = await press_latencies(sim, receiver, buttons, n, spacing, warmup)
            rss = daemon.rss_kb()
            await daemon.stop()
            receiver.clear()
            base = await baseline_latencies(receiver, workdir, n, spacing, warmup)
        finally:
            daemon.close()
            await sim.stop()
            await receiver.stop()
    got, floor = summary_ms(measured), summary_ms(base)
    return {
        "presses": n,
        "buttons": buttons,
        "spacing_ms": spacing * 1000,
        "daemon": "subprocess",
        "sink_pacing": FAST_PACING,
        "daemon_ms": got,
        "baseline_ms": floor,
        "ratio_p50": round(got["p50_ms"] / floor["p50_ms"], 2),
        "ratio_p99": round(got["p99_ms"] / floor["p99_ms"], 2),
        "daemon_rss_mb": round(rss / 1024, 1),
        "target": "p99 <= 2x baseline p99 and < 10 ms",
        "met": got["p99_ms"] <= 2 * floor["p99_ms"] and got["p99_ms"] < 10,
    }


# -- burst and drain ---------------------------------------------------------------------------


def count_rows(db: Path, sql: str) -> int:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return int(conn.execute(sql).fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


async def baseline_commits(workdir: Path, n: int) -> dict[str, float]:
    """Commits per second of a bare loop: one row per transaction, and 512 per transaction."""
    conn = sqlite3.connect(workdir / "commits.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, payload TEXT)")
    payload = "x" * 400
    start = time.perf_counter()
    single = min(n, 2000)
    for _ in range(single):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t (payload) VALUES (?)", (payload,))
        conn.execute("COMMIT")
    one_per_tx = single / (time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(0, n, 512):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO t (payload) VALUES (?)", [(payload,)] * min(512, n - i))
        conn.execute("COMMIT")
    batched = n / (time.perf_counter() - start)
    conn.close()
    return {
        "rows_per_s_one_per_commit": round(one_per_tx),
        "rows_per_s_512_per_commit": round(batched),
    }


async def baseline_posts(receiver: Receiver, n: int, concurrency: int) -> float:
    """Loopback POSTs per second from a bare aiohttp client, ``concurrency`` at a time."""
    payload = json.dumps({"alert_key": "b000", "state": "On"})
    queue = iter(range(n))

    async def worker(session: aiohttp.ClientSession) -> None:
        for _ in queue:
            async with session.post(receiver.url + "/baseline", data=payload) as resp:
                await resp.read()

    connector = aiohttp.TCPConnector(limit=64, limit_per_host=16)  # as the dispatcher's
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return n / (time.perf_counter() - start)


async def burst(quick: bool) -> dict[str, Any]:
    buttons = 100
    per_button = 20 if quick else 100
    total = buttons * per_button
    with tempfile.TemporaryDirectory(prefix="fb-bench-") as tmp:
        workdir = Path(tmp)
        down = True

        def respond(request: Any, body: Any) -> tuple[int, Any, dict[str, str]]:
            return (503, {"error": "down"}, {}) if down else (200, {"ok": True}, {})

        receiver = Receiver(respond)
        await receiver.start()
        sim = await start_sim(buttons)
        config = base_config(
            workdir,
            sim.port,
            # single_click flips the state, so every press is an open or a close: all sent.
            buttons=flicd_buttons(
                buttons, on=["hold"], off=["double_click"], toggle=["single_click"]
            ),
            sinks=[{"id": "hook", "type": "webhook", "url": receiver.url + "/hook", **FAST_PACING}],
        )
        db = workdir / "flicbridge.db"
        daemon = Daemon(config, workdir)
        try:
            await daemon.start()
            await channels_ready(sim, buttons)
            await asyncio.sleep(1)
            rss_idle = daemon.rss_kb()
            samples: list[tuple[int, int]] = [(0, rss_idle)]
            start = time.perf_counter()
            for _ in range(per_button):
                for b in range(buttons):
                    sim.press(address(b), "single")
                await asyncio.sleep(0)
            pressed = time.perf_counter()
            accepted = 0
            async with asyncio.timeout(300):
                while accepted < total:
                    await asyncio.sleep(0.01)
                    accepted = count_rows(db, "SELECT COUNT(*) FROM events")
                    samples.append((accepted, daemon.rss_kb()))
            accept_s = time.perf_counter() - start
            pending = count_rows(db, "SELECT COUNT(*) FROM outbox WHERE status = 'pending'")
            refused = len(receiver.arrivals)
            # The sink comes back: time the drain.
            down = False
            up = time.perf_counter()
            async with asyncio.timeout(600):
                await receiver.wait_until(lambda: len(receiver.delivered()) >= total)
            first = min(a.at for a in receiver.delivered())
            drained = time.perf_counter()
            await until(
                lambda: count_rows(db, "SELECT COUNT(*) FROM outbox WHERE status = 'pending'") == 0,
                60,
                0.05,
            )
            peak = daemon.hwm_kb()
            rss_end = daemon.rss_kb()
            await daemon.stop()
            keys = {a.body["alert_key"] for a in receiver.delivered()}
            commits = await baseline_commits(workdir, total)
            receiver.clear()
            posts = await baseline_posts(receiver, min(total, 5000), 100)
        finally:
            daemon.close()
            await sim.stop()
            await receiver.stop()
    quarter = [next(rss for n, rss in samples if n >= q * total // 4) for q in range(5)]
    accept_rate = total / accept_s
    drain_rate = total / (drained - up)
    return {
        "presses": total,
        "buttons": buttons,
        "sink_pacing": FAST_PACING,
        "backoff": "initial 0.1 s, max 1 s",
        "pending_rows_when_accepted": pending,
        "attempts_refused_while_down": refused,
        "simulator_pushed_s": round(pressed - start, 3),
        "accept_s": round(accept_s, 3),
        "accept_presses_per_s": round(accept_rate),
        "baseline_commits": commits,
        "accept_ratio_to_one_commit_per_row": round(
            accept_rate / commits["rows_per_s_one_per_commit"], 2
        ),
        "drain_s_from_sink_up": round(drained - up, 3),
        "first_delivery_after_up_s": round(first - up, 3),
        "drain_deliveries_per_s": round(drain_rate),
        "baseline_posts_per_s": round(posts),
        "drain_ratio_to_bare_posts": round(drain_rate / posts, 2),
        "alert_keys_delivered": len(keys),
        "rss_mb_at_backlog_0_25_50_75_100pct": [round(r / 1024, 1) for r in quarter],
        "rss_mb_after_drain": round(rss_end / 1024, 1),
        "peak_rss_mb": round(peak / 1024, 1),
        "rss_growth_mb": round((peak - rss_idle) / 1024, 1),
        "target": "accept >= 2000 presses/s; RSS flat as backlog grows",
        "met_accept": accept_rate >= 2000,
    }


# -- idle footprint ----------------------------------------------------------------------------

BASELINE_SCRIPT = """
import asyncio, os, socket, sys
import aiohttp, pydantic, pydantic_settings, structlog, prometheus_client, pyflic
from aiohttp import web

async def main():
    runner = web.AppRunner(web.Application())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.sendto(b"READY=1\\nSTATUS=listening on http://x", os.environ["NOTIFY_SOCKET"])
    await asyncio.Event().wait()

asyncio.run(main())
"""


class BareDaemon(Daemon):
    """The baseline process: the same interpreter and libraries, an idle aiohttp server, READY=1."""

    def command(self) -> list[str]:
        script = self.workdir / "bare.py"
        script.write_text(BASELINE_SCRIPT)
        return [sys.executable, str(script)]


async def idle_profile(
    daemon: Daemon,
    starts: int,
    cpu_window: float,
    settled: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, float]:
    ready = []
    for _ in range(starts):
        ready.append(await daemon.start())
        await daemon.stop()
    await daemon.start()
    if settled is not None:
        await settled()
    await asyncio.sleep(3)  # connected, channels made, first gauges written
    rss = daemon.rss_kb()
    cpu0, t0 = daemon.cpu_seconds(), time.perf_counter()
    await asyncio.sleep(cpu_window)
    cpu = (daemon.cpu_seconds() - cpu0) / (time.perf_counter() - t0) * 100
    rss_after = daemon.rss_kb()
    await daemon.stop()
    ready.sort()
    return {
        "ready_s_median": round(ready[len(ready) // 2], 3),
        "ready_s_max": round(ready[-1], 3),
        "rss_mb": round(rss / 1024, 1),
        "rss_mb_after_window": round(rss_after / 1024, 1),
        "cpu_pct_of_core": round(cpu, 3),
    }


async def idle(quick: bool) -> dict[str, Any]:
    window = 10.0 if quick else 60.0
    starts = 3 if quick else 5
    buttons = 10
    with tempfile.TemporaryDirectory(prefix="fb-bench-") as tmp:
        workdir = Path(tmp)
        receiver = Receiver()
        await receiver.start()
        sim = await start_sim(buttons)
        url = receiver.url
        sinks = [
            {"id": "alertops", "type": "alertops", "url": f"{url}/POSTAlert/KEY/Flic"},
            {
                "id": "pagerduty",
                "type": "pagerduty",
                "url": f"{url}/v2/enqueue",
                "routing_key": "R" * 32,
            },
            {
                "id": "ilert",
                "type": "ilert",
                "url": f"{url}/api/events",
                "integration_key": "il1" + "k" * 20,
            },
            {
                "id": "flashduty",
                "type": "flashduty",
                "url": f"{url}/event/push",
                "integration_key": "F" * 32,
            },
        ]
        config = base_config(workdir, sim.port, buttons=flicd_buttons(buttons), sinks=sinks)
        daemon = Daemon(config, workdir / "daemon")
        bare = BareDaemon({}, workdir / "bare")
        try:
            measured = await idle_profile(
                daemon, starts, window, lambda: channels_ready(sim, buttons)
            )
            base = await idle_profile(bare, starts, window)
        finally:
            daemon.close()
            bare.close()
            await sim.stop()
            await receiver.stop()
    return {
        "buttons": buttons,
        "sinks": len(sinks),
        "cpu_window_s": window,
        "daemon": measured,
        "baseline_bare_aiohttp_process": base,
        "ratio_rss": round(measured["rss_mb"] / base["rss_mb"], 2),
        "ratio_ready": round(measured["ready_s_median"] / base["ready_s_median"], 2),
        "target": "RSS <= 60 MB, CPU <= 0.5 % of a core, READY <= 1 s",
        "met_rss": measured["rss_mb"] <= 60,
        "met_cpu": measured["cpu_pct_of_core"] <= 0.5,
        "met_ready": measured["ready_s_max"] <= 1.0,
    }


# -- cost growth -------------------------------------------------------------------------------


def prefill(db: Path, rows: int, keys: int) -> None:
    """Write ``rows`` pending outbox rows (and their events) for sink "down" into a new store."""
    from flicbridge.domain import Message, SignalState
    from flicbridge.store import SCHEMA, connect

    conn = connect(db)
    conn.executescript(SCHEMA)
    now = time.time()
    from datetime import UTC, datetime

    stamp = datetime.now(UTC)
    conn.execute("BEGIN")
    for i in range(rows):
        key = f"idle{i % keys:03d}"
        conn.execute(
            "INSERT INTO events (id, button_id, alert_key, origin, state, click, decision,"
            " received_at, pressed_at) VALUES (?, ?, ?, 'api', 'On', '', 'open', ?, ?)",
            (i + 1, key, key, stamp.isoformat(), stamp.isoformat()),
        )
        message = Message(
            key,
            key,
            key,
            key,
            "backlog",
            SignalState.ON,
            "open",
            "",
            stamp,
            0.0,
            "",
            "critical",
            i + 1,
            "api",
        )
        conn.execute(
            "INSERT INTO outbox (event_id, sink_id, alert_key, payload, created_at,"
            " next_attempt_at)"
            " VALUES (?, 'down', ?, ?, ?, ?)",
            (i + 1, key, json.dumps(message.to_json()), now, now),
        )
    conn.execute("COMMIT")
    conn.close()


async def growth_point(buttons: int, pending: int, presses: int, spacing: float) -> dict[str, Any]:
    backlog_keys = 100
    with tempfile.TemporaryDirectory(prefix="fb-bench-") as tmp:
        workdir = Path(tmp)

        def respond(request: Any, body: Any) -> tuple[int, Any, dict[str, str]]:
            return (
                (503, {"error": "down"}, {}) if request.path == "/down" else (200, {"ok": True}, {})
            )

        receiver = Receiver(respond)
        await receiver.start()
        sim = await start_sim(buttons)
        idle_buttons = [
            {"id": f"idle{i:03d}", "source": "ingest", "sinks": ["down"]}
            for i in range(backlog_keys)
        ]
        config = base_config(
            workdir,
            sim.port,
            delivery={"timeout": 5, "backoff_initial": 1, "backoff_max": 30},
            buttons=flicd_buttons(buttons, sinks=["up"]) + idle_buttons,
            sinks=[
                {"id": "up", "type": "webhook", "url": receiver.url + "/up", **FAST_PACING},
                {"id": "down", "type": "webhook", "url": receiver.url + "/down", **FAST_PACING},
            ],
        )
        if pending:
            prefill(workdir / "flicbridge.db", pending, backlog_keys)
        daemon = Daemon(config, workdir)
        try:
            ready_s = await daemon.start(timeout=120)
            t0 = time.perf_counter()
            await channels_ready(sim, buttons)
            # A panic press right after start, while the backlog may still be loading.
            first = await press_latencies_on(sim, receiver, buttons, 1, 0, warmup=0)
            async with asyncio.timeout(300):
                while True:
                    status = await api(daemon, "/api/v1/status")
                    depth = {s["id"]: s["pending"] for s in status["sinks"]}
                    if depth["down"] >= pending:
                        break
                    await asyncio.sleep(0.05)
            loaded_s = time.perf_counter() - t0
            await asyncio.sleep(1)
            lat = await press_latencies_on(sim, receiver, buttons, presses, spacing)
            rss = daemon.rss_kb()
            await daemon.stop()
        finally:
            daemon.close()
            await sim.stop()
            await receiver.stop()
    return {
        "buttons": buttons,
        "pending_rows": pending,
        "ready_s": round(ready_s, 3),
        "backlog_loaded_after_ready_s": round(loaded_s, 3),
        "first_press_after_start_ms": round(first[0] * 1000, 1),
        "latency_ms": summary_ms(lat),
        "rss_mb": round(rss / 1024, 1),
    }


async def press_latencies_on(
    sim: Simulator, receiver: Receiver, buttons: int, n: int, spacing: float, warmup: int = 10
) -> list[float]:
    """Like ``press_latencies`` but counting only arrivals at /up (the backlog sink is noisy)."""
    latencies: list[float] = []
    for i in range(warmup + n):
        b = i % buttons
        click = "single" if (i // buttons) % 2 == 0 else "double"
        seen = sum(1 for a in receiver.arrivals if a.path == "/up")
        start = time.perf_counter()
        sim.press(address(b), click)
        arrived: list[float] = []

        def got(seen: int = seen, arrived: list[float] = arrived) -> bool:
            ups = [a for a in receiver.arrivals if a.path == "/up"]
            if len(ups) > seen:
                arrived.append(ups[seen].at)
                return True
            return False

        async with asyncio.timeout(30):
            await receiver.wait_until(got)
        if i >= warmup:
            latencies.append(arrived[0] - start)
        await asyncio.sleep(spacing)
    return latencies


async def growth(quick: bool) -> dict[str, Any]:
    presses = 100 if quick else 300
    spacing = 0.02
    points = []
    for buttons in (1, 10, 100):
        points.append(await growth_point(buttons, 0, presses, spacing))
    for pending in (1_000, 100_000):
        points.append(await growth_point(10, pending, presses, spacing))
    by_buttons = {p["buttons"]: p for p in points if p["pending_rows"] == 0}
    by_pending = {0: by_buttons[10], **{p["pending_rows"]: p for p in points if p["pending_rows"]}}
    return {
        "presses_per_point": presses,
        "points": points,
        "p99_ratio_100_to_1_buttons": round(
            by_buttons[100]["latency_ms"]["p99_ms"] / by_buttons[1]["latency_ms"]["p99_ms"], 2
        ),
        "rss_ratio_100_to_1_buttons": round(by_buttons[100]["rss_mb"] / by_buttons[1]["rss_mb"], 2),
        "p99_ratio_100k_to_0_pending": round(
            by_pending[100_000]["latency_ms"]["p99_ms"] / by_pending[0]["latency_ms"]["p99_ms"], 2
        ),
        "rss_mb_by_pending": {str(k): v["rss_mb"] for k, v in sorted(by_pending.items())},
        "target": "flat or logarithmic in buttons and pending rows, never linear",
    }
