"""One HTTP delivery attempt and the one place that decides what its outcome means.

A sink builds the request and may read a 2xx body; everything else is decided here:
2xx is delivered (unless the sink finds an error in the body), 408/429/5xx and
network errors are retried, any other status is dead. Every ``detail`` is safe to
log: sink URLs appear as scheme://host:port only and known secrets are masked,
also where a response body or an aiohttp exception echoes them.
"""

from __future__ import annotations

import html
import json
import random
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any, Literal
from urllib.parse import parse_qsl, quote, quote_plus, urlsplit

import aiohttp
import structlog
from pydantic import SecretStr

from flicbridge.domain import Message
from flicbridge.sinks.base import DirectSink, HttpRequest, Sink

log = structlog.get_logger(__name__)

RETRY_AFTER_CAP = 3600.0  # a Retry-After is honoured up to one hour
BODY_LIMIT = 64 * 1024  # enough for any error document; a huge answer is not read on
EXCERPT_LIMIT = 300
MASK = "***"
# Path segments and query values this long may be keys (AlertOps keeps its key in the
# path); shorter ones ("v2", "Flic") are left readable.
_KEYLIKE = 8

_WHITESPACE = re.compile(r"\s+")
_HTML_DROP = re.compile(r"<(script|style)\b.*?</\1\s*>|<!--.*?-->", re.IGNORECASE | re.DOTALL)
_HTML_TAG = re.compile(r"<[^>]*>")
_DELTA_SECONDS = re.compile(r"\d+(\.\d+)?")


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to; ``detail`` never contains a secret or a URL path."""

    kind: Literal["delivered", "retry", "dead"]
    status: int | None
    detail: str
    retry_after: float | None = None  # seconds; a minimum for the next attempt
    pause_sink: bool = False  # 429: the platform throttles the whole key, not one row


# -- secrets and excerpts ------------------------------------------------------------


def _secret_values(value: Any) -> Iterator[str]:
    """Every SecretStr inside a config value (url, keys, header values)."""
    if isinstance(value, SecretStr):
        yield value.get_secret_value()
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _secret_values(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _secret_values(item)


def _masks(sink: Sink) -> list[tuple[str, str]]:
    """(text, replacement) pairs that hide the sink's secrets, longest text first."""
    pairs: dict[str, str] = {}
    parts = urlsplit(sink.url)
    pieces = [parts.query, parts.username or "", parts.password or ""]
    if len(parts.path) > 1:
        pieces.append(parts.path)
        pieces.append(parts.path + ("?" + parts.query if parts.query else ""))
    pieces += [segment for segment in parts.path.split("/") if len(segment) >= _KEYLIKE]
    pieces += [value for _, value in parse_qsl(parts.query) if value]
    config = sink.config
    pieces += [
        secret
        for name in type(config).model_fields
        if name != "url"
        for secret in _secret_values(getattr(config, name))
    ]
    for piece in pieces:
        # Below four characters a "secret" would mask ordinary words, and guards nothing.
        if len(piece) >= 4:
            for form in {piece, quote(piece), quote(piece, safe=""), quote_plus(piece)}:
                pairs[form] = MASK
    # The whole URL reads better as its public form than as a mask.
    pairs[sink.url] = sink.public_url
    return sorted(pairs.items(), key=lambda pair: len(pair[0]), reverse=True)


def redact(sink: Sink, text: str) -> str:
    """``text`` with the sink's URL reduced to scheme://host:port and its secrets masked."""
    # Any URL on the sink's host goes, whatever its path or query: the client may have
    # normalised the configured URL or added the key to it (Flashduty's query).
    on_host = re.escape(sink.public_url) + r"(?![\w.-])[^\s'\"<>)]*"
    text = re.sub(on_host, lambda _: sink.public_url, text)
    for secret, replacement in _masks(sink):
        text = text.replace(secret, replacement)
    return text


