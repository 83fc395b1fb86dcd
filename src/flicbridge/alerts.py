"""Local alerts: what the bridge tells screens on the LAN about itself.

An alert is JSON with ``type`` INFO|WARNING|ERROR, ``action`` MESSAGE|EXECUTE|SHOW_EVENT,
``priority`` LOW|NORMAL|HIGH, ``message``, optional ``action_exec_token`` and ``event``
(the id of the press or callback in the store). Publishing never blocks: a subscriber
that cannot keep up loses its oldest alerts, never the bridge's time.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from flicbridge.secrecy import mask

AlertType = Literal["INFO", "WARNING", "ERROR"]
AlertAction = Literal["MESSAGE", "EXECUTE", "SHOW_EVENT"]
Priority = Literal["LOW", "NORMAL", "HIGH"]
PRIORITY_ORDER: dict[str, int] = {"LOW": 0, "NORMAL": 1, "HIGH": 2}


@dataclass(frozen=True, slots=True)
class LocalAlert:
    """One alert in the local alert format."""

    type: AlertType
    action: AlertAction
    priority: Priority
    message: str
    event: int | None = None
    action_exec_token: str | None = None
    id: int = 0
    at: float = field(default_factory=time.time)
    button: str | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "type": self.type,
            "action": self.action,
            "priority": self.priority,
            "message": self.message,
            "at": self.at,
        }
        if self.event is not None:
            data["event"] = self.event
        if self.action_exec_token is not None:
            data["action_exec_token"] = self.action_exec_token
        if self.button is not None:
            data["button"] = self.button
        return data


class Subscriber:
    """A bounded mailbox of alerts at or above ``min_priority``."""

    def __init__(self, min_priority: Priority = "LOW", size: int = 256) -> None:
        self.min_priority = min_priority
        self.queue: asyncio.Queue[LocalAlert] = asyncio.Queue(maxsize=size)
        self.dropped = 0

    def offer(self, alert: LocalAlert) -> None:
        if PRIORITY_ORDER[alert.priority] < PRIORITY_ORDER[self.min_priority]:
            return
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(alert)


class AlertBus:
    """Fans local alerts out to subscribers and keeps the most recent ones."""

    def __init__(self, keep: int = 100) -> None:
        self._ids = itertools.count(1)
        self.recent: deque[LocalAlert] = deque(maxlen=keep)
        self.subscribers: set[Subscriber] = set()

    def publish(
        self,
        type: AlertType,
        action: AlertAction,
        priority: Priority,
        message: str,
        *,
        event: int | None = None,
        token: str | None = None,
        button: str | None = None,
    ) -> LocalAlert:
        alert = LocalAlert(
            type=type,
            action=action,
            priority=priority,
            message=mask(message),
            event=event,
            action_exec_token=token,
            id=next(self._ids),
            button=button,
        )
        self.recent.append(alert)
        for subscriber in list(self.subscribers):
            subscriber.offer(alert)
        return alert

    def subscribe(self, min_priority: Priority = "LOW") -> Subscriber:
        subscriber = Subscriber(min_priority)
        self.subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)
