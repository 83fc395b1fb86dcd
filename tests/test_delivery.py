"""Retry or dead-letter: what each answer of a real HTTP peer on 127.0.0.1 comes to."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from flicbridge.config import config_from_mapping
from flicbridge.delivery import (
    Outcome,
    attempt,
    backoff_delay,
    classify,
    classify_exception,
    next_delay,
    parse_retry_after,
)
from flicbridge.domain import Message, SignalState
from flicbridge.sinks import Sink, build_sink
from tests.receiver import Receiver

SECRET_PATH = "/POSTAlert/SECRETKEY/Flic"
# Strings no detail may ever contain: the AlertOps key path and every configured secret.
SECRETS = ("SECRETKEY", "/POSTAlert", "fd-secret-key", "pd-routing-secret", "hook-token-9")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def make_message(action: str = "open") -> Message:
    return Message(
        alert_key="hq/reception",
        button_id="reception",
        button_name="Reception panic button",
        name_id="reception",
        info="Front desk",
        state=SignalState.ON if action == "open" else SignalState.OFF,
        action=action,
        click="single_click",
        pressed_at=datetime(2024, 5, 1, 10, 0, 0, tzinfo=UTC),
        delay_s=0.0,
        site="hq",
        severity="critical",
        event=1,
    )


def make_sink(sink: dict[str, Any]) -> Sink:
    config = config_from_mapping(
        {
            "site": "hq",
            "buttons": [{"id": "reception", "address": "80:e4:da:70:00:01"}],
            "sinks": [{"id": "s", **sink}],
        },
        base_dir=Path.cwd(),
    )
    return build_sink(config.sinks[0], config.site)


def alertops(base: str) -> Sink:
    return make_sink({"type": "alertops", "url": base + SECRET_PATH})


def flashduty(base: str) -> Sink:
    return make_sink(
        {
            "type": "flashduty",
            "url": base + "/event/push/alert/standard",
            "integration_key": "fd-secret-key",
        }
    )


def assert_safe(outcome: Outcome, sink: Sink) -> None:
    for secret in SECRETS:
        assert secret not in outcome.detail, outcome.detail
    assert sink.url not in outcome.detail


async def send(session: aiohttp.ClientSession, sink: Sink, seconds: float = 2.0) -> Outcome:
    return await attempt(session, sink, make_message(), seconds)


# -- 2xx ---------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 202, 204])
async def test_2xx_is_delivered(
    receiver: Receiver, session: aiohttp.ClientSession, status: int
) -> None:
    """Any 2xx delivers, with or without a body."""
    receiver.script.append((status, b"" if status == 204 else b'{"status": "success"}', {}))
    outcome = await send(session, alertops(receiver.url))
    assert outcome == Outcome("delivered", status, f"HTTP {status}", None, False)


async def test_flashduty_2xx_with_error_object_is_dead_with_its_message(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    """Flashduty's 200 carrying an error object is a permanent failure, "CODE: message"."""
    sink = flashduty(receiver.url)
    body = (
        b'{"request_id": "r1", "error": {"code": "InvalidParameter",'
        b' "message": "integration_key fd-secret-key is disabled"}}'
    )
    receiver.script.append((200, body, {}))
    outcome = await send(session, sink)
    assert outcome.kind == "dead"
    assert outcome.status == 200
    assert outcome.detail == "HTTP 200: InvalidParameter: integration_key *** is disabled"
    assert_safe(outcome, sink)


@pytest.mark.parametrize(
    "body", [b"", b"OK", b'{"request_id": "r1", "data": {"alert_key": "hq/reception"}}']
)
async def test_flashduty_2xx_without_error_object_is_delivered(
    receiver: Receiver, session: aiohttp.ClientSession, body: bytes
) -> None:
    """An empty, non-JSON or success body from Flashduty is a success."""
    receiver.script.append((200, body, {}))
    assert (await send(session, flashduty(receiver.url))).kind == "delivered"


# -- permanent failures ------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, "InvalidParameter"),
        (401, "Unauthorized"),
        (403, "AccessDenied"),
        (404, "RouteNotFound"),
    ],
)
async def test_other_4xx_is_dead_with_the_platforms_message(
    receiver: Receiver, session: aiohttp.ClientSession, status: int, code: str
) -> None:
    """400/401/403/404 are not retried; the platform's explanation is kept, secrets masked."""
    sink = flashduty(receiver.url)
    body = f'{{"error": {{"code": "{code}", "message": "bad key fd-secret-key"}}}}'
    receiver.script.append((status, body.encode(), {"Content-Type": "application/json"}))
    outcome = await send(session, sink)
    assert outcome.kind == "dead"
    assert outcome.status == status
    assert not outcome.pause_sink
    assert outcome.detail == (
        f'HTTP {status}: {{"error": {{"code": "{code}", "message": "bad key ***"}}}}'
    )
    assert_safe(outcome, sink)


