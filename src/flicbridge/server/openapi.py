"""``GET /openapi.json``: an OpenAPI 3.1 description of every route of the bridge's app.

The document is built on its first request from the application's router, so it lists
exactly the routes the features registered (this module is registered last). Known
operations are described from ``describe`` below, with body schemas generated from the
pydantic models that validate them; a route it does not know still appears, with a
generic description, and a test keeps the two in step.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel

from flicbridge import __version__
from flicbridge.config import Config
from flicbridge.server.acks import AckBody, AckOut, PagerDutyDelivery, PagerDutyResult
from flicbridge.server.app import IngestBody, SignalBody
from flicbridge.server.callbacks import (
    FlashdutyPush,
    FlashdutyResult,
    IlertActionRequest,
    IlertActionResponseRequest,
    IlertActionResult,
    IlertActions,
)
from flicbridge.server.http import BRIDGE
from flicbridge.server.local import (
    AlertOut,
    ExecBody,
    ExecResult,
    SubscriptionBody,
    SubscriptionList,
    SubscriptionOut,
)

REF = "#/components/schemas/{model}"
JSON = "application/json"

# -- response documents of server/app.py (its handlers build them as dicts) --------------


class ErrorOut(BaseModel):
    """The one error shape of the API."""

    error: str
    detail: Any = None


class HealthOut(BaseModel):
    status: Literal["ok"]
    version: str


class ReadyOut(BaseModel):
    ready: bool
    reasons: list[str]


class AcceptedOut(BaseModel):
    """A signal's decision, committed."""

    event: int
    decision: Literal["open", "appended", "resent", "close", "ignored"]
    rows: int
    duplicate: bool


class StatusButton(BaseModel):
    id: str
    name: str
    alert_key: str
    source: str
    state: Literal["open", "closed"]
    opened_at: str | None
    last_press: str | None
    last_decision: str | None
    connected: bool | None
    link_detail: str
    battery: int | None
    acknowledged_by: str | None
    acknowledged_at: str | None
    sinks: list[str]


class StatusSink(BaseModel):
    id: str
    type: str
    url: str
    pending: int
    dead: int
    delivered_kept: int
    last_success: float | None
    last_error: str | None
    paused_until: float | None


class StatusStore(BaseModel):
    path: str
    ok: bool


class StatusSource(BaseModel):
    connected: bool
    detail: str


class StatusOut(BaseModel):
    version: str
    site: str | None
    uptime_s: float
    ready: bool
    reasons: list[str]
    store: StatusStore
    sources: dict[str, StatusSource]
    buttons: list[StatusButton]
    sinks: list[StatusSink]


class OutboxRowOut(BaseModel):
    id: int
    sink: str
    alert_key: str
    action: Literal["open", "close"]
    state: Literal["On", "Off"]
    button: str
    event: int
    status: Literal["pending", "delivered", "dead"]
    attempts: int
    created_at: float
    next_attempt_at: float
    last_status: int | None
    last_error: str | None


class OutboxOut(BaseModel):
    pending: list[OutboxRowOut]
    dead: list[OutboxRowOut]


class RequeuedOut(BaseModel):
    requeued: list[int]


class DroppedOut(BaseModel):
    dropped: int


# -- building blocks ---------------------------------------------------------------------

ERRORS = {
    400: "bad input: not JSON, nested deeper than 32 levels, or a body/parameter that does not "
    "validate (every problem listed)",
    401: "missing or wrong credentials",
    403: "the API is disabled: [server] token is not set",
    404: "no such thing (or the feature is disabled)",
    409: "conflict",
    410: "gone",
    413: "body over 64 KiB",
    422: "understood, but names nothing this bridge knows",
    429: "an [ingest] source over its rate: wait Retry-After seconds",
    503: "shutting down, or the store cannot commit in time",
}
ROW_ID = {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}
TOKEN_AUTH: list[dict[str, list[str]]] = [
    {"bearerToken": []},
    {"queryToken": []},
    {"cookieToken": []},
]


class Schemas:
    """Component schemas, generated from pydantic models and referenced by name."""

    def __init__(self) -> None:
        self.components: dict[str, Any] = {}

    def ref(self, model: type[BaseModel]) -> dict[str, str]:
        schema = model.model_json_schema(ref_template=REF)
        for name, sub in schema.pop("$defs", {}).items():
            self.components.setdefault(name, sub)
        self.components[model.__name__] = schema
        return {"$ref": REF.format(model=model.__name__)}


