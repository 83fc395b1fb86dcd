"""POST /api/v1/ingest/flic end to end: the Flic body → bridge → store → AlertOps sink.

Authentication by the server's bearer token or by a source's own ``?token=`` ([ingest]),
rate-limited per source.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from flicbridge.app import Bridge
from tests.conftest import auth, make_config, running
from tests.receiver import Receiver

PHONE, HUB = "phone-secret-1", "hub-secret-2"


def ingest_config(tmp_path: Path, receiver: Receiver, **extra: Any) -> Any:
    sections: dict[str, Any] = {
        "site": "hq",
        "buttons": [
            {
                "id": "desk",
                "source": "ingest",
                "name": "Desk",
                "info": "Front desk",
                "ingest_name": "Reception Hub",
                "name_id": "reception-desk",
            },
            {"id": "lab", "source": "ingest"},
        ],
        "sinks": [{"id": "ao", "type": "alertops", "url": f"{receiver.url}/POSTAlert/KEY/Flic"}],
        "ingest": {"tokens": {"phone": PHONE, "hub": HUB}},
    }
    sections.update(extra)
    return make_config(tmp_path, **sections)


async def post(
    http: aiohttp.ClientSession,
    bridge: Bridge,
    body: Any,
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, dict[str, str]]:
    """POST to the ingest endpoint: (status, JSON body, headers)."""
    params = {"token": token} if token is not None else None
    async with asyncio.timeout(10):
        async with http.post(
            f"{bridge.url}/api/v1/ingest/flic", json=body, params=params, headers=headers
        ) as response:
            return response.status, await response.json(), dict(response.headers)


def seed(name: str, state: str, info: str = "") -> dict[str, str]:
    """Seed 002's body, as the Flic app's HTTP request action sends it."""
    return {"flic_nameId": name, "flic_state": state, "info": info}


async def test_on_and_off_reach_the_sink_like_a_press(
    tmp_path: Path, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    """On opens (sent, info appended), a repeat is appended (not sent), Off closes (sent)."""
    async with running(ingest_config(tmp_path, receiver)) as bridge:
        status, body, _ = await post(http, bridge, seed("desk", "On", "lobby"), token=PHONE)
        assert status == 202 and body["decision"] == "open" and body["rows"] == 1
        (opened,) = await receiver.wait_for(1)
        assert opened.path == "/POSTAlert/KEY/Flic"
        assert opened.body["flic_nameId"] == "reception-desk"
        assert opened.body["flic_state"] == "On"
        assert opened.body["info"] == "Front desk — lobby"
        assert opened.body["alert_key"] == "hq/desk"
        status, body, _ = await post(http, bridge, seed("desk", "On"), token=PHONE)
        assert (status, body["decision"], body["rows"]) == (202, "appended", 0)
        status, body, _ = await post(http, bridge, seed("desk", "Off", "all clear"), token=HUB)
        assert (status, body["decision"]) == (202, "close")
        got = await receiver.wait_for(2)
        assert [r.body["flic_state"] for r in got] == ["On", "Off"]
        assert got[1].body["info"] == "Front desk — all clear"
        events = list(reversed(await bridge.store.recent_events()))
        assert [(e["origin"], e["decision"], e["actor"]) for e in events] == [
            ("ingest", "open", "phone"),
            ("ingest", "appended", "phone"),
            ("ingest", "close", "hub"),
        ]
        assert events[0]["info"] == "lobby"


@pytest.mark.parametrize(
    "name",
    ["desk", "DESK", "Reception Hub", "reception hub", "reception-desk", "hq/desk", " desk "],
)
async def test_every_name_of_a_button_addresses_it(
    tmp_path: Path, receiver: Receiver, http: aiohttp.ClientSession, name: str
) -> None:
    """flic_nameId may be the id, ingest_name, name_id or alert key, in any case."""
    async with running(ingest_config(tmp_path, receiver)) as bridge:
        status, body, _ = await post(http, bridge, seed(name, "On"), headers=auth())
        assert (status, body["decision"]) == (202, "open")
        events = await bridge.store.recent_events(1)
        assert events[0]["button_id"] == "desk" and events[0]["actor"] == ""


async def test_state_is_matched_case_insensitively(
    tmp_path: Path, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    """ "on", "ON", " On " open and "off", "OFF" close; anything else is a 400."""
    async with running(ingest_config(tmp_path, receiver)) as bridge:
        for state, decision in [
            ("on", "open"),
            ("OFF", "close"),
            (" On ", "open"),
            ("off", "close"),
        ]:
            status, body, _ = await post(http, bridge, seed("lab", state), token=PHONE)
            assert (status, body["decision"]) == (202, decision), state
        status, body, _ = await post(http, bridge, seed("lab", "maybe"), token=PHONE)
        assert status == 400 and body["error"] == "invalid body"
        status, body, _ = await post(http, bridge, {"flic_state": "On"}, token=PHONE)
        assert status == 400 and body["detail"][0]["field"] == "flic_nameId"


async def test_an_unknown_name_is_a_404(
    tmp_path: Path, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    """A flic_nameId no button has: 404 JSON naming it; nothing is recorded or sent."""
    async with running(ingest_config(tmp_path, receiver)) as bridge:
        status, body, _ = await post(http, bridge, seed("nobody", "On"), token=PHONE)
        assert (status, body) == (404, {"error": "unknown flic_nameId", "detail": "nobody"})
        assert await bridge.store.recent_events() == []
    assert receiver.requests == []


async def test_a_wrong_or_missing_token_is_a_401(
    tmp_path: Path, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    """Unknown or missing tokens get 401; a source's token opens the ingest endpoint only."""
    async with running(ingest_config(tmp_path, receiver)) as bridge:
        status, body, _ = await post(http, bridge, seed("desk", "On"), token="guess")
        assert (status, body["error"]) == (401, "wrong token")
        status, body, _ = await post(http, bridge, seed("desk", "On"))
        assert (status, body["error"]) == (401, "missing token")
        async with http.get(f"{bridge.url}/api/v1/status", params={"token": PHONE}) as response:
            assert response.status == 401
        assert await bridge.store.recent_events() == []


