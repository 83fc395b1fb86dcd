"""What each sink puts on the wire, checked at a real aiohttp receiver on 127.0.0.1."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from flicbridge.config import config_from_mapping
from flicbridge.delivery import Outcome, attempt
from flicbridge.domain import Message, SignalState
from flicbridge.sinks import SINK_CLASSES, Sink, build_sink
from flicbridge.sinks.alertops import AlertOpsSink
from flicbridge.sinks.flashduty import FlashdutySink
from flicbridge.sinks.ilert import IlertSink
from flicbridge.sinks.incidentio import IncidentIoSink
from flicbridge.sinks.mqtt import MqttSink
from flicbridge.sinks.ntfy import NtfySink
from flicbridge.sinks.opsgenie import OpsgenieSink
from flicbridge.sinks.pagerduty import PagerDutySink
from flicbridge.sinks.pushover import PushoverSink
from flicbridge.sinks.splunk_oncall import SplunkOnCallSink
from flicbridge.sinks.webhook import PLACEHOLDERS, WebhookSink, template_problems
from tests.receiver import Receiver

PRESSED = "2024-05-01T10:00:00+00:00"
SUMMARY = f"Reception panic button: Front desk, ground floor (pressed {PRESSED})"
DETAILS = (
    "Button: Reception panic button (reception)\n"
    "Info: Front desk, ground floor\n"
    f"Pressed at: {PRESSED}\n"
    "Gesture: single_click\n"
    "Site: hq\n"
    "Origin: press"
)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def make_message(action: str = "open", **changes: Any) -> Message:
    message = Message(
        alert_key="hq/reception",
        button_id="reception",
        button_name="Reception panic button",
        name_id="reception",
        info="Front desk, ground floor",
        state=SignalState.ON if action == "open" else SignalState.OFF,
        action=action,
        click="single_click" if action == "open" else "double_click",
        pressed_at=datetime(2024, 5, 1, 10, 0, 0, tzinfo=UTC),
        delay_s=0.0,
        site="hq",
        severity="critical",
        event=42,
    )
    return replace(message, **changes)


def make_sink(sink: dict[str, Any], site: str | None = "hq") -> Sink:
    """A sink built the way the daemon builds it: from a validated configuration."""
    data: dict[str, Any] = {
        "buttons": [{"id": "reception", "address": "80:e4:da:70:00:01"}],
        "sinks": [{"id": "s", **sink}],
    }
    if site:
        data["site"] = site
    config = config_from_mapping(data, base_dir=Path.cwd())
    return build_sink(config.sinks[0], config.site)


async def send(session: aiohttp.ClientSession, sink: Sink, message: Message) -> Outcome:
    return await attempt(session, sink, message, timeout=2.0)


# -- AlertOps ----------------------------------------------------------------------


async def test_alertops_open_posts_the_flic_template_with_extras(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    """An open is flic_state On under flic_nameId, with the extras, to the secret URL path."""
    sink = make_sink(
        {
            "type": "alertops",
            "url": f"{receiver.url}/POSTAlert/SECRETKEY/Flic",
            "headers": {"X-Team": "ops"},
        }
    )
    outcome = await send(session, sink, make_message("open"))
    assert outcome.kind == "delivered"
    (request,) = receiver.requests
    assert request.method == "POST"
    assert request.path == "/POSTAlert/SECRETKEY/Flic"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["X-Team"] == "ops"
    assert request.json() == {
        "flic_nameId": "reception",
        "flic_state": "On",
        "info": "Front desk, ground floor",
        "alert_key": "hq/reception",
        "button": "Reception panic button",
        "click": "single_click",
        "pressed_at": PRESSED,
        "delay_s": 0.0,
        "action": "open",
        "site": "hq",
    }


async def test_alertops_close_is_flic_state_off_and_omits_an_unset_site(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    """A close is flic_state Off; without a site there is no site field."""
    sink = make_sink(
        {"type": "alertops", "url": f"{receiver.url}/POSTAlert/SECRETKEY/Flic"}, site=None
    )
    message = make_message("close", site="", alert_key="reception", delay_s=12.5)
    assert (await send(session, sink, message)).kind == "delivered"
    assert receiver.requests[0].json() == {
        "flic_nameId": "reception",
        "flic_state": "Off",
        "info": "Front desk, ground floor",
        "alert_key": "reception",
        "button": "Reception panic button",
        "click": "double_click",
        "pressed_at": PRESSED,
        "delay_s": 12.5,
        "action": "close",
    }


# -- webhook -----------------------------------------------------------------------


async def test_webhook_default_template_renders_every_field(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    """The default body template carries key, state, action, button, info and press time."""
    sink = make_sink({"type": "webhook", "url": f"{receiver.url}/hook"})
    assert (await send(session, sink, make_message("close"))).kind == "delivered"
    (request,) = receiver.requests
    assert request.method == "POST"
    assert request.headers["Content-Type"] == "application/json"
    assert request.json() == {
        "alert_key": "hq/reception",
        "state": "Off",
        "action": "close",
        "button": "Reception panic button",
        "info": "Front desk, ground floor",
        "pressed_at": PRESSED,
    }


async def test_webhook_custom_template_method_and_headers(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    """Placeholders fill every string at any depth; other JSON values, unknown placeholders
    and doubled braces come through as written."""
    body = {
        "text": "{button_name} is {state} ({click}, {delay_s} s late) at {site}",
        "key": "{alert_key}",
        "delay": "{delay_s}",
        "tags": ["{severity}", "{name_id}", "{button_id}", 7, True, None],
        "nested": {"{action}": {"when": "{pressed_at}", "info": "{info}"}},
        "unknown": "{nope} and {state}",
        "literal": "{{state}} is {{{state}}}",
        "json_in_text": '{"a": 1}',
    }
    sink = make_sink(
        {
            "type": "webhook",
            "url": f"{receiver.url}/hook?x=1",
            "method": "PUT",
            "body": body,
            "headers": {"Authorization": "Bearer hook-token"},
        }
    )
    message = make_message("open", delay_s=3.0)
    assert (await send(session, sink, message)).kind == "delivered"
    (request,) = receiver.requests
    assert request.method == "PUT"
    assert request.query == {"x": "1"}
    assert request.headers["Authorization"] == "Bearer hook-token"
    assert request.json() == {
        "text": "Reception panic button is On (single_click, 3 s late) at hq",
        "key": "hq/reception",
        "delay": "3",
        "tags": ["critical", "reception", "reception", 7, True, None],
        "nested": {"open": {"when": PRESSED, "info": "Front desk, ground floor"}},
        "unknown": "{nope} and On",
        "literal": "{state} is {On}",
        "json_in_text": '{"a": 1}',
    }


def test_webhook_template_problems_name_each_unknown_placeholder_with_its_path() -> None:
    """check-config learns of every placeholder typo and where it is."""
    body = {"a": "{alert_key}", "b": ["ok", {"c": "{nmae} {stat}"}], "{{literal}}": "{{x}}"}
    problems = template_problems(body)
    assert len(problems) == 2
    assert problems[0].startswith("b[1].c: unknown placeholder {nmae}")
    assert problems[1].startswith("b[1].c: unknown placeholder {stat}")
    assert "button_name" in problems[0]  # the known names are listed to fix the typo


def test_webhook_default_template_has_no_problems() -> None:
    """The shipped default body uses only known placeholders."""
    sink = make_sink({"type": "webhook", "url": "http://127.0.0.1:9/hook"})
    assert isinstance(sink, WebhookSink)
    assert template_problems(sink.body) == []


def test_webhook_placeholders_are_the_message_variables() -> None:
    """The placeholder list check-config uses matches what a message provides."""
    assert set(make_message().variables()) == PLACEHOLDERS


# -- PagerDuty ---------------------------------------------------------------------


async def test_pagerduty_trigger_carries_routing_key_and_payload(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    """An open is an Events v2 trigger with routing_key in the body and the full payload."""
    sink = make_sink(
        {"type": "pagerduty", "url": f"{receiver.url}/v2/enqueue", "routing_key": "R" * 32}
    )
    assert (await send(session, sink, make_message("open"))).kind == "delivered"
    (request,) = receiver.requests
    assert request.path == "/v2/enqueue"
    assert request.headers["Content-Type"] == "application/json"
    assert request.json() == {
        "routing_key": "R" * 32,
        "event_action": "trigger",
        "dedup_key": "hq/reception",
        "payload": {
            "summary": SUMMARY,
            "source": "hq",
            "severity": "critical",
            "timestamp": PRESSED,
            "custom_details": {
                "click": "single_click",
                "delay_s": 0.0,
                "queued": False,
                "bridge_version": sink.version,
                "button_id": "reception",
                "origin": "press",
            },
        },
        "client": "flicbridge",
    }


async def test_pagerduty_resolve_is_key_action_and_dedup_key_only(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    """A close is a resolve of the same dedup_key."""
    sink = make_sink(
        {"type": "pagerduty", "url": f"{receiver.url}/v2/enqueue", "routing_key": "R" * 32}
    )
    assert (await send(session, sink, make_message("close"))).kind == "delivered"
    assert receiver.requests[0].json() == {
        "routing_key": "R" * 32,
        "event_action": "resolve",
        "dedup_key": "hq/reception",
    }


def test_pagerduty_limits_and_hostname_source() -> None:
    """Summary ≤ 1024 keeping the press time, dedup_key ≤ 255, source = hostname without site."""
    sink = make_sink({"type": "pagerduty", "routing_key": "R" * 32}, site=None)
    assert sink.url == "https://events.pagerduty.com/v2/enqueue"
    message = make_message("open", info="x" * 5000, alert_key="k" * 400, delay_s=90.0, queued=True)
    body = sink.build(message).json
    summary = body["payload"]["summary"]
    assert len(summary) == 1024
    assert summary.endswith(f"… (pressed {PRESSED})")
    assert body["dedup_key"] == "k" * 255
    assert body["payload"]["source"] == socket.gethostname()
    assert body["payload"]["custom_details"]["queued"] is True


# -- iLert -------------------------------------------------------------------------


async def test_ilert_alert_carries_integration_key_summary_labels(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    """An open is eventType ALERT with integrationKey, alertKey, priority HIGH and labels."""
    sink = make_sink(
        {"type": "ilert", "url": f"{receiver.url}/api/events", "integration_key": "il-key-1"}
    )
    assert (await send(session, sink, make_message("open"))).kind == "delivered"
    (request,) = receiver.requests
    assert request.path == "/api/events"
    assert "Authorization" not in request.headers
    assert request.json() == {
        "integrationKey": "il-key-1",
        "eventType": "ALERT",
        "alertKey": "hq/reception",
        "summary": SUMMARY,
        "details": DETAILS,
        "priority": "HIGH",
        "labels": {"flic_button": "hq/reception", "button_id": "reception", "site": "hq"},
        "customDetails": {
            "click": "single_click",
            "delay_s": 0.0,
            "queued": False,
            "bridge_version": sink.version,
            "button_id": "reception",
            "origin": "press",
            "pressed_at": PRESSED,
        },
    }


async def test_ilert_resolve_still_sends_a_summary(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    """A close is eventType RESOLVE of the same alertKey, with summary and details."""
    sink = make_sink(
        {"type": "ilert", "url": f"{receiver.url}/api/events", "integration_key": "il-key-1"}
    )
    message = make_message("close", severity="warning")
    assert (await send(session, sink, message)).kind == "delivered"
    body = receiver.requests[0].json()
    assert body["integrationKey"] == "il-key-1"
    assert body["eventType"] == "RESOLVE"
    assert body["alertKey"] == "hq/reception"
    assert body["summary"] == SUMMARY
    assert body["details"] == DETAILS.replace("single_click", "double_click")
    assert body["priority"] == "LOW"


@pytest.mark.parametrize(
    ("severity", "priority"),
    [("critical", "HIGH"), ("error", "HIGH"), ("warning", "LOW"), ("info", "LOW")],
)
def test_ilert_priority_follows_severity(severity: str, priority: str) -> None:
    """critical and error page as HIGH, warning and info as LOW."""
    sink = make_sink({"type": "ilert", "integration_key": "il-key-1"})
    assert sink.url == "https://api.ilert.com/api/events"
    assert sink.build(make_message(severity=severity)).json["priority"] == priority


# -- Flashduty ---------------------------------------------------------------------


async def test_flashduty_event_has_key_in_query_and_labels(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    """An open puts integration_key in the query (keeping the URL's own) and the event in JSON."""
    sink = make_sink(
        {
            "type": "flashduty",
            "url": f"{receiver.url}/event/push/alert/standard?region=eu",
            "integration_key": "fd-key-1",
        }
    )
    assert (await send(session, sink, make_message("open", delay_s=4.0))).kind == "delivered"
    (request,) = receiver.requests
    assert request.path == "/event/push/alert/standard"
    assert request.query == {"region": "eu", "integration_key": "fd-key-1"}
    assert request.headers["Content-Type"] == "application/json"
    assert request.json() == {
        "title_rule": SUMMARY,
        "event_status": "Critical",
        "alert_key": "hq/reception",
        "description": DETAILS.replace(
            "Site: hq",
            "Delivered late: the button queued this press for 4 s\nSite: hq",
        ),
        "labels": {
            "flic_button": "hq/reception",
            "button_id": "reception",
            "click": "single_click",
            "site": "hq",
            "pressed_at": PRESSED,
        },
    }


async def test_flashduty_close_is_event_status_ok(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    """A close is event_status Ok for the same alert_key; the default URL gets the key too."""
    sink = make_sink(
        {
            "type": "flashduty",
            "url": f"{receiver.url}/event/push/alert/standard",
            "integration_key": "fd-key-1",
        }
    )
    assert (await send(session, sink, make_message("close", click=""))).kind == "delivered"
    (request,) = receiver.requests
    assert request.query == {"integration_key": "fd-key-1"}
    body = request.json()
    assert body["event_status"] == "Ok"
    assert body["alert_key"] == "hq/reception"
    assert "click" not in body["labels"]  # a callback's close has no gesture


@pytest.mark.parametrize(
    ("severity", "status"),
    [("critical", "Critical"), ("error", "Critical"), ("warning", "Warning"), ("info", "Info")],
)
def test_flashduty_event_status_follows_severity(severity: str, status: str) -> None:
    """critical and error are Critical; warning is Warning; info is Info."""
    sink = make_sink({"type": "flashduty", "integration_key": "fd-key-1"})
    request = sink.build(make_message(severity=severity))
    assert request.url == (
        "https://api.flashcat.cloud/event/push/alert/standard?integration_key=fd-key-1"
    )
    assert request.json["event_status"] == status


def test_flashduty_length_limits() -> None:
    """title_rule ≤ 512 (keeping the press time), description ≤ 2048, alert_key ≤ 255."""
    sink = make_sink({"type": "flashduty", "integration_key": "fd-key-1"})
    body = sink.build(make_message(info="y" * 5000, alert_key="k" * 300)).json
    assert len(body["title_rule"]) == 512
    assert body["title_rule"].endswith(f"(pressed {PRESSED})")
    assert len(body["description"]) == 2048
    assert body["alert_key"] == "k" * 255


# -- registry ----------------------------------------------------------------------


def test_build_sink_maps_every_type_with_its_default_rate() -> None:
    """Each sink type has its class and a rate under its platform's published limit."""
    expected = {
        "alertops": (AlertOpsSink, 5.0),
        "webhook": (WebhookSink, 20.0),
        "pagerduty": (PagerDutySink, 1.5),
        "ilert": (IlertSink, 0.7),
        "flashduty": (FlashdutySink, 15.0),
        "opsgenie": (OpsgenieSink, 0.5),
        "splunk_oncall": (SplunkOnCallSink, 1.0),
        "incidentio": (IncidentIoSink, 1.0),
        "ntfy": (NtfySink, 0.2),
        "pushover": (PushoverSink, 1.0),
        "mqtt": (MqttSink, 100.0),
    }
    assert set(SINK_CLASSES) == set(expected)
    fields = {
        "alertops": {"url": "http://127.0.0.1:9/a"},
        "webhook": {"url": "http://127.0.0.1:9/w"},
        "pagerduty": {"routing_key": "r"},
        "ilert": {"integration_key": "i"},
        "flashduty": {"integration_key": "f"},
        "opsgenie": {"api_key": "k"},
        "splunk_oncall": {"url": "http://127.0.0.1:9/s/k/r"},
        "incidentio": {"url": "http://127.0.0.1:9/i", "token": "t"},
        "ntfy": {"topic": "t"},
        "pushover": {"token": "t", "user": "u"},
        "mqtt": {"url": "mqtt://127.0.0.1:9"},
    }
    for kind, (cls, rate) in expected.items():
        sink = make_sink({"type": kind, **fields[kind]})
        assert type(sink) is cls
        assert sink.rate == rate
    faster = make_sink({"type": "pagerduty", "routing_key": "r", "rate": 0.5})
    assert faster.rate == 0.5
