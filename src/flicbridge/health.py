"""Button health: a flat or unheard button opens its own alert on the platforms.

A radio button (flicd, BLE) is unhealthy while its battery is low or while nothing was
heard from it (press, connection change, battery report) for ``[alerts] silent_after``.
Turning unhealthy opens a second alert with key ``<alert key>/health`` (severity warning,
a summary saying why) through the same state machine and outbox as a press, to
``[alerts] health_sinks`` (default: the button's sinks); turning healthy closes it.

Hysteresis: the battery counts as low at or below ``battery_warn_percent`` and as
recovered only at ``battery_warn_percent + BATTERY_HYSTERESIS`` or above, so a reading that
wobbles around the threshold (Flic reports are coarse) pages once, not at every report. A
dip that recovers and dips again opens a new alert.

Restarts: whether the health alert is open is the state machine's state for its key,
which the store keeps. When the bridge starts with it open, the battery counts as low
until a report says otherwise (why it opened is not kept), and silence is counted from
the start.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog

from flicbridge.state import AlertState

log = structlog.get_logger(__name__)

BATTERY_HYSTERESIS = 5  # percentage points above the warning threshold to count as recovered
HEALTH_SUFFIX = "/health"


@dataclass
class _Button:
    name: str
    last_heard: float
    battery: int | None = None
    battery_low: bool = False


@dataclass(frozen=True, slots=True)
class HealthChange:
    """Open (``unhealthy``) or close the button's health alert, with the reason."""

    button_id: str
    unhealthy: bool
    summary: str  # "<button name>: <why>", for people
    reason: str  # "<why>" alone, the health alert's info on the platforms


def health_key(alert_key: str) -> str:
    return alert_key + HEALTH_SUFFIX


def health_state(states: Mapping[str, AlertState], alert_key: str, button_id: str) -> AlertState:
    """The state of the health alert of the button whose alert key is ``alert_key``."""
    key = health_key(alert_key)
    return states.get(key) or AlertState(alert_key=key, button_id=button_id)


def _duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)} min"
    return f"{seconds:g} s"


class HealthMonitor:
    """Decides when each radio button's health alert opens and closes.

    ``is_open(button_id)`` reads the alert state; ``change`` is called with each decision
    (the bridge submits it as a signal). Constructors only assign; ``run`` checks silence.
    """

    def __init__(
        self,
        buttons: dict[str, str],
        *,
        battery_warn_percent: int,
        silent_after: float,
        is_open: Callable[[str], bool],
        change: Callable[[HealthChange], None],
        clock: Callable[[], float],
    ) -> None:
        self.warn = battery_warn_percent
        self.silent_after = silent_after
        self.is_open = is_open
        self.change = change
        self.clock = clock
        self.buttons = {bid: _Button(name, 0.0) for bid, name in buttons.items()}

    def start(self) -> None:
        """Count silence from now; an alert left open by the last run stays open."""
        now = self.clock()
        for button_id, b in self.buttons.items():
            b.last_heard = now
            b.battery_low = self.is_open(button_id)

    async def run(self, every: float | None = None) -> None:
        """Check for silent buttons forever (only when ``silent_after`` is set)."""
        if not self.silent_after:
            return
        period = every if every is not None else min(max(self.silent_after / 10, 1.0), 60.0)
        while True:
            await asyncio.sleep(period)
            self.check()

    # -- what the sources report ------------------------------------------------------

    def heard(self, button_id: str) -> None:
        b = self.buttons.get(button_id)
        if b is None:
            return
        b.last_heard = self.clock()
        self._update(button_id)

    def battery(self, button_id: str, percent: int) -> None:
        b = self.buttons.get(button_id)
        if b is None:
            return
        b.battery = percent
        b.last_heard = self.clock()
        if percent <= self.warn:
            b.battery_low = True
        elif percent >= self.warn + BATTERY_HYSTERESIS:
            b.battery_low = False
        self._update(button_id)

    def check(self) -> None:
        """Open the health alert of every button silent for ``silent_after``."""
        for button_id in self.buttons:
            self._update(button_id)

    # -- the decision -----------------------------------------------------------------

    def reasons(self, button_id: str) -> list[str]:
        b = self.buttons[button_id]
        out = []
        if b.battery_low:
            out.append(f"battery {b.battery} %" if b.battery is not None else "battery low")
        silent = self.clock() - b.last_heard
        if self.silent_after and silent >= self.silent_after:
            out.append(f"not heard from for {_duration(self.silent_after)}")
        return out

    def _update(self, button_id: str) -> None:
        b = self.buttons[button_id]
        why = self.reasons(button_id)
        is_open = self.is_open(button_id)
        if why and not is_open:
            summary = f"{b.name}: {', '.join(why)}"
            log.warning("button_unhealthy", button=button_id, reason=", ".join(why))
            self.change(HealthChange(button_id, True, summary, ", ".join(why)))
        elif not why and is_open:
            log.info("button_healthy", button=button_id)
            self.change(HealthChange(button_id, False, f"{b.name}: healthy again", "healthy again"))
