"""A live press is committed ahead of other buttons' queued writes, never ahead of its own
key's earlier writes, and never across a clock-step shift.

The writer thread is held by an operation that waits on a threading.Event, so that every
write queued meanwhile is waiting when it is released: what is asserted is the order the
real store commits them in (event ids and the order the futures resolve).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

from flicbridge.config import Config
from flicbridge.domain import Signal, SignalState, utcnow
from tests.conftest import make_config, running


def config(tmp_path: Path) -> Config:
    buttons = [{"id": f"busy{i}", "source": "ingest"} for i in range(10)]
    buttons.append({"id": "panic", "source": "ingest"})
    return make_config(tmp_path, buttons=buttons, alerts={"suppress_repeat_for": 0})


def on(button: str, state: str = "On") -> Signal:
    return Signal(button, SignalState(state), origin="api", received_at=utcnow())


async def test_a_live_press_commits_before_a_queued_burst(tmp_path: Path) -> None:
    async with running(config(tmp_path)) as bridge:
        gate = threading.Event()
        held = bridge.store.submit(lambda conn: gate.wait(10))
        order: list[str] = []
        burst = []
        for i in range(200):
            future = bridge.submit(on(f"busy{i % 10}", "On" if (i // 10) % 2 == 0 else "Off"))
            future.add_done_callback(lambda _f: order.append("busy"))
            burst.append(future)
        panic = bridge.submit(on("panic"))
        panic.add_done_callback(lambda _f: order.append("panic"))
        gate.set()
        await held
        accepted = await asyncio.gather(*burst, panic)
    # The busy buttons' first presses were live too (their keys had nothing queued); the
    # panic press is committed with them, before the other 190 rows of the burst.
    assert order.index("panic") <= 10, order[:20]
    panic_id = accepted[-1].event_id
    later = [a.event_id for a in accepted[:-1] if a.event_id > panic_id]
    assert len(later) >= 190
    # Each busy key's own presses kept their order (ids rise per key).
    for b in range(10):
        ids = [a.event_id for i, a in enumerate(accepted[:-1]) if i % 10 == b]
        assert ids == sorted(ids)


async def test_a_live_press_does_not_jump_a_clock_step_shift(tmp_path: Path) -> None:
    """A rebase (a clock step's shift of pending rows) queued before a live press is
    committed before it: the press's times, taken after the step, are not shifted."""
    sinks = [{"id": "hook", "type": "webhook", "url": "http://127.0.0.1:1/hook"}]  # refused
    cfg = make_config(
        tmp_path,
        buttons=[{"id": "busy", "source": "ingest"}, {"id": "panic", "source": "ingest"}],
        sinks=sinks,
        delivery={"timeout": 2, "backoff_initial": 60, "backoff_max": 60},
    )
    async with running(cfg) as bridge:
        gate = threading.Event()
        held = bridge.store.submit(lambda conn: gate.wait(10))
        busy = bridge.submit(on("busy"))
        rebase = bridge.store.rebase(1000.0)
        panic = bridge.submit(on("panic"))
        gate.set()
        await asyncio.gather(held, rebase)
        busy_id, panic_id = (await busy).event_id, (await panic).event_id
        assert busy_id < panic_id  # not committed ahead of the shift, so not ahead of busy
    with sqlite3.connect(cfg.store.path) as conn:
        created = dict(conn.execute("SELECT event_id, created_at FROM outbox"))
    # busy was written before the shift and moved by it; the panic press was not.
    assert 990 < created[busy_id] - created[panic_id] < 1010


async def test_a_delivered_mark_commits_alone_without_an_fsync(tmp_path: Path) -> None:
    """A lane waits for its delivered mark before its next row: the mark goes ahead of
    writes queued before it, in a transaction of its own with synchronous=NORMAL, while
    every other write still commits with FULL (its own fsync)."""
    sinks = [{"id": "hook", "type": "webhook", "url": "http://127.0.0.1:1/hook"}]  # refused
    cfg = make_config(
        tmp_path, sinks=sinks, delivery={"timeout": 2, "backoff_initial": 60, "backoff_max": 60}
    )
    async with running(cfg) as bridge:
        store = bridge.store
        (row,) = (await bridge.submit(on("desk"))).rows

        def mode(conn: sqlite3.Connection) -> int:
            return int(conn.execute("PRAGMA synchronous").fetchone()[0])

        gate = threading.Event()
        held = store.submit(lambda conn: gate.wait(10))
        order: list[str] = []
        writes = [store.submit(mode) for _ in range(3)]
        lazy = store.submit(mode, lazy=True)
        mark = store.mark_delivered(row.id, 200, durable=False)
        for name, future in [("write", w) for w in writes] + [("lazy", lazy), ("mark", mark)]:
            future.add_done_callback(lambda _f, name=name: order.append(name))
        gate.set()
        await held
        modes = await asyncio.gather(*writes)
        assert await lazy == 1  # NORMAL: no fsync of its own
        await mark
        after = await store.submit(mode)
        # Alone, a lazy mark is committed but not yet durable against a power cut; the next
        # full commit's fsync covers it.
        batch = await store.mark_delivered(row.id, 200, durable=False)
        assert store.synced < batch
        await store.sync()
        assert store.synced > batch
    assert order == ["lazy", "mark", "write", "write", "write"]
    assert modes == [2, 2, 2] and after == 2  # FULL for everything else, before and after
    with sqlite3.connect(cfg.store.path) as conn:
        status = conn.execute("SELECT status FROM outbox WHERE id = ?", (row.id,)).fetchone()
    assert status == ("delivered",)


async def test_a_receipt_commits_no_later_than_the_mark_of_its_row(tmp_path: Path) -> None:
    """A sink's receipt (Pushover) is queued when its row is delivered, before the row's
    mark; a mark that jumps queued writes must not leave its receipt behind (a kill in
    between would lose the cancel of an emergency)."""
    sinks = [{"id": "hook", "type": "webhook", "url": "http://127.0.0.1:1/hook"}]  # refused
    cfg = make_config(
        tmp_path, sinks=sinks, delivery={"timeout": 2, "backoff_initial": 60, "backoff_max": 60}
    )
    async with running(cfg) as bridge:
        store = bridge.store
        (row,) = (await bridge.submit(on("desk"))).rows
        gate = threading.Event()
        held = store.submit(lambda conn: gate.wait(10))
        order: list[str] = []
        write = store.submit(lambda conn: None)
        receipt = store.save_receipt("hook", "desk", "R1")
        mark = store.mark_delivered(row.id, 200, durable=False)
        for name, future in [("write", write), ("receipt", receipt), ("mark", mark)]:
            future.add_done_callback(lambda _f, name=name: order.append(name))
        gate.set()
        await asyncio.gather(held, write, receipt, mark)
        assert order.index("receipt") < order.index("mark")
        assert await store.receipts() == {"hook": {"desk": "R1"}}
