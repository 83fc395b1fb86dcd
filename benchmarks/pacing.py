"""Two benchmarks of what a live press gets: ``fairness`` and ``pi_disk``.

fairness: each sink type at its default pace. A panic press's latency (flicd simulator
press → arrival at the receiver) with no backlog, then with a 200-row backlog of 20 other
buttons draining; the ratio of the two; and the busiest 60 s window of requests against
the limit rate × 60 + burst.

pi_disk: every fsync 20 ms slower (``../shared/tools/slowfsync.c``, an LD_PRELOAD shim,
built here with cc), pacing lifted. A 1,001-press burst over 20 buttons with a panic press
on a 21st in its middle: the time until the last delivery, the panic press's latency,
``/healthz`` answer times sampled throughout; the same burst on the plain disk as the
baseline; then RSS after a 2,000-row backlog drains.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.scenarios import (
    FAST_PACING,
    address,
    base_config,
    channels_ready,
    count_rows,
    start_sim,
    until,
)
from benchmarks.stats import percentile, summary_ms
from flicbridge.sinks import SINK_CLASSES
from flicbridge.sources.simulator import Simulator
from tests.daemon import Daemon
from tests.receiver import Receiver

SHIM_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "tools" / "slowfsync.c"
DEFAULT_BURST = 5


def sink_for(kind: str, url: str) -> dict[str, Any]:
    """A sink of ``kind`` at its default pace, pointed at the receiver."""
    sink: dict[str, Any] = {"id": kind, "type": kind}
    if kind == "pagerduty":
        return {**sink, "url": f"{url}/v2/enqueue", "routing_key": "R" * 32}
    if kind == "ilert":
        return {**sink, "url": f"{url}/api/events", "integration_key": "il-bench"}
    if kind == "alertops":
        return {**sink, "url": f"{url}/POSTAlert/bench/Flic"}
    return {**sink, "url": f"{url}/hook"}


def buttons(n: int) -> list[dict[str, Any]]:
    """Button i at address(i): single click opens, double click closes."""
    return [{"id": f"b{i:03d}", "address": address(i)} for i in range(n)]


def busiest(times: list[float], window: float) -> int:
    times = sorted(times)
    return max((bisect.bisect_left(times, t + window) - i for i, t in enumerate(times)), default=0)


class Switch:
    """A platform that answers 503 while ``down``, 202 otherwise."""

    def __init__(self) -> None:
        self.down = False

    def __call__(self, request: Any, body: Any) -> tuple[int, Any, dict[str, str]]:
        return (503, {"down": True}, {}) if self.down else (202, {"status": "success"}, {})


@dataclass
class Rig:
    """A daemon subprocess with its flicd simulator and its platform (a receiver)."""

    workdir: Path
    switch: Switch
    receiver: Receiver
    sim: Simulator
    daemon: Daemon

    @property
    def db(self) -> Path:
        return self.workdir / "flicbridge.db"

    def count(self, sql: str) -> int:
        return count_rows(self.db, sql)


@contextlib.asynccontextmanager
async def rig(
    n_buttons: int,
    sinks: Callable[[str], list[dict[str, Any]]],
    env: dict[str, str] | None = None,
    **sections: Any,
) -> AsyncIterator[Rig]:
    """Everything started (READY, every channel made) and, at the end, stopped."""
    with tempfile.TemporaryDirectory(prefix="fb-bench-") as tmp:
        workdir = Path(tmp)
        switch = Switch()
        receiver = Receiver(switch)
        await receiver.start()
        sim = await start_sim(n_buttons)
        config = base_config(
            workdir, sim.port, buttons=buttons(n_buttons), sinks=sinks(receiver.url), **sections
        )
        daemon = Daemon(config, workdir, env=env)
        try:
            await daemon.start()
            await channels_ready(sim, n_buttons)
            yield Rig(workdir, switch, receiver, sim, daemon)
        finally:
            daemon.close()
            await sim.stop()
            await receiver.stop()


def fast_hook(url: str) -> list[dict[str, Any]]:
    return [{"id": "hook", "type": "webhook", "url": url + "/hook", **FAST_PACING}]


async def panic_latencies(sim: Any, receiver: Receiver, first: int, n: int) -> list[float]:
    """Press buttons ``first`` … ``first + n - 1`` once each, 1.5 s apart; each latency is
    press → its own arrival (found by the button's address in the body's key)."""
    latencies = []
    for i in range(first, first + n):
        key = f"b{i:03d}"
        start = time.perf_counter()
        sim.press(address(i), "single")

        def landed(key: str = key) -> bool:
            return any(key in str(a.body) for a in receiver.delivered())

        async with asyncio.timeout(60):
            await receiver.wait_until(landed)
        arrival = next(a for a in receiver.delivered() if key in str(a.body))
        latencies.append(arrival.at - start)
        await asyncio.sleep(max(0.0, 1.5 - (time.perf_counter() - start)))
    return latencies


async def fairness_one(kind: str, quick: bool) -> dict[str, Any]:
    busy, panics, presses = 20, 6 if not quick else 3, 10
    observe = 25.0 if quick else 65.0
    rate = SINK_CLASSES[kind].default_rate
    delivery = {"timeout": 5, "backoff_initial": 0.5, "backoff_max": 2}
    async with rig(
        busy + 2 * panics, lambda url: [sink_for(kind, url)], delivery=delivery
    ) as bench:
        sim, receiver = bench.sim, bench.receiver
        # Baseline: no backlog (buttons busy .. busy + panics - 1).
        alone = await panic_latencies(sim, receiver, busy, panics)
        await asyncio.sleep(1.5)
        # The backlog: 20 buttons x 10 presses while the platform answers 503.
        bench.switch.down = True
        for p in range(presses):
            for b in range(busy):
                sim.press(address(b), "single" if p % 2 == 0 else "double")
            await asyncio.sleep(0.05)
        events = busy * presses + panics
        await until(lambda: bench.count("SELECT COUNT(*) FROM events") >= events, 30)
        await asyncio.sleep(1.0)
        bench.switch.down = False
        up = time.perf_counter()
        behind = await panic_latencies(sim, receiver, busy + panics, panics)
        pending = bench.count("SELECT COUNT(*) FROM outbox WHERE status = 'pending'")
        await asyncio.sleep(max(0.0, observe - (time.perf_counter() - up)))
        await bench.daemon.stop()
    window = 60.0 if not quick else 20.0
    times = [a.at for a in receiver.arrivals if a.at >= up]
    top = busiest(times, window)
    limit = rate * window + DEFAULT_BURST
    worst_alone, worst_behind = max(alone), max(behind)
    return {
        "type": kind,
        "rate_per_s": rate,
        "panic_ms_no_backlog": summary_ms(alone),
        "panic_ms_behind_backlog": summary_ms(behind),
        "panic_max_ratio_backlog_to_none": round(worst_behind / worst_alone, 2),
        "pending_rows_after_panics": pending,
        "window_s": window,
        "busiest_window_requests": top,
        "window_limit": limit,
        "target": "panic press at the next token (<= 1/rate + 0.1 s) behind a backlog; "
        "busiest window <= rate x window + burst",
        "met": worst_behind <= 1 / rate + 0.1 and top <= limit,
    }


async def fairness(quick: bool) -> dict[str, Any]:
    kinds = ["pagerduty", "ilert"] if quick else ["pagerduty", "ilert", "alertops", "webhook"]
    return {"types": [await fairness_one(kind, quick) for kind in kinds]}


# -- Pi-class disk -------------------------------------------------------------------------------


def build_shim(workdir: Path) -> Path | None:
    """Compile the slow-fsync shim (None when there is no C compiler or no source)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not SHIM_SOURCE.exists():
        return None
    out = workdir / "slowfsync.so"
    subprocess.run(
        [cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(SHIM_SOURCE), "-ldl"], check=True
    )
    return out


