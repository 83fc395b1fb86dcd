"""The command line through real subprocesses: exit codes, messages, signals, kill -9."""

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import EXE, TOKEN, auth, cli, free_port
from tests.receiver import Receiver


def write_config(tmp_path: Path, receiver_url: str, **server: Any) -> Path:
    port = server.get("port", 0)
    text = f"""
[store]
path = "state/fb.db"
[server]
host = "127.0.0.1"
port = {port}
token = "{TOKEN}"
[delivery]
timeout = 2
backoff_initial = 0.05
backoff_max = 0.2
[[buttons]]
id = "desk"
source = "ingest"
info = "Front desk"
[[sinks]]
id = "ao"
type = "alertops"
url = "{receiver_url}/POSTAlert/SECRETKEY/Flic"
"""
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


async def test_check_config_ok_and_bad(tmp_path: Path, receiver: Receiver) -> None:
    """check-config exits 0 on a valid file and 2 with every key path on a bad one."""
    path = write_config(tmp_path, receiver.url)
    code, out, _ = await cli("check-config", "--config", str(path))
    assert code == 0 and "1 button(s), 1 sink(s)" in out
    path.write_text(path.read_text() + "\n[alerts]\nsupress_repeat_for = 5\n[delivery2]\nx = 1\n")
    code, out, err = await cli("check-config", "--config", str(path))
    assert code == 2
    assert "alerts.supress_repeat_for: unknown key" in err
    assert "delivery2: unknown key" in err
    assert "Traceback" not in err


async def test_run_refuses_bad_config_without_traceback(tmp_path: Path) -> None:
    """run with a broken or missing config exits 2 naming the problem."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[[buttons]]\nid = 'x'\naddress = 'nope'\n")
    code, _, err = await cli("run", "--config", str(bad))
    assert code == 2 and "buttons[0].address" in err and "Traceback" not in err
    code, _, err = await cli("run", "--config", str(tmp_path / "missing.toml"))
    assert code == 2 and "cannot read the file" in err
    code, _, err = await cli("frobnicate")
    assert code == 2 and "Traceback" not in err


async def test_corrupt_store_refuses_to_start(tmp_path: Path, receiver: Receiver) -> None:
    """A corrupt store file: exit 1, the file named, the file left as it was."""
    path = write_config(tmp_path, receiver.url)
    store = tmp_path / "state" / "fb.db"
    store.parent.mkdir()
    store.write_bytes(b"garbage" * 1000)
    code, _, err = await cli("run", "--config", str(path))
    assert code == 1 and str(store) in err and "Traceback" not in err
    assert store.read_bytes() == b"garbage" * 1000


async def start_daemon(config: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *EXE,
        "run",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def wait_healthy(port: int) -> None:
    async with asyncio.timeout(15), aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(f"http://127.0.0.1:{port}/healthz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)


async def signal_on(port: int) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{port}/api/v1/buttons/desk/signal",
            json={"state": "On"},
            headers=auth(),
        ) as r,
    ):
        assert r.status == 202
        body: dict[str, Any] = await r.json()
        return body


async def test_sigterm_stops_cleanly(tmp_path: Path, receiver: Receiver) -> None:
    """SIGTERM: the daemon stops taking signals, ends in order and exits 0."""
    port = free_port()
    proc = await start_daemon(write_config(tmp_path, receiver.url, port=port))
    await wait_healthy(port)
    await signal_on(port)
    await receiver.wait_for(1)
    proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(15):
        _, err = await proc.communicate()
    assert proc.returncode == 0
    events = [
        json.loads(line)["event"] for line in err.decode().splitlines() if line.startswith("{")
    ]
    assert "accepted" in events and events[-1] == "stopped"


async def test_kill_9_mid_delivery_loses_nothing(tmp_path: Path, receiver: Receiver) -> None:
    """A press accepted, then SIGKILL while its delivery hangs: delivered after restart."""
    receiver.script.append("hang")
    receiver.hang_for = 10
    port = free_port()
    config = write_config(tmp_path, receiver.url, port=port)
    proc = await start_daemon(config)
    await wait_healthy(port)
    accepted = await signal_on(port)
    await receiver.wait_for(1)  # the attempt is in flight, hanging
    proc.kill()
    await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    proc = await start_daemon(config)
    try:
        got = await receiver.wait_for(2, timeout=15)
        assert got[1].body["flic_state"] == "On"
        assert got[1].body["flic_nameId"] == "desk"
        assert accepted["decision"] == "open"
    finally:
        proc.terminate()
        await proc.communicate()


async def test_send_in_process_reports_each_sink(tmp_path: Path, receiver: Receiver) -> None:
    """send with no daemon running drives the real pipeline and prints sink outcomes."""
    config = write_config(tmp_path, receiver.url, port=free_port())
    code, out, err = await cli("send", "--config", str(config), "desk", "On")
    assert code == 0, err
    assert "→ open" in out and "ao: delivered (HTTP 202)" in out
    assert receiver.requests[0].body["flic_state"] == "On"
    receiver.default = (401, {"message": "Unauthorized key"}, {})
    code, out, _ = await cli("send", "--config", str(config), "desk", "Off")
    assert code == 1 and "ao: DEAD" in out and "Unauthorized key" in out
    assert "SECRETKEY" not in out
    code, _, err = await cli("send", "--config", str(config), "nobody", "On")
    assert code == 2 and "no button 'nobody'" in err


async def test_send_through_running_daemon(tmp_path: Path, receiver: Receiver) -> None:
    """send with a daemon running goes through its API and follows the rows."""
    port = free_port()
    config = write_config(tmp_path, receiver.url, port=port)
    proc = await start_daemon(config)
    try:
        await wait_healthy(port)
        code, out, err = await cli("send", "--config", str(config), "desk", "On")
        assert code == 0, err
        assert out.startswith("daemon: event") and "delivered" in out
        assert receiver.requests[0].body["flic_state"] == "On"
    finally:
        proc.terminate()
        await proc.communicate()
    assert (tmp_path / "state" / "fb.db").exists()
