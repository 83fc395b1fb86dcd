"""The schedule clock: epoch seconds that run at the wall clock's pace but never jump.

A Raspberry Pi has no real-time clock. It boots with the last saved time and NTP then
steps the clock, often by hours or days. Retry times, ``max_age``, sink pauses and pacing
must not jump with it, yet the store keeps them as epoch seconds so that they outlive the
process. So they are all read from ``ScheduleClock.now()``: the monotonic clock plus an
offset taken from the wall clock at start.

When the wall clock has moved away from the schedule by more than ``STEP_TOLERANCE``
(a step, or a long slew), the dispatcher absorbs it: the offset moves by the step, and
every pending schedule moves with it, in memory and in the store (``Store.rebase``, queued
in the writer's order, so that a time written before the step is shifted once and one
written after it never). Nothing ages, expires or waits longer because of a step, and
after a restart the stored times agree with the wall clock again.

A press's reported time (``pressed_at``, ``received_at``) is read from the wall clock and
never shifted: it says what the clock said when the press happened.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

STEP_TOLERANCE = 1.0  # seconds of disagreement taken for a step (NTP slews far slower)


def loop_time() -> float:
    """The running event loop's monotonic clock (``time.monotonic`` outside a loop)."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


class ScheduleClock:
    """``now()`` for schedules; ``step()`` says whether the wall clock has stepped."""

    def __init__(
        self,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = loop_time,
    ) -> None:
        self.wall = wall
        self.mono = mono
        self.offset = wall() - mono()

    def now(self) -> float:
        return self.mono() + self.offset

    def step(self) -> float:
        """Seconds the wall clock has moved away from the schedule (0.0 within tolerance)."""
        drift = self.wall() - self.now()
        return drift if abs(drift) > STEP_TOLERANCE else 0.0

    def absorb(self, delta: float) -> None:
        """Follow the wall clock's step from now on."""
        self.offset += delta
