"""Platform callbacks: iLert dynamic alert actions and Flashduty custom actions.

Both platforms can ask the bridge for two actions on a button's alert:

- **close**: the alert is closed here and the close is sent to every sink of the button;
- **rearm**: the alert is closed here only (the platform already closed it), so the next
  press opens a fresh alert.

Both enter the state machine as a ``Signal`` (origin ``ilert`` or ``flashduty``, actor =
the person who clicked) and are committed like a press; a close with nothing open is
"ignored", which is still a success for the platform. ``[ilert] enabled = false`` or
``[flashduty] enabled = false`` makes the routes answer 404.

iLert: ``POST /ilert/action-requests`` answers ``{"actions": [...]}`` — the shape
of iLert's own demo provider (iLert/dynamic-action-provider) — with at most three
actions whose ids are deterministic (``close:<button id>``, ``rearm:<button id>``): iLert
caches actions for an hour and maps its ids back to ours. ``POST /ilert/action-responses``
runs one and answers ``{"success": bool, "text": ...}`` in the request's locale (en, de).

Flashduty: ``POST /flashduty/action/close`` and ``/flashduty/action/rearm`` take
the ``i_custom`` push. Flashduty retries a push that timed out with the same ``event_id``:
the store remembers every event id it has acted on (also across restarts), so a repeat
answers 200 and does nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Annotated, Any, Literal

import structlog
from aiohttp import web
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StrictInt,
    model_serializer,
)

from flicbridge.domain import ACTIONS, Action
from flicbridge.secrecy import same_secret
from flicbridge.server.actions import (
    find_button,
    language,
    outcome_text,
    run_action,
    text,
)
from flicbridge.server.http import (
    BRIDGE,
    ApiError,
    Handler,
    Reply,
    operation,
    parse,
    read_json,
    sample_button,
)

if TYPE_CHECKING:
    from flicbridge.config import ButtonConfig, Config
    from flicbridge.core import Core

log = structlog.get_logger(__name__)

ILERT_WAIT = 2.5  # seconds an iLert action waits for its commit: the user is looking at it

# -- iLert -------------------------------------------------------------------------------


class IlertUser(BaseModel):
    """The iLert user clicking the action (absent outside notifications)."""

    model_config = ConfigDict(extra="allow")
    id: StrictInt | Annotated[str, Field(max_length=200)] | None = None
    email: str | None = Field(None, max_length=320)
    username: str | None = Field(None, max_length=200)
    firstName: str | None = Field(None, max_length=200)
    lastName: str | None = Field(None, max_length=200)


class IlertAlert(BaseModel):
    """The part of iLert's alert resource the bridge reads (the rest is kept, unread).

    Field names are iLert's (camelCase) so the models read like the wire format.
    """

    model_config = ConfigDict(extra="allow")
    id: int | str | None = None
    alertKey: str | None = Field(None, max_length=1000)
    summary: str | None = None
    labels: dict[str, Any] | None = None


class IlertActionRequest(BaseModel):
    """What iLert posts to ``requestUrl`` when it gathers an alert's actions."""

    model_config = ConfigDict(extra="allow")
    alert: IlertAlert
    user: IlertUser | None = None
    locale: str | None = Field(None, max_length=35)


class IlertActionResponseRequest(IlertActionRequest):
    """What iLert posts to ``responseUrl`` when a person picks an action."""

    actionId: str = Field(min_length=1, max_length=300, pattern=r"^(close|rearm)(:.+)?$")