async def test_source_tokens_work_without_a_server_token(
    tmp_path: Path, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    """With no [server] token the rest of the API is off (403), ingest by source token is not."""
    config = ingest_config(tmp_path, receiver, server={"host": "127.0.0.1", "port": 0})
    async with running(config) as bridge:
        status, body, _ = await post(http, bridge, seed("desk", "On"), token=HUB)
        assert (status, body["decision"]) == (202, "open")
        status, body, _ = await post(http, bridge, seed("desk", "On"), token="guess")
        assert (status, body["error"]) == (401, "wrong token")
        status, body, _ = await post(http, bridge, seed("desk", "On"))
        assert (status, body["error"]) == (401, "missing token")
        async with http.get(f"{bridge.url}/api/v1/status", params={"token": HUB}) as response:
            assert response.status == 403


async def test_each_source_is_rate_limited_on_its_own(
    tmp_path: Path, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    """Past its burst a source gets 429 with Retry-After; other sources and the bearer do not."""
    config = ingest_config(
        tmp_path,
        receiver,
        ingest={"tokens": {"phone": PHONE, "hub": HUB}, "rate": 0.01, "burst": 2},
    )
    async with running(config) as bridge:
        for _ in range(2):
            status, _, _ = await post(http, bridge, seed("desk", "On"), token=PHONE)
            assert status == 202
        status, body, headers = await post(http, bridge, seed("desk", "Off"), token=PHONE)
        assert status == 429 and body["error"] == "too many requests"
        assert body["detail"] == {"source": "phone", "retry_after": 100}
        assert headers["Retry-After"] == "100"
        status, body, _ = await post(http, bridge, seed("desk", "Off"), token=HUB)
        assert (status, body["decision"]) == (202, "close")
        for _ in range(3):
            status, _, _ = await post(http, bridge, seed("lab", "On"), headers=auth())
            assert status == 202
        events = await bridge.store.recent_events()
        assert [e["actor"] for e in events].count("phone") == 2  # the refused one left no trace


async def test_the_bucket_refills_at_the_rate(
    tmp_path: Path, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    """After a 429 the source may send again once 1/rate seconds have passed."""
    config = ingest_config(
        tmp_path, receiver, ingest={"tokens": {"phone": PHONE}, "rate": 20, "burst": 1}
    )
    async with running(config) as bridge:
        assert (await post(http, bridge, seed("desk", "On"), token=PHONE))[0] == 202
        status, _, headers = await post(http, bridge, seed("desk", "On"), token=PHONE)
        assert status == 429 and headers["Retry-After"] == "1"  # whole seconds, at least 1
        await asyncio.sleep(0.1)
        assert (await post(http, bridge, seed("desk", "On"), token=PHONE))[0] == 202


def test_ingest_keys_are_validated(tmp_path: Path, receiver: Receiver) -> None:
    """Source names follow the id rules; rate and burst must be positive."""
    from flicbridge.config import ConfigError

    with pytest.raises(ConfigError) as info:
        ingest_config(
            tmp_path, receiver, ingest={"tokens": {"my phone": "x"}, "rate": 0, "burst": 0}
        )
    paths = {path for path, _ in info.value.problems}
    assert {"ingest.rate", "ingest.burst"} <= paths
    assert any(path.startswith("ingest.tokens") for path in paths)
