"""Local alert subscriptions and the failing-sink watch.

- A subscription (``sse`` or ``webhook``) is a row of the ``subscriptions`` table in the
  store, so it survives restarts. An ``sse`` subscription fixes the ``min_priority`` of the
  streams that name it; a ``webhook`` one has every alert at or above its ``min_priority``
  POSTed as JSON to its URL.
- A webhook subscription is one lane: a bounded mailbox on the AlertBus (publishing never
  waits; when the mailbox is full the oldest alert goes) and one task that POSTs in order
  with ``delivery.send_and_classify`` (the sinks' own send, timeout, body bound and
  redaction), deciding retry or give-up and waiting ``delivery.next_delay`` as they do.
  Alerts live in memory only: one still failing after ``ALERT_MAX_AGE`` seconds of
  retries is given up, with a log line.
- The watch raises one ERROR alert when a sink's oldest pending row is older than
  ``FAILING_AFTER`` seconds, and another only after that sink has caught up again. It
  sleeps until the next row is due to cross that age (at most FAILING_AFTER): no polling.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import sqlite3
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import aiohttp
import structlog

from flicbridge import __version__
from flicbridge.alerts import LocalAlert, Priority, Subscriber
from flicbridge.config import WebhookSink as WebhookSinkConfig
from flicbridge.delivery import Outcome, next_delay, send_and_classify
from flicbridge.errors import TooManySubscriptions
from flicbridge.sinks import build_sink
from flicbridge.sinks.base import HttpRequest, Sink

if TYPE_CHECKING:
    from flicbridge.alerts import AlertBus
    from flicbridge.config import Config
    from flicbridge.dispatcher import Dispatcher
    from flicbridge.store import Store

log = structlog.get_logger(__name__)

Channel = Literal["sse", "webhook"]
MAX_SUBSCRIPTIONS = 64
ALERT_MAX_AGE = 3600.0  # seconds of retries before a webhook subscription gives an alert up
FAILING_AFTER = 300.0  # a sink whose oldest pending row is this old raises an ERROR alert
WATCH_SLACK = 0.05  # seconds the watch looks after a row is due, so that it is past due
STREAM_PATH = "/api/v1/alerts/stream"


@dataclass(frozen=True, slots=True)
class Subscription:
    """One subscription as stored."""

    id: str
    channel: Channel
    min_priority: Priority
    url: str | None
    created_at: float

    @property
    def stream(self) -> str | None:
        return f"{STREAM_PATH}?subscription={self.id}" if self.channel == "sse" else None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "channel": self.channel,
            "min_priority": self.min_priority,
            "url": self.url,
            "created_at": self.created_at,
            "stream": self.stream,
        }


def _subscription(row: sqlite3.Row) -> Subscription:
    channel: Channel = "webhook" if row["channel"] == "webhook" else "sse"
    priority: Priority = row["min_priority"] if row["min_priority"] in ("NORMAL", "HIGH") else "LOW"
    return Subscription(row["id"], channel, priority, row["url"], row["created_at"])


class Subscriptions:
    """The subscriptions of one bridge: their table, webhook lanes and the sink watch."""

    def __init__(
        self, store: Store, alerts_bus: AlertBus, config: Config, dispatcher: Dispatcher
    ) -> None:
        self.store = store
        self.alerts_bus = alerts_bus
        self.config = config
        self.dispatcher = dispatcher
        self.closing = asyncio.Event()  # set when the HTTP server shuts down: streams end
        self.rng = random.Random()
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._session: aiohttp.ClientSession | None = None
        self._failing: dict[str, float] = {}  # sink id → when its ERROR alert went out

    # -- the table (every operation runs on the store's writer thread) -------------------

    async def create(
        self, channel: Channel, url: str | None, min_priority: Priority
    ) -> Subscription:
        """Store a new subscription and start its lane; TooManySubscriptions past the cap."""
        sub = Subscription(
            id=secrets.token_hex(8),
            channel=channel,
            min_priority=min_priority,
            url=url if channel == "webhook" else None,
            created_at=time.time(),
        )

        def op(conn: sqlite3.Connection) -> None:
            count = conn.execute("SELECT COUNT(*) FROM subscriptions").fetchone()[0]
            if count >= MAX_SUBSCRIPTIONS:
                raise TooManySubscriptions(f"at most {MAX_SUBSCRIPTIONS} subscriptions")
            conn.execute(
                "INSERT INTO subscriptions (id, channel, url, min_priority, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (sub.id, sub.channel, sub.url, sub.min_priority, sub.created_at),
            )

        await self.store.run(op)
        log.info("subscription_created", subscription=sub.id, channel=channel)
        self._start(sub)
        return sub

    async def all(self) -> list[Subscription]:
        """Every subscription, from the store's reader (answers while commits are failing)."""

        def op(conn: sqlite3.Connection) -> list[Subscription]:
            if not _has_table(conn):
                return []
            cur = conn.execute("SELECT * FROM subscriptions ORDER BY created_at, id")
            return [_subscription(r) for r in cur]

        return await self.store.read(op)

    async def get(self, sub_id: str) -> Subscription | None:
        def op(conn: sqlite3.Connection) -> Subscription | None:
            if not _has_table(conn):
                return None
            row = conn.execute("SELECT * FROM subscriptions WHERE id = ?", (sub_id,)).fetchone()
            return None if row is None else _subscription(row)

        return await self.store.read(op)

    async def delete(self, sub_id: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            return conn.execute("DELETE FROM subscriptions WHERE id = ?", (sub_id,)).rowcount > 0

        deleted = await self.store.run(op)
        task = self._workers.pop(sub_id, None)
        if task is not None:
            task.cancel()
        if deleted:
            log.info("subscription_deleted", subscription=sub_id)
        return deleted

    # -- running -------------------------------------------------------------------------

    async def run(self) -> None:
        """Start the lanes of stored webhook subscriptions and the sink watch; until cancelled."""
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=16, limit_per_host=4)
        )
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tg.create_task(self._watch_sinks(), name="sink-watch")
                await self._load()
                await asyncio.Event().wait()
        finally:
            self._tg = None
            self._workers.clear()
            await self._session.close()
            self._session = None

    async def _load(self) -> None:
        delay = 1.0
        while True:
            try:
                subs = await self.store.run(_load_all)
            except Exception as exc:  # the store is unwell: presses matter more; try later
                log.warning("subscriptions_not_loaded", error=str(exc), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)
                continue
            for sub in subs:
                self._start(sub)
            return

    def _start(self, sub: Subscription) -> None:
        if sub.channel != "webhook" or sub.url is None or self._tg is None:
            return
        if sub.id in self._workers:
            return
        subscriber = self.alerts_bus.subscribe(sub.min_priority)
        task = self._tg.create_task(self._lane(sub, subscriber), name=f"subscription:{sub.id}")
        self._workers[sub.id] = task

    async def _lane(self, sub: Subscription, subscriber: Subscriber) -> None:
        """Deliver one webhook subscription's alerts in order, one at a time."""
        assert sub.url is not None
        sink = subscription_sink(sub.id, sub.url, self.config.site)
        bound = log.bind(subscription=sub.id, url=sink.public_url)
        try:
            while True:
                alert = await subscriber.queue.get()
                try:
                    await self._deliver(bound, sink, alert)
                except Exception:  # a defect here must not end the lane, nor the bridge
                    bound.exception("subscription_lane_error", alert=alert.id)
        finally:
            self.alerts_bus.unsubscribe(subscriber)
            if self._workers.get(sub.id) is asyncio.current_task():
                del self._workers[sub.id]

    async def _deliver(
        self, bound: structlog.typing.FilteringBoundLogger, sink: Sink, alert: LocalAlert
    ) -> None:
        delivery = self.config.delivery
        loop = asyncio.get_running_loop()
        started = loop.time()
        attempts = 0
        while True:
            outcome = await self._post(sink, alert)
            attempts += 1
            if outcome.kind == "delivered":
                bound.info("subscription_delivered", alert=alert.id, attempts=attempts)
                return
            if outcome.kind == "dead":
                bound.warning("subscription_alert_refused", alert=alert.id, detail=outcome.detail)
                return
            if loop.time() - started > ALERT_MAX_AGE:
                bound.warning("subscription_alert_given_up", alert=alert.id, detail=outcome.detail)
                return
            delay = next_delay(
                outcome, attempts - 1, delivery.backoff_initial, delivery.backoff_max, self.rng
            )
            bound.warning(
                "subscription_delivery_failed",
                alert=alert.id,
                detail=outcome.detail,
                attempts=attempts,
                retry_in=round(delay, 3),
            )
            await asyncio.sleep(delay)

    async def _post(self, sink: Sink, alert: LocalAlert) -> Outcome:
        assert self._session is not None
        request = HttpRequest(
            "POST",
            sink.url,
            alert.to_json(),
            headers={"Content-Type": "application/json", "User-Agent": f"flicbridge/{__version__}"},
        )
        outcome, _ = await send_and_classify(
            self._session, sink, request, self.config.delivery.timeout
        )
        return outcome

    # -- the failing-sink watch ----------------------------------------------------------

    async def _watch_sinks(self) -> None:
        # Woken when a pending row is due to cross FAILING_AFTER, else every FAILING_AFTER:
        # an idle bridge (or a six-hour outage already reported) costs a few wakeups an hour.
        while True:
            try:
                wait = self.check_sinks()
            except Exception:  # the watch is a courtesy: never let it stop the bridge
                log.exception("sink_watch_failed")
                wait = FAILING_AFTER
            await asyncio.sleep(wait)

    def check_sinks(self) -> float:
        """One ERROR alert per sink whose oldest pending row is older than FAILING_AFTER.

        Returns the seconds until the next look can find something new.
        """
        dispatcher = self.dispatcher
        now = dispatcher.now()  # pending rows' times are on the dispatcher's schedule clock
        depth = dispatcher.depth()
        wait = FAILING_AFTER
        for sink_id, oldest in dispatcher.oldest().items():
            alerted = self._failing.get(sink_id)
            if alerted is not None and (oldest is None or oldest > alerted):
                # Everything pending when it alerted went out: the next failure warns again.
                del self._failing[sink_id]
                alerted = None
            age = None if oldest is None else now - oldest
            if age is None or age <= FAILING_AFTER:
                if age is not None:
                    wait = min(wait, FAILING_AFTER - age)
                continue
            if alerted is not None:
                continue
            self._failing[sink_id] = now
            gate = dispatcher.gates.get(sink_id)
            last_error = gate.last_error if gate is not None else None
            log.error(
                "sink_failing",
                sink=sink_id,
                pending=depth.get(sink_id, 0),
                oldest_s=round(age),
                last_error=last_error,
            )
            self.alerts_bus.publish(
                "ERROR",
                "MESSAGE",
                "HIGH",
                f"sink {sink_id} has delivered nothing for {_duration(age)} "
                f"({depth.get(sink_id, 0)} pending); last error: {last_error or 'none yet'}",
            )
        return wait + WATCH_SLACK


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _has_table(conn: sqlite3.Connection) -> bool:
    query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'subscriptions'"
    return conn.execute(query).fetchone() is not None


def _load_all(conn: sqlite3.Connection) -> list[Subscription]:
    return [_subscription(r) for r in conn.execute("SELECT * FROM subscriptions ORDER BY id")]


def subscription_sink(sub_id: str, url: str, site: str | None) -> Sink:
    """A webhook sink for a subscription's URL: ``classify`` and redaction work on it."""
    config = WebhookSinkConfig.model_validate(
        {"id": f"subscription-{sub_id}", "type": "webhook", "url": url}
    )
    return build_sink(config, site)
