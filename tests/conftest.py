"""Shared test fixtures: a scripted HTTP receiver, configs, and a running bridge.

Everything is real: aiohttp servers on 127.0.0.1, SQLite files in tmp_path, the flicd
simulator speaking the real protocol. Only time is ever faked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from flicbridge.app import Bridge
from flicbridge.config import Config, ConfigError, config_from_mapping
from flicbridge.sources.simulator import Simulator


@dataclass
class Received:
    """One request the receiver got."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    at: float = field(default_factory=time.monotonic)
    raw_path: str = ""  # as sent, percent-escapes kept


@dataclass
class Receiver:
    """A real aiohttp server that records requests and answers from a script.

    ``script`` holds answers to use first (status, body, headers) or "hang"; when it is
    empty ``default`` answers.
    """

    url: str = ""
    requests: list[Received] = field(default_factory=list)
    script: deque[Any] = field(default_factory=deque)
    default: tuple[int, Any, dict[str, str]] = (202, {"status": "ok"}, {})
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    hang_for: float = 30.0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        answer = self.script.popleft() if self.script else self.default
        self.requests.append(
            Received(
                request.method,
                request.path,
                dict(request.query),
                dict(request.headers),
                body,
                raw_path=request.raw_path.split("?")[0],
            )
        )
        async with self.arrived:
            self.arrived.notify_all()
        if answer == "hang":
            await asyncio.sleep(self.hang_for)
            answer = self.default
        status, payload, headers = answer
        if isinstance(payload, str | bytes):
            return web.Response(status=status, body=payload, headers=headers)
        return web.json_response(payload, status=status, headers=headers)

    def ok(self, path_part: str = "") -> list[Received]:
        return [r for r in self.requests if path_part in r.path]

    async def wait_for(
        self, count: int, timeout: float = 10.0, where: Callable[[Received], bool] | None = None
    ) -> list[Received]:
        """Wait until ``count`` requests (matching ``where``) arrived; return them."""

        def matching() -> list[Received]:
            return [r for r in self.requests if where is None or where(r)]

        async with asyncio.timeout(timeout), self.arrived:
            await self.arrived.wait_for(lambda: len(matching()) >= count)
        return matching()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rec.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    rec.url = f"http://127.0.0.1:{port}"
    yield rec
    await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for talking to a bridge under test."""
    async with aiohttp.ClientSession() as session:
        yield session


EXE = [sys.executable, "-m", "flicbridge"]
A = "80:e4:da:70:00:01"
B = "80:e4:da:70:00:02"


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (for daemons run as subprocesses)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def cli(*args: str, timeout: float = 30) -> tuple[int, str, str]:
    """``flicbridge ARGS`` as a subprocess: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *EXE, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    """The flicd simulator on a free port with buttons A (Alpha) and B (Bravo)."""
    simulator = Simulator(host="127.0.0.1", port=0, buttons={A: "Alpha", B: "Bravo"})
    await simulator.start()
    yield simulator
    await simulator.stop()


TOKEN = "test-token"


def make_config(tmp_path: Path, **overrides: Any) -> Config:
    """A small valid configuration; ``overrides`` replace top-level sections."""
    data: dict[str, Any] = {
        "store": {"path": str(tmp_path / "flicbridge.db")},
        "server": {"host": "127.0.0.1", "port": 0, "token": TOKEN},
        "delivery": {"timeout": 2, "backoff_initial": 0.05, "backoff_max": 0.2},
        "buttons": [
            {"id": "desk", "source": "ingest", "name": "Desk", "info": "Front desk"},
        ],
        "sinks": [],
    }
    data.update(overrides)
    return config_from_mapping(data, base_dir=tmp_path, source="test")


def config_problems(tmp_path: Path, sink: dict[str, Any]) -> list[str]:
    """The key paths a configuration with this one sink is refused for (none: accepted)."""
    data = {
        "store": {"path": str(tmp_path / "s.db")},
        "buttons": [{"id": "desk", "source": "ingest"}],
        "sinks": [sink],
    }
    try:
        config_from_mapping(data, base_dir=tmp_path)
    except ConfigError as exc:
        return [path for path, _ in exc.problems]
    return []


@contextlib.asynccontextmanager
async def running(config: Config, **kwargs: Any) -> AsyncIterator[Bridge]:
    """A bridge running in this loop until the block ends (then stopped in order)."""
    bridge = Bridge(config, **kwargs)
    task = asyncio.create_task(bridge.run())
    try:
        async with asyncio.timeout(10):
            ready = asyncio.create_task(bridge.wait_ready())
            done, _ = await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                ready.cancel()
                task.result()  # raises what stopped the bridge
        yield bridge
    finally:
        bridge.stop()
        async with asyncio.timeout(15):
            await task


async def open_alert(http: aiohttp.ClientSession, bridge: Bridge, button: str = "desk") -> None:
    """Open a button's alert through the API and check it was decided "open"."""
    async with http.post(
        f"{bridge.url}/api/v1/buttons/{button}/signal", json={"state": "On"}, headers=auth()
    ) as response:
        assert response.status == 202
        assert (await response.json())["decision"] == "open"


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    """The structlog events the test's code logs, as dicts."""
    with capture_logs() as captured:
        yield captured
