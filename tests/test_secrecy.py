"""Nothing leaked, nothing crashes: secrets masked everywhere, empty secrets refused,
hostile bodies answered 4xx, slow clients dropped, connections bounded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from flicbridge import secrecy
from flicbridge.config import ConfigError, config_from_mapping
from flicbridge.server.limits import HEAD_TIMEOUT, BoundedRunner
from tests.conftest import EXE, auth, cli, free_port, make_config, running
from tests.receiver import Receiver

# -- config ----------------------------------------------------------------------------


def _base(tmp_path: Path) -> dict[str, Any]:
    return {
        "store": {"path": str(tmp_path / "s.db")},
        "buttons": [{"id": "desk", "source": "ingest"}],
    }


CREDENTIALS: list[tuple[str, dict[str, Any]]] = [
    ("server.token", {"server": {"token": "{v}"}}),
    ("ilert.authorization", {"ilert": {"enabled": True, "authorization": "{v}"}}),
    ("flashduty.secret", {"flashduty": {"enabled": True, "secret": "{v}"}}),
    ("ingest.tokens.app", {"ingest": {"tokens": {"app": "{v}"}}}),
    (
        "sinks[0].routing_key",
        {"sinks": [{"id": "pd", "type": "pagerduty", "routing_key": "{v}"}]},
    ),
    (
        "sinks[0].integration_key",
        {"sinks": [{"id": "il", "type": "ilert", "integration_key": "{v}"}]},
    ),
    ("sinks[0].url", {"sinks": [{"id": "ao", "type": "alertops", "url": "{v}"}]}),
    (
        "sinks[0].headers.Authorization",
        {
            "sinks": [
                {
                    "id": "h",
                    "type": "webhook",
                    "url": "https://example.invalid/h",
                    "headers": {"Authorization": "{v}"},
                }
            ]
        },
    ),
]


def _fill(template: Any, value: str) -> Any:
    if isinstance(template, dict):
        return {k: _fill(v, value) for k, v in template.items()}
    if isinstance(template, list):
        return [_fill(v, value) for v in template]
    return value if template == "{v}" else template


@pytest.mark.parametrize("form", ["literal", "env-empty", "file-empty"])
@pytest.mark.parametrize(("path", "section"), CREDENTIALS, ids=[c[0] for c in CREDENTIALS])
def test_an_empty_secret_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str, section: dict[str, Any], form: str
) -> None:
    """An empty secret, written literally, from an empty variable or an empty file, is
    refused with its key path: the bridge never compares against an empty value."""
    monkeypatch.setenv("EMPTY_SECRET", "")
    (tmp_path / "empty").write_text("\n")
    value = {"literal": "", "env-empty": "env:EMPTY_SECRET", "file-empty": "file:empty"}[form]
    data = _base(tmp_path) | _fill(section, value)
    with pytest.raises(ConfigError) as caught:
        config_from_mapping(data, base_dir=tmp_path)
    paths = [p for p, _ in caught.value.problems]
    assert path in paths, caught.value
    assert any("must not be empty" in reason for _, reason in caught.value.problems)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("htp:/not a url", "expected a URL starting with http:// or https://"),
        ("https://", "no host"),
        ("https://exa mple.invalid/x", "no host, or white space"),
        ("mqtt://broker.invalid", "expected a URL starting with http://"),
    ],
)
def test_a_sink_url_must_be_a_url_of_its_schemes(tmp_path: Path, url: str, why: str) -> None:
    """A sink url that is no URL, or of a scheme the sink cannot speak, is refused (the
    message never repeats the URL: it may carry a key)."""
    data = _base(tmp_path) | {"sinks": [{"id": "h", "type": "webhook", "url": url}]}
    with pytest.raises(ConfigError) as caught:
        config_from_mapping(data, base_dir=tmp_path)
    assert caught.value.problems[0][0] == "sinks[0].url"
    assert why in caught.value.problems[0][1]
    assert url not in str(caught.value)


async def test_bad_environment_overrides_exit_2_with_the_key(tmp_path: Path) -> None:
    """An environment override that does not parse, or an empty store path, is exit 2 with
    its key path and no traceback."""
    config = tmp_path / "c.toml"
    config.write_text('[[buttons]]\nid = "desk"\nsource = "ingest"\n')
    cases = {"FLICBRIDGE_BUTTONS": ("garbage", "buttons"), "FLICBRIDGE_STORE__PATH": ("", "store")}
    for name, (value, key) in cases.items():
        env = os.environ | {name: value}
        proc = await asyncio.create_subprocess_exec(
            *EXE,
            "check-config",
            "--config",
            str(config),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(30):
            _, err = await proc.communicate()
        assert proc.returncode == 2, (name, err)
        assert key in err.decode() and "Traceback" not in err.decode(), err


def test_empty_values_never_match() -> None:
    """The one secret comparison refuses an absent or empty value on either side."""
    assert secrecy.same_secret("abc-def", "abc-def")
    assert not secrecy.same_secret("", "")
    assert not secrecy.same_secret(None, "x")
    assert not secrecy.same_secret("x", None)
    assert not secrecy.same_secret("abc-def", "abc-deg")


def test_mask_covers_the_parts_of_a_secret() -> None:
    """A header's credential alone, a URL's key, query values and password are masked."""
    secrecy.register(
        [
            "Bearer hdr-cred-777",
            "https://user:pw-5555@h.invalid/POSTAlert/0a1b2c3d4e5f/Flic?key=qk-9999",
        ]
    )
    text = "echo hdr-cred-777 key 0a1b2c3d4e5f q qk-9999 pw pw-5555; POSTAlert stays"
    assert secrecy.mask(text) == "echo *** key *** q *** pw ***; POSTAlert stays"


# -- hostile bodies --------------------------------------------------------------------

DEEP_ARRAYS = b"[" * 30_000 + b"]" * 30_000
DEEP_OBJECTS = b'{"a":' * 6_000 + b"1" + b"}" * 6_000
DEEP_IN_FIELD = b'{"state": "On", "info": ' + b"[" * 5_000 + b"]" * 5_000 + b"}"


async def test_deep_json_is_400_on_every_json_route(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Deeply nested JSON gets a 400 JSON error on every route that takes a body, never a
    5xx; a string full of brackets is not nesting."""
    config = make_config(
        tmp_path,
        ilert={"enabled": True, "authorization": "ilert-auth-1"},
        flashduty={"enabled": True, "secret": "fd-secret-1"},
    )
    routes = {
        "/api/v1/buttons/desk/signal": auth(),
        "/api/v1/ingest/flic": auth(),
        "/api/v1/subscriptions": auth(),
        "/api/v1/actions/exec": auth(),
        "/ilert/action-requests": {"Authorization": "ilert-auth-1"},
        "/ilert/action-responses": {"Authorization": "ilert-auth-1"},
        "/flashduty/action/close": {"X-Flicbridge-Token": "fd-secret-1"},
    }
    async with running(config) as bridge:
        for path, headers in routes.items():
            for body in (DEEP_ARRAYS, DEEP_OBJECTS, DEEP_IN_FIELD):
                async with http.post(f"{bridge.url}{path}", data=body, headers=headers) as r:
                    assert r.status == 400, (path, r.status, await r.text())
                    answer = await r.json()
                    assert answer["error"] == "body is nested too deeply", (path, answer)
        brackets = json.dumps({"state": "On", "info": "[" * 1000})
        async with http.post(
            f"{bridge.url}/api/v1/buttons/desk/signal", data=brackets, headers=auth()
        ) as r:
            assert r.status == 202


