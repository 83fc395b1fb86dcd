"""The durable outbox: events, alert state and undelivered rows in one SQLite file.

Invariants:
- Every write goes through one writer thread that owns the connection; the event loop
  never touches SQLite. Operations queued together share one transaction and one fsync
  (group commit), in the order they were queued.
- ``commit_event`` writes a press's (or callback's) event, the alert state it leaves and
  one outbox row per sink in ONE transaction; the caller treats the press as accepted only
  when that future resolves. WAL + synchronous=FULL: a resolved commit survives kill -9
  and power loss. Only a delivered mark is written without its own fsync (see Job): one
  lost to a power cut sends its row again.
- An outbox row is ``pending`` until it is ``delivered`` or ``dead``; nothing pending is
  deleted. Delivered rows are trimmed to the newest ``history``; dead rows stay until an
  operator drops or re-queues them.
- Rows of one (sink, alert key) are delivered in id order (the dispatcher reads them so).
- When a commit fails (disk full, read-only, I/O error) the batch is kept in memory and
  retried with backoff; the health callback says so. The store file is never deleted.
- The hold is bounded by count, not time: while commits fail, at most ``max_held``
  operations (default 1000) wait in memory. Past that, ``commit_event`` raises StoreError
  at once (HTTP callers get 503, a flicd press is logged as lost); operations already held
  stay held and commit, in order, when the disk recovers. A held press loses nothing by
  waiting longer, so there is no time bound; closing the store fails what is still held,
  and every operation queued after it (so nothing commits out of order; the bridge keeps
  held presses in its spill file, see spill.py, and replays them at the next start).
- A file is a store only when ``inspect_store`` says so (application_id + user_version, see
  MIGRATIONS); a foreign or newer file is refused before anything writes to it.
- One process writes a store: ``open`` takes the flock of ``<store>.lock`` (StoreLock).
- A store that cannot commit at open (read-only file) opens unhealthy: a write probe is held
  and retried like any commit. The writer notices the file deleted or replaced under it
  (its inode changed) and holds commits instead of writing into an unlinked file.
- Status reads (``rows``, ``counts``, ``recent_events``) use a separate read-only
  connection in a worker thread: they see committed data only and never wait behind a
  failing commit, so the status API keeps answering while the disk is in trouble.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import structlog

from flicbridge.domain import Message
from flicbridge.errors import StoreError as StoreError  # re-exported: its callers catch it
from flicbridge.state import AlertState

log = structlog.get_logger(__name__)

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], Any]


class Job(NamedTuple):
    """One queued write. An ``urgent`` job (a live press) goes into the next transaction
    ahead of jobs queued before it, but never ahead of a ``barrier`` (a clock-step shift,
    whose place in the order matters to every time written after it).

    A ``lazy`` job (a delivered mark) may be committed without its own fsync: it survives
    kill -9 at once (the WAL is written before the future resolves) and power loss from
    the next full commit on (``Store.synced``). A power cut before then loses it together
    with every later write of the WAL (SQLite's WAL is a checksummed prefix), so those rows
    are sent again, in their order. The dispatcher makes that repeat harmless: it never
    sends a row of the other action (open after close) while a lazy mark of its key is
    not yet durable, so what a power cut repeats is a run of one action, which the
    platform deduplicates by the alert key."""

    op: Op
    future: asyncio.Future[Any]
    urgent: bool = False
    barrier: bool = False
    lazy: bool = False


SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    button_id TEXT NOT NULL,
    alert_key TEXT NOT NULL,
    origin TEXT NOT NULL,
    state TEXT NOT NULL,
    click TEXT NOT NULL DEFAULT '',
    decision TEXT NOT NULL,
    received_at TEXT NOT NULL,
    pressed_at TEXT NOT NULL,
    delay_s REAL NOT NULL DEFAULT 0,
    queued INTEGER NOT NULL DEFAULT 0,
    info TEXT NOT NULL DEFAULT '',
    actor TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS alerts (
    alert_key TEXT PRIMARY KEY,
    button_id TEXT NOT NULL,
    is_open INTEGER NOT NULL,
    opened_at TEXT,
    last_on_sent_at TEXT,
    last_event INTEGER,
    updated_at TEXT
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    event_id INTEGER NOT NULL,
    sink_id TEXT NOT NULL,
    alert_key TEXT NOT NULL,
    payload TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    last_status INTEGER,
    last_error TEXT,
    done_at REAL
);
CREATE INDEX IF NOT EXISTS outbox_lane ON outbox (status, sink_id, alert_key, id);
CREATE INDEX IF NOT EXISTS outbox_status ON outbox (status, id);
CREATE TABLE IF NOT EXISTS callbacks (
    source TEXT NOT NULL,
    event_id TEXT NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (source, event_id)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS subscriptions (
    id TEXT PRIMARY KEY,
    channel TEXT NOT NULL,
    url TEXT,
    min_priority TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""

# Acknowledgements of open alerts: one row per alert key, removed by the next open.
ACKS_DDL = """
CREATE TABLE IF NOT EXISTS acknowledgements (
    alert_key TEXT PRIMARY KEY,
    button_id TEXT NOT NULL,
    acknowledged_by TEXT NOT NULL,
    acknowledged_at TEXT NOT NULL,
    source TEXT NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class AckRecord:
    """Who acknowledged an open alert, when, and through what (pagerduty, api, ...)."""

    alert_key: str
    button_id: str
    by: str
    at: datetime
    source: str


# -- identity and schema versions ------------------------------------------------------
#
# A flicbridge store says what it is with two SQLite header fields: ``application_id`` is
# APPLICATION_ID and ``user_version`` is the number of MIGRATIONS applied to it. Before
# anything is written, ``inspect_store`` reads both (and the tables) on a read-only
# connection: a file of another program or of a newer flicbridge is refused and left
# byte-for-byte as it was. Version 1 is the schema 0.1.0 wrote; 0.1.0 set neither field, so
# a file with ``application_id`` 0 and ``user_version`` 0 is taken for one only when its
# tables are 0.1.0's, column for column.
#
# To change the schema, append ONE step to MIGRATIONS (never edit or reorder a step that
# shipped): a function that takes the writer connection and runs its DDL/DML. Step N
# upgrades version N-1 to N; ``migrate`` runs each missing step and its version bump in
# one transaction, so a crash leaves the store at the old or the new version, never
# between. A step must be safe on every store that reached version N-1.

IDLE_CHECK = 2.0  # seconds between the idle writer's checks that the store file is ours
# A commit that has not returned after this many seconds (a frozen filesystem, an SD card
# hanging on a write) makes the store count as unable to commit: not ready, no heartbeat.
STALL_AFTER = 5.0
APPLICATION_ID = 0x46426231  # "FBb1": flicbridge's mark in the SQLite header


def _step_1_base_schema(conn: sqlite3.Connection) -> None:
    """The 0.1.0 tables, the subscriptions table among them."""
    for statement in SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)


def _step_2_acknowledgements(conn: sqlite3.Connection) -> None:
    """Who acknowledged an open alert (PagerDuty webhook, the local API, ...)."""
    conn.execute(ACKS_DDL)


def _step_3_receipts(conn: sqlite3.Connection) -> None:
    """A reference a platform answered with that a later message needs (Pushover's
    receipt of an emergency message, which a close cancels and the bridge polls)."""
    conn.execute(
        "CREATE TABLE receipts (sink_id TEXT NOT NULL, alert_key TEXT NOT NULL,"
        " receipt TEXT NOT NULL, created_at REAL NOT NULL, PRIMARY KEY (sink_id, alert_key))"
    )


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _step_1_base_schema,
    _step_2_acknowledgements,
    _step_3_receipts,
]
SCHEMA_VERSION = len(MIGRATIONS)

