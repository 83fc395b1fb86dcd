"""The core's interface: what the HTTP server, the CLI and the features may ask of it.

``Core`` is a Protocol that ``app.Bridge`` implements; everything below the wiring
(``server/*``, ``subscriptions``) is typed against it and never imports ``app``, so the
import graph has no cycle (tests/test_import_graph.py checks it). The result types the
core hands out live here too; the status document in ``status``, the errors in ``errors``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from flicbridge.domain import Action, Decision, Signal

if TYPE_CHECKING:
    from flicbridge.acks import FeedbackEvent
    from flicbridge.alerts import AlertBus
    from flicbridge.config import Config
    from flicbridge.metrics import Metrics
    from flicbridge.state import AlertState
    from flicbridge.status import StatusOut
    from flicbridge.store import AckRecord, OutboxRow
    from flicbridge.subscriptions import Subscriptions


@dataclass(frozen=True, slots=True)
class Accepted:
    """A signal's decision, committed."""

    event_id: int
    decision: Decision
    rows: tuple[OutboxRow, ...]
    duplicate: bool = False


@dataclass
class ExecToken:
    """A single-use token of an EXECUTE local alert: closes the alert it was raised for."""

    button_id: str
    event: int
    created: float  # on the bridge's monotonic clock (wall-clock steps don't age it)
    spent: bool = False
    in_use: bool = False  # its action is being committed; spent only once it is


class Core(Protocol):
    """What a running bridge offers the parts wired to it."""

    config: Config
    alerts_bus: AlertBus  # the local alert stream
    metrics: Metrics  # rendered by /metrics
    states: dict[str, AlertState]  # read only: is an alert open
    subscriptions: Subscriptions
    accepting: bool

    def submit(
        self, signal: Signal, *, callback: tuple[str, str] | None = None, health: bool = False
    ) -> asyncio.Future[Accepted]: ...

    def run_action(
        self,
        button_id: str,
        action: Action,
        *,
        origin: str,
        actor: str,
        callback: tuple[str, str] | None = None,
    ) -> asyncio.Future[Accepted]:
        """Close (or re-arm) the button's alert on someone's behalf: its Off signal."""
        ...

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

    async def status(self) -> StatusOut:
        """A typed snapshot of the whole bridge, readiness included."""
        ...

    async def outbox_rows(self, status: str, limit: int) -> list[OutboxRow]: ...
