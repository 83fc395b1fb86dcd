"""incident.io HTTP alert source: ``deduplication_key`` = the alert key, Bearer token."""

from __future__ import annotations

from typing import Any

from flicbridge.config import IncidentIoSink as IncidentIoConfig
from flicbridge.domain import Message
from flicbridge.sinks.base import HttpRequest, Sink
from flicbridge.sinks.pagerduty import details, summary


class IncidentIoSink(Sink):
    """Open = ``status: firing``, close = ``resolved``, under one deduplication key."""

    type = "incidentio"
    default_rate = 1.0  # no limit is published for alert events; one a second is modest

    def __init__(self, config: IncidentIoConfig, *, site: str | None = None) -> None:
        super().__init__(config, site=site)
        self.token = config.token.get_secret_value()

    def build(self, message: Message) -> HttpRequest:
        body: dict[str, Any] = {
            "title": summary(message, 255),
            "status": "firing" if message.action == "open" else "resolved",
            "deduplication_key": message.alert_key,
            "description": details(message),
            "metadata": {
                "button_id": message.button_id,
                "severity": message.severity,
                "pressed_at": message.pressed_at.isoformat(),
                "origin": message.origin,
                "site": message.site or self.site,
            },
        }
        headers = {
            **self.headers(),
            "Authorization": f"Bearer {self.token}",
            "Content-Type": "application/json",
        }
        return HttpRequest("POST", self.url, body, headers)
