"""The SQLite outbox: one transaction per decision, group commit, restart-safe state."""

import asyncio
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from flicbridge.domain import Message, SignalState
from flicbridge.state import AlertState
from flicbridge.store import EventRecord, Store, StoreError

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def event(decision: str = "open") -> EventRecord:
    return EventRecord(
        "b", "b", "press", "On", "single_click", decision, NOW, NOW, 0.0, False, "", ""
    )


def message() -> Message:
    return Message(
        "b", "b", "B", "b", "", SignalState.ON, "open", "single_click", NOW, 0.0, "", "critical", 0
    )


async def test_event_state_and_rows_commit_together(tmp_path: Path) -> None:
    """A decision's event, alert state and rows are in the file once the future resolves."""
    store = Store(tmp_path / "s.db")
    await store.open()
    committed = await store.commit_event(
        event(),
        AlertState("b", "b", is_open=True, opened_at=NOW),
        [("s1", message()), ("s2", message())],
    )
    await store.close()
    conn = sqlite3.connect(tmp_path / "s.db")
    assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 1
    assert conn.execute("SELECT is_open FROM alerts").fetchone()[0] == 1
    rows = conn.execute("SELECT sink_id, payload FROM outbox ORDER BY id").fetchall()
    assert [r[0] for r in rows] == ["s1", "s2"]
    assert f'"event": {committed.event_id}' in rows[0][1]
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_concurrent_commits_share_transactions(tmp_path: Path) -> None:
    """Presses that arrive together share commits (group commit), each still resolved."""
    store = Store(tmp_path / "s.db")
    await store.open()
    futures = [
        store.commit_event(event(), AlertState("b", "b"), [("s", message())]) for _ in range(200)
    ]
    results = await asyncio.gather(*futures)
    assert len({r.event_id for r in results}) == 200
    assert store.commits < 200
    await store.close()


async def test_state_survives_reopen(tmp_path: Path) -> None:
    """Alert state and pending rows are there after a restart."""
    store = Store(tmp_path / "s.db")
    await store.open()
    await store.commit_event(
        event(), AlertState("b", "b", is_open=True, opened_at=NOW), [("s", message())]
    )
    await store.close()
    store = Store(tmp_path / "s.db")
    await store.open()
    assert (await store.alerts())["b"].is_open
    assert [r.sink_id for r in await store.pending()] == ["s"]
    await store.close()


async def test_callback_dedup(tmp_path: Path) -> None:
    """A callback event id seen before writes nothing."""
    store = Store(tmp_path / "s.db")
    await store.open()
    first = await store.commit_event(event(), AlertState("b", "b"), [], callback=("fd", "e1"))
    second = await store.commit_event(event(), AlertState("b", "b"), [], callback=("fd", "e1"))
    assert not first.duplicate and second.duplicate
    assert len(await store.recent_events()) == 1
    await store.close()


async def test_dead_letter_requeue_and_drop(tmp_path: Path) -> None:
    """Dead rows stay until re-queued or dropped."""
    store = Store(tmp_path / "s.db")
    await store.open()
    c = await store.commit_event(
        event(), AlertState("b", "b"), [("s", message()), ("t", message())]
    )
    a, b = c.rows
    await store.dead_letter(a.id, 1, 400, "bad request")
    assert [r.id for r in await store.rows("dead")] == [a.id]
    requeued = await store.requeue(a.id)
    assert [r.id for r in requeued] == [a.id] and requeued[0].attempts == 0
    assert await store.drop(b.id)
    assert not await store.drop(b.id)
    await store.close()


async def test_corrupt_file_is_refused_and_kept(tmp_path: Path) -> None:
    """A damaged store is a clear error naming the file, and the file is not deleted."""
    path = tmp_path / "s.db"
    path.write_bytes(b"this is not a database" * 100)
    store = Store(path)
    with pytest.raises(StoreError, match=str(path)):
        await store.open()
    assert path.read_bytes().startswith(b"this is not a database")


async def test_delivered_history_is_trimmed_to_the_newest(tmp_path: Path) -> None:
    """Delivered rows are kept as bounded history: the newest ``history`` (trimmed in steps)."""
    store = Store(tmp_path / "s.db", history=10)
    await store.open()
    rows = []
    for _ in range(300):
        c = await store.commit_event(event(), AlertState("b", "b"), [("s", message())])
        rows += c.rows
    for row in rows:
        await store.mark_delivered(row.id, 202)
    kept = await store.rows("delivered", 1000)
    assert 10 <= len(kept) < 10 + 64
    assert kept[0].id == rows[-1].id  # the newest survive
    assert [r.id for r in kept] == sorted((r.id for r in kept), reverse=True)
    await store.close()
