"""The state machine and the outbox against a simple model (Hypothesis, stateful).

The system under test is what the bridge does with a signal, minus the sockets: the
real ``flicbridge.state.decide`` and the real ``Store`` on a real SQLite file, restarted
at random. The model is a few dicts: an open flag per alert key, the time of the last
On sent, and per (sink, alert key) the FIFO of undelivered rows. After every step the
store must hold exactly what the model says.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from flicbridge.domain import Decision, Message, SignalState
from flicbridge.state import AlertState, decide
from flicbridge.store import EventRecord, Store

SUPPRESS = 60.0
SINKS_OF = {"a": ("s1", "s2"), "b": ("s1",)}  # button "b" sends to one sink only
KEYS = tuple(SINKS_OF)
START = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class ModelRow:
    row_id: int
    event_id: int
    action: str
    attempts: int = 0


class OutboxMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="fb-model-"))
        self.loop = asyncio.new_event_loop()
        self.store = self.open_store()
        self.now = START
        # What the bridge keeps in memory (reloaded from the store at every restart).
        self.states: dict[str, AlertState] = self.run(self.store.alerts())
        # The model.
        self.is_open: dict[str, bool] = dict.fromkeys(KEYS, False)
        self.last_on: dict[str, datetime | None] = dict.fromkeys(KEYS)
        self.lanes: dict[tuple[str, str], list[ModelRow]] = {
            (sink, key): [] for key, sinks in SINKS_OF.items() for sink in sinks
        }
        self.dead: dict[int, tuple[tuple[str, str], ModelRow]] = {}
        self.events = 0
        self.callbacks: set[tuple[str, str]] = set()

    # -- plumbing -------------------------------------------------------------------------

    def run(self, awaitable: Any) -> Any:
        return self.loop.run_until_complete(awaitable)

    def open_store(self) -> Store:
        store = Store(self.dir / "flicbridge.db", history=2)  # trimming runs, and must spare
        self.run(store.open())  # pending and dead rows
        return store

    def teardown(self) -> None:
        self.run(self.store.close())
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- the model's own table ----------------------------------------------

    def expected(self, key: str, state: str) -> str:
        if state == "On":
            if not self.is_open[key]:
                return "open"
            last = self.last_on[key]
            if last is not None and (self.now - last).total_seconds() < SUPPRESS:
                return "appended"
            return "resent"
        return "close" if self.is_open[key] else "ignored"

    # -- rules ----------------------------------------------------------------------------

    def signal(
        self,
        key: str,
        state: str,
        *,
        local_only: bool = False,
        callback: tuple[str, str] | None = None,
    ) -> None:
        before = self.states.get(key) or AlertState(alert_key=key, button_id=key)
        decision, after = decide(before, SignalState(state), self.now, SUPPRESS)
        sends = decision.sends and not local_only
        message = Message(
            key,
            key,
            key,
            key,
            "",
            SignalState.ON if decision.action == "open" else SignalState.OFF,
            decision.action,
            "",
            self.now,
            0.0,
            "",
            "critical",
            0,
        )
        event = EventRecord(
            key,
            key,
            "callback" if callback else "press",
            state,
            "",
            decision.value,
            self.now,
            self.now,
            0.0,
            False,
            "",
            "",
        )
        messages = [(sink, message) for sink in SINKS_OF[key]] if sends else []
        committed = self.run(self.store.commit_event(event, after, messages, callback=callback))
        if callback is not None and callback in self.callbacks:
            assert committed.duplicate and not committed.rows
            return  # a repeated callback changes nothing
        assert not committed.duplicate
        if callback is not None:
            self.callbacks.add(callback)
        assert decision.value == self.expected(key, state)
        self.states[key] = replace(after, last_event=committed.event_id)
        self.events += 1
        if decision in (Decision.OPEN, Decision.RESENT):
            self.last_on[key] = self.now
        self.is_open[key] = decision in (Decision.OPEN, Decision.RESENT, Decision.APPENDED)
        assert len(committed.rows) == len(messages)
        for row in committed.rows:
            assert row.message.event == committed.event_id
            self.lanes[(row.sink_id, key)].append(
                ModelRow(row.id, committed.event_id, decision.action)
            )

    @rule(key=st.sampled_from(KEYS), state=st.sampled_from(["On", "Off"]), wait=st.integers(0, 120))
    def press(self, key: str, state: str, wait: int) -> None:
        self.now += timedelta(seconds=wait)
        self.signal(key, state)

    @rule(
        key=st.sampled_from(KEYS),
        action=st.sampled_from(["close", "rearm"]),
        source=st.sampled_from(["ilert", "flashduty"]),
        event_id=st.integers(0, 4),
    )
    def callback(self, key: str, action: str, source: str, event_id: int) -> None:
        """A platform closes (Off to every sink) or re-arms (closed locally only)."""
        self.signal(key, "Off", local_only=action == "rearm", callback=(source, str(event_id)))

    @precondition(lambda self: any(self.lanes.values()))
    @rule(data=st.data(), outcome=st.sampled_from(["delivered", "retry", "dead"]))
    def attempt(self, data: st.DataObject, outcome: str) -> None:
        """The dispatcher tries the head of a lane (the lowest pending id of that lane)."""
        lane = data.draw(st.sampled_from(sorted(k for k, rows in self.lanes.items() if rows)))
        pending = [r for r in self.run(self.store.pending()) if (r.sink_id, r.alert_key) == lane]
        head, expected = pending[0], self.lanes[lane][0]
        assert (head.id, head.message.event, head.message.action) == (
            expected.row_id,
            expected.event_id,
            expected.action,
        )
        if outcome == "delivered":
            self.run(self.store.mark_delivered(head.id, 200))
            self.lanes[lane].pop(0)
        elif outcome == "retry":
            attempts = head.attempts + 1
            self.run(self.store.schedule_retry(head.id, attempts, 0.0, 503, "HTTP 503"))
            self.lanes[lane][0] = replace(expected, attempts=attempts)
        else:
            self.run(self.store.dead_letter(head.id, head.attempts + 1, 400, "HTTP 400"))
            self.dead[head.id] = (lane, replace(expected, attempts=head.attempts + 1))
            self.lanes[lane].pop(0)

    @precondition(lambda self: bool(self.dead))
    @rule(data=st.data())
    def requeue(self, data: st.DataObject) -> None:
        """An operator re-queues a dead row: pending again, in id order within its lane."""
        row_id = data.draw(st.sampled_from(sorted(self.dead)))
        rows = self.run(self.store.requeue(row_id))
        assert [r.id for r in rows] == [row_id]
        lane, row = self.dead.pop(row_id)
        self.lanes[lane] = sorted(
            [*self.lanes[lane], replace(row, attempts=0)], key=lambda r: r.row_id
        )

    @rule()
    def restart(self) -> None:
        """The daemon stops and starts: state and outbox come back from the file."""
        self.run(self.store.close())
        self.store = self.open_store()
        self.states = self.run(self.store.alerts())

    # -- what must always hold ---------------------------------------------------------------

    @invariant()
    def outbox_matches_the_model(self) -> None:
        got: dict[tuple[str, str], list[ModelRow]] = {lane: [] for lane in self.lanes}
        for r in self.run(self.store.pending()):
            got[(r.sink_id, r.alert_key)].append(
                ModelRow(r.id, r.message.event, r.message.action, r.attempts)
            )
        assert got == self.lanes
        dead = {
            r.id: (r.message.event, r.message.action)
            for r in self.run(self.store.rows("dead", 10_000))
        }
        assert dead == {i: (row.event_id, row.action) for i, (_, row) in self.dead.items()}

    @invariant()
    def state_matches_the_model(self) -> None:
        stored = self.run(self.store.alerts())
        for key in KEYS:
            assert bool(stored.get(key) and stored[key].is_open) == self.is_open[key]
            assert bool(self.states.get(key) and self.states[key].is_open) == self.is_open[key]
            if key in stored:
                assert stored[key].last_on_sent_at == self.last_on[key]
        assert self.events == len(self.run(self.store.recent_events(100_000)))


OutboxMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestOutboxModel = OutboxMachine.TestCase
