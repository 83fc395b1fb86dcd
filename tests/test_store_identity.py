"""The store knows its own files: schema versions, upgrades, foreign files, one writer."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import sqlite3
from pathlib import Path

import pytest

from flicbridge.state import AlertState
from flicbridge.store import (
    APPLICATION_ID,
    SCHEMA_VERSION,
    EventRecord,
    Store,
    StoreError,
    inspect_store,
)
from tests.conftest import cli, free_port, make_config, running
from tests.receiver import Receiver
from tests.test_cli import start_daemon, wait_healthy, write_config

FIXTURE = Path(__file__).parent / "fixtures" / "store-0.1.0.db"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def header(path: Path) -> tuple[int, int]:
    conn = sqlite3.connect(path)
    try:
        return (
            conn.execute("PRAGMA application_id").fetchone()[0],
            conn.execute("PRAGMA user_version").fetchone()[0],
        )
    finally:
        conn.close()


async def test_new_store_is_marked(tmp_path: Path) -> None:
    """A new store carries flicbridge's application_id and the current schema version."""
    store = Store(tmp_path / "fb.db")
    await store.open()
    await store.close()
    assert header(tmp_path / "fb.db") == (APPLICATION_ID, SCHEMA_VERSION)
    assert inspect_store(tmp_path / "fb.db") == SCHEMA_VERSION


async def test_store_from_0_1_0_upgrades_and_delivers(tmp_path: Path, receiver: Receiver) -> None:
    """A real 0.1.0 store opens with its rows, states, callbacks and subscriptions intact,
    and its pending rows are delivered."""
    path = tmp_path / "flicbridge.db"  # make_config's store path
    shutil.copy(FIXTURE, path)
    assert header(path) == (0, 0)
    config = make_config(
        tmp_path,
        buttons=[
            {"id": "desk", "source": "ingest", "name": "Desk"},
            {"id": "lab", "source": "ingest", "name": "Lab"},
        ],
        sinks=[
            {"id": "ao", "type": "alertops", "url": f"{receiver.url}/POSTAlert/KEY/Flic"},
            {"id": "fd", "type": "webhook", "url": f"{receiver.url}/hook"},
        ],
    )
    async with running(config) as bridge:
        assert header(path) == (APPLICATION_ID, SCHEMA_VERSION)
        assert bridge.states["lab-key"].is_open and not bridge.states["desk-key"].is_open
        assert bridge.states["desk-key"].last_event == 2
        assert await bridge.store.receipts() == {}  # step 3's table is there, and empty
        dead = await bridge.store.rows("dead")
        assert [(r.id, r.sink_id, r.last_status) for r in dead] == [(2, "fd", 400)]
        got = await receiver.wait_for(4, timeout=15)  # the four pending rows, delivered
        assert sorted(r.path for r in got) == sorted(
            ["/POSTAlert/KEY/Flic", "/hook", "/POSTAlert/KEY/Flic", "/hook"]
        )
        subs = await bridge.store.read(
            lambda c: [r[0] for r in c.execute("SELECT id FROM subscriptions ORDER BY id")]
        )
        assert subs == ["sub-hook", "sub-sse"]
        # The Flashduty event id recorded by 0.1.0 still deduplicates.
        event = EventRecord(
            "lab", "lab-key", "callback", "On", "", "appended",
            *(bridge.states["lab-key"].updated_at,) * 2, 0.0, False, "", "",
        )  # fmt: skip
        state: AlertState = bridge.states["lab-key"]
        repeat = await bridge.store.commit_event(
            event, state, [], callback=("flashduty", "fd-event-0001")
        )
        assert repeat.duplicate


def foreign_events(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, kind TEXT, at REAL)")
    conn.execute("INSERT INTO events (kind, at) VALUES ('boot', 1.0)")
    conn.commit()
    conn.close()


def foreign_outbox(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE outbox (id INTEGER PRIMARY KEY, topic TEXT, body BLOB)")
    conn.commit()
    conn.close()


def foreign_app_id(path: Path) -> None:
    shutil.copy(FIXTURE, path)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA application_id = 1234")
    conn.close()


def newer_version(path: Path) -> None:
    shutil.copy(FIXTURE, path)
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (foreign_events, "not a flicbridge store"),
        (foreign_outbox, "not a flicbridge store"),
        (foreign_app_id, "application_id 0x4d2"),
        (newer_version, "newer flicbridge"),
    ],
)
async def test_foreign_or_newer_file_refused_untouched(
    tmp_path: Path, receiver: Receiver, make: object, words: str
) -> None:
    """run refuses a foreign or newer file with exit 1, names it, and changes no byte."""
    config = write_config(tmp_path, receiver.url, port=free_port())
    store = tmp_path / "state" / "fb.db"
    store.parent.mkdir()
    make(store)  # type: ignore[operator]
    before = digest(store)
    code, _, err = await cli("run", "--config", str(config))
    assert code == 1, err
    assert str(store) in err and words in err and "Traceback" not in err
    assert digest(store) == before
    assert sorted(p.name for p in store.parent.iterdir() if p.name.startswith("fb.db-")) == []
    code, _, err = await cli("queue", "list", "--config", str(config))
    assert code == 1 and words in err
    assert digest(store) == before


async def test_second_run_refused_naming_holder(tmp_path: Path, receiver: Receiver) -> None:
    """A second run on the same store exits 1 naming the first one's pid; offline writes
    refuse while the daemon holds the store and its API cannot be reached; reads work."""
    port = free_port()
    config = write_config(tmp_path, receiver.url, port=port)
    proc = await start_daemon(config)
    try:
        await wait_healthy(port)
        other = tmp_path / "other.toml"
        other.write_text(config.read_text().replace(f"port = {port}", f"port = {free_port()}"))
        code, _, err = await cli("run", "--config", str(other))
        assert code == 1, err
        assert f"pid {proc.pid}" in err and "holds this store" in err
        # A config whose API port is wrong: the daemon cannot be reached, so no write.
        code, out, err = await cli("send", "--config", str(other), "desk", "On", "--wait", "1")
        assert code == 1 and f"pid {proc.pid}" in err and "nothing was changed" in err
        code, _, err = await cli("queue", "retry", "1", "--config", str(other))
        assert code == 1 and f"pid {proc.pid}" in err
        code, _, err = await cli("queue", "drop", "1", "--config", str(other))
        assert code == 1 and f"pid {proc.pid}" in err
        assert receiver.requests == []
        code, out, err = await cli("queue", "list", "--config", str(other))
        assert code == 0 and "pending:" in out, err
    finally:
        proc.terminate()
        await proc.communicate()
    code, out, err = await cli("queue", "retry", "--all-dead", "--config", str(config))
    assert code == 1 and "no dead row" in err  # the lock is free again: offline works


async def test_open_twice_in_one_process_refused(tmp_path: Path) -> None:
    """Two Store objects on one file: the second open raises StoreError."""
    first = Store(tmp_path / "fb.db")
    await first.open()
    try:
        with pytest.raises(StoreError, match="holds this store"):
            await Store(tmp_path / "fb.db").open()
    finally:
        await first.close()
    again = Store(tmp_path / "fb.db")
    await asyncio.wait_for(again.open(), 5)
    await again.close()
