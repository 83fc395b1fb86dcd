"""iLert dynamic alert actions against a real bridge, over real HTTP."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from flicbridge.app import Bridge
from flicbridge.config import Config
from tests.conftest import make_config, open_alert, running
from tests.receiver import Receiver

ILERT_AUTH = "some-optional-auth"  # the seed's sample header value


def ilert_config(tmp_path: Path, receiver: Receiver, **ilert: Any) -> Config:
    return make_config(
        tmp_path,
        site="hq",
        buttons=[
            {"id": "desk", "source": "ingest", "name": "Desk"},
            {"id": "lab", "source": "ingest", "name": "Lab"},
        ],
        sinks=[{"id": "hook", "type": "webhook", "url": f"{receiver.url}/hook"}],
        ilert={"enabled": True, "authorization": ILERT_AUTH, **ilert},
    )


@pytest.fixture
async def bridge(tmp_path: Path, receiver: Receiver) -> AsyncIterator[Bridge]:
    async with running(ilert_config(tmp_path, receiver)) as running_bridge:
        yield running_bridge


def seed_request(alert_key: str | None = "hq/desk", locale: str = "de") -> dict[str, Any]:
    """The seed's sample action request, its ``alert`` filled in like iLert's resource."""
    alert: dict[str, Any] = {"id": 4711, "summary": "Desk: panic button", "status": "PENDING"}
    if alert_key is not None:
        alert["alertKey"] = alert_key
    return {"user": {"id": 0, "email": "string"}, "locale": locale, "alert": alert}


async def post(
    http: aiohttp.ClientSession,
    bridge: Bridge,
    path: str,
    body: Any,
    authorization: str | None = ILERT_AUTH,
) -> tuple[int, Any]:
    headers = {"Authorization": authorization} if authorization is not None else {}
    async with http.post(f"{bridge.url}{path}", json=body, headers=headers) as response:
        return response.status, await response.json()


async def test_seed_request_offers_close_and_rearm_in_german(
    bridge: Bridge, http: aiohttp.ClientSession
) -> None:
    """The seed's request (locale de) gets two actions with stable ids and German texts."""
    async with asyncio.timeout(10):
        status, body = await post(http, bridge, "/ilert/action-requests", seed_request())
        assert status == 200
        assert [a["id"] for a in body["actions"]] == ["close:desk", "rearm:desk"]
        assert body["actions"][0]["text"] == "Überall schließen (Desk)"
        assert body["actions"][1]["text"] == "Knopf neu scharf schalten (Desk)"
        assert len(body["actions"]) <= 3
        _, again = await post(http, bridge, "/ilert/action-requests", seed_request())
        assert again == body  # deterministic: iLert caches and maps ids back


async def test_texts_follow_the_locale(bridge: Bridge, http: aiohttp.ClientSession) -> None:
    """en and unknown locales get English, de and de-AT German."""
    async with asyncio.timeout(10):
        texts = {}
        for locale in ("en", "fr", "de-AT", "DE"):
            _, body = await post(
                http, bridge, "/ilert/action-requests", seed_request(locale=locale)
            )
            texts[locale] = body["actions"][0]["text"]
        assert texts["en"] == texts["fr"] == "Close everywhere (Desk)"
        assert texts["de-AT"] == texts["DE"] == "Überall schließen (Desk)"


async def test_alert_key_matches_case_insensitively_and_by_label(
    bridge: Bridge, http: aiohttp.ClientSession
) -> None:
    """The alertKey may be the alert key in any case or the button id; else the label counts."""
    async with asyncio.timeout(10):
        for key in ("HQ/LAB", "lab", "Lab"):
            _, body = await post(http, bridge, "/ilert/action-requests", seed_request(key))
            assert [a["id"] for a in body["actions"]] == ["close:lab", "rearm:lab"], key
        request = seed_request("something-else")
        request["alert"]["labels"] = {"flic_button": "hq/lab"}
        _, body = await post(http, bridge, "/ilert/action-requests", request)
        assert [a["id"] for a in body["actions"]] == ["close:lab", "rearm:lab"]


async def test_alert_of_no_known_button_gets_no_actions(
    bridge: Bridge, http: aiohttp.ClientSession
) -> None:
    """An alert that names no button of this bridge is offered nothing."""
    async with asyncio.timeout(10):
        for key in ("hq/unknown", None):
            status, body = await post(http, bridge, "/ilert/action-requests", seed_request(key))
            assert (status, body) == (200, {"actions": []})


