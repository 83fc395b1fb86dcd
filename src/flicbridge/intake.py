"""The intake: a press or signal → the state machine's decision → one commit in the store.

``Intake.press`` maps a radio gesture to a signal (mapping.py); ``Intake.submit`` takes a
signal from any origin (press, API, ingest, platform callback, health monitor), decides
it (state.py) and queues its commit: the event, the state it leaves and one outbox row per
sink, in one transaction (store.py). The committed rows go to the dispatcher.

Invariants:
- Signals are decided in arrival order, at once, on the event loop: the in-memory state
  (``states``) moves when the commit is queued, so the next signal sees it. A commit the
  store refuses outright moves nothing; a duplicate platform callback (nothing written)
  moves it back unless a later signal has moved it on since.
- A caller learns that a signal is safe only from the future ``submit`` returns, resolved
  once the commit is durable; every future is resolved (result or error), never left
  pending, even by a bug in the settling code.
- A live press is committed ahead of other alert keys' writes when nothing of its own key
  is waiting for the disk (``urgent``), so a burst from other buttons does not delay it;
  the writes of one key keep their order.
- No press is dropped silently. A press is held in memory until its commit settles; while
  the store cannot commit it is also written to the spill file (spill.py), and a press
  whose commit fails is kept there. The spill is replayed, in order, at start and when
  the store recovers. A press neither committed nor spilled counts in ``lost`` and is
  logged (``press_lost``); one the store refused outright raises a local ERROR alert too.
  API, ingest and callback callers are told of a refusal and retry themselves, so only
  presses are held.
- Local alerts (announcements, exec tokens) follow the commit, never precede it; health
  alerts announce nothing.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import structlog

from flicbridge.alerts import AlertBus
from flicbridge.config import ButtonConfig, Config
from flicbridge.core import Accepted
from flicbridge.dispatcher import Dispatcher
from flicbridge.domain import Decision, Message, Press, Signal, SignalState, utcnow
from flicbridge.errors import NotAccepting, UnknownButton
from flicbridge.health import health_key, health_state
from flicbridge.mapping import signal_for
from flicbridge.metrics import Metrics
from flicbridge.spill import Spill, to_json
from flicbridge.state import AlertState, decide
from flicbridge.status import ButtonStatus
from flicbridge.store import Committed, EventRecord, Store, StoreError

log = structlog.get_logger(__name__)

Announce = Callable[[ButtonConfig, Signal, Decision, int], None]


class Intake:
    """Decides and commits signals; holds and replays the presses the store cannot take.

    ``states`` (alert key → state) is owned here and shared read-only with the parts that
    need it. ``heard(button_id)`` tells the health monitor a press came; ``announce`` is
    called with each committed decision of a button's alert.
    """

    def __init__(
        self,
        config: Config,
        buttons: Mapping[str, ButtonConfig],
        status: Mapping[str, ButtonStatus],
        states: dict[str, AlertState],
        *,
        store: Store,
        dispatcher: Dispatcher,
        spill: Spill,
        metrics: Metrics,
        bus: AlertBus,
        heard: Callable[[str], None],
        announce: Announce,
    ) -> None:
        self.config = config
        self.buttons = buttons
        self.status = status
        self.states = states
        self.store = store
        self.dispatcher = dispatcher
        self.spill = spill
        self.metrics = metrics
        self.bus = bus
        self.heard = heard
        self.announce = announce
        self.accepting = False
        self.lost = 0  # presses neither committed nor spilled: the exit status says so
        self._pending: set[asyncio.Future[Any]] = set()
        self._committing: Counter[str] = Counter()  # alert key → its commits not yet settled
        self._held: dict[str, Signal] = {}  # spill id → press signal not yet committed
        self._spilled: set[str] = set()
        self._reuse_id: str | None = None
        self._replay: asyncio.Task[None] | None = None  # a replay started on store recovery

    async def drain(self, limit: float) -> None:
        """Wait (at most ``limit`` seconds) for the commits still in flight to settle."""
        if self._pending:
            await asyncio.wait(self._pending, timeout=limit)

    def close(self) -> None:
        """Stop taking signals; a replay under way stops (the spill file keeps the rest)."""
        self.accepting = False
        if self._replay is not None:
            self._replay.cancel()

    # -- presses ---------------------------------------------------------------------

    def press(self, press: Press) -> None:
        """A gesture arrived: map it, decide, commit; never blocks the loop."""
        button = self.buttons.get(press.button_id)
        if button is None:
            log.warning("press_unknown_button", button=press.button_id)
            return

        ctx = {"button": button.id, "click": press.click.value, "source": press.source}
        self.heard(button.id)

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
        self.status[button.id].last_press = press.pressed_at.isoformat()
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
            self.bus.publish(
                "ERROR",
                "MESSAGE",
                "HIGH",
                f"a press of {button.display_name} at {press.pressed_at.isoformat()} was LOST: "
                f"{exc}",
                button=button.id,
            )

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
        button = self.buttons.get(signal.button_id)
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
                self.status[button.id].last_decision = decision.value
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
                self.announce(button, signal, decision, c.event_id)
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

    async def replay_held(self) -> None:
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

    def store_health(self, ok: bool) -> None:
        """The store's commits fail (keep waiting presses in the spill too) or work again
        (replay what the spill holds)."""
        if not ok:  # presses already waiting on the failing store: keep them durably too
            for held_id, signal in list(self._held.items()):
                self._keep(held_id, signal)
        if ok and self.accepting and (self._replay is None or self._replay.done()):
            # Presses spilled without a place in memory (refused past max_held) commit now.
            self._replay = asyncio.get_running_loop().create_task(self.replay_held())


def press_signal(button_id: str, state: SignalState, press: Press) -> Signal:
    """The signal a press makes (as ``Intake.press`` submits it)."""
    origin = press.source if press.source == "ingest" else "press"
    return Signal(button_id, state, origin, press.received_at, press=press, info=press.info)


def spill_json(signal: Signal) -> dict[str, Any]:
    """A held press's content, for the ``press_lost`` log line."""
    return to_json(signal)
