"""Shared test fixtures: the scripted HTTP receiver, configs, and a running bridge.

Everything is real: aiohttp servers on 127.0.0.1, SQLite files in tmp_path, the flicd
simulator speaking the real protocol. Only time is ever faked.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from flicbridge.app import Bridge
from flicbridge.config import Config, ConfigError, config_from_mapping
from flicbridge.sources.simulator import Simulator
from tests.receiver import Receiver


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """The platform stand-in on a free loopback port, answering 202 unless scripted."""
    async with Receiver() as rec:
        yield rec


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
