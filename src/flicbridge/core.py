"""The core's interface: what the HTTP server, the CLI and the features may ask of it.

``Core`` is a Protocol that ``app.Bridge`` implements; everything below the wiring
(``server/*``, ``subscriptions``) is typed against it and never imports ``app``, so the
import graph has no cycle (tests/test_import_graph.py checks it). The result and status
types the core hands out live here too; the errors live in ``errors``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from flicbridge.domain import Decision, Signal

if TYPE_CHECKING:
    from flicbridge.acks import FeedbackEvent
    from flicbridge.alerts import AlertBus
    from flicbridge.config import Config
    from flicbridge.dispatcher import Dispatcher
    from flicbridge.metrics import Metrics
    from flicbridge.sinks.base import Sink
    from flicbridge.state import AlertState
    from flicbridge.store import AckRecord, OutboxRow, Store
    from flicbridge.subscriptions import Subscriptions


@dataclass(frozen=True, slots=True)
class Accepted:
    """A signal's decision, committed."""

    event_id: int
    decision: Decision
    rows: tuple[OutboxRow, ...]
    duplicate: bool = False


@dataclass
class ButtonStatus:
    """What the bridge knows of a button's radio side."""

    connected: bool | None = None
    detail: str = ""
    battery: int | None = None
    battery_low: bool = False
    last_press: str | None = None
    last_decision: str | None = None


@dataclass
class ExecToken:
    """A single-use token of an EXECUTE local alert: closes the alert it was raised for."""

    button_id: str
    event: int
    created: float  # on the bridge's monotonic clock (wall-clock steps don't age it)
    spent: bool = False
    in_use: bool = False  # its action is being committed; spent only once it is


@dataclass
class Health:
    """Readiness inputs: the store and every radio source."""

    store_ok: bool = True
    store_error: str = ""
    source_up: dict[str, bool] = field(default_factory=dict)
    source_detail: dict[str, str] = field(default_factory=dict)
    source_faults: dict[str, list[str]] = field(default_factory=dict)


class Core(Protocol):
    """What a running bridge offers the parts wired to it."""

    config: Config
    store: Store  # status reads and the subscriptions' own table
    dispatcher: Dispatcher  # queue depths and sink gates, for status
    sinks: dict[str, Sink]
    alerts_bus: AlertBus
    metrics: Metrics
    health: Health
    states: dict[str, AlertState]
    buttons: dict[str, ButtonStatus]
    acks: dict[str, AckRecord]
    subscriptions: Subscriptions
    accepting: bool
    started_at: float
    clock: Callable[[], float]  # the wall clock
    mono: Callable[[], float]  # the monotonic clock

    def submit(
        self, signal: Signal, *, callback: tuple[str, str] | None = None, health: bool = False
    ) -> asyncio.Future[Accepted]: ...

    def acknowledge(
        self, button_id: str, by: str, at: datetime | None = None, *, source: str
    ) -> AckRecord | None: ...

    def feedback(self, event: FeedbackEvent, button_id: str, by: str) -> None: ...

    async def requeue(self, row_id: int | None) -> list[OutboxRow]: ...

    async def drop(self, row_id: int) -> bool: ...

    def exec_token(self, token: str) -> ExecToken: ...

    def token_done(self, token: str, *, committed: bool) -> None: ...

    def readiness(self) -> list[str]:
        """Why the bridge is not ready; empty when it is."""
        ...
