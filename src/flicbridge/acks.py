"""Acknowledgements: who said "help is coming" for a button's open alert, and what follows.

A responder acknowledges through a platform callback, the API, or a Pushover emergency
receipt; ``Acknowledgements.acknowledge`` records it, counts it, tells the local screens
(a HIGH INFO alert) and runs the ``[feedback] command``.

Invariants:
- Only an open alert of a configured button is acknowledged; anything else is logged and
  ignored (an unknown button raises UnknownButton). A repeat replaces the record.
- A record is in memory (``records``, alert key → record) at once and written to the store
  in the background; a failed write is logged, never raised. ``load`` reads the records
  back at start, so a restart keeps them. A new open of the alert forgets its record
  (``clear``), in memory and in the store.
- A Pushover receipt acknowledged before the alert's current open belongs to an earlier
  open and is ignored; Pushover sinks get their kept receipts at start and keep new ones
  in the store through ``remember``.

The ``[feedback] command``, run beside the button: when a responder acknowledges (or a
platform resolves) a button's alert, the bridge may run a local command — a sound, a GPIO
lamp — so the person who pressed learns that help is coming. The command is an argv list
run without a shell, with three environment variables added: ``FLICBRIDGE_EVENT``
(``acknowledged`` or ``resolved``), ``FLICBRIDGE_BUTTON`` (the button id) and
``FLICBRIDGE_BY`` (who, possibly empty). It runs in the background with a timeout: a
command that fails, hangs or does not exist is logged and killed, and never delays a press
or an HTTP answer. The bridge's stop cancels (and kills) a command still running.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Literal

import structlog

from flicbridge.alerts import AlertBus
from flicbridge.config import ButtonConfig, Config
from flicbridge.domain import utcnow
from flicbridge.errors import UnknownButton
from flicbridge.metrics import Metrics
from flicbridge.sinks.base import Sink
from flicbridge.sinks.pushover import PushoverSink
from flicbridge.state import AlertState
from flicbridge.store import AckRecord, Store

log = structlog.get_logger(__name__)

FeedbackEvent = Literal["acknowledged", "resolved"]


async def run_feedback(
    command: Sequence[str],
    limit_s: float,
    *,
    event: FeedbackEvent,
    button: str,
    by: str,
) -> int | None:
    """Run ``command`` once; its exit code, or None when it could not start or timed out."""
    env = {**os.environ, "FLICBRIDGE_EVENT": event, "FLICBRIDGE_BUTTON": button}
    env["FLICBRIDGE_BY"] = by
    ctx = {"button": button, "feedback_event": event, "program": command[0]}
    try:
        process = await asyncio.create_subprocess_exec(
            *command,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        log.error("feedback_failed", **ctx, error=str(exc))
        return None
    try:
        async with asyncio.timeout(limit_s or None):
            _, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        log.error("feedback_timeout", **ctx, timeout_s=limit_s)
        return None
    except asyncio.CancelledError:
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise
    code = process.returncode
    if code != 0:
        tail = stderr.decode(errors="replace").strip()[-500:]
        log.error("feedback_failed", **ctx, exit_code=code, stderr=tail or None)
    else:
        log.info("feedback_ran", **ctx)
    return code


class Acknowledgements:
    """The acknowledgements of open alerts, their Pushover receipts and feedback commands.

    ``states`` (alert key → state) is the intake's, read only here.
    """

    def __init__(
        self,
        config: Config,
        buttons: Mapping[str, ButtonConfig],
        states: Mapping[str, AlertState],
        store: Store,
        metrics: Metrics,
        bus: AlertBus,
    ) -> None:
        self.config = config
        self.buttons = buttons
        self.states = states
        self.store = store
        self.metrics = metrics
        self.bus = bus
        self.records: dict[str, AckRecord] = {}  # alert key → its acknowledgement (open alerts)
        self.feedback_tasks: set[asyncio.Task[int | None]] = set()

    async def load(self, sinks: Mapping[str, Sink]) -> list[PushoverSink]:
        """Read the kept acknowledgements; give each Pushover sink its kept receipts and a
        way to keep new ones. The Pushover sinks, whose receipts ``watch`` should poll."""
        self.records.update(await self.store.acks())
        pushover = [s for s in sinks.values() if isinstance(s, PushoverSink)]
        kept = await self.store.receipts() if pushover else {}
        for sink in pushover:
            sink.receipts.update(kept.get(sink.id, {}))
            sink.remember = functools.partial(self._keep_receipt, sink.id)
        return pushover

    def _keep_receipt(self, sink_id: str, alert_key: str, receipt: str | None) -> None:
        saved = self.store.save_receipt(sink_id, alert_key, receipt)
        _persist(saved, "receipt_save_failed", f"{sink_id}/{alert_key}")

    def receipt_acknowledged(self, alert_key: str, by: str, at: datetime | None) -> None:
        """Pushover says someone acknowledged the emergency message of ``alert_key``."""
        state = self.states.get(alert_key)
        button = self.buttons.get(state.button_id) if state else None
        if button is None or self.config.alert_key(button) != alert_key:
            log.info("ack_ignored_not_a_button_alert", alert_key=alert_key, source="pushover")
            return
        opened = state.opened_at if state else None
        if at is not None and opened is not None and at < opened:
            # The receipt of an earlier open of this alert, acknowledged before this one.
            log.info("ack_ignored_before_open", button=button.id, source="pushover")
            return
        self.acknowledge(button.id, by, at, source="pushover")

    def acknowledge(
        self, button_id: str, by: str, at: datetime | None = None, *, source: str
    ) -> AckRecord | None:
        """Record that ``by`` acknowledged the button's open alert (from ``source``).

        Returns the record, or None when the alert is not open (nothing to acknowledge;
        logged). Raises UnknownButton. The record is kept in memory at once and written to
        the store in the background; a repeat replaces it. Publishes a HIGH INFO local
        alert, counts it, and runs ``[feedback] command``.
        """
        button = self.buttons.get(button_id)
        if button is None:
            raise UnknownButton(button_id)
        key = self.config.alert_key(button)
        state = self.states.get(key)
        if state is None or not state.is_open:
            log.info("ack_ignored_not_open", button=button_id, source=source, by=by or None)
            return None
        at = at or utcnow()
        record = AckRecord(key, button.id, by, at, source)
        self.records[key] = record
        _persist(self.store.save_ack(record), "ack_save_failed", button.id)
        if state.opened_at is not None:
            waited = max((at - state.opened_at).total_seconds(), 0.0)
            self.metrics.time_to_ack.labels(button.id).observe(waited)
        self.metrics.acknowledgements.labels(button.id, source).inc()
        who = by or "someone"
        log.info("acknowledged", button=button.id, source=source, by=by or None)
        self.bus.publish(
            "INFO",
            "MESSAGE",
            "HIGH",
            f"{button.display_name}: {who} acknowledged the alert (via {source}); help is coming",
            event=state.last_event,
            button=button.id,
        )
        self.feedback("acknowledged", button.id, by)
        return record

    def feedback(self, event: FeedbackEvent, button_id: str, by: str) -> None:
        """Start ``[feedback] command`` in the background (nothing when none is set)."""
        command = self.config.feedback.command
        if not command:
            return
        task = asyncio.get_running_loop().create_task(
            run_feedback(
                command, self.config.feedback.timeout, event=event, button=button_id, by=by
            ),
            name=f"feedback:{button_id}",
        )
        self.feedback_tasks.add(task)
        task.add_done_callback(self.feedback_tasks.discard)

    def clear(self, alert_key: str) -> None:
        """The alert opened anew: its previous acknowledgement no longer holds."""
        if self.records.pop(alert_key, None) is not None:
            _persist(self.store.clear_ack(alert_key), "ack_clear_failed", alert_key)

    def cancel_feedback(self) -> None:
        """Stop every feedback command still running (the bridge is stopping)."""
        for task in list(self.feedback_tasks):
            task.cancel()


def _persist(future: asyncio.Future[None], event: str, subject: str) -> None:
    """Log (as ``event``) a background store write that failed."""

    def done(f: asyncio.Future[None]) -> None:
        if not f.cancelled() and f.exception() is not None:
            log.error(event, subject=subject, error=str(f.exception()))

    future.add_done_callback(done)
