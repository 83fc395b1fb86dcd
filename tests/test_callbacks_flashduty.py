"""Flashduty custom incident actions against a real bridge, over real HTTP."""

from __future__ import annotations

import asyncio
import copy
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

HEADER = "X-Customize-Header-A"
SECRET = "fd-secret-value"

# The seed's request example, verbatim; ``push`` points its alerts at configured buttons.
SEED_PUSH: dict[str, Any] = {
    "event_time": 1700208013988,
    "event_type": "i_custom",
    "incident": {
        "event_id": "fac0599a2a25529ba2362c0c184b6cfb",
        "account_id": 74058170041504,
        "account_name": "头铁科技",
        "ack_time": 0,
        "alert_cnt": 1,
        "alerts": [
            {
                "account_id": 74058170041504,
                "alert_id": "6551f37f8713372ad1054d54",
                "alert_key": "asdflasdfl2xzasd112621",
                "alert_severity": "Critical",
                "alert_status": "Critical",
                "close_time": 0,
                "created_at": 1699869567,
                "data_source_id": 2398086111504,
                "description": "cpu.idle < 20%",
                "end_time": 0,
                "event_cnt": 0,
                "labels": {
                    "a": "a",
                    "check": "自定义字段测试",
                    "cluster": "nj",
                    "metric": "node_cpu_seconds_total",
                    "resource": "es.nj.01",
                    "service": "engine",
                    "v": "v",
                },
                "last_time": 1699869562,
                "progress": "Triggered",
                "responder_email": "",
                "responder_id": 0,
                "responder_name": "",
                "start_time": 1699869562,
                "title": "nj / es.nj.01 - 自定义字段测试",
                "title_rule": "$cluster::$resource::$check",
                "updated_at": 1699869576,
            }
        ],
        "assigned_to": {
            "assigned_at": 1699869576,
            "escalate_rule_id": "6509344bc1d50d723ca04986",
            "escalate_rule_name": "策略5",
            "id": "VobpBqvTuXgQ7BZzJ2Qu94",
            "layer_idx": 0,
            "type": "assign",
        },
        "channel_id": 1973372625504,
        "channel_name": "lim_test",
        "close_time": 0,
        "created_at": 1699869576,
        "data_source_id": 2398086111504,
        "dedup_key": "asdflasdfl2xzasd112621",
        "description": "cpu.idle < 20%",
        "detail_url": "http://10.206.0.17:8567/incident/detail/6551f3888713372ad1054d57",
        "end_time": 0,
        "equals_md5": "",
        "fields": {"impacted_services": ["passport", "order"], "priority": "P3"},
        "group_method": "p",
        "impact": "",
        "incident_id": "6551f3888713372ad1054d57",
        "incident_severity": "Critical",
        "incident_status": "Critical",
        "labels": {
            "a": "a",
            "check": "自定义字段测试",
            "cluster": "nj",
            "metric": "node_cpu_seconds_total",
            "resource": "es.nj.01",
            "service": "engine",
            "v": "v",
        },
        "creator": {
            "email": "toutie@flashcat.cloud",
            "person_id": 1552048792504,
            "person_name": "头铁",
        },
        "last_time": 1699869562,
        "num": "054D57",
        "progress": "Triggered",
        "resolution": "",
        "responders": [
            {
                "acknowledged_at": 0,
                "assigned_at": 1699869576,
                "email": "zhangsan@toutie.com",
                "person_id": 1234648032504,
                "person_name": "zhangsan",
            }
        ],
        "root_cause": "",
        "snoozed_before": 0,
        "start_time": 1699869562,
        "title": "nj / es.nj.01 - 自定义字段测试",
        "updated_at": 1699929113,
    },
    "person": {
        "email": "zhangsan@toutie.com",
        "person_id": 1999632289504,
        "person_name": "zhangsan",
    },
}


def push(
    *alert_keys: str, event_id: str | None = "evt-1", top_level: bool = False
) -> dict[str, Any]:
    """The seed's push naming ``alert_keys``; ``event_id`` in the incident or at the top."""
    body = copy.deepcopy(SEED_PUSH)
    template = body["incident"]["alerts"][0]
    body["incident"]["alerts"] = [{**template, "alert_key": key} for key in alert_keys]
    del body["incident"]["event_id"]
    if event_id is not None:
        (body if top_level else body["incident"])["event_id"] = event_id
    return body


