"""Opsgenie / Jira Service Management Ops alerts API: ``alias`` = the alert key.

Create is ``POST url`` with ``Authorization: GenieKey <api_key>``; close is
``POST url/<alias, URL-encoded>/close?identifierType=alias``. The same shape serves JSM Ops
and EU accounts through ``url``. Both answer 202 and process asynchronously.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from flicbridge.config import OpsgenieSink as OpsgenieConfig
from flicbridge.domain import Message
from flicbridge.sinks.base import HttpRequest, Sink
from flicbridge.sinks.pagerduty import details, summary

MESSAGE_LIMIT = 130  # Opsgenie truncates longer messages
ALIAS_LIMIT = 512
DESCRIPTION_LIMIT = 15000
PRIORITY = {"critical": "P1", "error": "P2", "warning": "P3", "info": "P5"}


class OpsgenieSink(Sink):
    """Open = create alert (alias, message, priority), close = close by alias."""

    type = "opsgenie"
    default_rate = 0.5  # Opsgenie's alert API limit depends on the plan; 30/min fits every plan

    def __init__(self, config: OpsgenieConfig, *, site: str | None = None) -> None:
        super().__init__(config, site=site)
        self.api_key = config.api_key.get_secret_value()

    def build(self, message: Message) -> HttpRequest:
        alias = message.alert_key[:ALIAS_LIMIT]
        headers = {
            **self.headers(),
            "Authorization": f"GenieKey {self.api_key}",
            "Content-Type": "application/json",
        }
        if message.action == "open":
            body: dict[str, Any] = {
                "message": summary(message, MESSAGE_LIMIT),
                "alias": alias,
                "description": details(message)[:DESCRIPTION_LIMIT],
                "priority": PRIORITY.get(message.severity, "P3"),
                "source": self.source_name,
                "details": {
                    "button_id": message.button_id,
                    "pressed_at": message.pressed_at.isoformat(),
                    "origin": message.origin,
                },
            }
            return HttpRequest("POST", self.url, body, headers)
        url = f"{self.url.rstrip('/')}/{quote(alias, safe='')}/close?identifierType=alias"
        note = f"Closed by flicbridge ({message.origin})"
        return HttpRequest("POST", url, {"source": self.source_name, "note": note}, headers)
