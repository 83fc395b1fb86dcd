"""Local alerts over HTTP: subscriptions, the SSE stream and ``action_exec``.

- ``POST /api/v1/subscriptions`` (alert_subscribe) stores an ``sse`` or ``webhook``
  subscription; ``GET`` lists them, ``DELETE /api/v1/subscriptions/{id}`` removes one.
- ``GET /api/v1/alerts/stream`` is a Server-Sent Events stream: one JSON alert per
  ``data:`` line, ``id:`` = the alert id, a comment heartbeat every ``HEARTBEAT`` seconds.
  It needs no subscription (``?subscription=`` borrows one's ``min_priority``;
  ``?min_priority=`` sets it directly) and replays the recent alerts after a
  ``Last-Event-ID``. A browser's EventSource authenticates with ``?token=``.
- ``POST /api/v1/actions/exec`` (action_exec) spends an EXECUTE alert's single-use token:
  the button's alert is closed (Signal Off, origin ``exec``). Unknown 404, spent 409
  (used, or its alert was closed meanwhile), expired 410 (24 h).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable
from typing import Annotated, Any, Literal, TypeVar

import structlog
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, RootModel, field_validator

from flicbridge.alerts import PRIORITY_ORDER, LocalAlert, Priority
from flicbridge.errors import (
    StoreError,
    TokenExpired,
    TokenInUse,
    TokenSpent,
    TooManySubscriptions,
)
from flicbridge.server.actions import outcome_text, run_action
from flicbridge.server.http import (
    BRIDGE,
    ApiError,
    Param,
    Reply,
    committed,
    operation,
    parse,
    read_json,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")
TAG = "local alerts"
HEARTBEAT = 15.0  # seconds between comment lines on an idle stream (proxies close silent ones)


def _upper(value: Any) -> Any:
    return value.strip().upper() if isinstance(value, str) else value


class _SubscriptionBase(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_priority: Priority = Field("LOW", description="the lowest priority delivered")

    @field_validator("min_priority", mode="before")
    @classmethod
    def _priority_case(cls, value: Any) -> Any:
        return _upper(value)


class SseSubscriptionBody(_SubscriptionBase):
    """An sse subscription: streams that name it get its ``min_priority``."""

    channel: Literal["sse"]
    url: None = Field(None, description="webhook subscriptions only")


class WebhookSubscriptionBody(_SubscriptionBase):
    """A webhook subscription: every alert is POSTed as JSON to ``url``."""

    channel: Literal["webhook"]
    url: HttpUrl = Field(description="http or https")


class SubscriptionBody(
    RootModel[
        Annotated[SseSubscriptionBody | WebhookSubscriptionBody, Field(discriminator="channel")]
    ]
):
    """alert_subscribe: a channel, its URL for webhooks, and the lowest priority wanted."""


class SubscriptionOut(BaseModel):
    id: str
    channel: Literal["sse", "webhook"]
    min_priority: Priority
    url: str | None
    created_at: float
    stream: str | None = Field(description="the stream of an sse subscription")


class SubscriptionList(BaseModel):
    subscriptions: list[SubscriptionOut]


class ExecBody(BaseModel):
    """action_exec: the token of an EXECUTE alert."""

    model_config = ConfigDict(extra="forbid")
    action_exec_token: str = Field(min_length=1, max_length=200)


class ExecResult(BaseModel):
    button: str
    alert_key: str
    action: Literal["close"]
    decision: Literal["close", "ignored"]
    event: int | None
    rows: int
    text: str


class AlertOut(BaseModel):
    """One local alert as the stream and webhook subscriptions carry it."""

    id: int
    type: Literal["INFO", "WARNING", "ERROR"]
    action: Literal["MESSAGE", "EXECUTE", "SHOW_EVENT"]
    priority: Priority
    message: str
    at: float
    event: int | None = None
    action_exec_token: str | None = None
    button: str | None = None


# -- subscriptions ---------------------------------------------------------------------


async def _committed(change: Awaitable[T]) -> T:
    """A subscription change, committed; a refusal (too many) is the caller's to name."""
    return await committed(change, "the change is held; its commit is pending", failure=StoreError)


