"""Any HTTP endpoint: a JSON body template whose strings take ``{placeholder}`` values."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from flicbridge.config import WebhookSink as WebhookConfig
from flicbridge.domain import Message
from flicbridge.sinks.base import HttpRequest, Sink

# The keys of Message.variables(); a test keeps the two in step.
PLACEHOLDERS = frozenset(
    {
        "alert_key",
        "button_id",
        "button_name",
        "info",
        "state",
        "action",
        "click",
        "pressed_at",
        "delay_s",
        "site",
        "severity",
        "name_id",
        "event",
        "origin",
    }
)

# "{{" and "}}" are literal braces (as in str.format); "{name}" is a placeholder.
_TOKEN = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")


def render_text(text: str, values: Mapping[str, str]) -> str:
    """``text`` with known placeholders filled; unknown ones stay as written."""

    def replace(match: re.Match[str]) -> str:
        token = match.group(0)
        if token in ("{{", "}}"):
            return token[0]
        name = match.group(1)
        return values.get(name, token)

    return _TOKEN.sub(replace, text)


def _walk(node: Any, on_text: Callable[[str], str]) -> Any:
    """A copy of a JSON value with ``on_text`` applied to every string, keys included."""
    if isinstance(node, str):
        return on_text(node)
    if isinstance(node, Mapping):
        return {on_text(str(k)): _walk(v, on_text) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [_walk(v, on_text) for v in node]
    return node  # numbers, booleans, null


def render(body: Any, values: Mapping[str, str]) -> Any:
    """The body template with every string rendered from ``values``."""
    return _walk(body, lambda text: render_text(text, values))


def template_problems(body: Any) -> list[str]:
    """One line per unknown placeholder in a body template (for ``check-config``)."""
    problems: list[str] = []

    def check(node: Any, path: str) -> None:
        if isinstance(node, str):
            for match in _TOKEN.finditer(node):
                name = match.group(1)
                if name is not None and name not in PLACEHOLDERS:
                    problems.append(
                        f"{path or 'body'}: unknown placeholder {{{name}}}; known: "
                        + ", ".join(sorted(PLACEHOLDERS))
                    )
        elif isinstance(node, Mapping):
            for key, value in node.items():
                where = f"{path}.{key}" if path else str(key)
                check(str(key), where)
                check(value, where)
        elif isinstance(node, list | tuple):
            for i, value in enumerate(node):
                check(value, f"{path}[{i}]")

    check(body, "")
    return problems


class WebhookSink(Sink):
    """Sends the configured body template, rendered for the message, with the configured method."""

    type = "webhook"
    default_rate = 20.0

    def __init__(self, config: WebhookConfig, *, site: str | None = None) -> None:
        super().__init__(config, site=site)
        self.method = config.method
        self.body = config.body

    def build(self, message: Message) -> HttpRequest:
        """The template rendered from ``message.variables()``; values are always strings."""
        values = message.variables()
        if not values.get("site") and self.site:
            values["site"] = self.site
        headers = {**self.headers(), "Content-Type": "application/json"}
        return HttpRequest(self.method, self.url, render(self.body, values), headers)
