"""Domain values that flow through the pipeline: Press → Signal → Decision → Message.

Every value here is a frozen dataclass or an enum; nothing in this module does I/O.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Literal


class Click(StrEnum):
    """The one gesture flicd's ButtonSingleOrDoubleClickOrHold event reports."""

    SINGLE = "single_click"
    DOUBLE = "double_click"
    HOLD = "hold"


class SignalState(StrEnum):
    """What a person (or a callback) asks of an alert: open it or close it."""

    ON = "On"
    OFF = "Off"


class Decision(StrEnum):
    """What the state machine made of a signal (AlertOps' inbound-message vocabulary)."""

    OPEN = "open"  # Mapped
    APPENDED = "appended"  # Mapped Appended, recorded only
    RESENT = "resent"  # Mapped Appended, re-sent because the last On is old
    CLOSE = "close"  # Mapped
    IGNORED = "ignored"  # Mapped Ignored

    @property
    def sends(self) -> bool:
        """Whether this decision produces outbox rows for the sinks."""
        return self in (Decision.OPEN, Decision.RESENT, Decision.CLOSE)

    @property
    def action(self) -> str:
        """The sink-facing action: "open" or "close"."""
        return "close" if self in (Decision.CLOSE, Decision.IGNORED) else "open"


# A Bluetooth device address: six hex pairs separated by colons, lowercase as flicd writes
# them. The one definition the config, the CLI and the simulator all check against.
BD_ADDR = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")


def is_bd_addr(text: str) -> bool:
    """Whether ``text`` is a Bluetooth address like ``80:e4:da:70:00:01`` (any letter case)."""
    return BD_ADDR.fullmatch(text.lower()) is not None


def utcnow() -> datetime:
    """The current time, timezone-aware (UTC)."""
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Press:
    """One physical gesture on a button, as a source reported it.

    ``pressed_at`` is the real time of the gesture: for a press flicd queued while
    the button was out of range it is ``received_at - delay_s``.
    """

    button_id: str
    click: Click
    received_at: datetime
    delay_s: float = 0.0
    queued: bool = False
    source: str = "flicd"
    info: str = ""

    @property
    def pressed_at(self) -> datetime:
        return self.received_at - timedelta(seconds=self.delay_s)


@dataclass(frozen=True, slots=True)
class Signal:
    """A request to open (On) or close (Off) a button's alert.

    ``origin`` says who asked: ``press``, ``api``, ``ingest``, ``send``, ``ilert``,
    ``flashduty``, ``exec``. ``local_only`` is a re-arm: the state closes but
    nothing is sent to the sinks (the platform already closed its alert).
    """

    button_id: str
    state: SignalState
    origin: str
    received_at: datetime
    press: Press | None = None
    info: str = ""
    local_only: bool = False
    actor: str = ""  # who triggered a callback (e-mail, user id), for the record


# An action a platform or a local screen runs on a button's alert: ``close`` closes it here
# and at every sink; ``rearm`` closes it here only (the platform already closed its own).
Action = Literal["close", "rearm"]
ACTIONS: tuple[Action, ...] = ("close", "rearm")
ACTOR_LIMIT = 200  # characters of a person's name or id kept with an action
_VIA = {"ilert": "iLert", "flashduty": "Flashduty", "exec": "a local screen"}


def clip(value: str, limit: int = ACTOR_LIMIT) -> str:
    """``value``, cut to ``limit`` characters (an ellipsis marks the cut)."""
    return value if len(value) <= limit else value[: limit - 1] + "…"


def action_signal(button_id: str, action: Action, *, origin: str, actor: str) -> Signal:
    """The Off signal an action is, recording who ran it and from where."""
    via = _VIA.get(origin, origin)
    verb = "closed" if action == "close" else "re-armed"
    return Signal(
        button_id=button_id,
        state=SignalState.OFF,
        origin=origin,
        received_at=utcnow(),
        info=clip(f"{verb} from {via} by {actor}" if actor else f"{verb} from {via}", 500),
        local_only=action == "rearm",
        actor=clip(actor),
    )


@dataclass(frozen=True, slots=True)
class Message:
    """What every sink of a button is asked to deliver; stored as the outbox row's payload."""

    alert_key: str
    button_id: str
    button_name: str
    name_id: str
    info: str
    state: SignalState
    action: str  # "open" | "close"
    click: str  # a Click value, or "" for a signal that did not come from a press
    pressed_at: datetime
    delay_s: float
    site: str
    severity: str
    event: int  # id of the press/callback event in the store
    origin: str = "press"
    queued: bool = False  # flicd's was_queued: the button held it while out of range

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        data["pressed_at"] = self.pressed_at.isoformat()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Message:
        known = {f.name for f in fields(cls)}  # a row written by another version may have more
        values = {k: v for k, v in data.items() if k in known}
        values["state"] = SignalState(values["state"])
        values["pressed_at"] = datetime.fromisoformat(values["pressed_at"])
        return cls(**values)

    def variables(self) -> dict[str, str]:
        """Template placeholders of the webhook sink."""
        return {
            "alert_key": self.alert_key,
            "button_id": self.button_id,
            "button_name": self.button_name,
            "info": self.info,
            "state": self.state.value,
            "action": self.action,
            "click": self.click,
            "pressed_at": self.pressed_at.isoformat(),
            "delay_s": f"{self.delay_s:g}",
            "site": self.site,
            "severity": self.severity,
            "name_id": self.name_id,
            "event": str(self.event),
            "origin": self.origin,
        }
