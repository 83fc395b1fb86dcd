"""The bridge: wires sources → mapping → state machine → store → dispatcher → sinks.

Constructors only assign; ``run`` starts every unit under one TaskGroup and stops them in
order on ``stop``: sources first (no new presses), then deliveries in flight (bounded by
the HTTP timeout), then pending commits, then the store.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import Any

import structlog
from aiohttp import web

from flicbridge import __version__
from flicbridge.acks import Acknowledgements, FeedbackEvent
from flicbridge.alerts import AlertBus
from flicbridge.clock import ScheduleClock, loop_time
from flicbridge.config import ButtonConfig, Config
from flicbridge.core import Accepted, ButtonStatus, ExecToken, Health
from flicbridge.dispatcher import Dispatcher
from flicbridge.domain import Decision, Message, Press, Signal, SignalState, utcnow
from flicbridge.errors import NotAccepting, UnknownButton
from flicbridge.health import health_key, health_state
from flicbridge.heartbeat import Heartbeat
from flicbridge.mapping import signal_for
from flicbridge.metrics import Metrics
from flicbridge.notify import Notifier, watchdog_loop
from flicbridge.server.limits import BoundedRunner
from flicbridge.server.wiring import build_app
from flicbridge.sinks import build_sink
from flicbridge.sinks.base import DirectSink, Sink
from flicbridge.spill import Spill, default_path, to_json
from flicbridge.state import AlertState, decide
from flicbridge.store import AckRecord, Committed, EventRecord, OutboxRow, Store, StoreError
from flicbridge.subscriptions import Subscriptions
from flicbridge.telemetry import Telemetry
from flicbridge.tokens import Announcements, ExecTokens

log = structlog.get_logger(__name__)


class Bridge:
    """One running flicbridge. Implements ``SourceListener`` for every source."""

    def __init__(
        self,
        config: Config,
        *,
        notifier: Notifier | None = None,
        clock: Callable[[], float] = time.time,
        mono: Callable[[], float] = loop_time,
        radio: bool = True,
    ) -> None:
        self.config = config
        self.radio = radio  # False: no flicd or BLE source (a one-off send from the CLI)
        self.clock = clock  # the wall clock, which NTP may step (clock.py)
        # Lifetimes kept in this process (exec tokens, silence, uptime) are measured on a
        # clock NTP cannot step; schedules kept in the store, on the schedule clock.
        self.mono = mono
        self.schedule = ScheduleClock(clock, mono)
        self.notifier = notifier or Notifier.from_env()
        self.metrics = Metrics()
        self.alerts_bus = AlertBus()
        self.health = Health()
        self.store = Store(
            config.store.path,
            history=config.store.history,
            on_health=self._store_health,
            clock=self.schedule.now,
        )
        self.sinks: dict[str, Sink] = {s.id: build_sink(s, config.site) for s in config.sinks}
        # Shared by the parts: the intake moves ``states``; the others only read it.
        self.states: dict[str, AlertState] = {}
        self.button_config: dict[str, ButtonConfig] = {b.id: b for b in config.buttons}
        self.buttons: dict[str, ButtonStatus] = {b.id: ButtonStatus() for b in config.buttons}
        self.telemetry = Telemetry(
            config,
            self.button_config,
            self.buttons,
            self.states,
            metrics=self.metrics,
            bus=self.alerts_bus,
            health=self.health,
            store_path=config.store.path,
            submit=self.submit,  # health alerts are signals like any other
            mono=mono,
        )
        self.dispatcher = Dispatcher(
            self.store,
            self.sinks,
            timeout=config.delivery.timeout,
            backoff_initial=config.delivery.backoff_initial,
            backoff_max=config.delivery.backoff_max,
            max_age=config.delivery.max_age,
            listener=self.telemetry,
            clock=self.schedule,
        )
        self.telemetry.watch_queues(self.dispatcher, list(self.sinks))
        self.acknowledgements = Acknowledgements(
            config, self.button_config, self.states, self.store, self.metrics, self.alerts_bus
        )
        self.acks: dict[str, AckRecord] = self.acknowledgements.records
        self.tokens = ExecTokens(mono)
        self._announcements = Announcements(
            self.alerts_bus,
            self.tokens,
            alert_key=config.alert_key,
            clear_ack=self.acknowledgements.clear,
        )
        self.accepting = False
        self.started_at = mono()
        self.url: str | None = None
        self._pending: set[asyncio.Future[Any]] = set()
        self._stop = asyncio.Event()
        self._ready = asyncio.Event()
        self.subscriptions = Subscriptions(self.store, self.alerts_bus, config, self.dispatcher)
        # Sinks with a connection of their own (MQTT) run beside the dispatcher, each with
        # the alert keys (and buttons) it serves.
        self.direct_sinks: list[tuple[DirectSink, dict[str, ButtonConfig]]] = [
            (
                sink,
                {
                    config.alert_key(b): b
                    for b in config.buttons
                    if any(s.id == sink.id for s in config.sinks_of(b))
                },
            )
            for sink in self.sinks.values()
            if isinstance(sink, DirectSink)
        ]
        self.heartbeat: Heartbeat | None = None
        # Presses held while the store cannot commit, also kept in a file (spill.py).
        spill = config.store.spill
        if spill is not None and not spill.is_absolute():
            spill = config.store.path.parent / spill
        self.spill = Spill(spill or default_path(config.store.path))
        self._held: dict[str, Signal] = {}  # spill id → press signal not yet committed
        self._spilled: set[str] = set()
        self._reuse_id: str | None = None
        self.lost = 0  # presses neither committed nor spilled: the exit status says so
        self._replay: asyncio.Task[None] | None = None  # a replay started on store recovery
        self._committing: Counter[str] = Counter()  # alert key → its commits not yet settled

    # -- lifecycle -------------------------------------------------------------------

    def stop(self) -> None:
        """Ask ``run`` to shut down (SIGTERM)."""
        self._stop.set()

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def run(self) -> None:
        """Run until ``stop``; raises StoreError when the store cannot be opened."""
        await self.store.open()
        runner: web.AppRunner | None = None
        try:
            self.states.update(await self.store.alerts())  # shared: filled, never rebound
            pushover = await self.acknowledgements.load(self.sinks)
            self.telemetry.start()
            await self.dispatcher.prepare()  # finds the backlog's lanes; rows stay on disk
            runner = BoundedRunner(build_app(self), access_log=None, handle_signals=False)
            await runner.setup()
            site = web.TCPSite(runner, self.config.server.host, self.config.server.port)
            await site.start()
            self.url = _site_url(runner)
            self.accepting = True
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.dispatcher.run(), name="dispatcher")
                tg.create_task(self._replay_held(), name="replay-held")
                sources = [tg.create_task(c, name=n) for n, c in self._sources()]
                extras = [tg.create_task(self.subscriptions.run(), name="subscriptions")]
                extras += [
                    tg.create_task(sink.run(self, keys), name=f"sink:{sink.id}")
                    for sink, keys in self.direct_sinks
                ]
                tg.create_task(watchdog_loop(self.notifier), name="watchdog")
                tg.create_task(self.telemetry.run(), name="button-health")
                for sink in pushover:
                    on_ack = self.acknowledgements.receipt_acknowledged
                    tg.create_task(sink.watch(on_ack), name="pushover")
                if self.config.heartbeat.url is not None:
                    self.heartbeat = Heartbeat(self.config.heartbeat, self.telemetry.unhealthy)
                    tg.create_task(self.heartbeat.run(), name="heartbeat")
                await asyncio.sleep(0)  # let sources make their first connection attempt
                self.notifier.ready(f"listening on {self.url}")
                self._ready.set()
                log.info("started", version=__version__, url=self.url, sinks=list(self.sinks))
                await self._stop.wait()
                log.info("stopping")
                self.notifier.stopping()
                self.accepting = False
                for task in sources + extras:
                    task.cancel()
                await self.dispatcher.stop()
                if self._pending:
                    await asyncio.wait(self._pending, timeout=self.config.delivery.timeout)
                # Unwind the TaskGroup: every remaining task (dispatcher, watchdog) is cancelled.
                raise _Stopped
        except* _Stopped:
            pass
        finally:
            self.accepting = False
            self.acknowledgements.cancel_feedback()
            if self._replay is not None:
                self._replay.cancel()  # what it has not committed stays in the spill file
            if runner is not None:
                await runner.cleanup()
            await self.store.close()
            log.info("stopped")

    def _sources(self) -> list[tuple[str, Any]]:
        coroutines: list[tuple[str, Any]] = []
        if not self.radio:
            return coroutines

        def addresses(source: str) -> dict[str, str]:
            """Address → button id of the buttons this source serves."""
            return {
                b.address.lower(): b.id
                for b in self.config.buttons
                if b.source == source and b.address is not None
            }

        flicd_buttons = addresses("flicd")
        if flicd_buttons:
            from flicbridge.sources.flicd import FlicdSource

            source = FlicdSource(
                host=self.config.flicd.host,
                port=self.config.flicd.port,
                buttons=flicd_buttons,
                listener=self,
                reconnect_max=self.config.flicd.reconnect_max,
                ping_interval=self.config.flicd.ping_interval,
            )
            self.health.source_up["flicd"] = False
            self.health.source_detail["flicd"] = "connecting"
            coroutines.append(("source:flicd", source.run()))
        ble_buttons = addresses("ble")
        if ble_buttons:
            from flicbridge.sources.ble import BleSource  # loads pyflic-ble only in its run()

            ble = BleSource(
                buttons=ble_buttons,
                listener=self,
                pairings=self.config.store.path.parent / "ble-pairings.json",
            )
            self.health.source_up["ble"] = False
            self.health.source_detail["ble"] = "starting"
            coroutines.append(("source:ble", ble.run()))
        return coroutines

    # -- SourceListener --------------------------------------------------------------

    def press(self, press: Press) -> None:
        """A gesture arrived: map it, decide, commit; never blocks the loop."""
        button = self.button_config.get(press.button_id)
        if button is None:
            log.warning("press_unknown_button", button=press.button_id)
            return

        ctx = {"button": button.id, "click": press.click.value, "source": press.source}
        self.telemetry.heard(button.id)

        max_age = self.config.alerts.max_press_age
        if press.queued:
            log.info(
                "late_press",
                **ctx,
                delay_s=round(press.delay_s, 3),
                pressed_at=press.pressed_at.isoformat(),
            )
        if max_age and press.delay_s > max_age:
            log.warning(
                "press_dropped_too_old", **ctx, delay_s=press.delay_s, max_press_age=max_age
            )
            self.metrics.dropped_presses.labels(button.id).inc()
            return
        state = self._state(button)
        signal_state = signal_for(button, press.click, state.is_open)
        if signal_state is None:
            log.info("press_unmapped", **ctx)
            return
        self.buttons[button.id].last_press = press.pressed_at.isoformat()
        try:
            self.submit(
                Signal(
                    button_id=button.id,
                    state=signal_state,
                    origin="press",
                    received_at=press.received_at,
                    press=press,
                    info=press.info,
                )
            )
        except NotAccepting:
            log.warning("press_refused_shutting_down", **ctx)
        except StoreError as exc:  # the store is failing and holds all it may (store.py)
            if self._keep(secrets.token_hex(8), press_signal(button.id, signal_state, press)):
                return
            self.lost += 1
            log.error(
                "press_lost",
                **ctx,
                reason=str(exc),
                state=signal_state.value,
                pressed_at=press.pressed_at.isoformat(),
                queued=press.queued,
            )
            self.alerts_bus.publish(
                "ERROR",
                "MESSAGE",
                "HIGH",
                f"a press of {button.display_name} at {press.pressed_at.isoformat()} was LOST: "
                f"{exc}",
                button=button.id,
            )

    def link(self, source: str, up: bool, detail: str) -> None:
        self.telemetry.link(source, up, detail)

    def faults(self, source: str, reasons: list[str]) -> None:
        self.telemetry.faults(source, reasons)

    def button_link(self, button_id: str, connected: bool, detail: str) -> None:
        self.telemetry.button_link(button_id, connected, detail)

    def battery(self, button_id: str, percent: int) -> None:
        self.telemetry.battery(button_id, percent)

    # -- the pipeline ----------------------------------------------------------------

    def _state(self, button: ButtonConfig) -> AlertState:
        key = self.config.alert_key(button)
        state = self.states.get(key)
        if state is None:
            state = AlertState(alert_key=key, button_id=button.id)
        return state

    def submit(
        self, signal: Signal, *, callback: tuple[str, str] | None = None, health: bool = False
    ) -> asyncio.Future[Accepted]:
        """Decide ``signal`` now (arrival order) and commit it; the future says when it is safe.

        ``callback`` = (source, event id) makes a repeat of the same callback a no-op.
        ``health`` moves the button's health alert (``<alert key>/health``) instead.
        """
        if not self.accepting:
            raise NotAccepting("shutting down")
        button = self.button_config.get(signal.button_id)
        if button is None:
            raise UnknownButton(signal.button_id)
        now = utcnow()
        before = (
            health_state(self.states, self.config.alert_key(button), button.id)
            if health
            else self._state(button)
        )
        decision, after = decide(before, signal.state, now, self.config.alerts.suppress_repeat_for)
        sends = decision.sends and not signal.local_only
        messages = (
            [
                (sink.id, self._message(button, signal, decision))
                for sink in self.config.sinks_of(button)
            ]
            if sends and not health
            else []
        )
        if sends and health:
            messages = self._health_messages(button, signal, decision)
        press = signal.press
        event = EventRecord(
            button_id=button.id,
            alert_key=after.alert_key,
            origin=signal.origin + (" (rearm)" if signal.local_only else ""),
            state=signal.state.value,
            click=press.click.value if press else "",
            decision=decision.value,
            received_at=signal.received_at,
            pressed_at=press.pressed_at if press else signal.received_at,
            delay_s=press.delay_s if press else 0.0,
            queued=press.queued if press else False,
            info=signal.info,
            actor=signal.actor,
        )
        # The decision is made; state moves now so the next signal sees it (arrival order).
        previous = self.states.get(after.alert_key)
        started = time.perf_counter()
        steps = self.dispatcher.steps  # the rows' times are on the schedule clock as of now
        # A live press (nothing of its key waiting for the disk) is committed ahead of
        # other keys' writes: a burst from other buttons does not delay it.
        key = after.alert_key
        urgent = not self._committing[key]
        committed = self.store.commit_event(
            event, after, messages, callback=callback, urgent=urgent
        )
        self._committing[key] += 1
        self.states[after.alert_key] = after  # after commit_event: a refusal moves nothing
        held_id = self._hold(signal)
        result: asyncio.Future[Accepted] = asyncio.get_running_loop().create_future()
        self._pending.add(result)
        result.add_done_callback(self._pending.discard)

        def on_commit(done: asyncio.Future[Committed]) -> None:
            self._committing[key] -= 1
            if not self._committing[key]:
                del self._committing[key]
            try:
                settle(done)
            except Exception as exc:  # never leave a caller waiting on a bug of ours
                log.exception("commit_callback_failed", button=button.id)
                if not result.done():
                    result.set_exception(exc)

        def settle(done: asyncio.Future[Committed]) -> None:
            if done.cancelled() or done.exception() is not None:
                error = done.exception() if not done.cancelled() else None
                log.error(
                    "commit_failed",
                    button=button.id,
                    error=str(error),
                    origin=signal.origin,
                    state=signal.state.value,
                    decision=decision.value,
                    click=event.click or None,
                    pressed_at=event.pressed_at.isoformat(),
                )
                self._release(held_id, committed=False)
                if not result.done():
                    result.set_exception(error or RuntimeError("commit cancelled"))
                return
            self._release(held_id, committed=True)
            c = done.result()
            if c.duplicate:
                # Nothing was written: undo the in-memory move, unless a later signal for
                # the same key has moved the state on since.
                if self.states.get(after.alert_key) is after:
                    if previous is None:
                        self.states.pop(after.alert_key, None)
                    else:
                        self.states[after.alert_key] = previous
                log.info("callback_duplicate", button=button.id, origin=signal.origin)
                result.set_result(Accepted(0, decision, (), duplicate=True))
                return
            current = self.states[after.alert_key]
            self.states[after.alert_key] = replace(current, last_event=c.event_id)
            self.metrics.commit_seconds.observe(time.perf_counter() - started)
            self.metrics.presses.labels(button.id, signal.origin, decision.value).inc()
            if not health:
                self.buttons[button.id].last_decision = decision.value
            log.info(
                "accepted",
                button=button.id,
                alert_key=after.alert_key,
                origin=signal.origin,
                state=signal.state.value,
                decision=decision.value,
                event_id=c.event_id,
                rows=len(c.rows),
                click=event.click or None,
                delay_s=round(event.delay_s, 3) if event.queued else None,
                local_only=signal.local_only or None,
            )
            self.dispatcher.add(c.rows, since=steps)
            if not health:
                self._announcements.announce(button, signal, decision, c.event_id)
            result.set_result(Accepted(c.event_id, decision, c.rows))

        committed.add_done_callback(on_commit)
        return result

    def _message(self, button: ButtonConfig, signal: Signal, decision: Decision) -> Message:
        press = signal.press
        info = button.info
        if signal.info:
            info = f"{info} — {signal.info}" if info else signal.info
        return Message(
            alert_key=self.config.alert_key(button),
            button_id=button.id,
            button_name=button.display_name,
            name_id=button.name_id or self.config.alert_key(button),
            info=info,
            state=SignalState.ON if decision.action == "open" else SignalState.OFF,
            action=decision.action,
            click=press.click.value if press else "",
            pressed_at=press.pressed_at if press else signal.received_at,
            delay_s=press.delay_s if press else 0.0,
            site=self.config.site or "",
            severity=button.severity,
            event=0,
            origin=signal.origin,
            queued=press.queued if press else False,
        )

    # -- button health ---------------------------------------------------------------

    def _health_messages(
        self, button: ButtonConfig, signal: Signal, decision: Decision
    ) -> list[tuple[str, Message]]:
        """The health alert's messages: severity warning, the reason as info."""
        wanted = self.config.alerts.health_sinks
        sinks = (
            self.config.sinks_of(button)
            if wanted is None
            else tuple(s for s in self.config.sinks if s.id in wanted)
        )
        key = health_key(self.config.alert_key(button))
        base = replace(
            self._message(button, signal, decision),
            alert_key=key,
            name_id=key,
            info=signal.info,
            severity="warning",
        )
        return [(sink.id, base) for sink in sinks]

    # -- held presses (spill.py) -----------------------------------------------------

    def _hold(self, signal: Signal) -> str | None:
        """Track a press until its commit; spill it at once if the store is failing."""
        if signal.press is None:
            return None  # API, ingest and callback callers are told and retry themselves
        held_id, self._reuse_id = self._reuse_id or secrets.token_hex(8), None
        self._held[held_id] = signal
        if not self.store.healthy:
            self._keep(held_id, signal)
        return held_id

    def _keep(self, held_id: str, signal: Signal) -> bool:
        """Write a held press to the spill file; False (logged) when that fails too."""
        if held_id in self._spilled:
            return True
        try:
            self.spill.hold(held_id, signal)
        except OSError as exc:
            log.error("spill_failed", path=str(self.spill.path), error=str(exc))
            return False
        self._spilled.add(held_id)
        log.warning("press_spilled", button=signal.button_id, path=str(self.spill.path))
        return True

    def _release(self, held_id: str | None, *, committed: bool) -> None:
        if held_id is None:
            return
        signal = self._held.pop(held_id, None)
        if held_id not in self._spilled:
            if not committed and signal is not None and not self._keep(held_id, signal):
                self.lost += 1
                log.error("press_lost", **spill_json(signal))
            return
        if committed:
            self._spilled.discard(held_id)
            try:
                self.spill.done(held_id)
            except OSError as exc:  # replayed again at next start: a repeat On is appended
                log.warning("spill_done_failed", path=str(self.spill.path), error=str(exc))

    async def _replay_held(self) -> None:
        """Commit, in order, the presses a previous run (or a refusal) left in the spill."""
        held = [(i, s) for i, s in self.spill.pending() if i not in self._held]
        if not held:
            return
        log.warning("held_presses_replayed", count=len(held), path=str(self.spill.path))
        waits = []
        for held_id, signal in held:
            self._reuse_id = held_id
            self._spilled.add(held_id)
            try:
                waits.append(self.submit(signal))
            except (StoreError, UnknownButton, NotAccepting) as exc:
                self._reuse_id = None
                log.error("held_press_not_replayed", error=str(exc), **spill_json(signal))
        results = await asyncio.gather(*waits, return_exceptions=True)
        if not any(isinstance(r, BaseException) for r in results) and not self._spilled:
            self.spill.clear()

    # -- store health ----------------------------------------------------------------

    def _store_health(self, ok: bool, error: str) -> None:
        if not ok:  # presses already waiting on the failing store: keep them durably too
            for held_id, signal in list(self._held.items()):
                self._keep(held_id, signal)
        if ok and self.accepting and (self._replay is None or self._replay.done()):
            # Presses spilled without a place in memory (refused past max_held) commit now.
            self._replay = asyncio.get_running_loop().create_task(self._replay_held())
        self.telemetry.store_health(ok, error)

    # -- operator actions ------------------------------------------------------------

    async def drop(self, row_id: int) -> bool:
        """Delete a pending or dead row (an operator's choice); False if there is none."""
        dropped = await self.store.drop(row_id)
        if dropped is None:
            return False
        status, sink_id = dropped
        if status == "pending":
            self.dispatcher.forget(row_id, sink_id)
        return True

    async def requeue(self, row_id: int | None) -> list[OutboxRow]:
        steps = self.dispatcher.steps
        rows = await self.store.requeue(row_id)
        self.dispatcher.add(rows, since=steps)
        return rows

    def acknowledge(
        self, button_id: str, by: str, at: datetime | None = None, *, source: str
    ) -> AckRecord | None:
        """Record an acknowledgement of the button's open alert (``Acknowledgements``)."""
        return self.acknowledgements.acknowledge(button_id, by, at, source=source)

    def feedback(self, event: FeedbackEvent, button_id: str, by: str) -> None:
        """Start ``[feedback] command`` in the background (nothing when none is set)."""
        self.acknowledgements.feedback(event, button_id, by)

    def exec_token(self, token: str) -> ExecToken:
        """Take a single-use token for its action (``ExecTokens.take``)."""
        return self.tokens.take(token)

    def token_done(self, token: str, *, committed: bool) -> None:
        """The token's action was committed (spent) or not (usable again)."""
        self.tokens.done(token, committed=committed)


def press_signal(button_id: str, state: SignalState, press: Press) -> Signal:
    """The signal a press makes (as ``Bridge.press`` submits it)."""
    origin = press.source if press.source == "ingest" else "press"
    return Signal(button_id, state, origin, press.received_at, press=press, info=press.info)


def spill_json(signal: Signal) -> dict[str, Any]:
    """A held press's content, for the ``press_lost`` log line."""
    return to_json(signal)


class _Stopped(Exception):
    """Raised inside the TaskGroup to unwind it after an orderly stop."""


def _site_url(runner: web.AppRunner) -> str | None:
    for site in runner.sites:
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        for sock in sockets:
            host, port = sock.getsockname()[:2]
            return f"http://{host}:{port}"
    return None