def _clip(text: str, limit: int = EXCERPT_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """A header value, case-insensitively, from any mapping."""
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


def body_excerpt(sink: Sink, headers: Mapping[str, str], body: bytes) -> str:
    """A short, one-line, secret-free excerpt of a response body (HTML reduced to text)."""
    text = body[:BODY_LIMIT].decode("utf-8", errors="replace")
    content_type = (_header(headers, "content-type") or "").lower()
    if "html" in content_type or text.lstrip().startswith("<"):
        text = html.unescape(_HTML_TAG.sub(" ", _HTML_DROP.sub(" ", text)))
    text = _WHITESPACE.sub(" ", text).strip()
    # Mask before clipping, so a key cut in half by the clip is not left behind.
    return _clip(redact(sink, text))


# -- classification ------------------------------------------------------------------


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After (delta-seconds or HTTP-date), capped; None if unusable."""
    if value is None:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        seconds = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # "-0000" parses naive; HTTP-dates are GMT
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds < 0:  # a date in the past asks for nothing
        return None
    return min(seconds, RETRY_AFTER_CAP)


def classify(
    sink: Sink,
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    now: float | None = None,
) -> Outcome:
    """Delivered, retry or dead for an HTTP answer (``now``: epoch seconds, for HTTP-dates)."""
    if 200 <= status < 300:
        error = sink.success_error(status, body)
        if error is None:
            return Outcome("delivered", status, f"HTTP {status}")
        return Outcome("dead", status, f"HTTP {status}: {_clip(redact(sink, error))}")
    excerpt = body_excerpt(sink, headers, body)
    detail = f"HTTP {status}: {excerpt}" if excerpt else f"HTTP {status}"
    if status in (408, 429) or status >= 500:
        retry_after = parse_retry_after(_header(headers, "retry-after"), now)
        return Outcome("retry", status, detail, retry_after, pause_sink=status == 429)
    if 300 <= status < 400:
        # Following a redirect would turn the POST into a GET and could carry the key
        # to another host: the URL is wrong and needs fixing, retrying cannot help.
        detail += " (redirect not followed: check the sink URL)"
    return Outcome("dead", status, detail)


def classify_exception(sink: Sink, exc: Exception) -> Outcome:
    """Retry for timeouts and network errors; dead for a URL that can never work or a bug."""
    message = _clip(redact(sink, str(exc)))
    name = type(exc).__name__
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return Outcome("dead", None, f"{name}: invalid sink URL {sink.public_url}")
    if isinstance(exc, TimeoutError):  # also aiohttp's ServerTimeoutError family
        return Outcome("retry", None, f"timed out ({name}{': ' + message if message else ''})")
    if isinstance(exc, aiohttp.ClientError | OSError):
        return Outcome("retry", None, f"{name}: {message}" if message else name)
    # Anything else is a defect in building or encoding the request: retrying repeats it.
    return Outcome("dead", None, f"cannot send: {name}: {message}" if message else name)


async def _read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """At most ``limit`` bytes of the body; the rest is discarded with the connection."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await response.content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


async def send_and_classify(
    session: aiohttp.ClientSession,
    sink: Sink,
    request: HttpRequest,
    timeout: float,  # noqa: ASYNC109 - per sink, and aiohttp's own timeout names its phase
) -> tuple[Outcome, bytes]:
    """Send ``request`` once for ``sink`` and classify the answer, with the body read.

    ``timeout`` covers connect to last byte; a redirect is not followed; at most
    ``BODY_LIMIT`` bytes of the body are read (none when the request failed).
    """
    try:
        data = json.dumps(request.json).encode("utf-8")
        async with session.request(
            request.method,
            request.url,
            data=data,
            headers=dict(request.headers),
            timeout=aiohttp.ClientTimeout(total=timeout),
            allow_redirects=False,
        ) as response:
            body = await _read_bounded(response, BODY_LIMIT)
            return classify(sink, response.status, response.headers, body), body
    except Exception as exc:  # CancelledError is a BaseException: it propagates
        return classify_exception(sink, exc), b""


async def attempt(
    session: aiohttp.ClientSession,
    sink: Sink,
    message: Message,
    timeout: float,  # noqa: ASYNC109 - per sink, and aiohttp's own timeout names its phase
) -> Outcome:
    """Send ``message`` to ``sink`` once (``timeout`` covers connect to last byte) and classify."""
    if isinstance(sink, DirectSink):  # its own protocol (MQTT): the same three outcomes
        try:
            result = await sink.deliver(message, timeout)
        except Exception as exc:  # a bug of the sink's is retried like a network error
            return classify_exception(sink, exc)
        return Outcome(result.kind, None, redact(sink, result.detail))
    try:
        request = sink.build(message)
    except Exception as exc:  # a defect in building the request: classified like sending it
        return classify_exception(sink, exc)
    outcome, body = await send_and_classify(session, sink, request, timeout)
    if outcome.kind == "delivered":
        try:
            sink.on_delivered(message, body)
        except Exception:  # what a later message needs is lost, never the delivery
            log.exception("sink_on_delivered_failed", sink=sink.id)
    return outcome


# -- backoff ---------------------------------------------------------------------------


def backoff_delay(attempts: int, initial: float, cap: float, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(cap, initial * 2**attempts)]."""
    # The exponent is bounded so that a long outage cannot overflow the float.
    ceiling = min(cap, initial * 2 ** min(max(attempts, 0), 64))
    return rng.uniform(0, ceiling)


def next_delay(
    outcome: Outcome, attempts: int, initial: float, cap: float, rng: random.Random
) -> float:
    """Seconds before the next attempt: the backoff, or longer if the platform said so."""
    delay = backoff_delay(attempts, initial, cap, rng)
    if outcome.retry_after is not None:
        # A Retry-After is a minimum even above ``cap``, but never more than an hour.
        delay = max(delay, min(outcome.retry_after, RETRY_AFTER_CAP))
    return delay