# -- slow clients and the connection bound ---------------------------------------------


async def _half_head(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finishes the head
    await writer.drain()
    return reader, writer


async def test_slow_clients_are_closed_and_never_stop_presses(
    tmp_path: Path, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    """200 connections that never finish their request head: /healthz still answers, a
    press is still delivered, and the server closes them after the head timeout."""
    config = make_config(tmp_path, sinks=[{"id": "hook", "type": "webhook", "url": receiver.url}])
    async with running(config) as bridge:
        port = int(bridge.url.rsplit(":", 1)[1]) if bridge.url else 0
        started = time.monotonic()
        slow = [await _half_head(port) for _ in range(200)]
        begin = time.perf_counter()
        async with http.get(f"{bridge.url}/healthz") as r:
            assert r.status == 200
        print(f"healthz with 200 slow connections: {(time.perf_counter() - begin) * 1000:.1f} ms")
        async with http.post(
            f"{bridge.url}/api/v1/buttons/desk/signal", json={"state": "On"}, headers=auth()
        ) as r:
            assert r.status == 202
        await receiver.wait_for(1)
        closed = 0
        for reader, writer in slow:
            async with asyncio.timeout(HEAD_TIMEOUT + 10):
                data = await reader.read()
            closed += data == b""
            writer.close()
        assert closed == 200
        assert time.monotonic() - started >= HEAD_TIMEOUT - 1


async def test_connections_beyond_the_bound_are_closed_at_once() -> None:
    """Past the connection bound a new connection is closed straight away, while the ones
    inside it stay open and served."""
    app = web.Application()

    async def ok(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/", ok)
    runner = BoundedRunner(app, max_connections=5, access_log=None)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
        await asyncio.sleep(0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # closed, not served
        writer.close()
        r0, w0 = held[0]
        w0.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(5):
            assert b"200 OK" in await r0.read()
        for _, w in held:
            w.close()
    finally:
        await runner.cleanup()


# -- the leak campaign through the real daemon -----------------------------------------

SECRETS = {
    "server": "srv-token-5f3a9c",
    "ilert": "ilert-auth-7d2e41",
    "flashduty": "fd-hdr-secret-88b1",
    "ingest": "ingest-app-tok-42c7",
    "header": "hook-cred-0e9f6d",
    "urlkey": "0a9b8c7d6e5f4a3b",
    "pagerduty": "pd-routing-3c3c3c",
}


async def _raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        async with asyncio.timeout(5):
            return await reader.read(65536)
    except TimeoutError:
        return b""
    finally:
        writer.close()


async def test_no_secret_leaks_anywhere(tmp_path: Path, receiver: Receiver) -> None:
    """Malformed requests and a sink that echoes its credentials: no configured secret
    appears in stdout, stderr, the status API, the page or the metrics, and every log
    line is JSON."""
    s = SECRETS
    # The sink refuses with a body echoing the credential alone and the URL's key.
    receiver.default = (400, {"error": f"bad auth {s['header']} for key {s['urlkey']}"}, {})
    port = free_port()
    (tmp_path / "c.toml").write_text(
        f"""
[store]
path = "{tmp_path / "s.db"}"
[server]
host = "127.0.0.1"
port = {port}
token = "{s["server"]}"
[delivery]
timeout = 2
backoff_initial = 0.05
backoff_max = 0.2
[ilert]
enabled = true
authorization = "{s["ilert"]}"
[flashduty]
enabled = true
secret = "{s["flashduty"]}"
[ingest]
tokens = {{ app = "{s["ingest"]}" }}
[[buttons]]
id = "desk"
source = "ingest"
[[sinks]]
id = "hook"
type = "webhook"
url = "{receiver.url}/POSTAlert/{s["urlkey"]}/Flic"
headers = {{ Authorization = "Bearer {s["header"]}" }}
[[sinks]]
id = "pd"
type = "pagerduty"
url = "{receiver.url}/v2/enqueue"
routing_key = "{s["pagerduty"]}"
"""
    )
    proc = await asyncio.create_subprocess_exec(
        *EXE,
        "run",
        "--config",
        str(tmp_path / "c.toml"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    bearer = {"Authorization": f"Bearer {s['server']}"}
    pages: list[str] = []
    try:
        async with aiohttp.ClientSession() as http:
            async with asyncio.timeout(20):
                while True:
                    with contextlib.suppress(aiohttp.ClientError):
                        async with http.get(f"{base}/readyz") as r:
                            if r.status == 200:
                                break
                    await asyncio.sleep(0.1)
            hostile = [
                f"GET /api/v1/status?token={s['server']}&name=Küche HTTP/1.1\r\nHost: x\r\n\r\n",
                f"POST /ilert/action-requests HTTP/1.1\r\nAuthorization: {s['ilert']}\r\n"
                f"X-Long: {'x' * 20000}\r\n\r\n",
                f"POST /flashduty/action/close HTTP/1.1\r\n"
                f"X-Flicbridge-Token: {s['flashduty']}\x01\r\n\r\n",
                f"POST /api/v1/ingest/flic?token={s['ingest']}&n=\x7f HTTP/1.1\r\n\r\n",
                f"GET /\x00?token={s['server']} HTTP/1.1\r\n\r\n",
            ]
            for request in hostile:
                answer = await _raw(port, request.encode())
                assert answer.split(b" ", 2)[1].startswith(b"4"), answer[:80]
            async with http.post(
                f"{base}/api/v1/buttons/desk/signal", json={"state": "On"}, headers=bearer
            ) as r:
                assert r.status == 202
            await receiver.wait_for(2)
            async with asyncio.timeout(10):
                while True:
                    async with http.get(f"{base}/api/v1/outbox", headers=bearer) as r:
                        outbox = await r.text()
                    if outbox.count('"dead"') >= 2 or "bad auth" in outbox:
                        break
                    await asyncio.sleep(0.1)
            for path in ("/api/v1/status", "/api/v1/outbox", "/", "/metrics"):
                async with http.get(f"{base}{path}", headers=bearer) as r:
                    pages.append(await r.text())
            assert "bad auth ***" in pages[1], pages[1][:500]
    finally:
        proc.terminate()
        async with asyncio.timeout(20):
            out, err = await proc.communicate()
    everything = out.decode() + err.decode() + "".join(pages)
    for name, value in s.items():
        assert value not in everything, f"{name} leaked"
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert lines
    for line in lines:
        json.loads(line)  # every line is one JSON event
    assert any(json.loads(line).get("event") == "http_bad_request" for line in lines)


async def test_check_config_never_prints_a_secret(tmp_path: Path) -> None:
    """check-config's errors name keys, never the values of secrets."""
    (tmp_path / "c.toml").write_text(
        '[server]\ntoken = "tok-a1b2c3d4"\n[[buttons]]\nid = "desk"\nsource = "ingest"\n'
        '[[sinks]]\nid = "ao"\ntype = "alertops"\nurl = "htp:/POSTAlert/9f8e7d6c5b4a/x y"\n'
    )
    code, out, err = await cli("check-config", "--config", str(tmp_path / "c.toml"))
    assert code == 2
    assert "sinks[0].url" in err
    assert "9f8e7d6c5b4a" not in out + err and "tok-a1b2c3d4" not in out + err
