"""The HTTP API: health, metrics, status, signals, ingest, outbox.

Every error is JSON ``{"error": ..., "detail": ...}`` with a 4xx; bodies over 64 KiB get
413; nothing a client sends can produce a 500 or stop the daemon.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Literal

import structlog
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator

from flicbridge import __version__
from flicbridge.domain import Signal, SignalState, utcnow
from flicbridge.secrecy import mask, same_secret
from flicbridge.server import ingest
from flicbridge.server.actions import BUTTON_ID, find_button, submit
from flicbridge.server.http import (
    BRIDGE,
    MAX_BODY,
    ApiError,
    Handler,
    Param,
    Reply,
    committed,
    error,
    operation,
    parse,
    read_json,
    reply,
    requires_token,
    sample_button,
)
from flicbridge.status import StatusOut

if TYPE_CHECKING:
    from flicbridge.config import Config
    from flicbridge.core import Core
    from flicbridge.store import OutboxRow

log = structlog.get_logger(__name__)


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


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    # ingest.middleware (before this one) admits ingest requests by a source's own token.
    if requires_token(request.path) and ingest.SOURCE not in request:
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


# -- response models -------------------------------------------------------------------


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


# -- helpers ---------------------------------------------------------------------------


async def accept(bridge: Core, signal: Signal, **kwargs: Any) -> AcceptedOut:
    """Submit a signal and wait for its commit; the decision."""
    future = submit(bridge, signal, **kwargs)
    accepted = await committed(future, "the signal is decided and held; its commit is pending")
    return AcceptedOut(
        event=accepted.event_id,
        decision=accepted.decision.value,
        rows=len(accepted.rows),
        duplicate=accepted.duplicate,
    )


# -- handlers --------------------------------------------------------------------------


@operation(
    "Liveness: 200 while the event loop runs",
    tag="operations",
    replies=(Reply(200, "alive", HealthOut),),
)
async def healthz(request: web.Request) -> HealthOut:
    return HealthOut(status="ok", version=__version__)


@operation(
    "Readiness: the store commits and every radio source is connected",
    tag="operations",
    replies=(
        Reply(200, "ready", ReadyOut),
        Reply(503, "not ready, with the reasons", ReadyOut),
    ),
)
async def readyz(request: web.Request) -> ReadyOut | web.Response:
    reasons = request.app[BRIDGE].readiness()
    out = ReadyOut(ready=not reasons, reasons=reasons)
    return reply(out, 503) if reasons else out


@operation(
    "Prometheus metrics (text exposition format)",
    tag="operations",
    replies=(Reply(200, "metrics", media="text/plain"),),
)
async def metrics(request: web.Request) -> web.Response:
    body = request.app[BRIDGE].metrics.render()
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


@operation(
    "Buttons, alert states, battery, sources, per-sink queue and last results",
    tag="status",
    replies=(Reply(200, "the status document", StatusOut),),
)
async def status(request: web.Request) -> StatusOut:
    return await request.app[BRIDGE].status()


@operation(
    "Open (On) or close (Off) a button's alert, as a press would",
    tag="signals",
    params=(BUTTON_ID,),
    body=SignalBody,
    example={"state": "On", "info": "test"},
    replies=(Reply(202, "decided and committed", AcceptedOut),),
    errors=(400, 404, 413, 503),
)
async def button_signal(request: web.Request) -> AcceptedOut:
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
    return await accept(bridge, signal)


def _ingest_example(config: Config) -> dict[str, str]:
    key = sample_button(config)[1]
    return {"flic_nameId": key, "flic_state": "On", "info": "from the Flic app"}


@operation(
    "AlertOps-style Flic body (Flic app HTTP action, Flic Hub module)",
    description="Besides the server token, `?token=` may carry an `[ingest]` "
    "source's own token (rate limited per source).",
    tag="signals",
    body=IngestBody,
    example=_ingest_example,
    replies=(Reply(202, "decided and committed", AcceptedOut),),
    errors=(400, 404, 413, 429, 503),
    why={404: "no button has that flic_nameId"},
)
async def ingest_flic(request: web.Request) -> AcceptedOut:
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
    return await accept(bridge, signal)


def row_out(row: OutboxRow) -> OutboxRowOut:
    return OutboxRowOut(
        id=row.id,
        sink=row.sink_id,
        alert_key=row.alert_key,
        action=row.message.action,
        state=row.message.state.value,
        button=row.message.button_id,
        event=row.message.event,
        status=row.status,
        attempts=row.attempts,
        created_at=row.created_at,
        next_attempt_at=row.next_attempt_at,
        last_status=row.last_status,
        last_error=row.last_error,
    )


def row_json(row: OutboxRow) -> dict[str, Any]:
    """An outbox row as the API shows it (``flicbridge queue`` prints the same)."""
    return row_out(row).model_dump(mode="json")


@operation(
    "Pending and dead-lettered outbox rows (newest 500 of each)",
    tag="outbox",
    replies=(Reply(200, "the rows", OutboxOut),),
)
async def outbox(request: web.Request) -> OutboxOut:
    bridge = request.app[BRIDGE]
    pending = await bridge.outbox_rows("pending", 500)
    dead = await bridge.outbox_rows("dead", 500)
    return OutboxOut(pending=[row_out(r) for r in pending], dead=[row_out(r) for r in dead])


ROW_ID = {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}


def _row_id(request: web.Request) -> int:
    try:
        row_id = int(request.match_info["row"])
    except ValueError:
        raise ApiError(400, "row id must be a number", request.match_info["row"]) from None
    if not 0 <= row_id < 2**63:  # SQLite integers are 64-bit: a bigger one cannot be bound
        raise ApiError(400, "row id out of range", request.match_info["row"])
    return row_id


@operation(
    "Re-queue a dead row (or every dead row with `dead`)",
    tag="outbox",
    params=(
        Param(
            "row", {"anyOf": [ROW_ID, {"const": "dead"}]}, "a row id, or `dead` for every dead row"
        ),
    ),
    replies=(Reply(200, "re-queued rows", RequeuedOut),),
    errors=(400, 404),
)
async def outbox_retry(request: web.Request) -> RequeuedOut:
    bridge = request.app[BRIDGE]
    raw = request.match_info["row"]
    rows = await bridge.requeue(None if raw == "dead" else _row_id(request))
    if not rows and raw != "dead":
        raise ApiError(404, "no dead row with that id", raw)
    return RequeuedOut(requeued=[r.id for r in rows])


@operation(
    "Drop a pending or dead row an operator gave up on",
    tag="outbox",
    params=(Param("row", ROW_ID, "the row id"),),
    replies=(Reply(200, "dropped", DroppedOut),),
    errors=(400, 404),
)
async def outbox_drop(request: web.Request) -> DroppedOut:
    bridge = request.app[BRIDGE]
    row_id = _row_id(request)
    if not await bridge.drop(row_id):
        raise ApiError(404, "no pending or dead row with that id", row_id)
    return DroppedOut(dropped=row_id)
