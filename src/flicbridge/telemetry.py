"""Telemetry: what the bridge measures and says about its own health.

``Telemetry`` listens to the radio sources (links, faults, button links, batteries), the
dispatcher (every delivery attempt's outcome) and the store (commits failing or
recovering). It keeps the metrics and the readiness inputs (``core.Health``, the buttons'
``ButtonStatus``) current, publishes local alerts for what an operator must see, and runs
the button health monitor (health.py), whose alerts it submits as signals.

Invariants:
- Every callback is called on the event loop and returns at once; none waits for the
  store, a sink or the network. Telemetry never changes an alert's state itself: a health
  alert goes through ``submit`` like any signal (state machine, store, outbox).
- A local alert is published per transition, not per report: a source going down, the
  store starting to fail (the store reports changes only); a low battery warns once per
  dip, again only after a reading at or above the threshold. Each dead letter publishes
  one, naming the command that re-queues it.
- Queue depth and the oldest pending row's age are computed when /metrics is scraped,
  so they are never stale.
- ``unhealthy`` is the one definition of "the bridge is not well" the heartbeat uses: the
  store cannot commit, or a radio source is not connected.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import structlog

from flicbridge.alerts import AlertBus
from flicbridge.config import ButtonConfig, Config
from flicbridge.delivery import Outcome
from flicbridge.domain import Signal, SignalState, utcnow
from flicbridge.errors import NotAccepting, UnknownButton
from flicbridge.health import HealthChange, HealthMonitor, health_state
from flicbridge.metrics import Metrics
from flicbridge.state import AlertState
from flicbridge.status import ButtonStatus, Health
from flicbridge.store import OutboxRow, StoreError

log = structlog.get_logger(__name__)


class SubmitHealth(Protocol):
    """Commit a signal of a button's health alert (``health=True``); raises as ``submit``."""

    def __call__(self, signal: Signal, *, health: bool) -> object: ...


class Queues(Protocol):
    """The dispatcher's view of its queues, read at scrape time."""

    def depth(self) -> Mapping[str, int]: ...

    def oldest(self) -> Mapping[str, float | None]: ...

    def now(self) -> float: ...


