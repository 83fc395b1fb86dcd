"""Pushover: emergency messages for critical buttons, their receipts kept in the store,
cancelled by a close and polled for an acknowledgement, against a real aiohttp server
that answers as Pushover's API does."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import auth, cli, config_problems, make_config, running
from tests.receiver import Receiver
from tests.test_faults import accelerated, eventually, loop
from tests.test_sink_pipeline import settled, signal

TOKEN = "azGDORePK8gMaC0QOYAMyEEuzJnyUi"
USER = "uQiRzpo4DXghDmr9QzzfQu27cmVRsG"
RECEIPT = "rLqVuqTRh62UzxtmqiaLzQmVcPgiCy"
QUIRKY = "q2xKbHvZyA5uTcM9pLwN3rEoJfG7dS"


class FakePushover:
    """Answers as Pushover's API does (``/1/messages.json``, ``/1/receipts/<r>/cancel.json``,
    ``/1/receipts/<r>.json``), as the responder of a real loopback receiver."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, Any]] = []  # (method, path, body or query)
        self.receipt: dict[str, Any] = {"status": 1, "acknowledged": 0, "expired": 0}
        self.server = Receiver(self.answer)

    @property
    def url(self) -> str:
        return self.server.url

    async def start(self) -> None:
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop()

    def answer(self, request: Any, body: Any) -> tuple[int, Any, dict[str, str]]:
        path = request.path
        if request.method == "GET" and path.startswith("/1/receipts/"):
            self.requests.append(("GET", path, dict(request.query)))
            return 200, self.receipt, {}
        self.requests.append((request.method, path, body))
        if path.endswith("/cancel.json"):
            return 200, {"status": 1, "request": "req-2"}, {}
        if body.get("user") == QUIRKY:  # a 2xx that still says no
            return 200, {"status": 0, "errors": ["application token is over its limit"]}, {}
        if body.get("user") != USER:
            return (
                400,
                {"user": "invalid", "errors": ["user identifier is invalid"], "status": 0},
                {},
            )
        answer: dict[str, Any] = {"status": 1, "request": "req-1"}
        if body.get("priority") == 2:
            answer["receipt"] = RECEIPT
        return 200, answer, {}

    def paths(self) -> list[str]:
        return [path for _, path, _ in self.requests]


def pushover_config(tmp_path: Path, url: str, **options: Any) -> Any:
    sink = {"id": "po", "type": "pushover", "url": f"{url}/1/", "token": TOKEN, "user": USER}
    return make_config(
        tmp_path,
        buttons=[{"id": "desk", "source": "ingest", "name": "Desk", **options.pop("button", {})}],
        sinks=[{**sink, **options}],
    )


@pytest.fixture
async def pushover() -> Any:
    fake = FakePushover()
    await fake.start()
    yield fake
    await fake.stop()


async def test_a_critical_open_is_an_emergency_and_its_close_cancels_the_repeats(
    tmp_path: Path, pushover: FakePushover
) -> None:
    config = pushover_config(tmp_path, pushover.url, poll=3600)
    async with running(config) as bridge:
        await signal(bridge, "On")
        await settled(bridge)
        method, path, body = pushover.requests[0]
        assert (method, path) == ("POST", "/1/messages.json")
        assert isinstance(body.pop("timestamp"), int)
        assert body.pop("title").startswith("Alert: Desk (pressed ")
        assert "Button: Desk (desk)" in body.pop("message")
        assert body == {"token": TOKEN, "user": USER, "priority": 2, "retry": 60, "expire": 3600}
        assert await bridge.store.receipts() == {"po": {"desk": RECEIPT}}
        await signal(bridge, "Off")
        await settled(bridge)
        assert pushover.requests[1] == (
            "POST",
            f"/1/receipts/{RECEIPT}/cancel.json",
            {"token": TOKEN},
        )
        await eventually_empty(bridge)


async def eventually_empty(bridge: Any) -> None:
    async with asyncio.timeout(5):
        while await bridge.store.receipts():
            await asyncio.sleep(0.02)


async def test_the_receipt_outlives_a_restart(tmp_path: Path, pushover: FakePushover) -> None:
    """The receipt is in the store: the next daemon's close still cancels the repeats."""
    config = pushover_config(tmp_path, pushover.url, poll=3600)
    async with running(config) as bridge:
        await signal(bridge, "On")
        await settled(bridge)
        async with asyncio.timeout(5):
            while not await bridge.store.receipts():
                await asyncio.sleep(0.02)
    async with running(config) as bridge:
        await signal(bridge, "Off")
        await settled(bridge)
    assert pushover.paths() == ["/1/messages.json", f"/1/receipts/{RECEIPT}/cancel.json"]


async def test_a_non_critical_button_sends_a_plain_message_and_a_quiet_resolve(
    tmp_path: Path, pushover: FakePushover
) -> None:
    config = pushover_config(tmp_path, pushover.url, button={"severity": "warning"})
    async with running(config) as bridge:
        await signal(bridge, "On")
        await signal(bridge, "Off")
        await settled(bridge)
        assert await bridge.store.receipts() == {}
    opened, closed = (body for _, _, body in pushover.requests)
    assert (opened["priority"], closed["priority"]) == (0, -1)
    assert "retry" not in opened and "expire" not in opened
    assert closed["title"].startswith("Resolved: Desk")
    assert pushover.paths() == ["/1/messages.json", "/1/messages.json"]


