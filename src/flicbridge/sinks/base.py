"""What a sink is: it builds the HTTP request for a Message and, where its platform
needs it, reads a 2xx body. Retries, backoff, pacing and bookkeeping belong to the
dispatcher; the retry-or-dead decision for an HTTP outcome lives in ``delivery``."""

from __future__ import annotations

import socket
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol
from urllib.parse import urlsplit

from flicbridge import __version__
from flicbridge.config import ButtonConfig, SinkConfig
from flicbridge.domain import Message, Signal


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One HTTP attempt, fully built: the dispatcher sends it as it is."""

    method: str
    url: str
    json: Any
    headers: Mapping[str, str] = field(default_factory=dict)


def public_url(url: str) -> str:
    """The part of a URL that may be logged: scheme://host[:port] (keys hide in paths/queries)."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}"


class Sink(ABC):
    """One configured destination. Subclasses set ``type`` and ``default_rate``."""

    type: ClassVar[str]
    default_rate: ClassVar[float]  # messages per second, under the platform's published limit

    def __init__(self, config: SinkConfig, *, site: str | None = None) -> None:
        self.config = config
        self.id = config.id
        self.site = site or ""
        self.source_name = site or socket.gethostname()
        self.rate = config.rate or self.default_rate
        self.burst = config.burst
        self.url = config.url.get_secret_value()
        self.public_url = public_url(self.url)
        self.version = __version__

    def headers(self) -> dict[str, str]:
        """The configured extra headers, secrets resolved."""
        return {k: v.get_secret_value() for k, v in self.config.headers.items()}

    @abstractmethod
    def build(self, message: Message) -> HttpRequest:
        """The request that delivers ``message`` to this platform."""

    def on_delivered(self, message: Message, body: bytes) -> None:
        """A 2xx answer delivered ``message``: keep what a later message needs from it."""
        return None

    def success_error(self, status: int, body: bytes) -> str | None:
        """For a 2xx answer: None if it is a success, else why it is a permanent failure."""
        return None


@dataclass(frozen=True, slots=True)
class DirectResult:
    """What one direct attempt came to; ``delivery`` turns it into its ``Outcome``."""

    kind: Literal["delivered", "retry", "dead"]
    detail: str


class SignalTaker(Protocol):
    """What a direct sink may ask of the bridge: take a signal, read button health."""

    @property
    def buttons(self) -> Mapping[str, Any]:
        """Button id → its status (``battery``, ``connected``)."""

    def submit(self, signal: Signal) -> Any: ...


class DirectSink(Sink):
    """A sink that speaks its own protocol (MQTT) instead of HTTP.

    The dispatcher still owns retries, backoff, order and dead letters: ``deliver``
    makes one attempt and says what it came to. ``run`` is the sink's own connection,
    started beside the dispatcher by the one wiring point (``app``).
    """

    def build(self, message: Message) -> HttpRequest:
        raise TypeError(f"{self.type} sinks deliver directly, not over HTTP")

    @abstractmethod
    async def deliver(self, message: Message, timeout: float) -> DirectResult:  # noqa: ASYNC109
        """One attempt, bounded by ``timeout``."""

    @abstractmethod
    async def run(self, bridge: SignalTaker, keys: Mapping[str, ButtonConfig]) -> None:
        """Keep the connection until cancelled; ``keys``: alert key → button it serves."""
