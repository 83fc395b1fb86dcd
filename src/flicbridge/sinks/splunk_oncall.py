"""Splunk On-Call (VictorOps) REST endpoint: ``entity_id`` = the alert key.

The endpoint URL carries both the API key and the routing key, so it is a secret.
Open sends ``message_type`` from the button's severity (CRITICAL, or WARNING/INFO),
close sends ``RECOVERY`` for the same ``entity_id``.
"""

from __future__ import annotations

from typing import Any

from flicbridge.config import SplunkOnCallSink as SplunkOnCallConfig
from flicbridge.domain import Message
from flicbridge.sinks.base import HttpRequest, Sink
from flicbridge.sinks.pagerduty import details, summary

MESSAGE_TYPE = {"critical": "CRITICAL", "error": "CRITICAL", "warning": "WARNING", "info": "INFO"}


class SplunkOnCallSink(Sink):
    """Open = CRITICAL (or from severity), close = RECOVERY."""

    type = "splunk_oncall"
    default_rate = 1.0  # no published limit for the REST endpoint: one a second is modest

    def __init__(self, config: SplunkOnCallConfig, *, site: str | None = None) -> None:
        super().__init__(config, site=site)

    def build(self, message: Message) -> HttpRequest:
        body: dict[str, Any] = {
            "message_type": (
                MESSAGE_TYPE.get(message.severity, "CRITICAL")
                if message.action == "open"
                else "RECOVERY"
            ),
            "entity_id": message.alert_key,
            "entity_display_name": summary(message, 255),
            "state_message": details(message),
            "state_start_time": int(message.pressed_at.timestamp()),
            "monitoring_tool": "flicbridge",
        }
        headers = {**self.headers(), "Content-Type": "application/json"}
        return HttpRequest("POST", self.url, body, headers)