@operation(
    "alert_subscribe: an sse or webhook subscription to local alerts",
    tag=TAG,
    body=SubscriptionBody,
    example={"channel": "sse", "min_priority": "HIGH"},
    replies=(Reply(201, "created", SubscriptionOut),),
    errors=(400, 409, 413),
    why={409: "too many subscriptions"},
)
async def create_subscription(request: web.Request) -> SubscriptionOut:
    body = parse(SubscriptionBody, await read_json(request)).root
    create = request.app[BRIDGE].subscriptions.create(
        body.channel, str(body.url) if body.url else None, body.min_priority
    )
    try:
        sub = await _committed(create)
    except TooManySubscriptions as exc:
        raise ApiError(409, "too many subscriptions", str(exc)) from None
    return SubscriptionOut.model_validate(sub.to_json())


@operation(
    "Every subscription",
    tag=TAG,
    replies=(Reply(200, "the subscriptions", SubscriptionList),),
)
async def list_subscriptions(request: web.Request) -> SubscriptionList:
    subs = await request.app[BRIDGE].subscriptions.all()
    return SubscriptionList(
        subscriptions=[SubscriptionOut.model_validate(s.to_json()) for s in subs]
    )


@operation(
    "Remove a subscription",
    tag=TAG,
    params=(Param("id", {"type": "string"}, "the subscription id"),),
    replies=(Reply(204, "removed", media=None),),
    errors=(404,),
)
async def delete_subscription(request: web.Request) -> web.Response:
    sub_id = request.match_info["id"]
    if not await _committed(request.app[BRIDGE].subscriptions.delete(sub_id)):
        raise ApiError(404, "no subscription with that id", sub_id)
    return web.Response(status=204)


# -- the stream ------------------------------------------------------------------------


def sse_event(alert: LocalAlert) -> bytes:
    """One Server-Sent Event: ``id:`` and one ``data:`` line of JSON (JSON has no newlines)."""
    return f"id: {alert.id}\ndata: {json.dumps(alert.to_json())}\n\n".encode()


def _priority(raw: str) -> Priority:
    value = raw.strip().upper()
    if value == "LOW":
        return "LOW"
    if value == "NORMAL":
        return "NORMAL"
    if value == "HIGH":
        return "HIGH"
    raise ApiError(400, "invalid min_priority", "LOW, NORMAL or HIGH")


