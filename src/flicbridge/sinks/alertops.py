"""AlertOps generic API integration ("Flic" template): the key is in the URL path."""

from __future__ import annotations

from typing import Any

from flicbridge.domain import Message
from flicbridge.sinks.base import HttpRequest, Sink


class AlertOpsSink(Sink):
    """POSTs the seed's ``flic_nameId``/``flic_state``/``info`` body plus mappable extras."""

    type = "alertops"
    default_rate = 5.0

    def build(self, message: Message) -> HttpRequest:
        """``flic_state`` On opens the alert matched by ``flic_nameId``; Off closes it."""
        body: dict[str, Any] = {
            # The three fields of the "Flic" template: AlertOps maps these without setup.
            "flic_nameId": message.name_id,
            "flic_state": message.state.value,
            "info": message.info,
            # Extras AlertOps accepts and can map in its UI.
            "alert_key": message.alert_key,
            "button": message.button_name,
            "click": message.click,
            "pressed_at": message.pressed_at.isoformat(),
            "delay_s": message.delay_s,
            "action": message.action,
        }
        site = message.site or self.site
        if site:
            body["site"] = site
        headers = {**self.headers(), "Content-Type": "application/json"}
        return HttpRequest("POST", self.url, body, headers)
