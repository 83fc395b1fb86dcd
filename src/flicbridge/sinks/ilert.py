"""iLert Events API: ``integrationKey`` in the body, ``alertKey`` = the alert key."""

from __future__ import annotations

from typing import Any

from flicbridge.config import IlertSink as IlertConfig
from flicbridge.domain import Message
from flicbridge.sinks.base import HttpRequest, Sink
from flicbridge.sinks.pagerduty import KEY_LIMIT, custom_details, details, summary

SUMMARY_LIMIT = 255  # iLert shows the summary as the alert title; keep it a title


class IlertSink(Sink):
    """Open = ``ALERT``, close = ``RESOLVE``; summary and labels go on every event."""

    type = "ilert"
    default_rate = 0.7  # iLert allows 50 events/min per integration key

    def __init__(self, config: IlertConfig, *, site: str | None = None) -> None:
        super().__init__(config, site=site)
        self.integration_key = config.integration_key.get_secret_value()

    def build(self, message: Message) -> HttpRequest:
        """An iLert event; ``priority`` is HIGH for critical/error buttons, else LOW."""
        labels = {"flic_button": message.alert_key, "button_id": message.button_id}
        site = message.site or self.site
        if site:
            labels["site"] = site
        extras: dict[str, Any] = custom_details(message, self.version)
        # iLert has no timestamp field: the real press time goes into the details.
        extras["pressed_at"] = message.pressed_at.isoformat()
        body: dict[str, Any] = {
            "integrationKey": self.integration_key,
            "eventType": "ALERT" if message.action == "open" else "RESOLVE",
            "alertKey": message.alert_key[:KEY_LIMIT],
            # iLert asks for a summary on every event, resolves included.
            "summary": summary(message, SUMMARY_LIMIT),
            "details": details(message),
            "priority": "HIGH" if message.severity in ("critical", "error") else "LOW",
            "labels": labels,
            "customDetails": extras,
        }
        headers = {**self.headers(), "Content-Type": "application/json"}
        return HttpRequest("POST", self.url, body, headers)
