"""Flashduty standard alert event: ``integration_key`` in the query, ``alert_key`` in the body."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from flicbridge.config import FlashdutySink as FlashdutyConfig
from flicbridge.domain import Message
from flicbridge.sinks.base import HttpRequest, Sink
from flicbridge.sinks.pagerduty import KEY_LIMIT, details, summary

TITLE_LIMIT = 512
DESCRIPTION_LIMIT = 2048
EVENT_STATUS = {"critical": "Critical", "error": "Critical", "warning": "Warning", "info": "Info"}


def with_query(url: str, **params: str) -> str:
    """``url`` with ``params`` appended to its query; an existing query is kept."""
    parts = urlsplit(url)
    query = "&".join(q for q in (parts.query, urlencode(params)) if q)
    return urlunsplit(parts._replace(query=query))


class FlashdutySink(Sink):
    """Open = the button's severity as ``event_status``, close = ``Ok``."""

    type = "flashduty"
    default_rate = 15.0  # Flashduty allows 100/s and 1000/min per integration key

    def __init__(self, config: FlashdutyConfig, *, site: str | None = None) -> None:
        super().__init__(config, site=site)
        self.integration_key = config.integration_key.get_secret_value()
        self.push_url = with_query(self.url, integration_key=self.integration_key)

    def build(self, message: Message) -> HttpRequest:
        """A standard alert event; the ``flic_button`` label lets callbacks find the button."""
        labels = {"flic_button": message.alert_key, "button_id": message.button_id}
        if message.click:
            labels["click"] = message.click
        site = message.site or self.site
        if site:
            labels["site"] = site
        labels["pressed_at"] = message.pressed_at.isoformat()
        if message.action == "close":
            status = "Ok"
        else:
            status = EVENT_STATUS.get(message.severity, "Critical")
        body: dict[str, Any] = {
            "title_rule": summary(message, TITLE_LIMIT),
            "event_status": status,
            "alert_key": message.alert_key[:KEY_LIMIT],
            "description": details(message)[:DESCRIPTION_LIMIT],
            "labels": labels,
        }
        headers = {**self.headers(), "Content-Type": "application/json"}
        return HttpRequest("POST", self.push_url, body, headers)

    def success_error(self, status: int, body: bytes) -> str | None:
        """A 2xx whose JSON body carries an ``error`` object failed: "CODE: message"."""
        try:
            data = json.loads(body)
        except ValueError:  # empty or not JSON: nothing says it failed
            return None
        error = data.get("error") if isinstance(data, dict) else None
        if not isinstance(error, dict):
            return None
        code = str(error.get("code") or "error")
        text = str(error.get("message") or "").strip()
        return f"{code}: {text}" if text else code
