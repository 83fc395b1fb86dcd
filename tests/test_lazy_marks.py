"""Delivered marks without an fsync of their own, and what a power cut could repeat.

A lane marks a row delivered before sending its next one. The mark is committed lazily
(no fsync) when the next row has the same action; before a row of the other action goes
out, the key's lazy marks are made durable. Asserted at every real send: no row goes out
while a mark of its key with the other action is not yet durable (``Store.synced``), so a
power cut could only repeat a run of one action, never re-open a closed alert.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import flicbridge.dispatcher as dispatcher_module
from flicbridge.domain import Message, Signal, SignalState, utcnow
from tests.conftest import make_config, running
from tests.receiver import Receiver

PRESSES = ["On", "On", "Off", "On", "Off", "On", "On", "Off"]
ACTIONS = ["open", "open", "close", "open", "close", "open", "open", "close"]


async def test_no_row_of_the_other_action_goes_out_before_the_marks_are_durable(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    sinks = [{"id": "hook", "type": "webhook", "url": f"{receiver.url}/hook"}]
    config = make_config(tmp_path, sinks=sinks, alerts={"suppress_repeat_for": 0})
    receiver.default = (503, {"error": "down"}, {})
    async with running(config) as bridge:  # the rows wait on disk while the sink is down
        for state in PRESSES:
            signal = Signal("desk", SignalState(state), origin="api", received_at=utcnow())
            await bridge.submit(signal)
    # One row in memory per lane: every next row is read from disk after its predecessor
    # is marked, so its action is unknown at the mark (the lazy path, then a sync).
    monkeypatch.setattr(dispatcher_module, "WINDOW", 1)
    sent: list[tuple[str, int, int]] = []  # (action, store.synced, marks so far) per send
    marks: list[tuple[str, bool, int]] = []  # (action, durable, batch) of each mark
    syncs = 0
    async with running(config) as bridge:
        store = bridge.store
        actions = {row.id: row.message.action for row in await store.rows("pending")}
        assert sorted(actions.values()) == sorted(ACTIONS)
        real_attempt, real_mark, real_sync = (
            dispatcher_module.attempt,
            store.mark_delivered,
            store.sync,
        )

        async def spy_attempt(session: Any, sink: Any, message: Message, timeout: float) -> Any:
            sent.append((message.action, store.synced, len(marks)))
            return await real_attempt(session, sink, message, timeout)

        def spy_mark(row_id: int, status: int | None, *, durable: bool = True) -> Any:
            future = real_mark(row_id, status, durable=durable)
            future.add_done_callback(lambda f: marks.append((actions[row_id], durable, f.result())))
            return future

        def spy_sync() -> Any:
            nonlocal syncs
            syncs += 1
            return real_sync()

        monkeypatch.setattr(dispatcher_module, "attempt", spy_attempt)
        monkeypatch.setattr(store, "mark_delivered", spy_mark)
        monkeypatch.setattr(store, "sync", spy_sync)
        receiver.default = (202, {"status": "ok"}, {})  # the sink is back: the lane drains
        async with asyncio.timeout(15):
            while len(marks) < len(PRESSES):
                await asyncio.sleep(0.01)
    delivered = [r.body["action"] for r in receiver.requests]
    assert [action for action, _, _ in marks] == ACTIONS  # in order, each once
    assert delivered[-len(ACTIONS) :] == ACTIONS
    checked = 0
    for action, synced, seen in sent:  # every send, refused or not
        other = [batch for a, _, batch in marks[:seen] if a != action]
        assert all(batch <= synced for batch in other), (action, synced, marks[:seen])
        checked += bool(other)
    assert checked >= 5  # sends that followed a mark of the other action
    assert any(not durable for _, durable, _ in marks)  # the fast path was taken
    assert syncs >= 1  # and paid for where the action changed
