"""What the routes do on someone's behalf: find a button by any of its names, submit a
signal with the core's refusals as the API's errors, and run an action (close or re-arm)
for a platform or a local screen, with the text that tells its outcome.

Shared by the route modules (signals, platform callbacks, acknowledgements, local
screens), so none of them imports another.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from flicbridge.domain import Action, Decision, Signal
from flicbridge.errors import NotAccepting, StoreError, UnknownButton
from flicbridge.server.http import ApiError, Param, committed, sample_button

if TYPE_CHECKING:
    from flicbridge.config import ButtonConfig
    from flicbridge.core import Accepted, Core

log = structlog.get_logger(__name__)


BUTTON_ID = Param("id", {"type": "string"}, "the button id", example=lambda c: sample_button(c)[0])


# -- finding and submitting ----------------------------------------------------------


def submit(bridge: Core, signal: Signal, **kwargs: Any) -> asyncio.Future[Accepted]:
    """``bridge.submit`` with its refusals as the API's errors (503 / 404 / 503)."""
    return _refusals_as_errors(signal.button_id, lambda: bridge.submit(signal, **kwargs))


def _refusals_as_errors(
    button_id: str, call: Callable[[], asyncio.Future[Accepted]]
) -> asyncio.Future[Accepted]:
    try:
        return call()
    except NotAccepting:
        raise ApiError(503, "shutting down", None) from None
    except UnknownButton:
        raise ApiError(404, "unknown button", button_id) from None
    except StoreError as exc:  # commits are failing and the store holds all it may
        raise ApiError(503, "store unavailable", str(exc)) from None


def find_button(bridge: Core, name: str) -> ButtonConfig | None:
    """A button by id, ingest_name, name_id or alert key (case-insensitive)."""
    wanted = name.strip().casefold()
    for button in bridge.config.buttons:
        names = {button.id, button.ingest_name, button.name_id, bridge.config.alert_key(button)}
        if wanted in {n.casefold() for n in names if n}:
            return button
    return None


# -- texts -------------------------------------------------------------------------------

TEXTS: dict[str, dict[str, str]] = {
    "en": {
        "action.close": "Close everywhere ({name})",
        "action.rearm": "Re-arm button ({name})",
        "close.close": "Closed the alert of {name}; the close goes to {rows} sink(s).",
        "close.ignored": "Nothing to close: the alert of {name} was not open (ignored).",
        "rearm.close": "{name} is re-armed: closed here only, the next press opens a new alert.",
        "rearm.ignored": "{name} was already closed here; the next press opens a new alert.",
        "pending": " The bridge is still writing it to disk.",
        "no_button": "This alert belongs to no button of this bridge.",
        "other_button": "This action belongs to button {action_button}, not to this alert.",
        "not_accepting": "The bridge is shutting down; try again in a moment.",
        "failed": "The bridge could not record the action: {detail}",
    },
    "de": {
        "action.close": "Überall schließen ({name})",
        "action.rearm": "Knopf neu scharf schalten ({name})",
        "close.close": "Der Alarm von {name} ist geschlossen; "
        "das Schließen geht an {rows} Ziel(e).",
        "close.ignored": "Nichts zu schließen: der Alarm von {name} war nicht offen (ignoriert).",
        "rearm.close": "{name} ist wieder scharf: nur hier geschlossen, "
        "der nächste Druck öffnet einen neuen Alarm.",
        "rearm.ignored": "{name} war hier schon geschlossen; "
        "der nächste Druck öffnet einen neuen Alarm.",
        "pending": " Die Brücke schreibt es noch auf die Platte.",
        "no_button": "Dieser Alarm gehört zu keinem Knopf dieser Brücke.",
        "other_button": "Diese Aktion gehört zu Knopf {action_button}, nicht zu diesem Alarm.",
        "not_accepting": "Die Brücke fährt herunter; bitte gleich noch einmal versuchen.",
        "failed": "Die Brücke konnte die Aktion nicht speichern: {detail}",
    },
}


def language(locale: str | None) -> str:
    """``en`` or ``de`` from a locale like ``de``, ``de-DE``, ``de_AT``; English otherwise."""
    if not locale:
        return "en"
    lang = locale.strip().replace("_", "-").split("-")[0].lower()
    return lang if lang in TEXTS else "en"


def text(lang: str, key: str, **values: Any) -> str:
    return TEXTS[lang][key].format(**values)


def outcome_text(lang: str, action: Action, name: str, result: dict[str, Any]) -> str:
    """What happened, for the person who clicked: close or ignored, plus a pending note."""
    decided = "close" if result["decision"] == Decision.CLOSE.value else "ignored"
    line = text(lang, f"{action}.{decided}", name=name, rows=result.get("rows", 0))
    if result.get("pending"):
        line += text(lang, "pending")
    return line


# -- running an action -------------------------------------------------------------------


async def run_action(
    bridge: Core,
    button: ButtonConfig,
    action: Action,
    *,
    origin: str,
    actor: str,
    callback: tuple[str, str] | None = None,
    wait: float | None = None,
) -> dict[str, Any]:
    """Submit the action's Off signal and wait for its commit; JSON of what it decided.

    With ``wait`` the answer may come before the commit (``"pending": true``): the
    signal is decided and the store retries the write until it lands.
    """
    key = bridge.config.alert_key(button)
    before = bridge.states.get(key)
    was_open = before is not None and before.is_open
    future = _refusals_as_errors(
        button.id,
        lambda: bridge.run_action(button.id, action, origin=origin, actor=actor, callback=callback),
    )
    if wait is not None:
        await asyncio.wait({future}, timeout=wait)  # never cancels the commit
    if not future.done() and wait is not None:
        # The decision is made (the state moved when it was submitted); the store keeps
        # retrying the write. Only this wait ends.
        future.add_done_callback(_consume)
        sends = was_open and action == "close"
        result: dict[str, Any] = {
            "event": None,
            "decision": (Decision.CLOSE if was_open else Decision.IGNORED).value,
            "rows": len(bridge.config.sinks_of(button)) if sends else 0,
            "duplicate": False,
            "pending": True,
        }
    else:
        accepted = await committed(future, "the action is decided and held; its commit is pending")
        result = {
            "event": accepted.event_id or None,
            "decision": accepted.decision.value,
            "rows": len(accepted.rows),
            "duplicate": accepted.duplicate,
        }
    result.update(button=button.id, alert_key=bridge.config.alert_key(button), action=action)
    log.info(
        "callback_action",
        button=button.id,
        action=action,
        origin=origin,
        actor=actor or None,
        decision=result["decision"],
        duplicate=result["duplicate"] or None,
        event_id=result["event"],
    )
    return result


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("callback_commit_failed", error=str(future.exception()))
