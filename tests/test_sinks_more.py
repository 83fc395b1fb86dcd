"""Opsgenie / JSM Ops, Splunk On-Call, incident.io and ntfy: exact bodies for open and
close, through the whole pipeline to a real aiohttp receiver, permanent failures
dead-lettered with the platform's message, and their config errors."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import cli, config_problems, make_config, running
from tests.receiver import Receiver
from tests.test_sink_pipeline import settled, signal

PRESSED_FIELDS = {"pressed_at", "state_start_time", "description", "state_message", "message"}


def sink_config(kind: str, url: str) -> dict[str, Any]:
    base: dict[str, Any] = {"id": kind, "type": kind}
    if kind == "opsgenie":
        return {**base, "url": f"{url}/v2/alerts", "api_key": "og-key-1234567"}
    if kind == "splunk_oncall":
        return {**base, "url": f"{url}/integrations/generic/20131114/alert/api1234567/route"}
    if kind == "incidentio":
        return {**base, "url": f"{url}/v2/alert_events/http/01CFG123", "token": "inc-tok-98765"}
    return {**base, "url": url, "topic": "panic", "token": "tk_ntfy12345"}


KINDS = ["opsgenie", "splunk_oncall", "incidentio", "ntfy"]


def _stable(body: dict[str, Any]) -> dict[str, Any]:
    """The body without the fields that carry the press time."""
    out = {k: v for k, v in body.items() if k not in PRESSED_FIELDS}
    if isinstance(out.get("details"), dict):
        out["details"] = {k: v for k, v in out["details"].items() if k != "pressed_at"}
    if isinstance(out.get("metadata"), dict):
        out["metadata"] = {k: v for k, v in out["metadata"].items() if k != "pressed_at"}
    return out


EXPECTED: dict[str, tuple[tuple[str, str, dict[str, Any]], tuple[str, str, dict[str, Any]]]] = {
    "opsgenie": (
        (
            "/v2/alerts",
            "GenieKey og-key-1234567",
            {
                "alias": "hq/desk",
                "priority": "P1",
                "source": "hq",
                "details": {"button_id": "desk", "origin": "api"},
            },
        ),
        (
            "/v2/alerts/hq%2Fdesk/close",
            "GenieKey og-key-1234567",
            {"source": "hq", "note": "Closed by flicbridge (api)"},
        ),
    ),
    "splunk_oncall": (
        (
            "/integrations/generic/20131114/alert/api1234567/route",
            "",
            {
                "message_type": "CRITICAL",
                "entity_id": "hq/desk",
                "monitoring_tool": "flicbridge",
            },
        ),
        (
            "/integrations/generic/20131114/alert/api1234567/route",
            "",
            {
                "message_type": "RECOVERY",
                "entity_id": "hq/desk",
                "monitoring_tool": "flicbridge",
            },
        ),
    ),
    "incidentio": (
        (
            "/v2/alert_events/http/01CFG123",
            "Bearer inc-tok-98765",
            {
                "status": "firing",
                "deduplication_key": "hq/desk",
                "metadata": {
                    "button_id": "desk",
                    "severity": "critical",
                    "origin": "api",
                    "site": "hq",
                },
            },
        ),
        (
            "/v2/alert_events/http/01CFG123",
            "Bearer inc-tok-98765",
            {
                "status": "resolved",
                "deduplication_key": "hq/desk",
                "metadata": {
                    "button_id": "desk",
                    "severity": "critical",
                    "origin": "api",
                    "site": "hq",
                },
            },
        ),
    ),
    "ntfy": (
        (
            "/",
            "Bearer tk_ntfy12345",
            {"topic": "panic", "priority": 5, "tags": ["rotating_light", "hq_desk"]},
        ),
        (
            "/",
            "Bearer tk_ntfy12345",
            {"topic": "panic", "priority": 3, "tags": ["white_check_mark", "hq_desk"]},
        ),
    ),
}


@pytest.mark.parametrize("kind", KINDS)
async def test_open_and_close_reach_the_same_incident(
    tmp_path: Path, receiver: Receiver, kind: str
) -> None:
    """Open and close are exactly the platform's bodies, keyed by the alert key, and a 429
    and a 503 on the way are retried."""
    receiver.script.extend(
        [(429, {"error": "slow"}, {"Retry-After": "0"}), (503, "<html>oops</html>", {})]
    )
    config = make_config(tmp_path, site="hq", sinks=[sink_config(kind, receiver.url)])
    async with running(config) as bridge:
        await signal(bridge, "On")
        await signal(bridge, "Off")
        got = await receiver.wait_for(4)
        await settled(bridge)
        assert len(await bridge.store.rows("delivered")) == 2
    opened, closed = got[2], got[3]
    for request, (path, authorization, body) in zip((opened, closed), EXPECTED[kind], strict=True):
        assert request.method == "POST"
        assert request.raw_path == path
        assert request.headers.get("Authorization", "") == authorization
        stable = _stable(request.body)
        if kind == "opsgenie" and request is opened:
            assert request.body["message"].startswith("Desk: Front desk (pressed ")
        for field, value in body.items():
            assert stable.get(field) == value, (kind, field, stable)
    if kind == "opsgenie":
        assert closed.query == {"identifierType": "alias"}
    if kind == "splunk_oncall":
        assert isinstance(opened.body["state_start_time"], int)
        assert opened.body["entity_display_name"].startswith("Desk: Front desk (pressed ")
    if kind == "ntfy":
        assert opened.body["title"].startswith("Alert: Desk")
        assert closed.body["title"].startswith("Resolved: Desk")


@pytest.mark.parametrize("kind", KINDS)
async def test_a_permanent_refusal_is_dead_lettered_with_the_platforms_message(
    tmp_path: Path, receiver: Receiver, kind: str
) -> None:
    """A 4xx other than 408/429 is not retried: the row is dead with the platform's own
    message, and no credential shows in it."""
    receiver.default = (422, {"message": "Request body is not processable"}, {})
    config = make_config(tmp_path, site="hq", sinks=[sink_config(kind, receiver.url)])
    async with running(config) as bridge:
        await signal(bridge, "On")
        await receiver.wait_for(1)
        async with asyncio.timeout(10):
            while not await bridge.store.rows("dead"):
                await asyncio.sleep(0.02)
        dead = await bridge.store.rows("dead")
        assert len(receiver.requests) == 1
        assert "Request body is not processable" in (dead[0].last_error or "")
        for secret in ("og-key-1234567", "api1234567", "inc-tok-98765", "tk_ntfy12345"):
            assert secret not in (dead[0].last_error or "")


@pytest.mark.parametrize(
    ("sink", "path"),
    [
        ({"id": "o", "type": "opsgenie"}, "sinks[0].api_key"),
        ({"id": "o", "type": "opsgenie", "api_key": ""}, "sinks[0].api_key"),
        ({"id": "s", "type": "splunk_oncall"}, "sinks[0].url"),
        ({"id": "s", "type": "splunk_oncall", "url": "ftp://x/y"}, "sinks[0].url"),
        ({"id": "i", "type": "incidentio", "url": "https://h.invalid/x"}, "sinks[0].token"),
        ({"id": "n", "type": "ntfy"}, "sinks[0].topic"),
        ({"id": "n", "type": "ntfy", "topic": "a b"}, "sinks[0].topic"),
        ({"id": "n", "type": "ntfy", "topic": "t", "url": "not a url"}, "sinks[0].url"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, sink: dict[str, Any], path: str) -> None:
    """A missing credential, a bad URL or a bad topic is refused with its key path."""
    assert path in config_problems(tmp_path, sink)


async def test_check_config_exits_2_for_a_new_sink_without_its_key(tmp_path: Path) -> None:
    """check-config on a file: exit 2 naming the missing key, no traceback."""
    (tmp_path / "c.toml").write_text(
        '[[buttons]]\nid = "desk"\nsource = "ingest"\n[[sinks]]\nid = "og"\ntype = "opsgenie"\n'
    )
    code, _out, err = await cli("check-config", "--config", str(tmp_path / "c.toml"))
    assert code == 2
    assert "sinks[0].api_key" in err and "Traceback" not in err