def fd_config(tmp_path: Path, receiver: Receiver, **flashduty: Any) -> Config:
    return make_config(
        tmp_path,
        buttons=[
            {"id": "desk", "source": "ingest", "name": "Desk"},
            {"id": "lab", "source": "ingest", "name": "Lab"},
        ],
        sinks=[{"id": "hook", "type": "webhook", "url": f"{receiver.url}/hook"}],
        flashduty={"enabled": True, "header": HEADER, "secret": SECRET, **flashduty},
    )


@pytest.fixture
async def bridge(tmp_path: Path, receiver: Receiver) -> AsyncIterator[Bridge]:
    async with running(fd_config(tmp_path, receiver)) as running_bridge:
        yield running_bridge


async def post(
    http: aiohttp.ClientSession,
    bridge: Bridge,
    body: Any,
    action: str = "close",
    secret: str | None = SECRET,
) -> tuple[int, Any]:
    headers = {HEADER: secret} if secret is not None else {}
    url = f"{bridge.url}/flashduty/action/{action}"
    async with http.post(url, json=body, headers=headers) as response:
        return response.status, await response.json()


def event_count(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])


async def test_seed_push_closes_the_button(
    bridge: Bridge, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    """The seed's push closes the named button's alert at every sink, recorded with who."""
    async with asyncio.timeout(10):
        await open_alert(http, bridge)
        await receiver.wait_for(1)
        status, body = await post(http, bridge, push("desk"))
        assert status == 200
        assert body["action"] == "close"
        assert body["duplicate"] is False
        assert [(r["button"], r["decision"]) for r in body["results"]] == [("desk", "close")]
        got = await receiver.wait_for(2)
        assert [r.body["state"] for r in got] == ["On", "Off"]
        newest = (await bridge.store.recent_events(1))[0]
        assert (newest["origin"], newest["actor"]) == ("flashduty", "zhangsan@toutie.com")


async def test_seed_push_verbatim_names_no_button(
    bridge: Bridge, http: aiohttp.ClientSession
) -> None:
    """The seed's example as it is names an alert key this bridge does not know: 422 JSON."""
    async with asyncio.timeout(10):
        status, body = await post(http, bridge, copy.deepcopy(SEED_PUSH))
        assert status == 422
        assert body["error"] == "the incident names no button of this bridge"
        assert body["detail"]["alert_keys"] == ["asdflasdfl2xzasd112621"]


async def test_repeated_event_id_does_nothing(
    bridge: Bridge, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    """Flashduty's retry of an event_id (in the incident or at the top) answers 200, no-op."""
    async with asyncio.timeout(10):
        for top_level in (False, True):
            await open_alert(http, bridge)
            event_id = f"retry-{top_level}"
            first = await post(http, bridge, push("desk", event_id=event_id, top_level=top_level))
            assert first[0] == 200
            assert first[1]["results"][0]["decision"] == "close"
            events = event_count(bridge.store.path)
            await open_alert(http, bridge)  # a repeat that acted would close this one
            status, body = await post(
                http, bridge, push("desk", event_id=event_id, top_level=top_level)
            )
            assert status == 200
            assert body["duplicate"] is True
            assert body["results"][0]["duplicate"] is True
            assert body["results"][0]["decision"] == "duplicate"
            assert event_count(bridge.store.path) == events + 1  # only the open
            assert bridge.states["desk"].is_open
            await post(http, bridge, push("desk", event_id=f"close-{top_level}"))


async def test_repeated_event_id_after_a_restart_does_nothing(
    tmp_path: Path, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    """The store remembers event ids: a retry reaching a restarted bridge is still a no-op."""
    config = fd_config(tmp_path, receiver)
    async with asyncio.timeout(20):
        async with running(config) as first:
            await open_alert(http, first)
            status, body = await post(http, first, push("desk", event_id="across-restarts"))
            assert (status, body["results"][0]["decision"]) == (200, "close")
            await receiver.wait_for(2)  # delivered before the restart
        async with running(config) as second:
            await open_alert(http, second)
            status, body = await post(http, second, push("desk", event_id="across-restarts"))
            assert (status, body["duplicate"]) == (200, True)
            assert second.states["desk"].is_open
            await receiver.wait_for(3)
        assert [r.body["state"] for r in receiver.requests] == ["On", "Off", "On"]


async def test_incident_with_two_buttons_acts_on_both(
    bridge: Bridge, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    """Every button the incident names is closed; a retry repeats none of them."""
    async with asyncio.timeout(10):
        await open_alert(http, bridge, "desk")
        await open_alert(http, bridge, "lab")
        status, body = await post(http, bridge, push("desk", "LAB", "desk", event_id="two"))
        assert status == 200
        assert [(r["button"], r["decision"]) for r in body["results"]] == [
            ("desk", "close"),
            ("lab", "close"),
        ]
        await receiver.wait_for(4)
        status, body = await post(http, bridge, push("desk", "lab", event_id="two"))
        assert (status, [r["duplicate"] for r in body["results"]]) == (200, [True, True])
        await open_alert(http, bridge, "lab")  # the retry left lab alone: still closed
        offs = [r for r in receiver.requests if r.body["state"] == "Off"]
        assert len(offs) == 2


async def test_flic_button_label_finds_the_button(
    bridge: Bridge, http: aiohttp.ClientSession
) -> None:
    """An incident whose alerts have other keys is matched by its flic_button label."""
    async with asyncio.timeout(10):
        await open_alert(http, bridge, "lab")
        body = push("some-other-key", event_id="label")
        body["incident"]["labels"]["flic_button"] = "lab"
        status, answer = await post(http, bridge, body)
        assert status == 200
        assert [(r["button"], r["decision"]) for r in answer["results"]] == [("lab", "close")]


async def test_push_without_event_id_is_not_deduplicated(
    bridge: Bridge, http: aiohttp.ClientSession
) -> None:
    """No event_id: each push is processed (the second close finds nothing open)."""
    async with asyncio.timeout(10):
        await open_alert(http, bridge)
        decisions = []
        for _ in range(2):
            status, body = await post(http, bridge, push("desk", event_id=None))
            assert status == 200
            assert body["event_id"] is None
            decisions.append(body["results"][0]["decision"])
        assert decisions == ["close", "ignored"]
        events = await bridge.store.recent_events(2)
        assert [e["origin"] for e in events] == ["flashduty", "flashduty"]


async def test_rearm_closes_here_only(
    bridge: Bridge, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    """/flashduty/action/rearm closes the state and sends nothing; the next press opens."""
    async with asyncio.timeout(10):
        await open_alert(http, bridge)
        status, body = await post(http, bridge, push("desk", event_id="rearm-1"), action="rearm")
        assert status == 200
        assert body["action"] == "rearm"
        assert "re-armed" in body["results"][0]["text"]
        assert not bridge.states["desk"].is_open
        await open_alert(http, bridge)
        got = await receiver.wait_for(2)
        assert [r.body["state"] for r in got] == ["On", "On"]


async def test_custom_header_must_match(bridge: Bridge, http: aiohttp.ClientSession) -> None:
    """A missing or wrong custom header answers 401 JSON, and nothing happens."""
    async with asyncio.timeout(10):
        await open_alert(http, bridge)
        for secret in (None, "wrong", SECRET + "x", ""):
            status, body = await post(http, bridge, push("desk"), secret=secret)
            assert status == 401, secret
            assert body["error"]
        assert bridge.states["desk"].is_open


async def test_disabled_routes_answer_404(
    tmp_path: Path, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    """With [flashduty] enabled = false the routes do not exist."""
    async with asyncio.timeout(10), running(fd_config(tmp_path, receiver, enabled=False)) as b:
        for action in ("close", "rearm"):
            status, _ = await post(http, b, push("desk"), action=action)
            assert status == 404


async def test_bad_input_is_a_4xx(bridge: Bridge, http: aiohttp.ClientSession) -> None:
    """Not JSON or no incident: 400 JSON; 65 KiB: 413; an unknown action route: 404."""
    async with asyncio.timeout(10):
        url = f"{bridge.url}/flashduty/action/close"
        headers = {HEADER: SECRET, "Content-Type": "application/json"}
        for raw in (b"{", b"null", b'{"event_id": "x"}', b'{"incident": {"alerts": 5}}'):
            async with http.post(url, data=raw, headers=headers) as response:
                assert response.status == 400, raw
                assert (await response.json())["error"]
        big = b'{"incident": {"title": "' + b"x" * (65 * 1024) + b'"}}'
        async with http.post(url, data=big, headers=headers) as response:
            assert response.status == 413
        status, body = await post(http, bridge, push("desk"), action="reboot")
        assert status == 404
        assert body["error"]