COMMIT_SCRIPT = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA journal_mode = WAL"); conn.execute("PRAGMA synchronous = FULL")
conn.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, p TEXT)")
times = []
for _ in range(int(sys.argv[2])):
    t = time.perf_counter(); conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO t (p) VALUES ('x')"); conn.execute("COMMIT")
    times.append(time.perf_counter() - t)
times.sort(); print(times[len(times) // 2] * 1000)
"""


def commit_ms(workdir: Path, env: dict[str, str]) -> float:
    """Median ms of one FULL commit, in a fresh interpreter with ``env`` (the shim or not)."""
    script = workdir / "commit.py"
    script.write_text(COMMIT_SCRIPT)
    out = subprocess.run(
        [sys.executable, str(script), str(workdir / "commit.db"), "50"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return round(float(out.stdout.strip()), 2)


SAMPLER_SCRIPT = """
import http.client, json, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
out, end = [], time.perf_counter() + seconds
conn = http.client.HTTPConnection(host, port, timeout=10)
while time.perf_counter() < end:
    t = time.perf_counter()
    conn.request("GET", "/healthz"); conn.getresponse().read()
    out.append(time.perf_counter() - t)
    time.sleep(0.01)
print(json.dumps(out))
"""


async def healthz_sampler(url: str, seconds: float) -> list[float]:
    """/healthz answer times, every 10 ms for ``seconds``, from a process of its own (this
    one's loop is busy with the simulator and the receiver)."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SAMPLER_SCRIPT,
        host,
        port.rstrip("/"),
        str(seconds),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    return [float(v) for v in json.loads(out)]


def logged_latency(daemon: Daemon, button: str, pressed_wall: float) -> float:
    """Press (wall clock here) → the daemon's ``delivered`` log line for ``button``, which
    it writes once the delivery is committed to its store (so after the platform got it,
    by one commit and the time its turn in the writer's queue takes)."""
    for event in daemon.log_events():
        if event.get("event") == "delivered" and event.get("alert_key") == button:
            stamp = datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00"))
            return stamp.timestamp() - pressed_wall
    return math.nan


async def one_burst(env: dict[str, str], quick: bool, *, alternate: bool = True) -> dict[str, Any]:
    """``alternate``: each button's presses alternate single/double (open, close, open …:
    every delivered mark is fsync'd before the key's next row); else all single (a run of
    opens, whose marks share the next fsync)."""
    n_buttons, per_button = 20, 50
    total = n_buttons * per_button + 1
    async with rig(n_buttons + 1, fast_hook, env) as bench:
        sim, receiver, daemon = bench.sim, bench.receiver, bench.daemon
        await asyncio.sleep(1.0)
        sampler = asyncio.create_task(healthz_sampler(daemon.url, 3.0))
        await asyncio.sleep(0.2)
        start = time.perf_counter()
        panic_at = panic_wall = 0.0
        for p in range(per_button):
            for b in range(n_buttons):
                sim.press(address(b), "single" if p % 2 == 0 or not alternate else "double")
            if p == per_button // 2:
                panic_at, panic_wall = time.perf_counter(), time.time()
                sim.press(address(n_buttons), "single")
            await asyncio.sleep(0)
        async with asyncio.timeout(120):
            await receiver.wait_until(lambda: len(receiver.delivered()) >= total)
        done = max(a.at for a in receiver.delivered())
        panic = next(a for a in receiver.delivered() if f"b{n_buttons:03d}" in str(a.body))
        health = await sampler
        rss_after_burst = daemon.rss_kb()
        await daemon.stop()
        panic_logged = logged_latency(daemon, f"b{n_buttons:03d}", panic_wall)
    return {
        "presses": total,
        "delivered_s": round(done - start, 3),
        "panic_ms": round((panic.at - panic_at) * 1000, 1),
        "panic_ms_to_delivered_record": round(panic_logged * 1000, 1),
        "healthz_ms": {
            "p50": round(percentile(health, 50) * 1000, 2),
            "p99": round(percentile(health, 99) * 1000, 2),
            "max": round(max(health) * 1000, 2),
            "samples": len(health),
        },
        "rss_mb_after_burst": round(rss_after_burst / 1024, 1),
    }


async def drain_rss(env: dict[str, str], rows: int) -> dict[str, Any]:
    """RSS idle, then after ``rows`` presses queued while the sink is down drain."""
    n_buttons = 20
    async with rig(n_buttons, fast_hook, env) as bench:
        sim, receiver, daemon = bench.sim, bench.receiver, bench.daemon
        await asyncio.sleep(2.0)
        idle = daemon.rss_kb()
        bench.switch.down = True
        for p in range(rows // n_buttons):
            for b in range(n_buttons):
                sim.press(address(b), "single" if p % 2 == 0 else "double")
            await asyncio.sleep(0)
        await until(lambda: bench.count("SELECT COUNT(*) FROM events") >= rows, 120, 0.05)
        bench.switch.down = False
        async with asyncio.timeout(300):
            await receiver.wait_until(lambda: len(receiver.delivered()) >= rows)
        await asyncio.sleep(1.0)
        drained = daemon.rss_kb()
        peak = daemon.hwm_kb()
        await daemon.stop()
    return {
        "rows": rows,
        "rss_mb_idle": round(idle / 1024, 1),
        "rss_mb_after_drain": round(drained / 1024, 1),
        "peak_rss_mb": round(peak / 1024, 1),
    }


async def pi_disk(quick: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fb-shim-") as tmp:
        shim = build_shim(Path(tmp))
        if shim is None:
            return {"skipped": "no C compiler, or ../shared/tools/slowfsync.c is not there"}
        slow = {"LD_PRELOAD": str(shim), "SLOW_FSYNC_MS": "20"}
        floor_slow = commit_ms(Path(tmp), slow)
        floor_plain = commit_ms(Path(tmp), {})
        on_sd = await one_burst(slow, quick)
        plain = await one_burst({}, quick)
        one_action = await one_burst(slow, quick, alternate=False)
        drain = await drain_rss(slow, 2000)
    return {
        "fsync_delay_ms": 20,
        "one_full_commit_ms": {"slow_disk": floor_slow, "plain_disk": floor_plain},
        "burst_slow_disk": on_sd,
        "burst_plain_disk": plain,
        "burst_ratio_slow_to_plain": round(on_sd["delivered_s"] / plain["delivered_s"], 2),
        "burst_one_action_slow_disk": one_action,
        "drain_2000_slow_disk": drain,
        "target": "slow disk: burst delivered <= 1.5 s, panic <= 60 ms, healthz <= 20 ms; "
        "RSS after a 2,000-row drain <= 60 MB",
        "met": on_sd["delivered_s"] <= 1.5
        and on_sd["panic_ms"] <= 60
        and on_sd["healthz_ms"]["max"] <= 20
        and drain["rss_mb_after_drain"] <= 60,
    }
