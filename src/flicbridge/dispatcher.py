"""The dispatcher: delivers committed outbox rows to their sinks, at least once.

- A lane is one (sink, alert key): its rows go strictly in id order, one at a time, so a
  close never overtakes its open. Lanes never wait for each other; a lane exists only
  while it has rows, as one task in the dispatcher's TaskGroup.
- Every sink has a token bucket (its ``rate`` and ``burst``) shared by its lanes, and a
  pause: a 429 stops the whole sink until its Retry-After (or backoff) has passed. Lanes
  take turns at a sink (``SinkGate``): a live press first, then round robin, so a live
  press never waits behind another key's backlog and no lane starves another.
- Retry or dead-letter is decided by ``delivery.classify``; the delay by
  ``delivery.next_delay`` (full jitter, Retry-After as a minimum). Rows older than
  ``max_age`` are dead-lettered, never dropped. Every outcome is written to the store
  before the lane moves on, so nothing undelivered lives only in memory.
- Every schedule (retry times, ``max_age``, pauses, the buckets) is on the schedule clock
  (``clock.ScheduleClock``), which never jumps when NTP steps the wall clock; a step is
  absorbed by moving every pending schedule with it, in memory and in the store.
- A delivered mark is committed before the lane sends its next row. It is committed
  without an fsync of its own (``Store`` lazy write: 20 ms saved per row on an SD card)
  only when the next row does the same (open after open, close after close). Before a
  row of the other action goes out, every lazy mark of its key is made durable
  (``Store.sync``). So a power cut can only repeat a run of one action, deduplicated by
  the platform, never re-open a closed alert; kill -9 repeats at most the row in flight.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Protocol

import aiohttp
import structlog

from flicbridge.bucket import TokenBucket
from flicbridge.clock import ScheduleClock
from flicbridge.delivery import Outcome, attempt, next_delay
from flicbridge.sinks.base import Sink
from flicbridge.store import OutboxRow, Store, StoreError

log = structlog.get_logger(__name__)

WINDOW = 32  # rows of one lane held in memory; the rest of a backlog stays on disk
CLOCK_CHECK = 1.0  # seconds between checks for a wall-clock step while nothing else reads it


class DeliveryListener(Protocol):
    """Told of every attempt's outcome (metrics, local alerts, status)."""

    def delivered(self, row: OutboxRow, outcome: Outcome, latency: float) -> None: ...

    def retrying(self, row: OutboxRow, outcome: Outcome, delay: float) -> None: ...

    def dead(self, row: OutboxRow, outcome: Outcome) -> None: ...


@dataclass
class SinkGate:
    """Pacing, turns and pause of one sink, shared by all its lanes.

    A lane asks for a turn (``turn``) before each attempt and waits in line. Lanes holding a
    live press (the first row of a lane that had nothing waiting) stand in the first line,
    newest first: when more buttons are pressed than the sink's pace lets through (many at
    once, or during an outage), the latest press still goes at the next opportunity and
    the earlier ones right after it, all ahead of the backlog. Every other lane stands in
    the second line, in arrival order, and goes to its back for its next row, so turns go
    round the lanes: a lane of 1,000 rows and a lane of 5 alternate (round robin).

    A turn is granted only while the sink is not paused and its token bucket (``rate``,
    ``burst``) has a token, so over any window of T seconds the sink gets at most
    rate × T + burst requests, live presses included; a pause (429) holds every line.
    """

    rate: float
    burst: int
    clock: Callable[[], float]  # the dispatcher's schedule clock
    bucket: TokenBucket = field(init=False)
    paused_until: float = 0.0
    last_success: float | None = None
    last_error: str | None = None
    failing_since: float | None = None
    live: deque[asyncio.Future[bool]] = field(default_factory=deque)  # newest first
    waiting: deque[asyncio.Future[bool]] = field(default_factory=deque)
    _timer: asyncio.TimerHandle | None = None

    def __post_init__(self) -> None:
        self.bucket = TokenBucket(self.rate, float(self.burst))

    def turn(self, live: bool) -> asyncio.Future[bool]:
        """A future that says True when it is this lane's turn (False: ``withdraw``-n)."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if live:
            self.live.appendleft(future)
        else:
            self.waiting.append(future)
        self._grant()
        return future

    @staticmethod
    def withdraw(future: asyncio.Future[bool] | None) -> None:
        """Leave the line (the lane is stopping, or its head row was dropped)."""
        if future is not None and not future.done():
            future.set_result(False)

    def pause(self, until: float) -> None:
        self.paused_until = max(self.paused_until, until)

    def _grant(self) -> None:
        """Grant every turn the bucket allows now; wake up again when the next one can go."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._head(pop=False) is not None:
            now = self.clock()
            wait = self.paused_until - now if self.paused_until > now else self.bucket.take(now)
            if wait > 0:
                self._timer = asyncio.get_running_loop().call_later(wait, self._grant)
                return
            head = self._head(pop=True)
            assert head is not None
            head.set_result(True)

    def _head(self, *, pop: bool) -> asyncio.Future[bool] | None:
        """The waiter whose turn is next (live presses, then the rest), finished waiters
        dropped; taken out of its line with ``pop``."""
        for line in (self.live, self.waiting):
            while line and line[0].done():  # withdrawn, or its lane was cancelled
                line.popleft()
            if line:
                return line.popleft() if pop else line[0]
        return None

    def shift(self, delta: float) -> None:
        """Move this gate's times with a step of the schedule clock."""
        self.bucket.shift(delta)
        if self.paused_until:
            self.paused_until += delta
        if self.last_success is not None:
            self.last_success += delta
        if self.failing_since is not None:
            self.failing_since += delta