class Describer:
    """Helpers that keep each operation's description to a few lines."""

    def __init__(self, schemas: Schemas) -> None:
        self.schemas = schemas

    def body(self, model: type[BaseModel], example: Any = None) -> dict[str, Any]:
        media: dict[str, Any] = {"schema": self.schemas.ref(model)}
        if example is not None:
            media["example"] = example
        return {"required": True, "content": {JSON: media}}

    def ok(self, model: type[BaseModel], description: str, status: int = 200) -> dict[str, Any]:
        return {
            str(status): {
                "description": description,
                "content": {JSON: {"schema": self.schemas.ref(model)}},
            }
        }

    def errors(self, *codes: int, **why: str) -> dict[str, Any]:
        ref = self.schemas.ref(ErrorOut)
        out = {}
        for code in codes:
            description = why.get(f"e{code}", ERRORS[code])
            if code == 400 and f"e{code}" in why:
                description += ", or nested deeper than 32 levels"
            out[str(code)] = {"description": description, "content": {JSON: {"schema": ref}}}
        return out


def _path_param(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": schema,
        "description": description,
    }


def _query_param(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def examples(config: Config) -> dict[str, Any]:
    """Request examples naming this bridge's first button, so that they reach real work."""
    button = config.buttons[0] if config.buttons else None
    button_id = button.id if button else "reception"
    key = config.alert_key(button) if button else button_id
    user = {"id": 0, "email": "oncall@example.com"}
    alert = {"id": 1, "alertKey": key, "summary": f"{button_id} pressed"}
    return {
        "button": button_id,
        "signal": {"state": "On", "info": "test"},
        "ingest": {"flic_nameId": key, "flic_state": "On", "info": "from the Flic app"},
        "ilert_request": {"user": user, "locale": "de", "alert": alert},
        "ilert_response": {
            "user": user,
            "locale": "en",
            "alert": alert,
            "actionId": f"close:{button_id}",
        },
        "flashduty": {
            "event_time": 1700208013988,
            "event_type": "i_custom",
            "event_id": "fac0599a2a25529ba2362c0c184b6cfb",
            "person": {"person_id": 1, "person_name": "oncall", "email": "oncall@example.com"},
            "incident": {
                "incident_id": "6551f3888713372ad1054d57",
                "title": f"{button_id} pressed",
                "labels": {"flic_button": key},
                "alerts": [{"alert_id": "6551f37f8713372ad1054d54", "alert_key": key}],
            },
        },
        "subscription": {"channel": "sse", "min_priority": "HIGH"},
        "exec": {"action_exec_token": "token-from-an-EXECUTE-alert"},
    }


def describe(d: Describer, config: Config) -> dict[tuple[str, str], dict[str, Any]]:
    """Every operation the bridge's features register, by (method, path template)."""
    api = (401, 403)
    ex = examples(config)
    text = {"text/plain": {"schema": {"type": "string"}}}
    return {
        ("GET", "/healthz"): {
            "summary": "Liveness: 200 while the event loop runs",
            "tags": ["operations"],
            "responses": d.ok(HealthOut, "alive"),
        },
        ("GET", "/readyz"): {
            "summary": "Readiness: the store commits and every radio source is connected",
            "tags": ["operations"],
            "responses": {
                **d.ok(ReadyOut, "ready"),
                "503": {
                    "description": "not ready, with the reasons",
                    "content": {JSON: {"schema": d.schemas.ref(ReadyOut)}},
                },
            },
        },
        ("GET", "/metrics"): {
            "summary": "Prometheus metrics (text exposition format)",
            "tags": ["operations"],
            "responses": {"200": {"description": "metrics", "content": text}},
        },
        ("GET", "/"): {
            "summary": "Status page (HTML): buttons, alert state, battery, queue",
            "tags": ["operations"],
            "security": TOKEN_AUTH,
            "responses": {
                "200": {
                    "description": "the page",
                    "content": {"text/html": {"schema": {"type": "string"}}},
                },
                **d.errors(*api),
            },
        },
        ("GET", "/openapi.json"): {
            "summary": "This document",
            "tags": ["operations"],
            "responses": {
                "200": {
                    "description": "OpenAPI 3.1",
                    "content": {JSON: {"schema": {"type": "object"}}},
                }
            },
        },
        ("GET", "/api/v1/status"): {
            "summary": "Buttons, alert states, battery, sources, per-sink queue and last results",
            "tags": ["status"],
            "security": TOKEN_AUTH,
            "responses": {**d.ok(StatusOut, "the status document"), **d.errors(*api)},
        },
        ("POST", "/api/v1/buttons/{id}/signal"): {
            "summary": "Open (On) or close (Off) a button's alert, as a press would",
            "tags": ["signals"],
            "security": TOKEN_AUTH,
            "parameters": [
                {**_path_param("id", {"type": "string"}, "the button id"), "example": ex["button"]}
            ],
            "requestBody": d.body(SignalBody, ex["signal"]),
            "responses": {
                **d.ok(AcceptedOut, "decided and committed", 202),
                **d.errors(400, *api, 404, 413, 503),
            },
        },
        ("POST", "/api/v1/buttons/{id}/ack"): {
            "summary": "Acknowledge the button's open alert: someone is on the way",
            "description": "Recorded with the alert (status `acknowledged_by`, "
            "`acknowledged_at`), published as a HIGH INFO local alert and runs "
            "`[feedback] command`. The next open clears it.",
            "tags": ["signals"],
            "security": TOKEN_AUTH,
            "parameters": [
                {**_path_param("id", {"type": "string"}, "the button id"), "example": ex["button"]}
            ],
            "requestBody": d.body(AckBody, {"by": "Ada at the front desk"}),
            "responses": {
                **d.ok(AckOut, "recorded"),
                **d.errors(400, *api, 404, 409, 413, e409="the button's alert is not open"),
            },
        },
        ("POST", "/pagerduty/webhook"): {
            "summary": "PagerDuty Webhooks v3: incident acknowledged / resolved",
            "description": "Verified by `X-PagerDuty-Signature` (`v1=` hex HMAC-SHA256 of the "
            "raw body with `[pagerduty] webhook_secret`; several comma-separated, any valid "
            "one passes). `incident.acknowledged` records `event.agent.summary` as "
            "acknowledging; `incident.resolved` closes the alert here without sending Off. "
            "The button is found by `event.data.incident_key`. Other events and unknown "
            "incidents answer 200 `ignored`. 404 while no secret is set.",
            "tags": ["callbacks"],
            "security": [{"pagerdutySignature": []}],
            "requestBody": d.body(PagerDutyDelivery),
            "responses": {
                **d.ok(PagerDutyResult, "handled or ignored"),
                **d.errors(400, 401, 404, 413, 503, e401="no valid v1 signature", e400="not JSON"),
            },
        },
        ("POST", "/api/v1/ingest/flic"): {
            "summary": "AlertOps-style Flic body (Flic app HTTP action, Flic Hub module)",
            "description": "Besides the server token, `?token=` may carry an `[ingest]` "
            "source's own token (rate limited per source).",
            "tags": ["signals"],
            "security": TOKEN_AUTH,
            "requestBody": d.body(IngestBody, ex["ingest"]),
            "responses": {
                **d.ok(AcceptedOut, "decided and committed", 202),
                **d.errors(400, *api, 404, 413, 429, 503, e404="no button has that flic_nameId"),
            },
        },
        ("GET", "/api/v1/outbox"): {
            "summary": "Pending and dead-lettered outbox rows (newest 500 of each)",
            "tags": ["outbox"],
            "security": TOKEN_AUTH,
            "responses": {**d.ok(OutboxOut, "the rows"), **d.errors(*api)},
        },
        ("POST", "/api/v1/outbox/{row}/retry"): {
            "summary": "Re-queue a dead row (or every dead row with `dead`)",
            "tags": ["outbox"],
            "security": TOKEN_AUTH,
            "parameters": [
                _path_param(
                    "row",
                    {"anyOf": [ROW_ID, {"const": "dead"}]},
                    "a row id, or `dead` for every dead row",
                )
            ],
            "responses": {**d.ok(RequeuedOut, "re-queued rows"), **d.errors(400, *api, 404)},
        },
        ("DELETE", "/api/v1/outbox/{row}"): {
            "summary": "Drop a pending or dead row an operator gave up on",
            "tags": ["outbox"],
            "security": TOKEN_AUTH,
            "parameters": [_path_param("row", ROW_ID, "the row id")],
            "responses": {**d.ok(DroppedOut, "dropped"), **d.errors(400, *api, 404)},
        },
        ("POST", "/ilert/action-requests"): {
            "summary": "iLert dynamic alert actions: the actions offered on an alert",
            "description": "At most three, with deterministic ids (`close:<button>`, "
            "`rearm:<button>`), texts in the request's locale (en, de); none for an alert "
            "of no known button. 404 when `[ilert] enabled = false`.",
            "tags": ["callbacks"],
            "security": [{"ilertAuthorization": []}],
            "requestBody": d.body(IlertActionRequest, ex["ilert_request"]),
            "responses": {
                **d.ok(IlertActions, "the actions"),
                **d.errors(400, 401, 404, 413),
            },
        },
        ("POST", "/ilert/action-responses"): {
            "summary": "iLert dynamic alert actions: run the action a person picked",
            "description": "`close` closes the alert here and at every sink, `rearm` only "
            "here. `success: false` for an alert of no known button; 400 for an unknown "
            "actionId.",
            "tags": ["callbacks"],
            "security": [{"ilertAuthorization": []}],
            "requestBody": d.body(IlertActionResponseRequest, ex["ilert_response"]),
            "responses": {
                **d.ok(IlertActionResult, "the outcome, for the person who clicked"),
                **d.errors(400, 401, 404, 413, e400="not JSON, invalid, or an unknown actionId"),
            },
        },
        **{
            ("POST", f"/flashduty/action/{action}"): {
                "summary": f"Flashduty custom incident action: {action} the incident's buttons",
                "description": "The `i_custom` push. A repeated `event_id` (top level or in "
                "`incident`) answers 200 and does nothing. Buttons are found from "
                "`incident.alerts[].alert_key` and the `flic_button` label. 404 when "
                "`[flashduty] enabled = false`.",
                "tags": ["callbacks"],
                "security": [{"flashdutyHeader": []}],
                "requestBody": d.body(FlashdutyPush, ex["flashduty"]),
                "responses": {
                    **d.ok(FlashdutyResult, "done (or already done)"),
                    **d.errors(
                        400, 401, 404, 413, 422, 503, e422="the incident names no known button"
                    ),
                },
            }
            for action in ("close", "rearm")
        },
        ("POST", "/api/v1/subscriptions"): {
            "summary": "alert_subscribe: an sse or webhook subscription to local alerts",
            "tags": ["local alerts"],
            "security": TOKEN_AUTH,
            "requestBody": d.body(SubscriptionBody, ex["subscription"]),
            "responses": {
                **d.ok(SubscriptionOut, "created", 201),
                **d.errors(400, *api, 409, 413, e409="too many subscriptions"),
            },
        },
        ("GET", "/api/v1/subscriptions"): {
            "summary": "Every subscription",
            "tags": ["local alerts"],
            "security": TOKEN_AUTH,
            "responses": {**d.ok(SubscriptionList, "the subscriptions"), **d.errors(*api)},
        },
        ("DELETE", "/api/v1/subscriptions/{id}"): {
            "summary": "Remove a subscription",
            "tags": ["local alerts"],
            "security": TOKEN_AUTH,
            "parameters": [_path_param("id", {"type": "string"}, "the subscription id")],
            "responses": {"204": {"description": "removed"}, **d.errors(*api, 404)},
        },
        ("GET", "/api/v1/alerts/stream"): {
            "summary": "Server-Sent Events: one JSON local alert per `data:` line",
            "description": "`id:` is the alert id; a comment line every 15 s keeps the "
            "connection open; `Last-Event-ID` replays recent alerts. Each `data:` line is "
            "an `AlertOut` document. Needs no subscription.",
            "tags": ["local alerts"],
            "security": TOKEN_AUTH,
            "parameters": [
                _query_param(
                    "min_priority",
                    {"type": "string", "enum": ["LOW", "NORMAL", "HIGH"]},
                    "lowest priority streamed (default LOW, or the subscription's)",
                ),
                _query_param("subscription", {"type": "string"}, "an sse subscription id"),
            ],
            "responses": {
                "200": {
                    "description": "the stream (never ends while the bridge runs)",
                    "content": {
                        "text/event-stream": {
                            "schema": {"type": "string"},
                            "x-data-schema": d.schemas.ref(AlertOut),
                        }
                    },
                },
                **d.errors(400, *api, 404),
            },
        },
        ("POST", "/api/v1/actions/exec"): {
            "summary": "action_exec: run an EXECUTE alert's action (close its alert), once",
            "tags": ["local alerts"],
            "security": TOKEN_AUTH,
            "requestBody": d.body(ExecBody, ex["exec"]),
            "responses": {
                **d.ok(ExecResult, "done"),
                **d.errors(
                    400,
                    *api,
                    404,
                    409,
                    410,
                    413,
                    503,
                    e404="unknown token",
                    e409="token already used, or its alert was closed",
                    e410="token expired (24 h)",
                ),
            },
        },
    }


def security_schemes(config: Config) -> dict[str, Any]:
    return {
        "bearerToken": {
            "type": "http",
            "scheme": "bearer",
            "description": "`[server] token`, for /api/v1/* and the status page",
        },
        "queryToken": {
            "type": "apiKey",
            "in": "query",
            "name": "token",
            "description": "`[server] token` as `?token=` (a browser EventSource sends no headers)",
        },
        "cookieToken": {
            "type": "apiKey",
            "in": "cookie",
            "name": "flicbridge_token",
            "description": "`[server] token` as a cookie (the status page)",
        },
        "ilertAuthorization": {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": "must equal `[ilert] authorization` (the credentials of the "
            "dynamic action connector)",
        },
        "pagerdutySignature": {
            "type": "apiKey",
            "in": "header",
            "name": "X-PagerDuty-Signature",
            "description": "`v1=` + hex HMAC-SHA256 of the raw body with "
            "`[pagerduty] webhook_secret`",
        },
        "flashdutyHeader": {
            "type": "apiKey",
            "in": "header",
            "name": config.flashduty.header,
            "description": "the custom header of the Flashduty action: must equal "
            "`[flashduty] secret`",
        },
    }


_PARAM = re.compile(r"\{([^}:]+)(:[^}]*)?\}")


def _routes(app: web.Application) -> list[tuple[str, str, Callable[..., Any]]]:
    """(method, OpenAPI path, handler) of every route, HEAD and OPTIONS left out."""
    out = []
    for route in app.router.routes():
        if route.method in ("HEAD", "OPTIONS"):
            continue
        resource = route.resource
        if resource is None:
            continue
        if isinstance(resource, web.StaticResource):
            path = resource.canonical.rstrip("/") + "/{filename}"
        else:
            path = _PARAM.sub(lambda m: "{" + m.group(1) + "}", resource.canonical)
        methods = (
            ["GET", "POST", "PUT", "PATCH", "DELETE"] if route.method == "*" else [route.method]
        )
        out += [(method, path, route.handler) for method in methods]
    return out


def _generic(method: str, path: str, handler: Callable[..., Any]) -> dict[str, Any]:
    doc = (handler.__doc__ or "").strip().splitlines()
    op: dict[str, Any] = {
        "summary": doc[0] if doc else f"{method} {path}",
        "responses": {"default": {"description": "see the handler"}},
    }
    params = re.findall(r"\{([^}]+)\}", path)
    if params:
        op["parameters"] = [_path_param(p, {"type": "string"}, p) for p in params]
    if path.startswith("/api/v1/") or path == "/":
        op["security"] = TOKEN_AUTH
    return op


def build_document(app: web.Application) -> dict[str, Any]:
    """The OpenAPI document of ``app`` as its router stands."""
    config = app[BRIDGE].config
    schemas = Schemas()
    d = Describer(schemas)
    known = describe(d, config)
    paths: dict[str, dict[str, Any]] = {}
    op_ids: set[str] = set()
    for method, path, handler in _routes(app):
        op = dict(known.get((method, path)) or _generic(method, path, handler))
        op_id = getattr(handler, "__name__", "") or "op"
        if op_id in op_ids or not op_id.isidentifier():
            op_id = f"{method.lower()}_{re.sub(r'[^A-Za-z0-9]+', '_', path).strip('_')}"
        op_ids.add(op_id)
        op["operationId"] = op_id
        paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "flicbridge",
            "version": __version__,
            "description": "Flic button presses to incident platforms, durably. Errors are "
            '`{"error": ..., "detail": ...}`; bodies over 64 KiB get 413, bodies nested deeper '
            "than 32 levels get 400, a body not sent within 10 s gets 408, and a connection "
            "that has not sent a whole request head within 10 s is closed.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas.components,
            "securitySchemes": security_schemes(config),
        },
    }


DOCUMENT: web.AppKey[dict[str, Any]] = web.AppKey("openapi_document", dict)


async def openapi_json(request: web.Request) -> web.Response:
    """This document."""
    cache = request.app[DOCUMENT]
    if "document" not in cache:
        # Built once: the router is frozen by the time the first request arrives.
        cache["document"] = build_document(request.app)
    return web.json_response(cache["document"])


def add_routes(app: web.Application) -> None:
    """Register ``GET /openapi.json`` (last: it describes every route added before it)."""
    app[DOCUMENT] = {}
    app.router.add_get("/openapi.json", openapi_json)
