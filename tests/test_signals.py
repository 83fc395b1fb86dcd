"""Signals to a real ``flicbridge run`` process: SIGHUP is logged and ignored."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import aiohttp

from tests.conftest import EXE, TOKEN, auth, free_port


def write_config(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "flicbridge.toml"
    path.write_text(
        f"""
[store]
path = "{tmp_path / "fb.db"}"

[server]
port = {port}
token = "{TOKEN}"

[[buttons]]
id = "desk"
source = "ingest"
"""
    )
    return path


async def get(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url) as response:
        return response.status


async def test_sighup_neither_kills_nor_reloads(tmp_path: Path) -> None:
    """Two SIGHUPs: the daemon logs sighup_ignored each time and keeps taking signals;
    SIGTERM then stops it with exit 0."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *EXE,
        "run",
        "--config",
        str(write_config(tmp_path, port)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with asyncio.timeout(30), aiohttp.ClientSession() as session:
            while True:
                try:
                    if await get(session, f"{base}/readyz") == 200:
                        break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
            for _ in range(2):
                proc.send_signal(signal.SIGHUP)
                await asyncio.sleep(0.3)
                assert proc.returncode is None
                assert await get(session, f"{base}/readyz") == 200
            async with session.post(
                f"{base}/api/v1/buttons/desk/signal", json={"state": "On"}, headers=auth()
            ) as response:
                assert response.status == 202
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    events = [json.loads(x)["event"] for x in err.decode().splitlines() if x.startswith("{")]
    assert events.count("sighup_ignored") == 2
    assert "accepted" in events and events[-1] == "stopped"
