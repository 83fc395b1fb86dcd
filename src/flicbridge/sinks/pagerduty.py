"""PagerDuty Events API v2: ``routing_key`` in the body, ``dedup_key`` = the alert key."""

from __future__ import annotations

from typing import Any

from flicbridge.config import PagerDutySink as PagerDutyConfig
from flicbridge.domain import Message
from flicbridge.sinks.base import HttpRequest, Sink

KEY_LIMIT = 255  # PagerDuty dedup_key, Flashduty alert_key
SUMMARY_LIMIT = 1024  # PagerDuty payload.summary


def summary(message: Message, limit: int) -> str:
    """One line of at most ``limit`` chars: button name, info, press time (the time is kept)."""
    # The press time is what a responder needs first for a press that arrived late,
    # so an over-long info is shortened, never the time.
    when = f" (pressed {message.pressed_at.isoformat(timespec='seconds')})"
    name = message.button_name or message.button_id
    head = f"{name}: {message.info}" if message.info else name
    if len(head) + len(when) > limit:
        head = head[: max(0, limit - len(when) - 1)] + "…"
    return (head + when)[:limit]


def details(message: Message) -> str:
    """Multi-line text for a platform's description field."""
    name = message.button_name or message.button_id
    lines = [f"Button: {name} ({message.button_id})"]
    if message.info:
        lines.append(f"Info: {message.info}")
    lines.append(f"Pressed at: {message.pressed_at.isoformat()}")
    if message.click:
        lines.append(f"Gesture: {message.click}")
    if message.delay_s > 0:
        lines.append(f"Delivered late: the button queued this press for {message.delay_s:g} s")
    if message.site:
        lines.append(f"Site: {message.site}")
    lines.append(f"Origin: {message.origin}")
    return "\n".join(lines)


def custom_details(message: Message, version: str) -> dict[str, Any]:
    """Structured extras for PagerDuty ``custom_details`` and iLert ``customDetails``."""
    return {
        "click": message.click,
        "delay_s": message.delay_s,
        "queued": message.queued,
        "bridge_version": version,
        "button_id": message.button_id,
        "origin": message.origin,
    }


class PagerDutySink(Sink):
    """Open = ``trigger``, close = ``resolve``, both under ``dedup_key`` = alert key."""

    type = "pagerduty"
    default_rate = 1.5  # PagerDuty allows about 120 events/min per integration key

    def __init__(self, config: PagerDutyConfig, *, site: str | None = None) -> None:
        super().__init__(config, site=site)
        self.routing_key = config.routing_key.get_secret_value()

    def build(self, message: Message) -> HttpRequest:
        """An Events v2 event; a trigger carries the payload PagerDuty requires."""
        body: dict[str, Any] = {
            "routing_key": self.routing_key,
            "event_action": "trigger" if message.action == "open" else "resolve",
            "dedup_key": message.alert_key[:KEY_LIMIT],
        }
        if message.action == "open":
            body["payload"] = {
                "summary": summary(message, SUMMARY_LIMIT),
                "source": self.source_name,
                "severity": message.severity,
                "timestamp": message.pressed_at.isoformat(),
                "custom_details": custom_details(message, self.version),
            }
            # Shown as "sent by" in the incident; the API documents it for triggers only.
            body["client"] = "flicbridge"
        headers = {**self.headers(), "Content-Type": "application/json"}
        return HttpRequest("POST", self.url, body, headers)
