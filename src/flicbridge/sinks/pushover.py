"""Pushover: a message per open; a critical button's is an emergency (priority 2).

An emergency message repeats every ``retry`` seconds until someone acknowledges it or
``expire`` passes, and Pushover answers it with a receipt. The sink keeps the receipt per
alert key (in memory and, through ``remember``, in the store, so a restart keeps it):

- The close of an alert whose receipt is still live is the cancel request of that receipt
  (``receipts/<r>/cancel.json``): the repeats stop. With no live receipt (not critical,
  or already acknowledged or expired) the close is a quiet "Resolved" message.
- ``watch`` asks Pushover about each live receipt every ``poll`` seconds (never faster
  than every 5 s, as Pushover asks). An acknowledged receipt is reported through
  ``on_ack`` (the bridge records an acknowledgement); an acknowledged or expired receipt
  is forgotten, since its repeats have stopped.

Pushover's ``acknowledged_by`` is a user key, which may be the configured ``user`` itself
(a credential): the acknowledgement names the device (``acknowledged_by_device``) instead.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import aiohttp
import structlog

from flicbridge.config import PushoverSink as PushoverConfig
from flicbridge.domain import Message
from flicbridge.sinks.base import HttpRequest, Sink
from flicbridge.sinks.pagerduty import details, summary

log = structlog.get_logger(__name__)

PRIORITY = {"critical": 2, "error": 1, "warning": 0, "info": -1}
EMERGENCY = 2


class PushoverSink(Sink):
    """Open = a message (emergency for critical), close = cancel its repeats or "Resolved"."""

    type = "pushover"
    # Pushover publishes a monthly message quota per application, not a per-second limit.
    default_rate = 1.0

    def __init__(self, config: PushoverConfig, *, site: str | None = None) -> None:
        super().__init__(config, site=site)
        self.base = self.url.rstrip("/") + "/"
        self.token = config.token.get_secret_value()
        self.user = config.user.get_secret_value()
        self.retry = int(config.retry)
        self.expire = int(config.expire)
        self.poll = config.poll
        self.sound = config.sound
        self.receipts: dict[str, str] = {}  # alert key → receipt of its live emergency message
        self.remember: Callable[[str, str | None], None] | None = None  # keeps them in the store

    def _headers(self) -> dict[str, str]:
        return {**self.headers(), "Content-Type": "application/json"}

    def build(self, message: Message) -> HttpRequest:
        receipt = self.receipts.get(message.alert_key)
        if message.action != "open" and receipt:
            return HttpRequest(
                "POST",
                f"{self.base}receipts/{quote(receipt, safe='')}/cancel.json",
                {"token": self.token},
                self._headers(),
            )
        opened = message.action == "open"
        priority = PRIORITY.get(message.severity, 0) if opened else -1
        body: dict[str, Any] = {
            "token": self.token,
            "user": self.user,
            "title": ("Alert: " if opened else "Resolved: ") + summary(message, 250),
            "message": details(message),
            "priority": priority,
            "timestamp": int(message.pressed_at.timestamp()),
        }
        if priority == EMERGENCY:
            body["retry"] = self.retry
            body["expire"] = self.expire
        if self.sound and opened:
            body["sound"] = self.sound
        return HttpRequest("POST", self.base + "messages.json", body, self._headers())

    def success_error(self, status: int, body: bytes) -> str | None:
        """Pushover says ``"status": 1`` on success; a 2xx with 0 carries its ``errors``."""
        if _field(body, "status") == 0:
            errors = _field(body, "errors")
            return "; ".join(map(str, errors)) if isinstance(errors, list) else "status 0"
        return None

    def on_delivered(self, message: Message, body: bytes) -> None:
        """Keep an emergency message's receipt; a delivered close forgets it."""
        key = message.alert_key
        if message.action == "open":
            receipt = _field(body, "receipt")
            if isinstance(receipt, str) and receipt:
                self._keep(key, receipt)
        elif key in self.receipts:
            self._keep(key, None)

    def _keep(self, key: str, receipt: str | None) -> None:
        if receipt is None:
            self.receipts.pop(key, None)
        else:
            self.receipts[key] = receipt
        if self.remember is not None:
            self.remember(key, receipt)

    async def check(self, session: aiohttp.ClientSession, key: str, receipt: str) -> Any:
        """Pushover's answer about one receipt (None when it could not be had)."""
        url = f"{self.base}receipts/{quote(receipt, safe='')}.json"
        try:
            async with session.get(
                url, params={"token": self.token}, timeout=aiohttp.ClientTimeout(total=10)
            ) as response:
                raw = await response.read()
                if response.status == 200:
                    return json.loads(raw)
                if 400 <= response.status < 500:  # unknown receipt: nothing more to learn
                    log.warning(
                        "pushover_receipt_gone", sink=self.id, alert_key=key, status=response.status
                    )
                    self._keep(key, None)
                    return None
                log.warning("pushover_receipt_check_failed", sink=self.id, status=response.status)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning(
                "pushover_receipt_check_failed",
                sink=self.id,
                error=type(exc).__name__,  # client errors can carry the URL with the token
                url=self.public_url,
            )
        return None

    async def watch(self, on_ack: Callable[[str, str, datetime | None], None]) -> None:
        """Poll every live receipt each ``poll`` seconds until cancelled."""
        async with aiohttp.ClientSession() as session:
            while True:
                await asyncio.sleep(self.poll)
                for key, receipt in list(self.receipts.items()):
                    answer = await self.check(session, key, receipt)
                    if not isinstance(answer, dict) or self.receipts.get(key) != receipt:
                        continue
                    if answer.get("acknowledged") == 1:
                        device = answer.get("acknowledged_by_device")
                        by = f"Pushover ({device})" if device else "Pushover"
                        at = answer.get("acknowledged_at")
                        when = datetime.fromtimestamp(at, UTC) if isinstance(at, int) else None
                        self._keep(key, None)
                        on_ack(key, by, when)
                    elif answer.get("expired") == 1:
                        self._keep(key, None)


def _field(body: bytes, name: str) -> Any:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return data.get(name) if isinstance(data, dict) else None
