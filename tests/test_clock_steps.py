"""Wall-clock steps (NTP on a Pi without a real-time clock) move no schedule.

Each scenario runs on the time-accelerated loop of ``test_faults``: the bridge's wall clock
is the loop's epoch clock plus a step the test sets, its monotonic clock is the loop's.
Every bound is asserted in loop time, never wall-clock time.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import running
from tests.receiver import Receiver
from tests.test_faults import (
    accelerated,
    arrived,
    eventually,
    hook_config,
    loop,
    pending_and_dead,
    scripted,
    settled,
    signal,
)

DAY = 86400.0


def stepped(step: list[float]) -> Callable[[], float]:
    """The loop's wall clock, moved by ``step[0]`` seconds (a step the test makes)."""
    return lambda: loop().wall() + step[0]


def stored_created_at(path: Path) -> list[float]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT created_at FROM outbox WHERE status = 'pending'")
        return [float(r[0]) for r in rows]


def test_a_forward_step_of_eight_days_ages_no_row_before_or_after_a_restart(
    tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    """A row pending while the clock steps +8 days is not dead-lettered for max_age (1 h),
    its stored times move with the step, and the next daemon on that store (started after
    the step) delivers it once the sink is back."""
    down = [True]

    def respond(request: Any, body: Any) -> tuple[int, Any, dict[str, str]]:
        return (503, {"down": True}, {}) if down[0] else (200, {"ok": True}, {})

    step = [0.0]
    delivery = {"timeout": 5, "backoff_initial": 1, "backoff_max": 30, "max_age": 3600}

    async def main() -> None:
        receiver = Receiver(respond)
        await receiver.start()
        config = hook_config(tmp_path, receiver.url, delivery=delivery)
        async with running(config, clock=stepped(step)) as bridge:
            await signal(bridge, "desk", "On")
            await eventually(lambda: len(receiver.arrivals) >= 2, 60)
            step[0] = 8 * DAY
            await eventually(lambda: len(receiver.arrivals) >= 6, 600)
            assert await pending_and_dead(bridge) == (1, 0)
            await eventually(lambda: bool(stored_created_at(config.store.path)), 5)
            now = loop().wall() + step[0]
            (created,) = stored_created_at(config.store.path)
            assert now - 600 < created <= now  # moved with the step, not 8 days old
        async with running(config, clock=stepped(step)) as bridge:
            await eventually(lambda: len(receiver.arrivals) >= 8, 600)
            assert await pending_and_dead(bridge) == (1, 0)
            down[0] = False
            await arrived(receiver, 1, 600)
            assert await settled(bridge) == (0, 0)
        await receiver.stop()
        (delivered,) = receiver.delivered()
        assert delivered.body["alert_key"] == "desk"

    accelerated(main())
    steps = [e for e in logs if e["event"] == "clock_step"]
    assert [round(e["seconds"] / DAY) for e in steps] == [8]
    assert not [e for e in logs if e["event"] == "dead_lettered"]


def test_a_backward_step_of_an_hour_delays_no_retry(
    tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    """Backoff at most 1 s; the clock steps back 1 h after the first refusal: every retry
    still follows its refusal within the backoff."""
    step = [0.0]

    async def main() -> None:
        receiver = Receiver(scripted([(503, {"down": True}, {})] * 3))
        await receiver.start()
        delivery = {"timeout": 5, "backoff_initial": 1, "backoff_max": 1}
        config = hook_config(tmp_path, receiver.url, delivery=delivery)
        async with running(config, clock=stepped(step)) as bridge:
            await signal(bridge, "desk", "On")
            await eventually(lambda: len(receiver.arrivals) >= 1, 30)
            step[0] = -3600.0
            await arrived(receiver, 1, 600)
            assert await settled(bridge) == (0, 0)
        await receiver.stop()
        times = [a.loop_at for a in receiver.arrivals]
        assert [a.status for a in receiver.arrivals] == [503, 503, 503, 200]
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
        assert max(gaps) <= 1.5, gaps  # the backoff's cap, plus the loop's own slack

    accelerated(main())
    assert [round(e["seconds"]) for e in logs if e["event"] == "clock_step"] == [-3600]


def test_a_backward_step_does_not_lengthen_a_429_pause(
    tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    """A 429 with Retry-After: 5 pauses the sink; the clock then steps back 1 h: the sink
    is tried again after 5 s, not after an hour and 5 s."""
    step = [0.0]

    async def main() -> None:
        receiver = Receiver(scripted([(429, {"error": "slow down"}, {"Retry-After": "5"})]))
        await receiver.start()
        async with running(hook_config(tmp_path, receiver.url), clock=stepped(step)) as bridge:
            await signal(bridge, "desk", "On")
            await eventually(lambda: len(receiver.arrivals) >= 1, 30)
            step[0] = -3600.0
            await signal(bridge, "door", "On")
            await arrived(receiver, 2, 600)
            assert await settled(bridge) == (0, 0)
        await receiver.stop()
        first, *later = receiver.arrivals
        assert first.status == 429
        waits = [a.loop_at - first.loop_at for a in later]
        assert all(5 <= w <= 8 for w in waits), waits

    accelerated(main())