# The tables and columns a 0.1.0 store may have (subscriptions was created on first use).
_V010_TABLES: dict[str, tuple[str, ...]] = {
    "events": (
        "id", "button_id", "alert_key", "origin", "state", "click", "decision",
        "received_at", "pressed_at", "delay_s", "queued", "info", "actor",
    ),
    "alerts": (
        "alert_key", "button_id", "is_open", "opened_at", "last_on_sent_at", "last_event",
        "updated_at",
    ),
    "outbox": (
        "id", "event_id", "sink_id", "alert_key", "payload", "status", "attempts",
        "created_at", "next_attempt_at", "last_status", "last_error", "done_at",
    ),
    "callbacks": ("source", "event_id", "received_at"),
    "meta": ("key", "value"),
    "subscriptions": ("id", "channel", "url", "min_priority", "created_at"),
}  # fmt: skip


def inspect_store(path: Path) -> int:
    """The schema version of the store at ``path`` (0: new or empty); StoreError if foreign.

    Reads only, on a read-only connection: a refused file is never modified.
    """
    if not path.exists() or path.stat().st_size == 0:
        return 0
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise StoreError(
            f"{path}: cannot open the store ({exc}); check that the file and its folder are "
            "readable by this user. The file was left untouched"
        ) from None
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {
            r[0]: tuple(c[1] for c in conn.execute(f"PRAGMA table_info('{r[0]}')"))
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        }
    except sqlite3.OperationalError as exc:  # the file may be fine: we may not read/write it
        raise StoreError(
            f"{path}: cannot open the store ({exc}); check that the file and its folder are "
            "writable by this user (not read-only) and the disk has free space. The file was "
            "left untouched"
        ) from None
    except sqlite3.DatabaseError as exc:
        raise StoreError(
            f"{path}: not a usable SQLite store ({exc}); it was left untouched — move it "
            "aside or restore a backup, then start again"
        ) from None
    finally:
        conn.close()
    if app_id not in (0, APPLICATION_ID):
        raise StoreError(
            f"{path}: not a flicbridge store (SQLite application_id {app_id:#x}); it belongs "
            "to another program and was left untouched — set [store] path to another file"
        )
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path}: written by a newer flicbridge (store version {version}, this one "
            f"knows up to {SCHEMA_VERSION}); it was left untouched — run the newer version "
            "or restore a backup"
        )
    if app_id == 0:
        foreign = [name for name, columns in tables.items() if _V010_TABLES.get(name) != columns]
        if version != 0 or foreign or (tables and "outbox" not in tables):
            raise StoreError(
                f"{path}: not a flicbridge store (tables {sorted(tables)}); it was left "
                "untouched — set [store] path to another file"
            )
    return int(version)


