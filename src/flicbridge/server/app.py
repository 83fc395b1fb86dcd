"""The HTTP API: health, metrics, status, signals, ingest, outbox.

Every error is JSON ``{"error": ..., "detail": ...}`` with a 4xx; bodies over 64 KiB get
413; nothing a client sends can produce a 500 or stop the daemon.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal

import structlog
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator

from flicbridge import __version__
from flicbridge.domain import Signal, SignalState, utcnow
from flicbridge.errors import NotAccepting, UnknownButton
from flicbridge.secrecy import mask, same_secret
from flicbridge.server import ingest
from flicbridge.server.http import (
    BRIDGE,
    MAX_BODY,
    ApiError,
    committed,
    error,
    parse,
    read_json,
)
from flicbridge.store import StoreError

if TYPE_CHECKING:
    from flicbridge.config import ButtonConfig
    from flicbridge.core import Accepted, Core

log = structlog.get_logger(__name__)

STATUS_READ_WAIT = 0.5  # seconds the status waits for the disk before answering from memory
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error(exc.status, exc.message, exc.detail)
    except web.HTTPRequestEntityTooLarge:
        return error(413, "body too large", f"at most {MAX_BODY} bytes")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error(exc.status, exc.reason, None)
        if "Allow" in exc.headers:  # a 405 must say which methods the path has (RFC 9110)
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("http_handler_failed", path=request.path)
        return error(503, "internal error", "logged by the bridge")


_MASKED_TYPES = ("application/json", "text/html", "text/plain")


@web.middleware
async def redact_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every body the API builds passes the secret mask (status, page, metrics, errors)."""
    response = await handler(request)
    if (
        isinstance(response, web.Response)
        and isinstance(response.body, bytes)
        and response.content_type in _MASKED_TYPES
    ):
        text = response.body.decode("utf-8", "replace")
        masked = mask(text)
        if masked != text:
            response.body = masked.encode()
    return response


def _token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    # A token in the URL is what the person typed now: it wins over a cookie a browser
    # kept from before the token was changed (the status page then replaces the cookie).
    query = request.query.get("token")
    if query:
        return query
    return request.cookies.get("flicbridge_token") or None


def _requires_token(request: web.Request) -> bool:
    path = request.path
    return path.startswith("/api/v1/") or path == "/"


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    # ingest.middleware (before this one) admits ingest requests by a source's own token.
    if _requires_token(request) and ingest.SOURCE not in request:
        configured = request.app[BRIDGE].config.server.token
        if configured is None:
            return error(403, "API disabled", "set [server] token to use /api/v1 and /")
        given = _token(request)
        if given is None:
            return error(401, "missing token", "Authorization: Bearer TOKEN, or ?token=")
        if not same_secret(given, configured):
            return error(401, "wrong token", None)
    return await handler(request)


# -- bodies ----------------------------------------------------------------------------


class SignalBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    state: Literal["On", "Off"]
    info: str = Field("", max_length=2000)

    @field_validator("state", mode="before")
    @classmethod
    def _case(cls, value: Any) -> Any:
        return value.capitalize() if isinstance(value, str) else value


class IngestBody(BaseModel):
    """The AlertOps-style Flic body (Flic app "HTTP request", Flic Hub module)."""

    model_config = ConfigDict(extra="ignore")
    flic_nameId: str = Field(min_length=1, max_length=255)
    flic_state: Literal["On", "Off"]
    info: str = Field("", max_length=2000)

    @field_validator("flic_state", mode="before")
    @classmethod
    def _case(cls, value: Any) -> Any:
        return value.strip().capitalize() if isinstance(value, str) else value


# -- helpers ---------------------------------------------------------------------------


def submit(bridge: Core, signal: Signal, **kwargs: Any) -> asyncio.Future[Accepted]:
    """``bridge.submit`` with its refusals as the API's errors (503 / 404 / 503)."""

    try:
        return bridge.submit(signal, **kwargs)
    except NotAccepting:
        raise ApiError(503, "shutting down", None) from None
    except UnknownButton:
        raise ApiError(404, "unknown button", signal.button_id) from None
    except StoreError as exc:  # commits are failing and the store holds all it may
        raise ApiError(503, "store unavailable", str(exc)) from None


async def accept(bridge: Core, signal: Signal, **kwargs: Any) -> dict[str, Any]:
    """Submit a signal and wait for its commit; JSON of the decision."""
    future = submit(bridge, signal, **kwargs)
    accepted = await committed(future, "the signal is decided and held; its commit is pending")
    return {
        "event": accepted.event_id,
        "decision": accepted.decision.value,
        "rows": len(accepted.rows),
        "duplicate": accepted.duplicate,
    }


def find_button(bridge: Core, name: str) -> ButtonConfig | None:
    """A button by id, ingest_name, name_id or alert key (case-insensitive)."""
    wanted = name.strip().casefold()
    for button in bridge.config.buttons:
        names = {button.id, button.ingest_name, button.name_id, bridge.config.alert_key(button)}
        if wanted in {n.casefold() for n in names if n}:
            return button
    return None


# -- handlers --------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


def readiness(bridge: Core) -> list[str]:
    """Why the bridge is not ready; empty when it is."""
    reasons = []
    if not bridge.health.store_ok:
        reasons.append(f"store cannot commit: {bridge.health.store_error}")
    for source, up in bridge.health.source_up.items():
        if not up:
            detail = bridge.health.source_detail.get(source, "")
            reasons.append(f"{source} not connected: {detail}")
    for source, faults in bridge.health.source_faults.items():
        if bridge.health.source_up.get(source):
            reasons.extend(f"{source}: {fault}" for fault in faults)
    if not bridge.accepting:
        reasons.append("not accepting signals (starting or stopping)")
    return reasons