async def test_pagerduty_400_is_dead_and_hides_the_routing_key(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    """PagerDuty's 400 reason is kept even when it quotes the routing key."""
    sink = make_sink(
        {
            "type": "pagerduty",
            "url": receiver.url + "/v2/enqueue",
            "routing_key": "pd-routing-secret",
        }
    )
    body = (
        b'{"status":"invalid event","message":"Event object is invalid",'
        b'"errors":["Length of \'routing_key\' pd-routing-secret is incorrect"]}'
    )
    receiver.script.append((400, body, {}))
    outcome = await send(session, sink)
    assert outcome.kind == "dead"
    assert "Event object is invalid" in outcome.detail
    assert "'routing_key' *** is incorrect" in outcome.detail
    assert_safe(outcome, sink)


async def test_redirect_is_dead_and_not_followed(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    """A 301 is a wrong URL: it is not followed (no GET, no key sent elsewhere)."""
    sink = alertops(receiver.url)
    receiver.script.append((301, b"", {"Location": receiver.url + "/elsewhere" + SECRET_PATH}))
    outcome = await send(session, sink)
    assert outcome.kind == "dead"
    assert outcome.status == 301
    assert "redirect not followed" in outcome.detail
    assert [(r.path, r.query) for r in receiver.requests] == [(SECRET_PATH, {})]
    assert_safe(outcome, sink)


async def test_html_error_page_becomes_a_short_text_excerpt(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    """An HTML page is reduced to its text, whitespace collapsed, the echoed URL path hidden."""
    sink = alertops(receiver.url)
    page = (
        "<!DOCTYPE html>\n<html><head><title>404 Not Found</title>\n"
        "<style>body { color: red; }</style><script>var x = 1;</script></head>\n"
        f"<body>\n  <h1>Not   Found</h1>\n  <p>Cannot POST {SECRET_PATH} &amp; sorry</p>\n"
        "<!-- served by nginx -->\n</body></html>"
    )
    receiver.script.append((404, page.encode(), {"Content-Type": "text/html; charset=utf-8"}))
    outcome = await send(session, sink)
    assert outcome.kind == "dead"
    assert outcome.detail == "HTTP 404: 404 Not Found Not Found Cannot POST *** & sorry"
    assert_safe(outcome, sink)


async def test_a_huge_body_is_cut_to_a_short_excerpt(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    """Only a bounded part of the body is read and at most 300 chars of it are kept."""
    receiver.script.append((400, b"x" * 1_000_000, {}))
    outcome = await send(session, alertops(receiver.url))
    assert outcome.kind == "dead"
    excerpt = outcome.detail.removeprefix("HTTP 400: ")
    assert len(excerpt) == 300
    assert excerpt.endswith("…")


# -- retries -----------------------------------------------------------------------


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503])
async def test_408_429_and_5xx_are_retried_and_429_pauses_the_sink(
    receiver: Receiver, session: aiohttp.ClientSession, status: int
) -> None:
    """Throttling, timeouts and server errors retry; only 429 pauses the whole sink."""
    receiver.script.append((status, b"", {}))
    outcome = await send(session, alertops(receiver.url))
    assert outcome == Outcome("retry", status, f"HTTP {status}", None, status == 429)


async def test_retry_after_seconds_is_honoured(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    """A delta-seconds Retry-After becomes the outcome's minimum delay."""
    receiver.script.append((429, b'{"error": "slow down"}', {"Retry-After": "30"}))
    outcome = await send(session, alertops(receiver.url))
    assert outcome.kind == "retry"
    assert outcome.pause_sink
    assert outcome.retry_after == 30.0
    assert outcome.detail == 'HTTP 429: {"error": "slow down"}'


async def test_retry_after_http_date_is_honoured(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    """An HTTP-date Retry-After becomes seconds from now."""
    when = format_datetime(datetime.fromtimestamp(time.time() + 120, UTC), usegmt=True)
    receiver.script.append((503, b"", {"Retry-After": when}))
    outcome = await send(session, alertops(receiver.url))
    assert outcome.kind == "retry"
    assert outcome.retry_after is not None
    assert 110 <= outcome.retry_after <= 121


async def test_garbage_retry_after_is_ignored(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    """An unreadable Retry-After leaves the backoff alone."""
    receiver.script.append((503, b"", {"Retry-After": "soon, maybe"}))
    outcome = await send(session, alertops(receiver.url))
    assert outcome.kind == "retry"
    assert outcome.retry_after is None


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("0", 0.0),
        (" 45 ", 45.0),
        ("1.5", 1.5),
        ("99999", 3600.0),
        ("-5", None),
        ("", None),
        ("soon", None),
        ("Wed, 01 May 2024 10:01:00 GMT", 60.0),
        ("Wed, 01 May 2024 10:01:00 -0000", 60.0),
        ("Wed, 01 May 2024 09:59:00 GMT", None),
        ("Sat, 01 Jun 2024 10:00:00 GMT", 3600.0),
        (None, None),
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    """Seconds or HTTP-date, capped at an hour; negative, past or garbage is ignored."""
    now = datetime(2024, 5, 1, 10, 0, 0, tzinfo=UTC).timestamp()
    assert parse_retry_after(value, now) == seconds


def test_classify_reads_retry_after_case_insensitively_from_any_mapping() -> None:
    """A plain dict of headers works as well as aiohttp's multidict."""
    sink = alertops("http://127.0.0.1:9")
    outcome = classify(sink, 429, {"retry-after": "7"}, b"")
    assert outcome.retry_after == 7.0


async def test_a_peer_that_hangs_past_the_timeout_is_retried(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    """An answer that never comes ends at the timeout as a retry, the URL hidden."""
    sink = alertops(receiver.url)
    receiver.script.append("hang")
    started = time.monotonic()
    outcome = await send(session, sink, seconds=0.2)
    assert time.monotonic() - started < 5
    assert outcome.kind == "retry"
    assert outcome.status is None
    assert outcome.detail.startswith("timed out")
    assert_safe(outcome, sink)


async def test_connection_refused_is_retried(session: aiohttp.ClientSession) -> None:
    """Nobody listening is a network error: retry, with the URL hidden."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sink = alertops(f"http://127.0.0.1:{port}")
    outcome = await send(session, sink)
    assert outcome.kind == "retry"
    assert outcome.status is None
    assert not outcome.pause_sink
    assert "ClientConnectorError" in outcome.detail
    assert_safe(outcome, sink)


async def test_cancellation_propagates(receiver: Receiver, session: aiohttp.ClientSession) -> None:
    """Cancelling an attempt cancels it; it is never turned into an outcome."""
    receiver.script.append("hang")
    task = asyncio.create_task(send(session, alertops(receiver.url), seconds=5.0))
    await receiver.wait_for(1, timeout=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# -- exceptions and secrets --------------------------------------------------------


def test_exception_details_never_carry_the_url_or_keys() -> None:
    """aiohttp embeds the full URL in its messages; the detail keeps only scheme://host:port."""
    sink = flashduty("https://api.example.invalid")
    full = "https://api.example.invalid/event/push/alert/standard?integration_key=fd-secret-key"
    cases: list[tuple[Exception, str]] = [
        (aiohttp.ServerTimeoutError(f"Connection timeout to host {full}"), "retry"),
        (aiohttp.ClientPayloadError(f"Response payload is not completed for {full}"), "retry"),
        (OSError(104, f"Connection reset by peer ({full})"), "retry"),
        (TimeoutError(), "retry"),
        (aiohttp.InvalidURL(full), "dead"),
        (ValueError(f"cannot encode the body for {full}"), "dead"),
    ]
    for exc, kind in cases:
        outcome = classify_exception(sink, exc)
        assert outcome.kind == kind, exc
        assert outcome.status is None
        assert_safe(outcome, sink)
        assert "/event/push" not in outcome.detail
    timeout = classify_exception(sink, cases[0][0])
    assert timeout.detail == (
        "timed out (ServerTimeoutError: Connection timeout to host https://api.example.invalid)"
    )


async def test_header_secrets_are_masked_when_echoed(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    """A webhook's Authorization value echoed by a 401 page does not reach the detail."""
    sink = make_sink(
        {
            "type": "webhook",
            "url": receiver.url + "/hook",
            "headers": {"Authorization": "Bearer hook-token-9"},
        }
    )
    receiver.script.append((401, b"bad credentials: Bearer hook-token-9", {}))
    outcome = await send(session, sink)
    assert outcome.kind == "dead"
    assert outcome.detail == "HTTP 401: bad credentials: ***"


# -- backoff -----------------------------------------------------------------------


def test_backoff_is_full_jitter_under_the_cap() -> None:
    """The delay is uniform in [0, min(cap, initial * 2**attempts)]."""
    rng = random.Random(1)
    for attempts, ceiling in [(0, 1.0), (1, 2.0), (3, 8.0), (20, 300.0), (10_000, 300.0)]:
        delays = [backoff_delay(attempts, 1.0, 300.0, rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # it spreads over the whole range


def test_next_delay_treats_retry_after_as_a_minimum_above_the_cap() -> None:
    """Retry-After wins over a shorter backoff, even beyond backoff_max, up to an hour."""
    rng = random.Random(2)
    plain = Outcome("retry", 503, "HTTP 503", None, False)
    assert 0 <= next_delay(plain, 2, 1.0, 300.0, rng) <= 4.0
    told = Outcome("retry", 429, "HTTP 429", 900.0, True)
    assert next_delay(told, 0, 1.0, 300.0, rng) == 900.0
    huge = Outcome("retry", 429, "HTTP 429", 86_400.0, True)
    assert next_delay(huge, 0, 1.0, 300.0, rng) == 3600.0
