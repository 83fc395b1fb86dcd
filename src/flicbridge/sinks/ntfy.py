"""ntfy: a JSON publish to the server root; the topic and a tag carry the alert key.

ntfy has no incidents to close: a close is a second message on the same topic, tagged
with the same alert key, saying the alert was resolved (priority default).
"""

from __future__ import annotations

from typing import Any

from flicbridge.config import NtfySink as NtfyConfig
from flicbridge.domain import Message
from flicbridge.sinks.base import HttpRequest, Sink
from flicbridge.sinks.pagerduty import details, summary

PRIORITY = {"critical": 5, "error": 4, "warning": 3, "info": 2}


class NtfySink(Sink):
    """Open = a message at the button's priority (5 = urgent for critical), close = resolved."""

    type = "ntfy"
    # An ntfy server allows each visitor a burst of 60 requests, then one per 5 s (10 s in
    # older releases): one per 5 s sustained, with the sinks' default burst of 5, stays under it.
    default_rate = 0.2

    def __init__(self, config: NtfyConfig, *, site: str | None = None) -> None:
        super().__init__(config, site=site)
        self.topic = config.topic
        self.token = config.token.get_secret_value() if config.token else None

    def build(self, message: Message) -> HttpRequest:
        opened = message.action == "open"
        tag = message.alert_key.replace("/", "_")
        body: dict[str, Any] = {
            "topic": self.topic,
            "title": ("Alert: " if opened else "Resolved: ") + summary(message, 200),
            "message": details(message),
            "priority": PRIORITY.get(message.severity, 3) if opened else 3,
            "tags": ["rotating_light" if opened else "white_check_mark", tag],
        }
        headers = {**self.headers(), "Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return HttpRequest("POST", self.url.rstrip("/") + "/", body, headers)