class Telemetry:
    """Metrics, readiness and health alerts; the ``DeliveryListener`` of the dispatcher and
    the health half of the sources' ``SourceListener``.

    ``states`` (alert key → state) is the intake's, read only here (is a health alert
    open). ``submit`` commits a health alert's signal.
    """

    def __init__(
        self,
        config: Config,
        buttons: Mapping[str, ButtonConfig],
        status: dict[str, ButtonStatus],
        states: Mapping[str, AlertState],
        *,
        metrics: Metrics,
        bus: AlertBus,
        health: Health,
        store_path: Path,
        store_stalled: Callable[[], str | None],
        submit: SubmitHealth,
        mono: Callable[[], float],
    ) -> None:
        self.config = config
        self.buttons = buttons
        self.status = status
        self.states = states
        self.metrics = metrics
        self.bus = bus
        self.health = health
        self.store_path = store_path
        self.store_stalled = store_stalled
        self.submit = submit
        self.monitor = HealthMonitor(
            {b.id: b.display_name for b in config.buttons if b.source != "ingest"},
            battery_warn_percent=config.alerts.battery_warn_percent,
            silent_after=config.alerts.silent_after,
            is_open=self.health_open,
            change=self._health_change,
            clock=mono,
        )

    def start(self) -> None:
        """Count the buttons' silence from now (a health alert left open stays open)."""
        self.monitor.start()

    async def run(self) -> None:
        """Check for silent buttons until cancelled (only when ``silent_after`` is set)."""
        await self.monitor.run()

    def watch_queues(self, queues: Queues, sink_ids: list[str]) -> None:
        """Compute each sink's queue depth and oldest pending age when scraped."""
        for sink_id in sink_ids:
            depth = functools.partial(_queue_depth, queues, sink_id)
            self.metrics.queue_depth.labels(sink_id).set_function(depth)
            age = functools.partial(_oldest_pending_age, queues, sink_id)
            self.metrics.oldest_pending.labels(sink_id).set_function(age)

    # -- SourceListener (all but press) ----------------------------------------------

    def heard(self, button_id: str) -> None:
        """Something came from the button (a press): it is not silent."""
        self.monitor.heard(button_id)

    def link(self, source: str, up: bool, detail: str) -> None:
        was = self.health.source_up.get(source)
        self.health.source_up[source] = up
        self.health.source_detail[source] = detail
        self.metrics.source_up.labels(source).set(1 if up else 0)
        if was and not up:
            self.bus.publish("WARNING", "MESSAGE", "HIGH", f"{source} lost: {detail}")

    def faults(self, source: str, reasons: list[str]) -> None:
        had = self.health.source_faults.get(source, [])
        self.health.source_faults[source] = list(reasons)
        for reason in reasons:
            if reason not in had:
                log.warning("source_fault", source=source, reason=reason)
        if had and not reasons:
            log.info("source_faults_cleared", source=source)

    def button_link(self, button_id: str, connected: bool, detail: str) -> None:
        status = self.status.get(button_id)
        if status is None:
            return
        status.connected, status.detail = connected, detail
        self.monitor.heard(button_id)
        self.metrics.button_connected.labels(button_id).set(1 if connected else 0)
        log.info("button_link", button=button_id, connected=connected, detail=detail)

    def battery(self, button_id: str, percent: int) -> None:
        status = self.status.get(button_id)
        if status is None:
            return
        status.battery = percent
        self.metrics.battery.labels(button_id).set(percent)
        self.monitor.battery(button_id, percent)
        threshold = self.config.alerts.battery_warn_percent
        if percent < threshold and not status.battery_low:
            status.battery_low = True
            log.warning("battery_low", button=button_id, percent=percent)
            self.bus.publish(
                "WARNING",
                "MESSAGE",
                "NORMAL",
                f"battery of {self._name(button_id)} is at {percent} %",
                button=button_id,
            )
        elif percent >= threshold and status.battery_low:
            status.battery_low = False  # recovered: the next dip warns again

    def _name(self, button_id: str) -> str:
        button = self.buttons.get(button_id)
        return button.display_name if button else button_id

    # -- DeliveryListener ------------------------------------------------------------

    def delivered(self, row: OutboxRow, outcome: Outcome, latency: float) -> None:
        self.metrics.deliveries.labels(row.sink_id, "delivered").inc()
        self.metrics.latency.labels(row.sink_id).observe(max(latency, 0.0))

    def retrying(self, row: OutboxRow, outcome: Outcome, delay: float) -> None:
        self.metrics.deliveries.labels(row.sink_id, "retry").inc()
        self.metrics.retries.labels(row.sink_id).inc()

    def dead(self, row: OutboxRow, outcome: Outcome) -> None:
        self.metrics.deliveries.labels(row.sink_id, "dead").inc()
        self.metrics.dead_letters.labels(row.sink_id).inc()
        self.bus.publish(
            "ERROR",
            "MESSAGE",
            "HIGH",
            f"{row.message.action} of {row.message.button_name} could not be delivered to "
            f"{row.sink_id}: {outcome.detail} (row {row.id}; `flicbridge queue retry "
            f"{row.id}` re-queues it)",
            event=row.message.event,
            button=row.message.button_id,
        )

    # -- store health ----------------------------------------------------------------

    def store_health(self, ok: bool, error: str) -> None:
        """The store's commits fail (``ok`` False) or succeed again."""
        self.health.store_ok, self.health.store_error = ok, error
        self.metrics.store_healthy.set(1 if ok else 0)
        if ok:
            log.info("store_recovered")
        else:
            log.error("store_commit_failing", error=error, path=str(self.store_path))
            self.bus.publish(
                "ERROR",
                "MESSAGE",
                "HIGH",
                f"the store cannot commit ({error}); presses are held in memory and retried",
            )

    # -- heartbeat -------------------------------------------------------------------

    def unhealthy(self) -> list[str]:
        """Why the heartbeat is withheld: the store fails or stalls, or a radio source is
        down."""
        reasons = []
        if not self.health.store_ok:
            reasons.append(f"store cannot commit: {self.health.store_error}")
        elif stall := self.store_stalled():
            reasons.append(f"store cannot commit: {stall}")
        for source, up in self.health.source_up.items():
            if not up:
                detail = self.health.source_detail.get(source, "")
                reasons.append(f"{source} not connected: {detail}")
        return reasons

    def readiness(self, accepting: bool) -> list[str]:
        """Why the bridge is not ready (empty: ready): what withholds the heartbeat, the
        faults a connected source reports (a deaf button, a detached controller), and not
        ``accepting`` signals."""
        reasons = self.unhealthy()
        for source, faults in self.health.source_faults.items():
            if self.health.source_up.get(source):
                reasons.extend(f"{source}: {fault}" for fault in faults)
        if not accepting:
            reasons.append("not accepting signals (starting or stopping)")
        return reasons

    # -- button health ---------------------------------------------------------------

    def health_open(self, button_id: str) -> bool:
        """Whether the button's health alert is open."""
        button = self.buttons.get(button_id)
        if button is None:
            return False
        return health_state(self.states, self.config.alert_key(button), button.id).is_open

    def _health_change(self, change: HealthChange) -> None:
        state = SignalState.ON if change.unhealthy else SignalState.OFF
        signal = Signal(
            button_id=change.button_id,
            state=state,
            origin="health",
            received_at=utcnow(),
            info=change.reason,
        )
        try:
            self.submit(signal, health=True)
        except (NotAccepting, UnknownButton, StoreError) as exc:
            log.error("health_alert_not_recorded", button=change.button_id, error=str(exc))
            return
        if change.unhealthy and "not heard" in change.summary:
            self.bus.publish(
                "WARNING", "MESSAGE", "NORMAL", change.summary, button=change.button_id
            )


def _queue_depth(queues: Queues, sink_id: str) -> float:
    return float(queues.depth().get(sink_id, 0))


def _oldest_pending_age(queues: Queues, sink_id: str) -> float:
    oldest = queues.oldest().get(sink_id)
    return 0.0 if oldest is None else queues.now() - oldest