async def test_a_refused_message_is_dead_lettered_with_pushovers_reason(
    tmp_path: Path, pushover: FakePushover
) -> None:
    config = pushover_config(tmp_path, pushover.url, user="gznej3rKEVAvPUxu9vvNnqpmZpokzF")
    async with running(config) as bridge:
        await signal(bridge, "On")
        await settled(bridge)
        dead = await bridge.store.rows("dead")
    assert "user identifier is invalid" in (dead[0].last_error or "")
    assert TOKEN not in (dead[0].last_error or "")


async def test_an_answer_that_echoes_the_credentials_leaks_neither(
    tmp_path: Path, logs: list[Any]
) -> None:
    """Pushover's token and user key travel in the request body, as its API asks; an error
    answer that repeats the whole body shows neither in the dead letter, the log or the
    status."""

    def echo(request: Any, body: Any) -> tuple[int, Any, dict[str, str]]:
        return 400, {"status": 0, "errors": [f"cannot take {json.dumps(body)}"]}, {}

    server = Receiver(echo)
    await server.start()
    try:
        config = pushover_config(tmp_path, server.url)
        async with running(config) as bridge, aiohttp.ClientSession() as http:
            await signal(bridge, "On")
            await settled(bridge)
            dead = await bridge.store.rows("dead")
            async with http.get(f"{bridge.url}/api/v1/status", headers=auth()) as response:
                status = await response.text()
    finally:
        await server.stop()
    error = dead[0].last_error or ""
    assert "cannot take" in error and TOKEN in json.dumps(server.requests[0].body)
    shown = [error, status, *(json.dumps(event, default=str) for event in logs)]
    assert not [text for text in shown if TOKEN in text or USER in text]


def test_an_acknowledged_receipt_is_an_acknowledgement(tmp_path: Path, logs: list[Any]) -> None:
    """Polled every 30 s (loop time): once Pushover says acknowledged, the bridge records
    who (the device) and when, shows it in the status, and stops polling that receipt."""

    async def main() -> None:
        fake = FakePushover()
        await fake.start()
        config = pushover_config(tmp_path, fake.url)
        async with running(config, clock=loop().wall) as bridge, aiohttp.ClientSession() as http:
            await signal(bridge, "On")
            await eventually(lambda: bool(fake.requests), 10)
            await asyncio.sleep(65)  # two polls: not acknowledged yet
            polls = [r for r in fake.requests if r[0] == "GET"]
            assert len(polls) == 2 and polls[0][2] == {"token": TOKEN}
            assert "desk" not in bridge.acks
            acknowledged_at = int(loop().wall())
            fake.receipt.update(acknowledged=1, acknowledged_at=acknowledged_at)
            fake.receipt.update(acknowledged_by=USER, acknowledged_by_device="iphone")
            await eventually(lambda: "desk" in bridge.acks, 60)
            ack = bridge.acks["desk"]
            assert (ack.by, ack.source) == ("Pushover (iphone)", "pushover")
            assert ack.at.timestamp() == acknowledged_at
            async with http.get(f"{bridge.url}/api/v1/status", headers=auth()) as response:
                status = await response.json()
            (desk,) = [b for b in status["buttons"] if b["id"] == "desk"]
            assert desk["acknowledged_by"] == "Pushover (iphone)"
            await asyncio.sleep(90)
            assert len([r for r in fake.requests if r[0] == "GET"]) == 3  # no more polls
            assert await bridge.store.receipts() == {}
        await fake.stop()

    accelerated(main())
    text = json.dumps([dict(e) for e in logs], default=str)
    assert TOKEN not in text and USER not in text


async def test_a_2xx_that_says_status_0_is_dead_lettered(
    tmp_path: Path, pushover: FakePushover
) -> None:
    config = pushover_config(tmp_path, pushover.url, user=QUIRKY)
    async with running(config) as bridge:
        await signal(bridge, "On")
        async with asyncio.timeout(10):
            while not (dead := await bridge.store.rows("dead")):
                await asyncio.sleep(0.02)
    assert "over its limit" in (dead[0].last_error or "")


def test_an_acknowledgement_older_than_the_open_is_not_taken(tmp_path: Path) -> None:
    """A receipt acknowledged before the alert opened (an earlier open's) records nothing."""

    async def main() -> None:
        fake = FakePushover()
        await fake.start()
        async with running(pushover_config(tmp_path, fake.url), clock=loop().wall) as bridge:
            fake.receipt.update(acknowledged=1, acknowledged_at=int(loop().wall()) - 3600)
            await signal(bridge, "On")
            await eventually(lambda: any(r[0] == "GET" for r in fake.requests), 60)
            await asyncio.sleep(1)
            assert "desk" not in bridge.acks
            assert await bridge.store.receipts() == {}  # its repeats are over: not polled again
        await fake.stop()

    accelerated(main())


@pytest.mark.parametrize(
    ("options", "path"),
    [
        ({"retry": 10}, "sinks[0].retry"),
        ({"expire": 20000}, "sinks[0].expire"),
        ({"poll": 1}, "sinks[0].poll"),
        ({"retry": 600, "expire": 300}, "sinks[0]"),
        ({"token": ""}, "sinks[0].token"),
        ({"url": "ftp://api.pushover.net/1/"}, "sinks[0].url"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, options: dict[str, Any], path: str) -> None:
    sink = {"id": "po", "type": "pushover", "token": TOKEN, "user": USER, **options}
    assert path in config_problems(tmp_path, sink)


async def test_check_config_exits_2_without_the_user_key(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(
        '[[buttons]]\nid = "desk"\nsource = "ingest"\n'
        f'[[sinks]]\nid = "po"\ntype = "pushover"\ntoken = "{TOKEN}"\n'
    )
    code, _out, err = await cli("check-config", "--config", str(tmp_path / "c.toml"))
    assert code == 2
    assert "sinks[0].user" in err and "Traceback" not in err and TOKEN not in err