def migrate(conn: sqlite3.Connection, version: int) -> None:
    """Bring a store at ``version`` to SCHEMA_VERSION: each step in its own transaction."""
    for number, step in enumerate(MIGRATIONS[version:], start=version + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            step(conn)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        log.info("store_upgraded", version=number)


def open_offline(path: Path) -> sqlite3.Connection:
    """A connection for the CLI's offline commands: a known store at this version, or
    StoreError. Reads only unless the caller writes (then it must hold the store lock)."""
    if not path.exists():
        raise StoreError(f"{path}: no store yet (the daemon never ran)")
    version = inspect_store(path)
    if version != SCHEMA_VERSION:
        raise StoreError(f"{path}: store version {version}; start the daemon once to upgrade it")
    return connect(path)


# -- one writer per store -------------------------------------------------------------
#
# Every process that writes the store (the daemon, an in-process ``send``, an offline
# ``queue retry|drop``) holds an exclusive flock on ``<store>.lock`` beside it, with its pid
# written inside, for as long as it may write. The kernel drops the lock when the process
# dies (even by kill -9), so a stale lock file never blocks a start.


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


class StoreLock:
    """The exclusive writer lock of one store; ``release`` (or process exit) frees it."""

    def __init__(self, path: Path) -> None:
        self.path = lock_path(path)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock now, or StoreError naming the process that holds it."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(
                f"{self.path}: cannot write the store's folder to create its lock file "
                f"({exc.strerror}); check that the folder exists, is writable by this user "
                "and is not on a read-only disk"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            holder = lock_holder(self.path.with_suffix(""))
            raise StoreError(
                f"{self.path.with_suffix('')}: another flicbridge (pid {holder or '?'}) holds "
                f"this store ({self.path}); only one process may write a store"
            ) from None
        self._fd = fd

    def stamp(self) -> None:
        """Write our pid into the lock file (once the store opened: a refused start leaves
        the folder as it was)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
                os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def lock_holder(path: Path) -> int | None:
    """The pid of the process holding the store's writer lock, or None when it is free."""
    try:
        fd = os.open(lock_path(path), os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def outbox_rows(conn: sqlite3.Connection, status: str) -> list[OutboxRow]:
    """Every row of ``status`` in id order (offline listing)."""
    cur = conn.execute("SELECT * FROM outbox WHERE status = ? ORDER BY id", (status,))
    return [_row(r) for r in cur]


@dataclass(frozen=True, slots=True)
class EventRecord:
    """A press or callback as recorded, with the decision made for it."""

    button_id: str
    alert_key: str
    origin: str
    state: str
    click: str
    decision: str
    received_at: datetime
    pressed_at: datetime
    delay_s: float
    queued: bool
    info: str
    actor: str


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One message for one sink, as the dispatcher sees it."""

    id: int
    sink_id: str
    alert_key: str
    message: Message
    attempts: int
    created_at: float
    next_attempt_at: float
    status: str = "pending"
    last_status: int | None = None
    last_error: str | None = None
    done_at: float | None = None


@dataclass(frozen=True, slots=True)
class Committed:
    """What ``commit_event`` wrote: the event id and its outbox rows (empty if none)."""

    event_id: int
    rows: tuple[OutboxRow, ...]
    duplicate: bool = False  # a callback whose event id was seen before: nothing written


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _row(r: sqlite3.Row) -> OutboxRow:
    return OutboxRow(
        id=r["id"],
        sink_id=r["sink_id"],
        alert_key=r["alert_key"],
        message=Message.from_json(json.loads(r["payload"])),
        attempts=r["attempts"],
        created_at=r["created_at"],
        next_attempt_at=r["next_attempt_at"],
        status=r["status"],
        last_status=r["last_status"],
        last_error=r["last_error"],
        done_at=r["done_at"],
    )


def connect(path: Path) -> sqlite3.Connection:
    """Open the store file with the pragmas every connection needs; check it is a store."""
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        check = conn.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.OperationalError as exc:
        # The file may be fine: the daemon cannot open or write it (permissions, a
        # read-only or full disk, a missing folder). Say so, not "damaged".
        raise StoreError(
            f"{path}: cannot open the store for writing ({exc}); check that the file and "
            "its folder are writable by this user (not read-only) and the disk has free "
            "space. The file was left untouched"
        ) from None
    except sqlite3.DatabaseError as exc:
        raise StoreError(
            f"{path}: not a usable SQLite store ({exc}); it was left untouched — move it "
            "aside or restore a backup, then start again"
        ) from None
    if check != "ok":
        conn.close()
        raise StoreError(f"{path}: the store is damaged ({check}); it was left untouched")
    return conn


class Store:
    """Async facade over the writer thread. Create, ``await open()``, use, ``await close()``."""

    def __init__(
        self,
        path: Path,
        *,
        history: int = 10_000,
        on_health: Callable[[bool, str], None] | None = None,
        max_batch: int = 512,
        max_held: int = 1000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        # Stamps rows, read on the loop when a write is queued (never in the writer thread):
        # the dispatcher's schedule clock, whose step absorption relies on that order.
        self.clock = clock
        self.history = history
        self.max_batch = max_batch
        self.max_held = max_held
        self.healthy = True
        self.last_error = ""
        self.commits = 0
        # Batches committed, and the newest one made durable by a full commit (fsync): a
        # lazy write in batch N survives a power cut once ``synced >= N``. Written by the
        # writer thread, read on the loop.
        self.batches = 0
        self.synced = 0
        self._on_health = on_health
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        self._unsettled = 0  # submitted, not yet resolved (touched on the loop only)
        self._stop_retrying = threading.Event()
        self.lock = StoreLock(path)
        self._identity: tuple[int, int] | None = None  # (device, inode) of the open file
        self._abandoned = False  # closing gave a failing batch up (keeps commit order)
        self._durable = True  # the connection's synchronous mode is FULL (connect sets it)
        self.stall_after = STALL_AFTER
        self._busy_since: float | None = None  # when the writer began its batch (monotonic)
        self._counts_task: asyncio.Future[dict[str, dict[str, int]]] | None = None
        self._counts_cache: dict[str, dict[str, int]] = {}

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        """Create the file and schema if needed, then start the writer thread."""
        self._loop = asyncio.get_running_loop()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{self.path.parent}: cannot create the store folder: {exc}") from None
        await asyncio.to_thread(inspect_store, self.path)  # a refused file: nothing created
        self.lock.acquire()
        try:
            self._conn = await asyncio.to_thread(self._open_sync)
        except BaseException:
            self.lock.release()
            raise
        self.lock.stamp()
        self._reader = await asyncio.to_thread(self._open_reader)
        self._thread = threading.Thread(target=self._writer, name="store-writer", daemon=True)
        self._thread.start()
        if not self.healthy:  # opened, but cannot commit (read-only file or disk, full disk)
            if self._on_health is not None:
                self._loop.call_soon(self._on_health, False, self.last_error)
            probe = self.submit(_write_probe)  # held and retried until a commit works
            probe.add_done_callback(lambda f: f.cancelled() or f.exception())

    def _open_sync(self) -> sqlite3.Connection:
        version = inspect_store(self.path)  # before anything could write to the file
        conn = connect(self.path)
        try:
            if version < SCHEMA_VERSION:
                migrate(conn, version)
            st = os.stat(self.path)
            self._identity = (st.st_dev, st.st_ino)
        except (sqlite3.DatabaseError, OSError) as exc:
            conn.close()
            raise StoreError(f"{self.path}: cannot prepare the store: {exc}") from None
        try:
            _write_probe(conn)  # readiness must not say 200 for a store that cannot commit
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self.healthy, self.last_error = False, f"{type(exc).__name__}: {exc}"
        return conn

    def _open_reader(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("PRAGMA query_only = ON")
        return conn

    async def close(self) -> None:
        """Finish queued work, stop the thread, close the file."""
        if self._thread is None:
            return
        self._stop_retrying.set()
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        await asyncio.to_thread(self._close_reader)
        self.lock.release()

    def _close_reader(self) -> None:
        with self._read_lock:  # after any read in progress
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    # -- the writer thread -----------------------------------------------------------

    def _writer(self) -> None:
        assert self._conn is not None
        conn = self._conn
        waiting: deque[Job] = deque()  # taken off the queue, not yet in a transaction
        stop = False
        lazy = False  # the last batch was all lazy jobs (committed without an fsync)
        while True:
            if not waiting:
                if stop:
                    return
                try:
                    first = self._queue.get(timeout=IDLE_CHECK)
                except queue.Empty:
                    try:  # idle: still notice a store deleted or replaced under us
                        self._check_identity()
                    except sqlite3.OperationalError as exc:
                        self._report(False, str(exc))
                    continue
                if first is None:
                    return
                waiting.append(first)
            while not stop:  # everything queued meanwhile, so an urgent job can go first
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                else:
                    waiting.append(item)
            jobs = _next_batch(waiting, self.max_batch, lazy_first=not lazy)
            lazy = all(job.lazy for job in jobs)
            batch = [(job.op, job.future) for job in jobs]
            if self._abandoned:  # an earlier operation failed at close: none after it commits
                closed = "store unavailable at close"
                self._resolve([(future, None, StoreError(closed)) for _, future in batch])
            else:
                self._run_batch(conn, batch, durable=not lazy)

    def _run_batch(
        self,
        conn: sqlite3.Connection,
        batch: list[tuple[Op, asyncio.Future[Any]]],
        *,
        durable: bool = True,
    ) -> None:
        self._busy_since = time.monotonic()
        try:
            self._commit_batch(conn, batch, durable=durable)
        finally:
            self._busy_since = None

    def _commit_batch(
        self,
        conn: sqlite3.Connection,
        batch: list[tuple[Op, asyncio.Future[Any]]],
        *,
        durable: bool,
    ) -> None:
        delay = 0.05
        while True:
            results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
            try:
                self._check_identity()
                if durable != self._durable:  # FULL: this commit fsyncs; NORMAL: it does not
                    conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
                    self._durable = durable
                conn.execute("BEGIN IMMEDIATE")
                for op, future in batch:
                    conn.execute("SAVEPOINT op")
                    try:
                        value = op(conn)
                    except sqlite3.OperationalError:
                        raise  # disk trouble: the whole batch waits and retries
                    except Exception as exc:  # one bad operation must not sink the batch
                        conn.execute("ROLLBACK TO op")
                        results.append((future, None, exc))
                    else:
                        results.append((future, value, None))
                    conn.execute("RELEASE op")
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                self._report(False, f"{type(exc).__name__}: {exc}")
                if self._stop_retrying.wait(delay):
                    self._abandoned = True
                    why = f"store unavailable: {exc}"
                    self._resolve([(future, None, StoreError(why)) for _, future in batch])
                    return
                delay = min(delay * 2, 5.0)
                continue
            self.commits += 1
            self.batches += 1
            if durable:  # its fsync also made every earlier (lazy) batch durable
                self.synced = self.batches
            if not self.healthy:
                self._report(True, "")
            self._resolve(results)
            return

    def stalled(self) -> str | None:
        """Why the store cannot commit although no commit has failed: the writer has been on
        one batch for longer than ``stall_after`` (None: it has not)."""
        since = self._busy_since
        if since is None:
            return None
        waited = time.monotonic() - since
        if waited < self.stall_after:
            return None
        return f"a commit has waited {waited:.0f} s (the disk is frozen or not answering)"

    def _check_identity(self) -> None:
        """OperationalError when the path no longer names the file we have open: whatever
        we commit would be lost with the open file (held instead; restart to recover)."""
        if self._identity is None:
            return
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise sqlite3.OperationalError(
                f"the store file {self.path} is gone ({exc.strerror})"
            ) from None
        if (st.st_dev, st.st_ino) != self._identity:
            raise sqlite3.OperationalError(
                f"the store file {self.path} was replaced under the daemon; restart it"
            )

    def _report(self, healthy: bool, error: str) -> None:
        changed = healthy != self.healthy
        self.healthy = healthy
        self.last_error = error
        if changed and self._on_health is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._on_health, healthy, error)

    def _resolve(
        self, results: list[tuple[asyncio.Future[Any], Any, BaseException | None]]
    ) -> None:
        """Settle a batch's futures in their order, in one callback on the loop: one wake-up
        of the loop per commit rather than one per operation."""
        assert self._loop is not None

        def settle() -> None:
            self._unsettled -= len(results)
            for future, value, error in results:
                if future.done():
                    continue
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(value)

        self._loop.call_soon_threadsafe(settle)

    def submit(
        self,
        op: Callable[[sqlite3.Connection], T],
        *,
        urgent: bool = False,
        barrier: bool = False,
        lazy: bool = False,
    ) -> asyncio.Future[T]:
        """Queue ``op`` for the writer thread; the future resolves after its commit."""
        if self._thread is None or self._loop is None:
            raise StoreError("the store is not open")
        future: asyncio.Future[T] = self._loop.create_future()
        self._unsettled += 1
        self._queue.put(Job(op, future, urgent, barrier, lazy))
        return future

    async def run(self, op: Callable[[sqlite3.Connection], T]) -> T:
        return await self.submit(op)

    async def read(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read-only ``op`` on the reader connection, off the loop and off the writer."""
        return await asyncio.to_thread(self._read_sync, op)

    def _read_sync(self, op: Callable[[sqlite3.Connection], T]) -> T:
        with self._read_lock:
            if self._reader is None:
                raise StoreError("the store is not open")
            return op(self._reader)

    @property
    def waiting(self) -> int:
        """Operations submitted and not yet resolved (held in memory while commits fail)."""
        return self._unsettled

    def _refuse_when_full(self) -> None:
        """StoreError when commits are failing and ``max_held`` operations already wait."""
        if not self.healthy and self._unsettled >= self.max_held:
            raise StoreError(
                f"the store cannot commit ({self.last_error}) and already holds "
                f"{self._unsettled} operations in memory (max_held); refusing more"
            )

    # -- operations ------------------------------------------------------------------

    def commit_event(
        self,
        event: EventRecord,
        alert: AlertState,
        messages: Iterable[tuple[str, Message]],
        *,
        callback: tuple[str, str] | None = None,
        urgent: bool = False,
    ) -> asyncio.Future[Committed]:
        """Write an event, its alert state and one pending row per (sink id, message).

        ``messages`` may refer to the event id through ``Message.event`` = 0: the row's
        payload gets the real id. With ``callback`` = (source, event id) a repeat of a
        callback already recorded writes nothing and returns ``duplicate=True``.
        ``urgent``: a live press, committed ahead of writes queued before it (the caller
        makes sure none of them is for the same alert key).
        """
        self._refuse_when_full()
        pending = list(messages)
        now = self.clock()  # read on the loop, in the order of the writes (clock.py)

        def op(conn: sqlite3.Connection) -> Committed:
            if callback is not None:
                inserted = conn.execute(
                    "INSERT OR IGNORE INTO callbacks (source, event_id, received_at)"
                    " VALUES (?, ?, ?)",
                    (callback[0], callback[1], now),
                ).rowcount
                if not inserted:
                    return Committed(event_id=0, rows=(), duplicate=True)
            cur = conn.execute(
                "INSERT INTO events (button_id, alert_key, origin, state, click, decision,"
                " received_at, pressed_at, delay_s, queued, info, actor)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    event.button_id,
                    event.alert_key,
                    event.origin,
                    event.state,
                    event.click,
                    event.decision,
                    event.received_at.isoformat(),
                    event.pressed_at.isoformat(),
                    event.delay_s,
                    int(event.queued),
                    event.info,
                    event.actor,
                ),
            )
            event_id = int(cur.lastrowid or 0)
            _save_alert(conn, alert, event_id)
            rows = []
            for sink_id, message in pending:
                message = replace(message, event=event_id)
                cur = conn.execute(
                    "INSERT INTO outbox (event_id, sink_id, alert_key, payload, created_at,"
                    " next_attempt_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (event_id, sink_id, message.alert_key, json.dumps(message.to_json()), now, now),
                )
                rows.append(
                    OutboxRow(
                        id=int(cur.lastrowid or 0),
                        sink_id=sink_id,
                        alert_key=message.alert_key,
                        message=message,
                        attempts=0,
                        created_at=now,
                        next_attempt_at=now,
                    )
                )
            return Committed(event_id=event_id, rows=tuple(rows))

        return self.submit(op, urgent=urgent)

    def mark_delivered(
        self, row_id: int, status: int | None, *, durable: bool = True
    ) -> asyncio.Future[int]:
        """The row reached its sink; keep it as bounded history. Resolves to the number of
        the batch it committed in. Not ``durable``: committed without its own fsync (see
        Job), durable once ``synced`` reaches that number (or after ``sync``)."""
        history = self.history
        now = self.clock()

        def op(conn: sqlite3.Connection) -> int:
            conn.execute(
                "UPDATE outbox SET status = 'delivered', last_status = ?, last_error = NULL,"
                " done_at = ?, attempts = attempts + 1 WHERE id = ?",
                (status, now, row_id),
            )
            # Trim history now and then, not on every delivery.
            if row_id % 64 == 0:
                # Walks the (status, id) index: cheap enough for the writer thread.
                cutoff = conn.execute(
                    "SELECT id FROM outbox WHERE status = 'delivered'"
                    " ORDER BY id DESC LIMIT 1 OFFSET ?",
                    (history,),
                ).fetchone()
                if cutoff is not None:
                    conn.execute(
                        "DELETE FROM outbox WHERE status = 'delivered' AND id <= ?", (cutoff[0],)
                    )
            return self.batches + 1  # this batch's number once it commits

        return self.submit(op, lazy=not durable)

    def sync(self) -> asyncio.Future[None]:
        """A full commit (fsync): every lazy write committed before it survives a power cut."""
        stamp = str(self.clock())

        def op(conn: sqlite3.Connection) -> None:  # a real write, or the commit syncs nothing
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('synced_at', ?)", (stamp,)
            )

        return self.submit(op)

    def schedule_retry(
        self, row_id: int, attempts: int, next_attempt_at: float, status: int | None, error: str
    ) -> asyncio.Future[None]:
        """An attempt failed and may be retried at ``next_attempt_at`` (epoch seconds)."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE outbox SET attempts = ?, next_attempt_at = ?, last_status = ?,"
                " last_error = ? WHERE id = ? AND status = 'pending'",
                (attempts, next_attempt_at, status, error, row_id),
            )

        return self.submit(op)

    def dead_letter(
        self, row_id: int, attempts: int, status: int | None, error: str
    ) -> asyncio.Future[None]:
        """The row can never be delivered as it is: keep it, loudly, for an operator."""
        now = self.clock()

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE outbox SET status = 'dead', attempts = ?, last_status = ?,"
                " last_error = ?, done_at = ? WHERE id = ? AND status = 'pending'",
                (attempts, status, error, now, row_id),
            )

        return self.submit(op)

    def rebase(self, delta: float) -> asyncio.Future[None]:
        """The wall clock stepped by ``delta`` seconds: move every pending row's schedule with
        it, so that after a restart no row looks older, younger or later than it is.

        Queued in the writer's order, so a time written before the step is shifted once and a
        time written after it not at all (the schedule clock changes as this is queued).
        """

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE outbox SET created_at = created_at + ?,"
                " next_attempt_at = next_attempt_at + ? WHERE status = 'pending'",
                (delta, delta),
            )

        return self.submit(op, barrier=True)

    async def pending(self) -> list[OutboxRow]:
        """Every pending row in id order (start-up and re-queue)."""

        def op(conn: sqlite3.Connection) -> list[OutboxRow]:
            cur = conn.execute("SELECT * FROM outbox WHERE status = 'pending' ORDER BY id")
            return [_row(r) for r in cur]

        return await self.run(op)

    async def alerts(self) -> dict[str, AlertState]:
        """Alert state as last committed, by alert key (the reader: at start the writer may
        be holding a probe of a store that cannot commit)."""
        return await self.read(load_alerts)

    async def lanes(self) -> list[tuple[str, str, int, float]]:
        """(sink id, alert key, pending rows, oldest created_at) of every lane with work."""

        def op(conn: sqlite3.Connection) -> list[tuple[str, str, int, float]]:
            cur = conn.execute(
                "SELECT sink_id, alert_key, COUNT(*), MIN(created_at) FROM outbox"
                " WHERE status = 'pending' GROUP BY sink_id, alert_key"
            )
            return [(r[0], r[1], int(r[2]), float(r[3])) for r in cur]

        return await self.read(op)

    async def lane_page(
        self, sink_id: str, alert_key: str, after_id: int, limit: int, *, through: int
    ) -> list[OutboxRow]:
        """The next pending rows of one lane, in id order, after ``after_id`` and up to
        ``through``."""

        def op(conn: sqlite3.Connection) -> list[OutboxRow]:
            cur = conn.execute(
                "SELECT * FROM outbox WHERE status = 'pending' AND sink_id = ?"
                " AND alert_key = ? AND id > ? AND id <= ? ORDER BY id LIMIT ?",
                (sink_id, alert_key, after_id, through, limit),
            )
            return [_row(r) for r in cur]

        return await self.read(op)

    async def newest_row(self) -> int:
        """The highest outbox row id (0 for none)."""

        def op(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM outbox").fetchone()[0])

        return await self.read(op)

    async def rows(self, status: str, limit: int = 100) -> list[OutboxRow]:
        """Newest rows of a status (pending, dead, delivered) for the status API."""

        def op(conn: sqlite3.Connection) -> list[OutboxRow]:
            cur = conn.execute(
                "SELECT * FROM outbox WHERE status = ? ORDER BY id DESC LIMIT ?", (status, limit)
            )
            return [_row(r) for r in cur]

        return await self.read(op)

    async def requeue(self, row_id: int | None) -> list[OutboxRow]:
        """Make a dead row (or every dead row with None) pending again; return them."""
        now = self.clock()
        return await self.run(lambda conn: requeue_dead(conn, row_id, now))

    async def drop(self, row_id: int) -> tuple[str, str] | None:
        """Delete a dead or pending row an operator gave up on: (status, sink id) or None."""
        return await self.run(lambda conn: drop_row(conn, row_id))

    async def counts(self) -> dict[str, dict[str, int]]:
        """Row counts by sink and status."""

        def op(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
            out: dict[str, dict[str, int]] = {}
            for r in conn.execute(
                "SELECT sink_id, status, COUNT(*) AS n FROM outbox GROUP BY sink_id, status"
            ):
                out.setdefault(r["sink_id"], {})[r["status"]] = r["n"]
            return out

        return await self.read(op)

    async def counts_within(self, seconds: float) -> dict[str, dict[str, int]]:
        """``counts``, or the last counts read when the disk does not answer in ``seconds``
        (a frozen or stalled disk blocks the reader too: the status API answers anyway).
        At most one read is in flight, so a stall does not pile up threads."""
        task = self._counts_task
        if task is None or task.done():
            task = self._counts_task = asyncio.ensure_future(self.counts())
        try:
            self._counts_cache = await asyncio.wait_for(asyncio.shield(task), seconds)
        except TimeoutError:
            log.warning("status_from_memory", waited_s=seconds)
        except StoreError:
            pass
        except sqlite3.Error as exc:
            log.warning("status_counts_failed", error=str(exc))
        return self._counts_cache

    async def recent_events(self, limit: int = 20) -> list[dict[str, Any]]:
        def op(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            cur = conn.execute("SELECT * FROM events ORDER BY id DESC LIMIT ?", (limit,))
            return [dict(r) for r in cur]

        return await self.read(op)

    # -- acknowledgements (who said "help is coming" for an open alert) --------------

    def save_ack(self, ack: AckRecord) -> asyncio.Future[None]:
        """Record (or replace) the acknowledgement of ``ack.alert_key``."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO acknowledgements (alert_key, button_id,"
                " acknowledged_by, acknowledged_at, source) VALUES (?, ?, ?, ?, ?)",
                (ack.alert_key, ack.button_id, ack.by, ack.at.isoformat(), ack.source),
            )

        return self.submit(op)

    def clear_ack(self, alert_key: str) -> asyncio.Future[None]:
        """Forget the acknowledgement of ``alert_key`` (a new open)."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM acknowledgements WHERE alert_key = ?", (alert_key,))

        return self.submit(op)

    async def acks(self) -> dict[str, AckRecord]:
        """Every recorded acknowledgement by alert key (read at start)."""

        def op(conn: sqlite3.Connection) -> dict[str, AckRecord]:
            cur = conn.execute(
                "SELECT alert_key, button_id, acknowledged_by, acknowledged_at, source"
                " FROM acknowledgements"
            )
            return {
                r[0]: AckRecord(r[0], r[1], r[2], datetime.fromisoformat(r[3]), r[4]) for r in cur
            }

        return await self.read(op)  # the reader: a store that cannot commit still starts

    def save_receipt(
        self, sink_id: str, alert_key: str, receipt: str | None
    ) -> asyncio.Future[None]:
        """Keep (or, with None, forget) the platform's receipt for an alert key.

        Lazy like a delivered mark, and queued before the mark of the row it came with
        (``Sink.on_delivered``), so the two commit in that order: a mark is never durable
        while the receipt of its row is not (a power cut loses both, and the row is sent
        again with a new receipt)."""
        now = self.clock()

        def op(conn: sqlite3.Connection) -> None:
            if receipt is None:
                conn.execute(
                    "DELETE FROM receipts WHERE sink_id = ? AND alert_key = ?", (sink_id, alert_key)
                )
            else:
                conn.execute(
                    "INSERT OR REPLACE INTO receipts (sink_id, alert_key, receipt, created_at)"
                    " VALUES (?, ?, ?, ?)",
                    (sink_id, alert_key, receipt, now),
                )

        return self.submit(op, lazy=True)

    async def receipts(self) -> dict[str, dict[str, str]]:
        """Kept receipts: sink id → alert key → receipt (read at start)."""

        def op(conn: sqlite3.Connection) -> dict[str, dict[str, str]]:
            out: dict[str, dict[str, str]] = {}
            for sink_id, key, receipt in conn.execute(
                "SELECT sink_id, alert_key, receipt FROM receipts"
            ):
                out.setdefault(sink_id, {})[key] = receipt
            return out

        return await self.read(op)


def _next_batch(waiting: deque[Job], limit: int, *, lazy_first: bool = False) -> list[Job]:
    """The jobs of the next transaction, taken off ``waiting``: the urgent ones queued
    before the first barrier, alone (a live press does not wait for a long batch); else,
    when ``lazy_first`` (the last batch was a full commit), the lazy ones queued before the
    first barrier, alone (a delivered mark does not wait for other writes' fsync, so a
    lane's next row goes out without it); else up to ``limit`` jobs in order.

    Taking a lazy job ahead of earlier writes is safe: a mark only touches its own row, a
    row already committed and in flight, which no other queued write changes."""
    urgent: list[Job] = []
    lazy: list[Job] = []
    for job in waiting:
        if job.barrier:
            break
        if job.urgent and len(urgent) < limit:
            urgent.append(job)
        elif job.lazy and len(lazy) < limit:
            lazy.append(job)
    chosen = urgent or (lazy if lazy_first else [])
    if chosen:
        taken = {id(job) for job in chosen}
        rest = [job for job in waiting if id(job) not in taken]
        waiting.clear()
        waiting.extend(rest)
        return chosen
    return [waiting.popleft() for _ in range(min(limit, len(waiting)))]


def _write_probe(conn: sqlite3.Connection) -> None:
    """A tiny real commit: proves the store can be written (at open, and while held)."""
    stamp = str(time.time())
    if conn.in_transaction:  # inside the writer's batch
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('opened_at', ?)", (stamp,))
        return
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('opened_at', ?)", (stamp,))
    conn.execute("COMMIT")


def _save_alert(conn: sqlite3.Connection, alert: AlertState, event_id: int) -> None:
    conn.execute(
        "INSERT INTO alerts (alert_key, button_id, is_open, opened_at, last_on_sent_at,"
        " last_event, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (alert_key) DO UPDATE SET button_id = excluded.button_id,"
        " is_open = excluded.is_open, opened_at = excluded.opened_at,"
        " last_on_sent_at = excluded.last_on_sent_at, last_event = excluded.last_event,"
        " updated_at = excluded.updated_at",
        (
            alert.alert_key,
            alert.button_id,
            int(alert.is_open),
            _iso(alert.opened_at),
            _iso(alert.last_on_sent_at),
            event_id,
            _iso(alert.updated_at),
        ),
    )


def load_alerts(conn: sqlite3.Connection) -> dict[str, AlertState]:
    return {
        r["alert_key"]: AlertState(
            alert_key=r["alert_key"],
            button_id=r["button_id"],
            is_open=bool(r["is_open"]),
            opened_at=_dt(r["opened_at"]),
            last_on_sent_at=_dt(r["last_on_sent_at"]),
            last_event=r["last_event"],
            updated_at=_dt(r["updated_at"]),
        )
        for r in conn.execute("SELECT * FROM alerts")
    }


def requeue_dead(
    conn: sqlite3.Connection, row_id: int | None, now: float | None = None
) -> list[OutboxRow]:
    """Dead → pending, attempts reset, due ``now`` (the schedule clock's time; the wall
    clock offline). Works from the CLI's own connection too."""
    now = time.time() if now is None else now
    if row_id is None:
        ids = [r["id"] for r in conn.execute("SELECT id FROM outbox WHERE status = 'dead'")]
    else:
        ids = [
            r["id"]
            for r in conn.execute(
                "SELECT id FROM outbox WHERE status = 'dead' AND id = ?", (row_id,)
            )
        ]
    for rid in ids:
        conn.execute(
            "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = ?,"
            " created_at = ?, done_at = NULL WHERE id = ?",
            (now, now, rid),
        )
    if not ids:
        return []
    marks = ",".join("?" * len(ids))
    cur = conn.execute(f"SELECT * FROM outbox WHERE id IN ({marks}) ORDER BY id", ids)
    return [_row(r) for r in cur]


def drop_row(conn: sqlite3.Connection, row_id: int) -> tuple[str, str] | None:
    """Delete a dead or pending row: (the status it had, its sink id), or None if none."""
    found = conn.execute(
        "SELECT status, sink_id FROM outbox WHERE id = ? AND status IN ('dead', 'pending')",
        (row_id,),
    ).fetchone()
    if found is None:
        return None
    conn.execute("DELETE FROM outbox WHERE id = ?", (row_id,))
    return str(found[0]), str(found[1])
