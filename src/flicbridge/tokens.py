"""Exec tokens, and the local alerts that announce each committed decision.

Every committed decision of a button's alert (never of its health alert) is announced on
the local alert bus: an INFO ``SHOW_EVENT`` always; when the alert opens, an ``EXECUTE``
alert too, carrying a fresh single-use token that closes it (``POST /api/v1/local/exec``).

Invariants:
- A token is issued only by an OPEN decision that is already committed, and names that
  decision's button and event. It is random (``secrets.token_urlsafe``), kept in memory
  only: a restart forgets every token (the alert stays open; a press closes it).
- A token is spent at most once. ``take`` marks it in use, so a second request with the
  same token is refused (``TokenInUse``) while the first commits; ``done`` spends it when
  its action committed, or hands it back when not.
- A CLOSE of the button's alert (from any origin) spends every token its opens issued:
  the alert they would close is closed already.
- Lifetimes are on the monotonic clock (a wall-clock step ages nothing): a token expires
  ``TOKEN_LIFETIME`` after issue (``TokenExpired``); it is forgotten a lifetime later, by
  a prune at most once an hour when a token is issued. Until then a request with it gets
  a precise refusal rather than "unknown".
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from flicbridge.alerts import AlertBus
from flicbridge.config import ButtonConfig
from flicbridge.core import ExecToken
from flicbridge.domain import Decision, Signal
from flicbridge.errors import TokenExpired, TokenInUse, TokenSpent

TOKEN_LIFETIME = 24 * 3600.0
PRUNE_EVERY = 3600.0  # seconds between sweeps of tokens long expired


class ExecTokens:
    """The registry of exec tokens: issue, take, settle, and spend a button's on close."""

    def __init__(self, mono: Callable[[], float]) -> None:
        self.mono = mono
        self.entries: dict[str, ExecToken] = {}
        self._live: dict[str, list[str]] = {}  # button id → its unspent tokens
        self._pruned = mono()

    def issue(self, button_id: str, event: int) -> str:
        """A new token that closes the alert ``event`` opened."""
        now = self.mono()
        if now - self._pruned > PRUNE_EVERY:
            # Forget tokens a day after they expired (until then they answer 409/410).
            self._pruned = now
            for old in [t for t, e in self.entries.items() if now - e.created > 2 * TOKEN_LIFETIME]:
                del self.entries[old]
        token = secrets.token_urlsafe(24)
        self.entries[token] = ExecToken(button_id, event, now)
        self._live.setdefault(button_id, []).append(token)
        return token

    def closed(self, button_id: str) -> None:
        """The button's alert closed: every token issued for it is spent."""
        for token in self._live.pop(button_id, ()):
            entry = self.entries.get(token)  # None once pruned
            if entry is not None:
                entry.spent = True

    def take(self, token: str) -> ExecToken:
        """Take a single-use token for its action; ``done`` spends or returns it.

        KeyError unknown; TokenSpent, TokenInUse or TokenExpired otherwise.
        """
        entry = self.entries[token]
        if entry.spent:
            raise TokenSpent(token)
        if entry.in_use:
            raise TokenInUse(token)
        if self.mono() - entry.created > TOKEN_LIFETIME:
            raise TokenExpired(token)
        entry.in_use = True
        return entry

    def done(self, token: str, *, committed: bool) -> None:
        """The token's action was committed (spent) or not (usable again)."""
        entry = self.entries.get(token)
        if entry is not None:
            entry.in_use = False
            entry.spent = entry.spent or committed


class Announcements:
    """Publishes the local alerts of each committed decision; opens issue exec tokens.

    ``clear_ack(alert_key)`` forgets the acknowledgement of the alert's previous open.
    """

    def __init__(
        self,
        bus: AlertBus,
        tokens: ExecTokens,
        *,
        alert_key: Callable[[ButtonConfig], str],
        clear_ack: Callable[[str], None],
    ) -> None:
        self.bus = bus
        self.tokens = tokens
        self.alert_key = alert_key
        self.clear_ack = clear_ack

    def announce(
        self, button: ButtonConfig, signal: Signal, decision: Decision, event: int
    ) -> None:
        """Local alerts for a decision: INFO always, EXECUTE (close token) when opened."""
        name = button.display_name
        self.bus.publish(
            "INFO",
            "SHOW_EVENT",
            "NORMAL",
            f"{name}: {signal.state.value} from {signal.origin} → {decision.value}",
            event=event,
            button=button.id,
        )
        if decision is Decision.OPEN:
            self.clear_ack(self.alert_key(button))
            token = self.tokens.issue(button.id, event)
            self.bus.publish(
                "INFO",
                "EXECUTE",
                "HIGH",
                f"{name} raised an alert. Close it?",
                event=event,
                token=token,
                button=button.id,
            )
        elif decision is Decision.CLOSE:
            self.tokens.closed(button.id)
