"""Acknowledgements coming in: PagerDuty Webhooks v3 and the local ack API.

``POST /pagerduty/webhook`` takes PagerDuty's v3 webhook deliveries. Each is verified
before anything else is read: ``X-PagerDuty-Signature`` carries one or more comma-separated
``v1=<hex HMAC-SHA256 of the raw body>`` signatures (several while a secret rotates); any
one made with ``[pagerduty] webhook_secret`` passes (constant-time compare), none → 401.
Only then is the body parsed (not JSON → 400). The incident is matched to a button by
``event.data.incident_key``, the dedup key the pagerduty sink sent (= the alert key):

- ``incident.acknowledged`` → the button's alert is acknowledged by ``event.agent.summary``;
- ``incident.resolved`` → the alert is closed here only (re-armed: no Off is sent back,
  PagerDuty already closed it) and the feedback command runs with ``resolved``.

Anything else — other event types, incidents of no known button — answers 200 with
``"ignored"`` and is logged, so PagerDuty does not retry it. With no secret set the route
answers 404.

``POST /api/v1/buttons/{id}/ack`` (token) records an acknowledgement by hand, or from any
tool that can post ``{"by": "name"}``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import TYPE_CHECKING, Any, Literal

import structlog
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from flicbridge.server.actions import BUTTON_ID, find_button, run_action
from flicbridge.server.http import BRIDGE, MAX_BODY, ApiError, Reply, operation, parse, read_json

if TYPE_CHECKING:
    from flicbridge.core import Core
    from flicbridge.store import AckRecord

log = structlog.get_logger(__name__)

PAGERDUTY_PATH = "/pagerduty/webhook"
SIGNATURE_HEADER = "X-PagerDuty-Signature"
BY_LIMIT = 200


class AckBody(BaseModel):
    """``POST /api/v1/buttons/{id}/ack``: who is on the way."""

    model_config = ConfigDict(extra="forbid")
    by: str = Field(min_length=1, max_length=BY_LIMIT)


class AckOut(BaseModel):
    """The acknowledgement as recorded."""

    button: str
    alert_key: str
    acknowledged_by: str
    acknowledged_at: str
    source: str


class PagerDutyEvent(BaseModel):
    """The fields of a v3 webhook event the bridge reads (all others are kept, unread)."""

    model_config = ConfigDict(extra="allow")
    id: str | None = None
    event_type: str | None = None
    agent: dict[str, Any] | None = None
    data: dict[str, Any] | None = None


class PagerDutyDelivery(BaseModel):
    """A PagerDuty Webhooks v3 delivery: ``{"event": {...}}`` (described, not validated)."""

    model_config = ConfigDict(extra="allow")
    event: PagerDutyEvent | None = None


class PagerDutyResult(BaseModel):
    """What the bridge did with a PagerDuty webhook delivery."""

    result: Literal["acknowledged", "resolved", "ignored"]
    button: str | None = None
    reason: str | None = None


def ack_out(ack: AckRecord) -> AckOut:
    return AckOut(
        button=ack.button_id,
        alert_key=ack.alert_key,
        acknowledged_by=ack.by,
        acknowledged_at=ack.at.isoformat(),
        source=ack.source,
    )


def signature_valid(secret: bytes, body: bytes, header: str | None) -> bool:
    """True when any ``v1=`` signature in ``header`` is the HMAC-SHA256 of ``body``."""
    if not header:
        return False
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest().encode()
    valid = False
    for part in header.split(","):
        version, _, given = part.strip().partition("=")
        if version == "v1" and given:
            # Compare every candidate (no early exit), each in constant time.
            valid |= hmac.compare_digest(given.strip().lower().encode(), expected)
    return valid


def _text(value: Any, limit: int = BY_LIMIT) -> str:
    text = value.strip() if isinstance(value, str) else ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _ignored(reason: str, **ctx: Any) -> PagerDutyResult:
    log.info("pagerduty_webhook_ignored", reason=reason, **ctx)
    return PagerDutyResult(result="ignored", button=None, reason=reason)


@operation(
    "PagerDuty Webhooks v3: incident acknowledged / resolved",
    description="Verified by `X-PagerDuty-Signature` (`v1=` hex HMAC-SHA256 of the "
    "raw body with `[pagerduty] webhook_secret`; several comma-separated, any valid "
    "one passes). `incident.acknowledged` records `event.agent.summary` as "
    "acknowledging; `incident.resolved` closes the alert here without sending Off. "
    "The button is found by `event.data.incident_key`. Other events and unknown "
    "incidents answer 200 `ignored`. 404 while no secret is set.",
    tag="callbacks",
    security="pagerdutySignature",
    body=PagerDutyDelivery,
    replies=(Reply(200, "handled or ignored", PagerDutyResult),),
    errors=(400, 401, 404, 413, 503),
    why={401: "no valid v1 signature", 400: "not JSON"},
)
async def pagerduty_webhook(request: web.Request) -> PagerDutyResult:
    bridge = request.app[BRIDGE]
    secret = bridge.config.pagerduty.webhook_secret
    if secret is None:
        raise ApiError(404, "PagerDuty webhooks are off", "set [pagerduty] webhook_secret")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, "body too large", f"at most {MAX_BODY} bytes") from None
    key = secret.get_secret_value().encode()
    if not signature_valid(key, raw, request.headers.get(SIGNATURE_HEADER)):
        log.warning("pagerduty_webhook_bad_signature", remote=request.remote)
        raise ApiError(401, "bad signature", f"{SIGNATURE_HEADER} has no valid v1 signature")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "body is not valid JSON", str(exc)) from None
    event = body.get("event") if isinstance(body, dict) else None
    if not isinstance(event, dict):
        return _ignored("no event object")
    event_type = event.get("event_type")
    ctx = {"event_type": _text(event_type, 100) or None, "event_id": _text(event.get("id"), 100)}
    if event_type not in ("incident.acknowledged", "incident.resolved"):
        return _ignored("event type not handled", **ctx)
    data = event.get("data")
    incident_key = _text(data.get("incident_key"), 1000) if isinstance(data, dict) else ""
    button = find_button(bridge, incident_key) if incident_key else None
    if button is None:
        return _ignored("incident of no known button", incident_key=incident_key or None, **ctx)
    agent = event.get("agent")
    by = _text(agent.get("summary")) if isinstance(agent, dict) else ""
    if event_type == "incident.acknowledged":
        return _acknowledge(bridge, button.id, by, ctx)
    result = await run_action(bridge, button, "rearm", origin="pagerduty", actor=by)
    if result["decision"] != "close":
        log.info("pagerduty_webhook_ignored", reason="alert not open", button=button.id, **ctx)
        return PagerDutyResult(
            result="ignored", button=button.id, reason="the alert is not open here"
        )
    bridge.feedback("resolved", button.id, by)
    return PagerDutyResult(result="resolved", button=button.id, reason=None)


def _acknowledge(bridge: Core, button_id: str, by: str, ctx: dict[str, Any]) -> PagerDutyResult:
    ack = bridge.acknowledge(button_id, by, source="pagerduty")
    if ack is None:
        log.info("pagerduty_webhook_ignored", reason="alert not open", button=button_id, **ctx)
        return PagerDutyResult(
            result="ignored", button=button_id, reason="the alert is not open here"
        )
    return PagerDutyResult(result="acknowledged", button=button_id, reason=None)


@operation(
    "Acknowledge the button's open alert: someone is on the way",
    description="Recorded with the alert (status `acknowledged_by`, "
    "`acknowledged_at`), published as a HIGH INFO local alert and runs "
    "`[feedback] command`. The next open clears it.",
    tag="signals",
    params=(BUTTON_ID,),
    body=AckBody,
    example={"by": "Ada at the front desk"},
    replies=(Reply(200, "recorded", AckOut),),
    errors=(400, 404, 409, 413),
    why={409: "the button's alert is not open"},
)
async def button_ack(request: web.Request) -> AckOut:
    bridge = request.app[BRIDGE]
    button_id = request.match_info["id"]
    if bridge.config.button(button_id) is None:
        raise ApiError(404, "unknown button", button_id)
    body = parse(AckBody, await read_json(request))
    by = body.by.strip()
    if not by:
        raise ApiError(400, "invalid body", [{"field": "by", "problem": "blank"}])
    ack = bridge.acknowledge(button_id, by, source="api")
    if ack is None:
        raise ApiError(409, "nothing to acknowledge", f"the alert of {button_id} is not open")
    return ack_out(ack)


def add_routes(app: web.Application) -> None:
    app.router.add_post(PAGERDUTY_PATH, pagerduty_webhook)
    app.router.add_post("/api/v1/buttons/{id}/ack", button_ack)