@dataclass
class Lane:
    """One (sink, alert key): a short window of its rows in memory, the rest on disk.

    Rows with an id above ``upto`` are only in the store while ``on_disk`` is set; the
    lane reads them a page at a time, so memory does not grow with the backlog.
    """

    rows: deque[OutboxRow] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    on_disk: bool = False
    upto: int = 0
    loading: bool = False
    arrived: list[OutboxRow] = field(default_factory=list)  # added while a page loads
    oldest: float | None = None  # created_at of the oldest row while none is in memory
    turn: asyncio.Future[bool] | None = None  # its place in the sink's line, while waiting

    def idle(self) -> bool:
        """Nothing waiting: a row added now is a live press."""
        return not (self.rows or self.on_disk or self.loading or self.arrived)


class Dispatcher:
    """Owns every delivery; ``prepare`` finds the backlog, ``run`` until cancelled, ``add``
    rows after they commit."""

    def __init__(
        self,
        store: Store,
        sinks: dict[str, Sink],
        *,
        timeout: float,
        backoff_initial: float,
        backoff_max: float,
        max_age: float,
        listener: DeliveryListener | None = None,
        clock: ScheduleClock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.sinks = sinks
        self.timeout = timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.max_age = max_age
        self.listener = listener
        self.schedule = clock or ScheduleClock()
        self.rng = rng or random.Random()
        self.gates = {
            sid: SinkGate(rate=s.rate, burst=s.burst, clock=self.now) for sid, s in sinks.items()
        }
        self._live: set[int] = set()  # ids of rows that are live presses (``SinkGate``)
        self.lanes: dict[tuple[str, str], Lane] = {}
        self.pending: dict[str, int] = dict.fromkeys(sinks, 0)
        self._forgotten: set[int] = set()
        # The newest row id handed to ``add`` (or pending at start): a page read stops there,
        # so a row committed but not yet added is never read from disk AND then added.
        self._announced = 0
        # (sink, alert key) → (action, batch) of its newest lazily marked row, until synced.
        self._unsynced: dict[tuple[str, str], tuple[str, int]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._stopping = False
        self._running = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._rebased: asyncio.Future[None] | None = None  # the store's last step shift
        self._steps: list[float] = []  # each step absorbed so far, in seconds

    # -- public ----------------------------------------------------------------------

    async def prepare(self) -> None:
        """Find every lane with pending rows in one grouped read (no row is loaded yet)."""
        self._announced = max(self._announced, await self.store.newest_row())
        for sink_id, alert_key, count, oldest in await self.store.lanes():
            if sink_id not in self.sinks:
                log.warning("rows_for_unknown_sink", sink=sink_id, rows=count)
                continue
            self.lanes[(sink_id, alert_key)] = Lane(on_disk=True, oldest=oldest)
            self.pending[sink_id] += count

    async def run(self) -> None:
        """Deliver until cancelled (lanes start here; ``add`` before it only queues)."""
        self._running = True
        for key, lane in list(self.lanes.items()):
            self._spawn(key, lane)
        try:
            while True:  # a step is absorbed within a second even when no lane is busy
                await asyncio.sleep(CLOCK_CHECK)
                self.now()
        finally:
            await self._shutdown()

    @property
    def steps(self) -> int:
        """How many clock steps were absorbed: read it before queueing a write whose rows
        are then ``add``-ed, so that a step absorbed meanwhile moves them too."""
        return len(self._steps)

    def add(self, rows: Iterable[OutboxRow], *, since: int | None = None) -> None:
        """Queue committed rows; each lane keeps id order. ``since``: ``steps`` when their
        write was queued (its times are on the schedule clock as it was then)."""
        delta = sum(self._steps[since:]) if since is not None else 0.0
        for row in rows:
            if delta:
                row = _moved(row, delta)
            if row.sink_id not in self.sinks:
                log.warning("row_for_unknown_sink", row=row.id, sink=row.sink_id)
                continue
            self.pending[row.sink_id] += 1
            self._announced = max(self._announced, row.id)
            key = (row.sink_id, row.alert_key)
            lane = self.lanes.get(key)
            if lane is None:
                lane = self.lanes[key] = Lane()
                if self._running:
                    self._spawn(key, lane)
            if lane.idle() and row.attempts == 0:
                self._live.add(row.id)
            self._place(lane, row)
            lane.wake.set()

    def _place(self, lane: Lane, row: OutboxRow) -> None:
        if lane.loading:
            lane.arrived.append(row)
            return
        if lane.on_disk and row.id > lane.upto:
            return  # committed: a later page reads it, in order
        if lane.rows and lane.rows[-1].id > row.id:
            lane.rows = deque(sorted([*lane.rows, row], key=lambda r: r.id))
        else:
            lane.rows.append(row)
        lane.upto = max(lane.upto, row.id)
        self._trim(lane)

    def _trim(self, lane: Lane) -> None:
        """Keep at most WINDOW rows in memory; the head stays (it may be in flight)."""
        if len(lane.rows) > WINDOW:
            while len(lane.rows) > WINDOW:
                lane.rows.pop()
            lane.on_disk = True
            lane.upto = lane.rows[-1].id

    async def _load(self, key: tuple[str, str], lane: Lane) -> None:
        """Read the lane's next page of rows from the store."""
        lane.loading = True
        try:
            while True:
                steps = self.steps
                if self._rebased is not None:  # read the shifted times, never the old ones
                    await asyncio.gather(self._rebased, return_exceptions=True)
                page = await self.store.lane_page(
                    key[0], key[1], lane.upto, WINDOW, through=self._announced
                )
                if steps == self.steps:  # else a step moved the times as they were read
                    break
        finally:
            lane.loading = False
        arrived, lane.arrived = lane.arrived, []
        lane.on_disk = len(page) >= WINDOW
        if page:
            lane.upto = page[-1].id
        rows = {r.id: r for r in page if r.id not in self._forgotten}
        for row in arrived:
            if row.id not in rows and (not lane.on_disk or row.id <= lane.upto):
                rows[row.id] = row
        lane.rows = deque(sorted(rows.values(), key=lambda r: r.id))
        lane.upto = max([lane.upto, *rows])
        lane.oldest = None
        self._trim(lane)

    def now(self) -> float:
        """The schedule clock's time, after absorbing any step of the wall clock.

        Every schedule decision reads the time here, so a step is absorbed before any
        time taken after it is compared with, or written beside, times taken before it.
        """
        delta = self.schedule.step()
        if delta:
            self._absorb(delta)
        return self.schedule.now()

    def _absorb(self, delta: float) -> None:
        """The wall clock stepped by ``delta``: move every pending schedule with it."""
        self.schedule.absorb(delta)
        self._steps.append(delta)
        for lane in self.lanes.values():
            lane.rows = deque(_moved(r, delta) for r in lane.rows)
            lane.arrived = [_moved(r, delta) for r in lane.arrived]
            if lane.oldest is not None:
                lane.oldest += delta
            lane.wake.set()
        for gate in self.gates.values():
            gate.shift(delta)
        rebased = self._rebased = self.store.rebase(delta)
        rebased.add_done_callback(_report_rebase)
        log.warning("clock_step", seconds=round(delta, 3), pending=sum(self.pending.values()))

    def forget(self, row_id: int, sink_id: str) -> None:
        """An operator dropped a pending row: stop trying it (an attempt in flight ends)."""
        self._forgotten.add(row_id)
        self.pending[sink_id] = max(0, self.pending.get(sink_id, 0) - 1)
        self._live.discard(row_id)
        for lane in self.lanes.values():
            for row in list(lane.rows):
                if row.id == row_id:
                    if lane.rows[0] is row:
                        SinkGate.withdraw(lane.turn)
                    lane.rows.remove(row)
                    lane.wake.set()
                    return

    def depth(self) -> dict[str, int]:
        """Pending rows per sink, in memory or on disk."""
        return dict(self.pending)

    def oldest(self) -> dict[str, float | None]:
        """Creation time of the oldest pending row per sink."""
        out: dict[str, float | None] = dict.fromkeys(self.sinks)
        for (sink_id, _), lane in self.lanes.items():
            first = lane.rows[0].created_at if lane.rows else lane.oldest
            if first is not None:
                current = out[sink_id]
                out[sink_id] = first if current is None else min(current, first)
        return out

    async def stop(self, grace: float | None = None) -> None:
        """Start no new attempt; let attempts in flight finish or time out."""
        self._stopping = True
        for lane in self.lanes.values():
            SinkGate.withdraw(lane.turn)
            lane.wake.set()
        try:
            async with asyncio.timeout(grace if grace is not None else self.timeout + 1):
                await self._idle.wait()
        except TimeoutError:
            log.warning("shutdown_abandoned_attempts", in_flight=self._in_flight)

    # -- lanes -----------------------------------------------------------------------

    def _spawn(self, key: tuple[str, str], lane: Lane) -> None:
        task = asyncio.get_running_loop().create_task(
            self._drive(key, lane), name=f"lane:{key[0]}:{key[1]}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drive(self, key: tuple[str, str], lane: Lane) -> None:
        sink = self.sinks[key[0]]
        gate = self.gates[key[0]]
        bound = log.bind(sink=sink.id, alert_key=key[1])
        try:
            while not self._stopping:
                if not lane.rows:
                    if not lane.on_disk:
                        break
                    try:
                        await self._load(key, lane)
                    except (StoreError, sqlite3.Error) as exc:
                        bound.error("lane_read_failed", error=str(exc))
                        await self._sleep(lane, 1.0)
                    continue
                now = self.now()  # first: a step absorbed here moves the rows
                row = lane.rows[0]
                if self.max_age and now - row.created_at > self.max_age:
                    outcome = Outcome(
                        kind="dead",
                        status=row.last_status,
                        detail=f"older than max_age ({self.max_age:g} s); last error: "
                        f"{row.last_error or 'none'}",
                        retry_after=None,
                        pause_sink=False,
                    )
                    await self._dead(bound, row, outcome)
                    _remove_head(lane, row)
                    continue
                wait = row.next_attempt_at - now
                if wait > 0:
                    await self._sleep(lane, wait)
                    continue
                if await self._synced_before(key, row):
                    continue  # the sync took a while: look at the row again
                lane.turn = gate.turn(live=row.id in self._live)
                try:
                    granted = await lane.turn
                finally:
                    lane.turn = None
                if not granted or not lane.rows or lane.rows[0].id != row.id:
                    continue  # stopping, or the row was dropped while it waited
                await self._attempt(key, bound, sink, gate, lane, lane.rows[0])
        finally:
            idle = not lane.rows and not lane.on_disk
            if self.lanes.get(key) is lane and idle:
                del self.lanes[key]
            elif self.lanes.get(key) is lane and not self._stopping:
                # Rows arrived as the loop ended: keep the lane going.
                self._spawn(key, lane)

    async def _sleep(self, lane: Lane, seconds: float) -> None:
        lane.wake.clear()
        try:
            async with asyncio.timeout(seconds):
                await lane.wake.wait()
        except TimeoutError:
            pass

    async def _synced_before(self, key: tuple[str, str], row: OutboxRow) -> bool:
        """Make the key's lazy marks durable before a row of the other action goes out
        (True: it waited for a sync)."""
        unsynced = self._unsynced.get(key)
        if unsynced is None or unsynced[0] == row.message.action:
            return False
        if self.store.synced >= unsynced[1]:  # a full commit since made them durable
            del self._unsynced[key]
            return False
        await self.store.sync()
        if self._unsynced.get(key) == unsynced:
            del self._unsynced[key]
        return True

    async def _attempt(
        self,
        key: tuple[str, str],
        bound: structlog.typing.FilteringBoundLogger,
        sink: Sink,
        gate: SinkGate,
        lane: Lane,
        row: OutboxRow,
    ) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=64, limit_per_host=16)
            self._session = aiohttp.ClientSession(connector=connector)
        self._in_flight += 1
        self._idle.clear()
        self._live.discard(row.id)  # a retry is backlog
        try:
            outcome = await attempt(
                self._session, sink, row.message, sink.config.timeout or self.timeout
            )
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
        now = self.now()
        if lane.rows and lane.rows[0].id == row.id:
            row = lane.rows[0]  # as a step absorbed during the attempt moved it
        attempts = row.attempts + 1
        if outcome.kind == "delivered":
            gate.last_success, gate.failing_since = now, None
            # Committed before the lane sends its next row: after a crash, never an older
            # row of the other action is sent again after a newer one (which could re-open
            # a closed alert at the platform). Durable at once when the next row is known
            # to be of the other action; else lazy, and synced later if need be.
            action = row.message.action
            after = lane.rows[1] if len(lane.rows) > 1 and lane.rows[0].id == row.id else None
            durable = after is not None and after.message.action != action
            batch = await self.store.mark_delivered(row.id, outcome.status, durable=durable)
            if durable:
                self._unsynced.pop(key, None)
            else:
                self._unsynced[key] = (action, batch)
            latency = now - row.message.pressed_at.timestamp()
            bound.info(
                "delivered",
                row=row.id,
                action=row.message.action,
                status=outcome.status,
                attempts=attempts,
                url=sink.public_url,
            )
            _remove_head(lane, row)
            self._finished(row)
            if self.listener:
                self.listener.delivered(replace(row, attempts=attempts), outcome, latency)
            return
        gate.last_error = outcome.detail
        if outcome.kind == "dead":
            await self._dead(bound, replace(row, attempts=attempts), outcome)
            _remove_head(lane, row)
            return
        if gate.failing_since is None:
            gate.failing_since = now
        delay = next_delay(outcome, row.attempts, self.backoff_initial, self.backoff_max, self.rng)
        if outcome.pause_sink:
            gate.pause(now + delay)
        retry_at = now + delay
        await self.store.schedule_retry(row.id, attempts, retry_at, outcome.status, outcome.detail)
        row = replace(
            row,
            attempts=attempts,
            next_attempt_at=retry_at,
            last_status=outcome.status,
            last_error=outcome.detail,
        )
        if lane.rows and lane.rows[0].id == row.id:  # not dropped by an operator meanwhile
            lane.rows[0] = row
        bound.warning(
            "delivery_failed",
            row=row.id,
            action=row.message.action,
            status=outcome.status,
            detail=outcome.detail,
            attempts=attempts,
            retry_in=round(delay, 3),
            url=sink.public_url,
        )
        if self.listener:
            self.listener.retrying(row, outcome, delay)

    async def _dead(
        self, bound: structlog.typing.FilteringBoundLogger, row: OutboxRow, outcome: Outcome
    ) -> None:
        await self.store.dead_letter(row.id, row.attempts, outcome.status, outcome.detail)
        self._finished(row)
        bound.error(
            "dead_lettered",
            row=row.id,
            action=row.message.action,
            status=outcome.status,
            detail=outcome.detail,
            attempts=row.attempts,
        )
        if self.listener:
            self.listener.dead(replace(row, status="dead", last_error=outcome.detail), outcome)

    def _finished(self, row: OutboxRow) -> None:
        """A row left the pending set (delivered or dead); a dropped one was counted already."""
        if row.id in self._forgotten:
            self._forgotten.discard(row.id)
        else:
            self.pending[row.sink_id] -= 1

    async def _shutdown(self) -> None:
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None


def _moved(row: OutboxRow, delta: float) -> OutboxRow:
    """``row`` with its schedule moved by a clock step."""
    return replace(
        row, created_at=row.created_at + delta, next_attempt_at=row.next_attempt_at + delta
    )


def _report_rebase(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and (exc := future.exception()) is not None:
        log.error(
            "clock_step_not_saved",
            error=str(exc),
            detail="pending rows keep their times on disk: after a restart they look aged"
            " by the step",
        )


def _remove_head(lane: Lane, row: OutboxRow) -> None:
    """Take a finished row off its lane, unless an operator already dropped it."""
    if lane.rows and lane.rows[0].id == row.id:
        lane.rows.popleft()