@operation(
    "Server-Sent Events: one JSON local alert per `data:` line",
    description=f"`id:` is the alert id; a comment line every {HEARTBEAT:g} s keeps the "
    "connection open; `Last-Event-ID` replays recent alerts. Each `data:` line is "
    "an `AlertOut` document. Needs no subscription.",
    tag=TAG,
    params=(
        Param(
            "min_priority",
            {"type": "string", "enum": ["LOW", "NORMAL", "HIGH"]},
            "lowest priority streamed (default LOW, or the subscription's)",
            where="query",
        ),
        Param("subscription", {"type": "string"}, "an sse subscription id", where="query"),
    ),
    replies=(
        Reply(
            200,
            "the stream (never ends while the bridge runs)",
            media="text/event-stream",
            data=AlertOut,
        ),
    ),
    errors=(400, 404),
)
async def alerts_stream(request: web.Request) -> web.StreamResponse:
    bridge = request.app[BRIDGE]
    subs = request.app[BRIDGE].subscriptions
    min_priority: Priority = "LOW"
    sub_id = request.query.get("subscription")
    if sub_id is not None:
        sub = await subs.get(sub_id)
        if sub is None:
            raise ApiError(404, "no subscription with that id", sub_id)
        min_priority = sub.min_priority
    if "min_priority" in request.query:
        min_priority = _priority(request.query["min_priority"])
    replay_after: int | None = None  # no Last-Event-ID: a new client, nothing to replay
    with contextlib.suppress(ValueError):
        replay_after = int(request.headers.get("Last-Event-ID", ""))
    # Subscribe before the first byte goes out: nothing published from now on is missed.
    subscriber = bridge.alerts_bus.subscribe(min_priority)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx would buffer the stream otherwise
        }
    )
    closing = asyncio.ensure_future(subs.closing.wait())
    bound = log.bind(remote=request.remote, min_priority=min_priority)
    bound.info("stream_opened")
    try:
        await response.prepare(request)
        await response.write(b"retry: 3000\n: flicbridge alert stream\n\n")
        sent = 0  # the newest alert id written: the mailbox may hold replayed ones too
        if replay_after is not None:
            recent = list(bridge.alerts_bus.recent)
            if recent and replay_after > recent[-1].id:
                replay_after = 0  # ids restart with the bridge: all that is recent is new
            wanted = PRIORITY_ORDER[min_priority]
            for alert in recent:
                if alert.id > replay_after and PRIORITY_ORDER[alert.priority] >= wanted:
                    await response.write(sse_event(alert))
                    sent = alert.id
        while not subs.closing.is_set():
            get = asyncio.ensure_future(subscriber.queue.get())
            try:
                done, _ = await asyncio.wait(
                    {get, closing}, timeout=HEARTBEAT, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                if not get.done():
                    get.cancel()
            if get in done:
                alert = get.result()
                if alert.id > sent:
                    await response.write(sse_event(alert))
                    sent = alert.id
            elif not closing.done():
                await response.write(b": heartbeat\n\n")
    except ConnectionError:
        pass  # the client went away
    finally:
        closing.cancel()
        bridge.alerts_bus.unsubscribe(subscriber)
        bound.info("stream_closed", dropped=subscriber.dropped or None)
    return response


async def _close_streams(app: web.Application) -> None:
    app[BRIDGE].subscriptions.closing.set()


# -- action_exec -------------------------------------------------------------------------


@operation(
    "action_exec: run an EXECUTE alert's action (close its alert), once",
    tag=TAG,
    body=ExecBody,
    example={"action_exec_token": "token-from-an-EXECUTE-alert"},
    replies=(Reply(200, "done", ExecResult),),
    errors=(400, 404, 409, 410, 413, 503),
    why={
        404: "unknown token",
        409: "token already used, or its alert was closed",
        410: "token expired (24 h)",
    },
)
async def action_exec(request: web.Request) -> ExecResult:
    bridge = request.app[BRIDGE]
    body = parse(ExecBody, await read_json(request))
    if not bridge.accepting:
        raise ApiError(503, "shutting down", None)  # the token stays unspent
    try:
        entry = bridge.exec_token(body.action_exec_token)
    except KeyError:
        raise ApiError(404, "unknown action_exec_token", None) from None
    except TokenSpent:
        raise ApiError(
            409, "action_exec_token already used", "it was executed, or its alert was closed"
        ) from None
    except TokenInUse:
        raise ApiError(
            409, "action_exec_token in use", "its action is being committed; try again"
        ) from None
    except TokenExpired:
        raise ApiError(410, "action_exec_token expired", "tokens live 24 hours") from None
    # The token is spent only once its action is committed: a refusal (503) keeps it usable.
    landed = False
    try:
        button = bridge.config.button(entry.button_id)
        if button is None:  # tokens live in memory with the config that made them
            raise ApiError(404, "unknown button", entry.button_id)
        result = await run_action(
            bridge,
            button,
            "close",
            origin="exec",
            actor=f"action_exec from {request.remote or 'an unknown address'}",
        )
        landed = not result.get("pending")
    finally:
        bridge.token_done(body.action_exec_token, committed=landed)
    return ExecResult(
        button=button.id,
        alert_key=result["alert_key"],
        action="close",
        decision=result["decision"],
        event=result["event"],
        rows=result["rows"],
        text=outcome_text("en", "close", button.display_name, result),
    )


def add_routes(app: web.Application) -> None:
    """Register the local alert routes; the subscriptions' lanes run with the bridge."""
    app.on_shutdown.append(_close_streams)
    app.router.add_post("/api/v1/subscriptions", create_subscription)
    app.router.add_get("/api/v1/subscriptions", list_subscriptions)
    app.router.add_delete("/api/v1/subscriptions/{id}", delete_subscription)
    app.router.add_get("/api/v1/alerts/stream", alerts_stream)
    app.router.add_post("/api/v1/actions/exec", action_exec)
