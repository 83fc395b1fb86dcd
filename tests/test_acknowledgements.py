"""Acknowledgements: PagerDuty Webhooks v3, the local ack API and the feedback command.

Everything over real HTTP against a running bridge: a pagerduty sink delivering to a real
receiver, signed v3 bodies built from PagerDuty's documented example, and a feedback
command that is a real subprocess writing a file.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import hmac
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from flicbridge.acks import run_feedback
from flicbridge.app import Bridge
from flicbridge.config import Config
from tests.conftest import auth, make_config, open_alert, running
from tests.receiver import Receiver

SECRET = "pd-webhook-secret"
OLD_SECRET = "the-secret-before-rotation"

# PagerDuty's documented v3 webhook example (an incident event), trimmed of nothing the
# bridge reads; ``delivery`` points it at a configured button.
EXAMPLE: dict[str, Any] = {
    "event": {
        "id": "5ac64822-4adc-4fda-ade0-410becf0de4f",
        "event_type": "incident.acknowledged",
        "resource_type": "incident",
        "occurred_at": "2020-10-02T18:45:22.169Z",
        "agent": {
            "html_url": "https://acme.pagerduty.com/users/PLH1HKV",
            "id": "PLH1HKV",
            "self": "https://api.pagerduty.com/users/PLH1HKV",
            "summary": "Tenex Engineer",
            "type": "user_reference",
        },
        "client": {"name": "PagerDuty"},
        "data": {
            "id": "PGR0VU2",
            "type": "incident",
            "self": "https://api.pagerduty.com/incidents/PGR0VU2",
            "html_url": "https://acme.pagerduty.com/incidents/PGR0VU2",
            "number": 2,
            "status": "acknowledged",
            "incident_key": "d3640fbd41094207a1c11e58e46b1662",
            "created_at": "2020-04-09T15:16:27Z",
            "title": "A little bump in the road",
            "service": {
                "html_url": "https://acme.pagerduty.com/services/PF9KMXH",
                "id": "PF9KMXH",
                "self": "https://api.pagerduty.com/services/PF9KMXH",
                "summary": "API Service",
                "type": "service_reference",
            },
            "assignees": [
                {
                    "html_url": "https://acme.pagerduty.com/users/PTUXL6G",
                    "id": "PTUXL6G",
                    "self": "https://api.pagerduty.com/users/PTUXL6G",
                    "summary": "User 123",
                    "type": "user_reference",
                }
            ],
            "escalation_policy": {
                "html_url": "https://acme.pagerduty.com/escalation_policies/PUS0KTE",
                "id": "PUS0KTE",
                "self": "https://api.pagerduty.com/escalation_policies/PUS0KTE",
                "summary": "Default",
                "type": "escalation_policy_reference",
            },
            "teams": [],
            "priority": None,
            "urgency": "high",
            "conference_bridge": None,
            "resolve_reason": None,
        },
    }
}

# Writes one JSON line per run with the three variables the command is promised.
RECORDER = (
    "import json, os, sys\n"
    "keys = ('FLICBRIDGE_EVENT', 'FLICBRIDGE_BUTTON', 'FLICBRIDGE_BY')\n"
    "with open(sys.argv[1], 'a') as f:\n"
    "    f.write(json.dumps({k: os.environ.get(k) for k in keys}) + '\\n')\n"
)


def delivery(event_type: str, incident_key: str, agent: str = "Tenex Engineer") -> bytes:
    body = copy.deepcopy(EXAMPLE)
    body["event"]["event_type"] = event_type
    body["event"]["data"]["incident_key"] = incident_key
    body["event"]["agent"]["summary"] = agent
    return json.dumps(body).encode()


def sign(body: bytes, secret: str = SECRET) -> str:
    return "v1=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def config(tmp_path: Path, receiver: Receiver, **overrides: Any) -> Config:
    data: dict[str, Any] = {
        "sinks": [
            {"id": "pd", "type": "pagerduty", "url": f"{receiver.url}/v2/enqueue"}
            | {"routing_key": "R" * 32}
        ],
        "pagerduty": {"webhook_secret": SECRET},
        "feedback": {
            "command": [sys.executable, "-c", RECORDER, str(tmp_path / "feedback.jsonl")],
            "timeout": 20,
        },
    }
    data.update(overrides)
    return make_config(tmp_path, **data)


async def post(
    http: aiohttp.ClientSession, bridge: Bridge, body: bytes, signature: str | None
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["X-PagerDuty-Signature"] = signature
    async with http.post(f"{bridge.url}/pagerduty/webhook", data=body, headers=headers) as r:
        return r.status, await r.json()


async def status_of(http: aiohttp.ClientSession, bridge: Bridge) -> dict[str, Any]:
    async with http.get(f"{bridge.url}/api/v1/status", headers=auth()) as r:
        assert r.status == 200
        buttons: list[dict[str, Any]] = (await r.json())["buttons"]
        return buttons[0]


async def feedback_lines(path: Path, count: int) -> list[dict[str, str]]:
    """The feedback file's lines once there are ``count`` of them."""
    async with asyncio.timeout(20):
        while True:
            lines = path.read_text().splitlines() if path.exists() else []
            if len(lines) >= count:
                return [json.loads(line) for line in lines]
            await asyncio.sleep(0.05)