class IlertAction(BaseModel):
    id: str
    text: str
    url: str | None = None

    @model_serializer(mode="wrap")
    def _without_url(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """No ``url`` key at all when none is set: iLert then calls its responseUrl."""
        out: dict[str, Any] = handler(self)
        if out.get("url") is None:
            out.pop("url", None)
        return out


class IlertActions(BaseModel):
    """Up to three actions; ``url`` is left out so iLert calls the configured responseUrl."""

    actions: list[IlertAction] = Field(max_length=3)


class IlertActionResult(BaseModel):
    success: bool
    text: str


def _ilert_guard(request: web.Request) -> None:
    config = request.app[BRIDGE].config.ilert
    if not config.enabled:
        raise ApiError(404, "not found", "iLert callbacks are disabled ([ilert] enabled)")
    if config.authorization is not None and not same_secret(
        request.headers.get("Authorization"), config.authorization.get_secret_value()
    ):
        raise ApiError(401, "wrong or missing Authorization header", None)


def _ilert_button(bridge: Core, alert: IlertAlert) -> ButtonConfig | None:
    """The button of an iLert alert: its ``alertKey``, else its ``flic_button`` label."""
    names: list[Any] = [alert.alertKey]
    if alert.labels:
        names.append(alert.labels.get("flic_button"))
    for name in names:
        if isinstance(name, str) and name.strip():
            button = find_button(bridge, name)
            if button is not None:
                return button
    return None


def _ilert_actor(user: IlertUser | None) -> str:
    if user is None:
        return ""
    if user.email:
        return user.email
    if user.username:
        return user.username
    full = " ".join(n for n in (user.firstName, user.lastName) if n)
    if full:
        return full
    return f"iLert user {user.id}" if user.id is not None else ""


def action_id(action: Action, button: ButtonConfig) -> str:
    """Deterministic: the same action on the same button always has the same id."""
    return f"{action}:{button.id}"


def _ilert_user() -> dict[str, Any]:
    return {"id": 0, "email": "oncall@example.com"}


def _ilert_request(config: Config) -> dict[str, Any]:
    button_id, key = sample_button(config)
    alert = {"id": 1, "alertKey": key, "summary": f"{button_id} pressed"}
    return {"user": _ilert_user(), "locale": "de", "alert": alert}


def _ilert_response(config: Config) -> dict[str, Any]:
    button_id, key = sample_button(config)
    alert = {"id": 1, "alertKey": key, "summary": f"{button_id} pressed"}
    return {"user": _ilert_user(), "locale": "en", "alert": alert, "actionId": f"close:{button_id}"}


@operation(
    "iLert dynamic alert actions: the actions offered on an alert",
    description="At most three, with deterministic ids (`close:<button>`, "
    "`rearm:<button>`), texts in the request's locale (en, de); none for an alert "
    "of no known button. 404 when `[ilert] enabled = false`.",
    tag="callbacks",
    security="ilertAuthorization",
    body=IlertActionRequest,
    example=_ilert_request,
    replies=(Reply(200, "the actions", IlertActions),),
    errors=(400, 401, 404, 413),
)
async def ilert_action_requests(request: web.Request) -> IlertActions:
    """The actions iLert may offer on an alert: close everywhere, re-arm (none if no button)."""
    _ilert_guard(request)
    bridge = request.app[BRIDGE]
    body = parse(IlertActionRequest, await read_json(request))
    lang = language(body.locale)
    button = _ilert_button(bridge, body.alert)
    actions: list[IlertAction] = []
    if button is not None:
        name = button.display_name
        actions = [
            IlertAction(id=action_id(a, button), text=text(lang, f"action.{a}", name=name))
            for a in ACTIONS
        ]
    log.info(
        "ilert_action_request",
        alert_key=body.alert.alertKey,
        button=button.id if button else None,
        actions=len(actions),
    )
    return IlertActions(actions=actions)


@operation(
    "iLert dynamic alert actions: run the action a person picked",
    description="`close` closes the alert here and at every sink, `rearm` only "
    "here. `success: false` for an alert of no known button; 400 for an unknown "
    "actionId.",
    tag="callbacks",
    security="ilertAuthorization",
    body=IlertActionResponseRequest,
    example=_ilert_response,
    replies=(Reply(200, "the outcome, for the person who clicked", IlertActionResult),),
    errors=(400, 401, 404, 413),
    why={400: "not JSON, invalid, or an unknown actionId"},
)
async def ilert_action_responses(request: web.Request) -> IlertActionResult:
    """Run the action iLert names by ``actionId``; feedback text in the request's locale."""
    _ilert_guard(request)
    bridge = request.app[BRIDGE]
    body = parse(IlertActionResponseRequest, await read_json(request))
    lang = language(body.locale)
    kind, _, named = body.actionId.partition(":")
    if kind not in ACTIONS:
        raise ApiError(400, "unknown actionId", body.actionId)
    action: Action = "close" if kind == "close" else "rearm"

    def answer(success: bool, line: str) -> IlertActionResult:
        return IlertActionResult(success=success, text=line)

    button = _ilert_button(bridge, body.alert)
    if button is None:
        log.info("ilert_action_no_button", alert_key=body.alert.alertKey, action=body.actionId)
        return answer(False, text(lang, "no_button"))
    if named and named.casefold() != button.id.casefold():
        return answer(False, text(lang, "other_button", action_button=named))
    try:
        result = await run_action(
            bridge,
            button,
            action,
            origin="ilert",
            actor=_ilert_actor(body.user),
            wait=ILERT_WAIT,
        )
    except ApiError as exc:
        key = "not_accepting" if exc.message == "shutting down" else "failed"
        return answer(False, text(lang, key, detail=exc.message))
    return answer(True, outcome_text(lang, action, button.display_name, result))


# -- Flashduty ---------------------------------------------------------------------------


class FlashdutyPerson(BaseModel):
    model_config = ConfigDict(extra="allow")
    person_id: StrictInt | Annotated[str, Field(max_length=200)] | None = None
    person_name: str | None = Field(None, max_length=200)
    email: str | None = Field(None, max_length=320)


class FlashdutyAlert(BaseModel):
    """One alert of the incident; ``alert_key`` is what the flashduty sink sent."""

    model_config = ConfigDict(extra="allow")
    alert_id: str | None = None
    alert_key: str | None = Field(None, max_length=1000)
    labels: dict[str, Any] | None = None


class FlashdutyIncident(BaseModel):
    model_config = ConfigDict(extra="allow")
    incident_id: str | None = None
    title: str | None = None
    event_id: str | None = Field(None, max_length=200)  # some pushes carry it here, not at the top
    labels: dict[str, Any] | None = None
    alerts: list[FlashdutyAlert] | None = Field(None, max_length=1000)


class FlashdutyPush(BaseModel):
    """The ``i_custom`` push of a Flashduty custom incident action."""

    model_config = ConfigDict(extra="allow")
    event_time: int | None = None
    event_type: str | None = Field(None, max_length=100)
    event_id: str | None = Field(None, max_length=200)
    person: FlashdutyPerson | None = None
    incident: FlashdutyIncident


class FlashdutyButtonResult(BaseModel):
    button: str
    alert_key: str
    decision: Literal["close", "ignored", "duplicate"] = Field(
        description="ignored: nothing was open; duplicate: this event_id was already done"
    )
    event: int | None
    duplicate: bool
    text: str


class FlashdutyResult(BaseModel):
    action: Action
    event_id: str | None
    duplicate: bool
    results: list[FlashdutyButtonResult]


def _label(labels: dict[str, Any] | None) -> str | None:
    value = (labels or {}).get("flic_button")
    return value if isinstance(value, str) else None


def _flashduty_names(incident: FlashdutyIncident) -> Iterable[str]:
    for alert in incident.alerts or ():
        if alert.alert_key:
            yield alert.alert_key
        label = _label(alert.labels)
        if label:
            yield label
    label = _label(incident.labels)
    if label:
        yield label


def _flashduty_buttons(bridge: Core, incident: FlashdutyIncident) -> list[ButtonConfig]:
    """Every known button the incident names, in order, each once."""
    found: dict[str, ButtonConfig] = {}
    for name in _flashduty_names(incident):
        button = find_button(bridge, name)
        if button is not None:
            found.setdefault(button.id, button)
    return list(found.values())


def _flashduty_example(config: Config) -> dict[str, Any]:
    button_id, key = sample_button(config)
    return {
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
    }


def _flashduty_handler(action: Action) -> Handler:
    async def handler(request: web.Request) -> FlashdutyResult:
        bridge = request.app[BRIDGE]
        config = bridge.config.flashduty
        if not config.enabled:
            raise ApiError(
                404, "not found", "Flashduty callbacks are disabled ([flashduty] enabled)"
            )
        if config.secret is not None and not same_secret(
            request.headers.get(config.header), config.secret.get_secret_value()
        ):
            raise ApiError(401, f"wrong or missing {config.header} header", None)
        push = parse(FlashdutyPush, await read_json(request))
        event_id = push.event_id or push.incident.event_id or None
        buttons = _flashduty_buttons(bridge, push.incident)
        if not buttons:
            raise ApiError(
                422,
                "the incident names no button of this bridge",
                {"alert_keys": list(_flashduty_names(push.incident))[:20]},
            )
        person = push.person
        actor = (person.email or person.person_name or "") if person else ""
        results = []
        for button in buttons:
            callback = None
            if event_id is not None:
                key = event_id if len(buttons) == 1 else f"{event_id}/{button.id}"
                callback = ("flashduty", key)
            result = await run_action(
                bridge, button, action, origin="flashduty", actor=actor, callback=callback
            )
            line = (
                "already done (repeated event_id)"
                if result["duplicate"]
                else outcome_text("en", action, button.display_name, result)
            )
            results.append(
                FlashdutyButtonResult(
                    button=button.id,
                    alert_key=result["alert_key"],
                    decision="duplicate" if result["duplicate"] else result["decision"],
                    event=result["event"] or None,
                    duplicate=result["duplicate"],
                    text=line,
                )
            )
        return FlashdutyResult(
            action=action,
            event_id=event_id,
            duplicate=all(r.duplicate for r in results),
            results=results,
        )

    summary = f"Flashduty custom incident action: {action} the incident's buttons"
    handler.__name__ = f"flashduty_{action}"
    handler.__doc__ = f"{summary}."
    return operation(
        summary,
        description="The `i_custom` push. A repeated `event_id` (top level or in "
        "`incident`) answers 200 and does nothing. Buttons are found from "
        "`incident.alerts[].alert_key` and the `flic_button` label. 404 when "
        "`[flashduty] enabled = false`.",
        tag="callbacks",
        security="flashdutyHeader",
        body=FlashdutyPush,
        example=_flashduty_example,
        replies=(Reply(200, "done (or already done)", FlashdutyResult),),
        errors=(400, 401, 404, 413, 422, 503),
        why={422: "the incident names no known button"},
    )(handler)


def add_routes(app: web.Application) -> None:
    """Register the iLert and Flashduty callback routes."""
    app.router.add_post("/ilert/action-requests", ilert_action_requests)
    app.router.add_post("/ilert/action-responses", ilert_action_responses)
    for action in ACTIONS:
        app.router.add_post(f"/flashduty/action/{action}", _flashduty_handler(action))