async def readyz(request: web.Request) -> web.Response:
    reasons = readiness(request.app[BRIDGE])
    return web.json_response(
        {"ready": not reasons, "reasons": reasons}, status=503 if reasons else 200
    )


async def metrics(request: web.Request) -> web.Response:
    body = request.app[BRIDGE].metrics.render()
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


async def status_json(bridge: Core) -> dict[str, Any]:
    """The status document shared by the API, the page and ``flicbridge status``."""
    counts = await bridge.store.counts_within(STATUS_READ_WAIT)  # memory if the disk stalls
    depth = bridge.dispatcher.depth()
    buttons = []
    for button in bridge.config.buttons:
        key = bridge.config.alert_key(button)
        state = bridge.states.get(key)
        link = bridge.buttons[button.id]
        buttons.append(
            {
                "id": button.id,
                "name": button.display_name,
                "alert_key": key,
                "source": button.source,
                "state": "open" if state and state.is_open else "closed",
                "opened_at": state.opened_at.isoformat() if state and state.opened_at else None,
                "last_press": link.last_press,
                "last_decision": link.last_decision,
                "connected": link.connected,
                "link_detail": link.detail,
                "battery": link.battery,
                "acknowledged_by": ack.by if (ack := bridge.acks.get(key)) else None,
                "acknowledged_at": ack.at.isoformat() if ack else None,
                "sinks": [s.id for s in bridge.config.sinks_of(button)],
            }
        )
    sinks = []
    for sink_id, sink in bridge.sinks.items():
        gate = bridge.dispatcher.gates[sink_id]
        sinks.append(
            {
                "id": sink_id,
                "type": sink.type,
                "url": sink.public_url,
                "pending": depth.get(sink_id, 0),
                "dead": counts.get(sink_id, {}).get("dead", 0),
                "delivered_kept": counts.get(sink_id, {}).get("delivered", 0),
                "last_success": gate.last_success,
                "last_error": gate.last_error,
                "paused_until": gate.paused_until or None,
            }
        )
    return {
        "version": __version__,
        "site": bridge.config.site,
        "uptime_s": round(bridge.mono() - bridge.started_at, 1),
        "ready": not readiness(bridge),
        "reasons": readiness(bridge),
        "store": {"path": str(bridge.store.path), "ok": bridge.health.store_ok},
        "sources": {
            name: {"connected": up, "detail": bridge.health.source_detail.get(name, "")}
            for name, up in bridge.health.source_up.items()
        },
        "buttons": buttons,
        "sinks": sinks,
    }


async def status(request: web.Request) -> web.Response:
    return web.json_response(await status_json(request.app[BRIDGE]))


async def button_signal(request: web.Request) -> web.Response:
    bridge = request.app[BRIDGE]
    button_id = request.match_info["id"]
    if bridge.config.button(button_id) is None:
        raise ApiError(404, "unknown button", button_id)
    body = parse(SignalBody, await read_json(request))
    signal = Signal(
        button_id=button_id,
        state=SignalState(body.state),
        origin="api",
        received_at=utcnow(),
        info=body.info,
    )
    return web.json_response(await accept(bridge, signal), status=202)


async def ingest_flic(request: web.Request) -> web.Response:
    bridge = request.app[BRIDGE]
    body = parse(IngestBody, await read_json(request))
    button = find_button(bridge, body.flic_nameId)
    if button is None:
        raise ApiError(404, "unknown flic_nameId", body.flic_nameId)
    signal = Signal(
        button_id=button.id,
        state=SignalState(body.flic_state),
        origin="ingest",
        received_at=utcnow(),
        info=body.info,
        actor=request.get(ingest.SOURCE, ""),  # the [ingest] source, if its token admitted it
    )
    return web.json_response(await accept(bridge, signal), status=202)


def row_json(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "sink": row.sink_id,
        "alert_key": row.alert_key,
        "action": row.message.action,
        "state": row.message.state.value,
        "button": row.message.button_id,
        "event": row.message.event,
        "status": row.status,
        "attempts": row.attempts,
        "created_at": row.created_at,
        "next_attempt_at": row.next_attempt_at,
        "last_status": row.last_status,
        "last_error": row.last_error,
    }


async def outbox(request: web.Request) -> web.Response:
    bridge = request.app[BRIDGE]
    pending = await bridge.store.rows("pending", 500)
    dead = await bridge.store.rows("dead", 500)
    return web.json_response(
        {"pending": [row_json(r) for r in pending], "dead": [row_json(r) for r in dead]}
    )


def _row_id(request: web.Request) -> int:
    try:
        row_id = int(request.match_info["row"])
    except ValueError:
        raise ApiError(400, "row id must be a number", request.match_info["row"]) from None
    if not 0 <= row_id < 2**63:  # SQLite integers are 64-bit: a bigger one cannot be bound
        raise ApiError(400, "row id out of range", request.match_info["row"])
    return row_id


async def outbox_retry(request: web.Request) -> web.Response:
    bridge = request.app[BRIDGE]
    raw = request.match_info["row"]
    rows = await bridge.requeue(None if raw == "dead" else _row_id(request))
    if not rows and raw != "dead":
        raise ApiError(404, "no dead row with that id", raw)
    return web.json_response({"requeued": [r.id for r in rows]})


async def outbox_drop(request: web.Request) -> web.Response:
    bridge = request.app[BRIDGE]
    row_id = _row_id(request)
    if not await bridge.drop(row_id):
        raise ApiError(404, "no pending or dead row with that id", row_id)
    return web.json_response({"dropped": row_id})