async def test_signed_acknowledgement_is_recorded_shown_counted_and_fed_back(
    tmp_path: Path, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    """A signed incident.acknowledged names who is coming everywhere the bridge shows it."""
    async with asyncio.timeout(30), running(config(tmp_path, receiver)) as bridge:
        await open_alert(http, bridge)
        status, answer = await post(http, bridge, delivery("incident.acknowledged", "desk"), None)
        assert status == 401  # unsigned first: nothing recorded
        body = delivery("incident.acknowledged", "desk")
        status, answer = await post(http, bridge, body, sign(body))
        assert (status, answer["result"], answer["button"]) == (200, "acknowledged", "desk")

        button = await status_of(http, bridge)
        assert button["acknowledged_by"] == "Tenex Engineer"
        assert button["acknowledged_at"] is not None

        alert = [a for a in bridge.alerts_bus.recent if "acknowledged" in a.message][-1]
        assert (alert.type, alert.action, alert.priority) == ("INFO", "MESSAGE", "HIGH")
        assert "Tenex Engineer" in alert.message and alert.button == "desk"

        async with http.get(f"{bridge.url}/metrics") as r:
            text = await r.text()
        assert 'flicbridge_acknowledgements_total{button="desk",source="pagerduty"} 1.0' in text
        assert 'flicbridge_time_to_acknowledge_seconds_count{button="desk"} 1.0' in text

        lines = await feedback_lines(tmp_path / "feedback.jsonl", 1)
        assert lines == [
            {
                "FLICBRIDGE_EVENT": "acknowledged",
                "FLICBRIDGE_BUTTON": "desk",
                "FLICBRIDGE_BY": "Tenex Engineer",
            }
        ]


async def test_signature_header_rules(
    tmp_path: Path, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    """Any one valid v1 signature of several passes; none valid, tampering or none → 401."""
    async with asyncio.timeout(30), running(config(tmp_path, receiver)) as bridge:
        await open_alert(http, bridge)
        body = delivery("incident.acknowledged", "desk", agent="Rotated Responder")
        rotated = f"{sign(body, OLD_SECRET)}, {sign(body)}"
        assert (await post(http, bridge, body, rotated))[0] == 200
        assert bridge.acks["desk"].by == "Rotated Responder"

        other = delivery("incident.acknowledged", "desk", agent="Mallory")
        for header in (
            sign(other, OLD_SECRET),  # only a signature of another secret
            sign(body),  # a valid signature of another body (tampered)
            sign(other).replace("v1=", "v0="),  # unknown scheme version
            "v1=",
            "",
        ):
            status, answer = await post(http, bridge, other, header)
            assert status == 401, header
            assert answer["error"] == "bad signature"
        assert bridge.acks["desk"].by == "Rotated Responder"


async def test_malformed_unknown_and_oversized_deliveries(
    tmp_path: Path, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    """Signed bad JSON → 400; other types and unknown keys → 200 ignored; > 64 KiB → 413."""
    async with asyncio.timeout(30), running(config(tmp_path, receiver)) as bridge:
        await open_alert(http, bridge)
        broken = b'{"event": '
        status, answer = await post(http, bridge, broken, sign(broken))
        assert status == 400 and answer["error"] == "body is not valid JSON"

        for body in (
            delivery("incident.triggered", "desk"),
            delivery("incident.acknowledged", "no-such-button"),
            delivery("incident.resolved", "no-such-button"),
            b"[1, 2]",
            b'{"event": {"event_type": "incident.acknowledged", "data": null}}',
        ):
            status, answer = await post(http, bridge, body, sign(body))
            assert (status, answer["result"]) == (200, "ignored"), body[:60]
        assert bridge.acks == {}
        assert bridge.states["desk"].is_open

        huge = b'{"pad": "' + b"x" * (64 * 1024) + b'"}'
        status, answer = await post(http, bridge, huge, sign(huge))
        assert status == 413


async def test_resolved_closes_locally_without_sending_off(
    tmp_path: Path, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    """incident.resolved re-arms the button: closed here, no resolve back to PagerDuty."""
    async with asyncio.timeout(30), running(config(tmp_path, receiver)) as bridge:
        await open_alert(http, bridge)
        await receiver.wait_for(1)
        body = delivery("incident.resolved", "desk", agent="Night Shift")
        status, answer = await post(http, bridge, body, sign(body))
        assert (status, answer["result"]) == (200, "resolved")
        assert not bridge.states["desk"].is_open
        lines = await feedback_lines(tmp_path / "feedback.jsonl", 1)
        assert lines[0]["FLICBRIDGE_EVENT"] == "resolved"
        assert lines[0]["FLICBRIDGE_BY"] == "Night Shift"
        # A resolve of an alert that is no longer open is ignored (PagerDuty may repeat it).
        status, answer = await post(http, bridge, body, sign(body))
        assert (status, answer["result"]) == (200, "ignored")
        await open_alert(http, bridge)  # re-armed: the next press opens a fresh alert
        await receiver.wait_for(2)
        await asyncio.sleep(0.3)  # a resolve would be on its way by now
        actions = [r.body["event_action"] for r in receiver.requests]
        assert actions == ["trigger", "trigger"]


async def test_local_ack_api_and_a_new_open_clears_it(
    tmp_path: Path, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    """POST /api/v1/buttons/{id}/ack records who; 409 when closed; the next open clears it."""
    cfg = config(tmp_path, receiver)
    url = "/api/v1/buttons/desk/ack"
    async with asyncio.timeout(30), running(cfg) as bridge:
        async with http.post(f"{bridge.url}{url}", json={"by": "Ada"}, headers=auth()) as r:
            assert r.status == 409
        await open_alert(http, bridge)
        for bad in ({}, {"by": ""}, {"by": "   "}, {"by": 3}, {"by": "Ada", "x": 1}):
            async with http.post(f"{bridge.url}{url}", json=bad, headers=auth()) as r:
                assert r.status == 400, bad
        async with http.post(f"{bridge.url}{url}", data=b"{", headers=auth()) as r:
            assert r.status == 400
        async with http.post(f"{bridge.url}/api/v1/buttons/nope/ack", json={"by": "A"}) as r:
            assert r.status == 401
        async with http.post(
            f"{bridge.url}/api/v1/buttons/nope/ack", json={"by": "A"}, headers=auth()
        ) as r:
            assert r.status == 404
        async with http.post(f"{bridge.url}{url}", json={"by": "Ada"}, headers=auth()) as r:
            assert r.status == 200
            answer = await r.json()
        assert answer["acknowledged_by"] == "Ada" and answer["source"] == "api"
        assert (await status_of(http, bridge))["acknowledged_by"] == "Ada"

    # The acknowledgement survives a restart (it is in the store) ...
    async with asyncio.timeout(30), running(cfg) as bridge:
        assert (await status_of(http, bridge))["acknowledged_by"] == "Ada"
        # ... until the alert closes and a new open clears it.
        async with http.post(
            f"{bridge.url}/api/v1/buttons/desk/signal", json={"state": "Off"}, headers=auth()
        ) as r:
            assert r.status == 202
        await open_alert(http, bridge)
        button = await status_of(http, bridge)
        assert button["acknowledged_by"] is None and button["acknowledged_at"] is None

    async with asyncio.timeout(30), running(cfg) as bridge:
        assert (await status_of(http, bridge))["acknowledged_by"] is None


async def test_webhook_is_off_without_a_secret(
    tmp_path: Path, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    """No [pagerduty] webhook_secret: the route answers 404 JSON, whatever is sent."""
    cfg = config(tmp_path, receiver, pagerduty={})
    async with asyncio.timeout(30), running(cfg) as bridge:
        body = delivery("incident.acknowledged", "desk")
        status, answer = await post(http, bridge, body, sign(body))
        assert status == 404 and "webhook_secret" in answer["detail"]


async def test_failing_or_hanging_feedback_never_blocks(
    tmp_path: Path, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    """A command that hangs is killed at its timeout; one that is missing is logged."""
    marker = tmp_path / "late"
    hang = [sys.executable, "-c", f"import time; time.sleep(30); open({str(marker)!r}, 'w')"]
    assert await run_feedback(hang, 0.5, event="acknowledged", button="desk", by="x") is None
    missing = [str(tmp_path / "no-such-program")]
    assert await run_feedback(missing, 5, event="acknowledged", button="desk", by="x") is None
    failing = [sys.executable, "-c", "raise SystemExit(3)"]
    assert await run_feedback(failing, 20, event="resolved", button="desk", by="") == 3
    assert not marker.exists()

    # Through the bridge: the ack answers while the hanging command still runs.
    cfg = config(tmp_path, receiver, feedback={"command": hang, "timeout": 60})
    async with asyncio.timeout(30), running(cfg) as bridge:
        await open_alert(http, bridge)
        async with http.post(
            f"{bridge.url}/api/v1/buttons/desk/ack", json={"by": "Ada"}, headers=auth()
        ) as r:
            assert r.status == 200
        assert len(bridge.acknowledgements.feedback_tasks) == 1  # still running in the background
    assert not marker.exists()  # the stop cancelled (and killed) it


@pytest.mark.parametrize("header", [None, "garbage", "v1=zz"])
async def test_signature_valid_rejects_junk(header: str | None) -> None:
    """The signature check itself refuses absent and malformed headers."""
    from flicbridge.server.acks import signature_valid

    assert not signature_valid(SECRET.encode(), b"{}", header)
    assert signature_valid(SECRET.encode(), b"{}", sign(b"{}"))
