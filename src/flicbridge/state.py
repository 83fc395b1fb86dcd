"""The open/close state machine of one alert, mirroring how AlertOps maps inbound messages.

| signal | state now                                   | decision             |
|--------|---------------------------------------------|----------------------|
| On     | closed                                      | open                 |
| On     | open, last On sent < suppress_repeat_for ago | appended (not sent)  |
| On     | open, older                                 | resent               |
| Off    | open                                        | close                |
| Off    | closed                                      | ignored (not sent)   |

Pure functions only: the bridge calls ``decide`` in arrival order and persists the result.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

from flicbridge.domain import Decision, SignalState


@dataclass(frozen=True, slots=True)
class AlertState:
    """What the bridge knows of one alert key."""

    alert_key: str
    button_id: str
    is_open: bool = False
    opened_at: datetime | None = None
    last_on_sent_at: datetime | None = None
    last_event: int | None = None
    updated_at: datetime | None = None


def decide(
    state: AlertState, signal: SignalState, now: datetime, suppress_repeat_for: float
) -> tuple[Decision, AlertState]:
    """The decision for ``signal`` arriving ``now`` and the state it leaves behind."""
    if signal is SignalState.ON:
        if not state.is_open:
            return Decision.OPEN, replace(
                state, is_open=True, opened_at=now, last_on_sent_at=now, updated_at=now
            )
        last = state.last_on_sent_at
        if last is not None and (now - last).total_seconds() < suppress_repeat_for:
            return Decision.APPENDED, replace(state, updated_at=now)
        return Decision.RESENT, replace(state, last_on_sent_at=now, updated_at=now)
    if state.is_open:
        return Decision.CLOSE, replace(state, is_open=False, updated_at=now)
    return Decision.IGNORED, replace(state, updated_at=now)