async def test_close_action_closes_everywhere(
    bridge: Bridge, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    """close:<button> closes the alert, sends Off to the sinks and records who did it."""
    async with asyncio.timeout(10):
        await open_alert(http, bridge)
        await receiver.wait_for(1)
        request = {**seed_request(locale="en"), "actionId": "close:desk"}
        status, body = await post(http, bridge, "/ilert/action-responses", request)
        assert status == 200
        assert body == {
            "success": True,
            "text": "Closed the alert of Desk; the close goes to 1 sink(s).",
        }
        got = await receiver.wait_for(2)
        assert [r.body["state"] for r in got] == ["On", "Off"]
        assert not bridge.states["hq/desk"].is_open
        newest = (await bridge.store.recent_events(1))[0]
        assert (newest["origin"], newest["actor"], newest["decision"]) == (
            "ilert",
            "string",
            "close",
        )


async def test_close_with_nothing_open_is_a_success(
    bridge: Bridge, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    """A close of a closed alert is "ignored": success, and the text says so (in German too)."""
    async with asyncio.timeout(10):
        request = {**seed_request(locale="de"), "actionId": "close:desk"}
        status, body = await post(http, bridge, "/ilert/action-responses", request)
        assert status == 200
        assert body["success"] is True
        assert "ignoriert" in body["text"]
        request["locale"] = "en"
        _, body = await post(http, bridge, "/ilert/action-responses", request)
        assert body == {
            "success": True,
            "text": "Nothing to close: the alert of Desk was not open (ignored).",
        }
        assert receiver.requests == []


async def test_rearm_closes_here_only(
    bridge: Bridge, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    """rearm closes the state without telling the sinks; the next press opens a new alert."""
    async with asyncio.timeout(10):
        await open_alert(http, bridge)
        await receiver.wait_for(1)
        request = {**seed_request(locale="en"), "actionId": "rearm:desk"}
        status, body = await post(http, bridge, "/ilert/action-responses", request)
        assert (status, body["success"]) == (200, True)
        assert "re-armed" in body["text"]
        assert not bridge.states["hq/desk"].is_open
        await open_alert(http, bridge)  # "open", not "appended": the rearm took
        got = await receiver.wait_for(2)
        assert [r.body["state"] for r in got] == ["On", "On"]  # no Off went out
        newest = (await bridge.store.recent_events(2))[1]
        assert (newest["origin"], newest["decision"]) == ("ilert (rearm)", "close")


async def test_unknown_action_id_is_400(bridge: Bridge, http: aiohttp.ClientSession) -> None:
    """An actionId the bridge never offered is a bad request, as in the seed's sample."""
    async with asyncio.timeout(10):
        for action in ("abc", "restart:desk", ""):
            request = {**seed_request(), "actionId": action}
            status, body = await post(http, bridge, "/ilert/action-responses", request)
            assert status == 400, action
            assert "error" in body


async def test_action_for_an_unknown_alert_fails_softly(
    bridge: Bridge, http: aiohttp.ClientSession
) -> None:
    """An alert of no known button answers success false; so does another button's action."""
    async with asyncio.timeout(10):
        request = {**seed_request("hq/unknown", locale="en"), "actionId": "close:desk"}
        status, body = await post(http, bridge, "/ilert/action-responses", request)
        assert (status, body["success"]) == (200, False)
        assert body["text"] == "This alert belongs to no button of this bridge."
        request = {**seed_request("hq/lab", locale="en"), "actionId": "close:desk"}
        status, body = await post(http, bridge, "/ilert/action-responses", request)
        assert (status, body["success"]) == (200, False)


async def test_authorization_header_must_match(bridge: Bridge, http: aiohttp.ClientSession) -> None:
    """Missing or wrong Authorization answers 401 with a JSON error, on both routes."""
    async with asyncio.timeout(10):
        for path in ("/ilert/action-requests", "/ilert/action-responses"):
            body = {**seed_request(), "actionId": "close:desk"}
            for header in (None, "wrong", f"Bearer {ILERT_AUTH}"):
                status, answer = await post(http, bridge, path, body, authorization=header)
                assert status == 401, (path, header)
                assert answer["error"]


async def test_disabled_routes_answer_404(
    tmp_path: Path, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    """With [ilert] enabled = false the routes do not exist."""
    async with asyncio.timeout(10), running(ilert_config(tmp_path, receiver, enabled=False)) as b:
        for path in ("/ilert/action-requests", "/ilert/action-responses"):
            status, body = await post(http, b, path, seed_request())
            assert status == 404
            assert body["error"]


async def test_bad_json_and_big_bodies(bridge: Bridge, http: aiohttp.ClientSession) -> None:
    """Not JSON, not an object or no alert: 400 JSON; 65 KiB: 413; the bridge keeps going."""
    async with asyncio.timeout(10):
        headers = {"Authorization": ILERT_AUTH, "Content-Type": "application/json"}
        url = f"{bridge.url}/ilert/action-requests"
        for raw in (b"{not json", b"[]", b'{"locale": "de"}', b"\xff\xfe"):
            async with http.post(url, data=raw, headers=headers) as response:
                assert response.status == 400, raw
                assert (await response.json())["error"]
        big = b'{"alert": {"summary": "' + b"x" * (65 * 1024) + b'"}}'
        async with http.post(url, data=big, headers=headers) as response:
            assert response.status == 413
            assert (await response.json())["error"] == "body too large"
        status, _ = await post(http, bridge, "/ilert/action-requests", seed_request())
        assert status == 200


async def test_a_stalled_disk_still_gets_an_answer_in_time(
    bridge: Bridge, http: aiohttp.ClientSession
) -> None:
    """With the store locked, the action is decided and answered before iLert gives up;
    the commit lands once the disk is free again."""
    async with asyncio.timeout(20):
        blocker = sqlite3.connect(bridge.store.path, isolation_level=None, timeout=1)
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the file: commits wait
        try:
            request = {**seed_request(locale="en"), "actionId": "rearm:desk"}
            status, body = await post(http, bridge, "/ilert/action-responses", request)
            assert (status, body["success"]) == (200, True)
            assert body["text"].endswith("The bridge is still writing it to disk.")
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        while not await bridge.store.recent_events(1):
            await asyncio.sleep(0.05)
        newest = (await bridge.store.recent_events(1))[0]
        assert (newest["origin"], newest["actor"]) == ("ilert (rearm)", "string")
