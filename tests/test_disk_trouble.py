"""Disk trouble (store.py): the store cannot commit, the daemon says so loudly,
holds what it accepted for a bounded count while it retries, never crashes, and delivers
the held presses once the disk recovers.

The trouble is real SQLite trouble on the real store file: a full disk is the writer
connection's ``PRAGMA max_page_count`` pinned to the file's size (freeing space is another
connection deleting its ballast, as an operator deleting files would), a read-only
disk is ``PRAGMA query_only`` on the writer connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

import flicbridge.server.app
import flicbridge.server.http
from flicbridge.alerts import Subscriber
from flicbridge.app import Bridge
from flicbridge.config import Config
from flicbridge.sources.simulator import Simulator
from tests.conftest import A, auth, make_config, running
from tests.receiver import Receiver

# More than a page (4 KiB) of button info: every open writes an outbox row that needs new
# pages, so a store that may not grow cannot commit it.
LONG_INFO = "Lab A, second floor, beside the fume hood. " * 150


def trouble_config(tmp_path: Path, sim: Simulator, receiver: Receiver) -> Config:
    return make_config(
        tmp_path,
        flicd={"port": sim.port, "reconnect_max": 0.5, "ping_interval": 1},
        buttons=[
            {"id": "alpha", "address": A, "name": "Alpha", "info": LONG_INFO},
            {"id": "desk", "source": "ingest", "name": "Desk"},
        ],
        sinks=[{"id": "ao", "type": "alertops", "url": f"{receiver.url}/POSTAlert/KEY/Flic"}],
    )


async def wait_until(condition: Callable[[], Any], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


async def connected(bridge: Bridge) -> None:
    await wait_until(
        lambda: bridge.health.source_up.get("flicd") and bridge.buttons["alpha"].connected
    )


def errors(alerts: Subscriber) -> list[str]:
    found = []
    while not alerts.queue.empty():
        alert = alerts.queue.get_nowait()
        if alert.type == "ERROR":
            found.append(alert.message)
    return found


@contextlib.contextmanager
def other_connection(path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def pin_size(conn: sqlite3.Connection) -> int:
    """On the writer connection: the file may not grow; the free pages left (0 expected)."""
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")
    free: int = conn.execute("PRAGMA freelist_count").fetchone()[0]
    return free


async def scrape(http: aiohttp.ClientSession, name: str) -> str:
    async with http.get("/metrics") as r:
        text = await r.text()
    return next(line for line in text.splitlines() if line.startswith(name + " "))


async def test_full_disk_is_loud_holds_presses_and_delivers_them_after_recovery(
    tmp_path: Path, sim: Simulator, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Disk full: a log line, readyz 503 with the reason, store_healthy 0, an ERROR alert,
    status still answering, nothing delivered or lost; space freed: the held flicd press
    and the HTTP signal (answered 503 while held) commit and are delivered."""
    monkeypatch.setattr(flicbridge.server.http, "COMMIT_WAIT", 0.5)  # an HTTP caller's wait
    config = trouble_config(tmp_path, sim, receiver)
    with capture_logs() as logs:
        async with (
            asyncio.timeout(60),
            running(config) as bridge,
            aiohttp.ClientSession(bridge.url, headers=auth()) as http,
        ):
            await connected(bridge)
            alerts = bridge.alerts_bus.subscribe("HIGH")
            with other_connection(config.store.path) as other:
                other.execute("CREATE TABLE ballast (b BLOB)")
                other.execute("INSERT INTO ballast VALUES (zeroblob(1048576))")
                assert await bridge.store.run(pin_size) == 0

                sim.press(A, "single")
                await wait_until(lambda: not bridge.health.store_ok)

                async with http.get("/readyz") as r:
                    assert r.status == 503
                    reasons = (await r.json())["reasons"]
                assert reasons == [
                    "store cannot commit: OperationalError: database or disk is full"
                ]
                assert await scrape(http, "flicbridge_store_healthy") == (
                    "flicbridge_store_healthy 0.0"
                )
                [alert] = errors(alerts)
                assert "the store cannot commit" in alert and "disk is full" in alert
                [line] = [e for e in logs if e["event"] == "store_commit_failing"]
                assert line["log_level"] == "error" and "disk is full" in line["error"]
                assert line["path"] == str(config.store.path)
                async with http.get("/healthz") as r:
                    assert r.status == 200
                async with http.get("/api/v1/status") as r:  # status answers meanwhile
                    assert r.status == 200
                    status = await r.json()
                assert status["store"]["ok"] is False and status["ready"] is False

                # An HTTP caller is told its signal is held, not that it failed or landed.
                async with http.post("/api/v1/buttons/desk/signal", json={"state": "On"}) as r:
                    assert r.status == 503
                    assert (await r.json())["error"] == "store is slow"
                assert bridge.store.waiting == 2
                assert receiver.requests == []
                assert other.execute("SELECT COUNT(*) FROM events").fetchone() == (0,)

                other.execute("DELETE FROM ballast")  # space is freed

                got = await receiver.wait_for(2, timeout=20)
            assert {(r.body["flic_nameId"], r.body["flic_state"]) for r in got} == {
                ("alpha", "On"),
                ("desk", "On"),
            }
            alpha = next(r for r in got if r.body["flic_nameId"] == "alpha")
            assert alpha.body["info"] == LONG_INFO
            await wait_until(lambda: bridge.health.store_ok)
            async with http.get("/readyz") as r:
                assert r.status == 200
            assert await scrape(http, "flicbridge_store_healthy") == "flicbridge_store_healthy 1.0"
            decisions = [
                (e["button_id"], e["decision"]) for e in await bridge.store.recent_events()
            ]
            assert sorted(decisions) == [("alpha", "open"), ("desk", "open")]
            await wait_until(lambda: bridge.store.waiting == 0)  # nothing is held any more
    events = [e["event"] for e in logs]
    assert "store_recovered" in events
    assert "press_lost" not in events and "commit_failed" not in events


async def test_read_only_disk_bounds_the_hold_and_never_crashes(
    tmp_path: Path, sim: Simulator, receiver: Receiver
) -> None:
    """Read-only disk: presses are held up to max_held; past it a flicd press is logged as
    LOST with its details and an HTTP signal gets 503 at once; the daemon keeps answering
    and stops cleanly, naming each held signal it could not write."""
    config = trouble_config(tmp_path, sim, receiver)
    # No spill file can be written either (a press is then truly lost, and says so).
    nowhere = config.store.model_copy(update={"spill": Path("/dev/null/held.jsonl")})
    config = config.model_copy(update={"store": nowhere})
    with capture_logs() as logs:
        async with (
            asyncio.timeout(60),
            running(config) as bridge,
            aiohttp.ClientSession(bridge.url, headers=auth()) as http,
        ):
            await connected(bridge)
            bridge.store.max_held = 3
            alerts = bridge.alerts_bus.subscribe("HIGH")
            await bridge.store.run(lambda conn: conn.execute("PRAGMA query_only = ON"))

            sim.press(A, "single")  # open
            await wait_until(lambda: not bridge.health.store_ok)
            async with http.get("/readyz") as r:
                assert r.status == 503
                reasons = (await r.json())["reasons"]
            assert reasons == [
                "store cannot commit: OperationalError: attempt to write a readonly database"
            ]
            sim.press(A, "single")  # appended
            sim.press(A, "hold")  # appended
            await wait_until(lambda: bridge.store.waiting == 3)
            errors(alerts)  # the "cannot commit" alert; the next one is the loss

            sim.press(A, "double")  # close: one too many
            await wait_until(lambda: any(e["event"] == "press_lost" for e in logs))
            [lost] = [e for e in logs if e["event"] == "press_lost"]
            assert lost["log_level"] == "error"
            assert (lost["button"], lost["click"], lost["state"]) == (
                "alpha",
                "double_click",
                "Off",
            )
            assert "max_held" in lost["reason"] and "readonly" in lost["reason"]
            assert lost["pressed_at"]
            [alert] = errors(alerts)
            assert "Alpha" in alert and "LOST" in alert
            # A refused press moves no state: the alert is still open as the person left it.
            assert bridge.states["alpha"].is_open

            async with http.post("/api/v1/buttons/desk/signal", json={"state": "On"}) as r:
                assert r.status == 503
                body = await r.json()
            assert body["error"] == "store unavailable" and "max_held" in body["detail"]
            assert "desk" not in bridge.states

            async with http.get("/healthz") as r:
                assert r.status == 200
            assert await scrape(http, "flicbridge_store_healthy") == "flicbridge_store_healthy 0.0"
            assert bridge.store.waiting == 3
            assert receiver.requests == []
        # The bridge stopped without raising; each held signal is named as it is given up.
    failed = [e for e in logs if e["event"] == "commit_failed"]
    assert [(e["button"], e["decision"], e["click"]) for e in failed] == [
        ("alpha", "open", "single_click"),
        ("alpha", "appended", "single_click"),
        ("alpha", "appended", "hold"),
    ]
    assert all(e["log_level"] == "error" and e["pressed_at"] for e in failed)
    assert [e["event"] for e in logs][-1] == "stopped"
    with other_connection(config.store.path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM events").fetchone() == (0,)


# -- the store's file and folder under the daemon -------------------------------------


@contextlib.contextmanager
def tmpfs(where: Path, size: str = "2m") -> Iterator[Path]:
    """A real small filesystem mounted at ``where`` (root only); unmounted at the end."""
    import subprocess

    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


async def ready_status(http: aiohttp.ClientSession, bridge: Bridge) -> tuple[int, Any]:
    async with http.get(f"{bridge.url}/readyz") as r:
        return r.status, await r.json()


async def test_store_folder_deleted_mid_run_is_not_ready(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """The store's folder deleted under a running daemon: /readyz turns 503 naming the file,
    and a signal is held, never answered as committed."""
    import shutil

    config = make_config(tmp_path, store={"path": str(tmp_path / "state" / "fb.db")})
    async with running(config) as bridge:
        assert (await ready_status(http, bridge))[0] == 200
        shutil.rmtree(tmp_path / "state")
        async with asyncio.timeout(15):
            while (await ready_status(http, bridge))[0] != 503:
                await asyncio.sleep(0.1)
        _, body = await ready_status(http, bridge)
        assert any("fb.db" in r and "gone" in r for r in body["reasons"]), body
        held = bridge.submit(
            flicbridge.server.app.Signal(
                button_id="desk",
                state=flicbridge.server.app.SignalState.ON,
                origin="api",
                received_at=flicbridge.server.app.utcnow(),
            )
        )
        await asyncio.sleep(0.5)
        assert not held.done()  # held, not "accepted" into a file that no longer exists
        assert bridge.store.waiting >= 1


async def test_store_file_replaced_mid_run_is_not_ready(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """The store file replaced by another file under the daemon: /readyz turns 503."""
    config = make_config(tmp_path)
    async with running(config) as bridge:
        path = config.store.path
        other = path.with_name("other.db")
        other.write_bytes(b"")
        other.replace(path)
        async with asyncio.timeout(15):
            while (await ready_status(http, bridge))[0] != 503:
                await asyncio.sleep(0.1)
        _, body = await ready_status(http, bridge)
        assert any("replaced" in r for r in body["reasons"]), body


async def test_read_only_filesystem_at_start_never_ready(tmp_path: Path) -> None:
    """A store on a filesystem mounted read-only: run exits 1 naming the file, never 200,
    and the file is left as it was."""
    import hashlib
    import subprocess

    from tests.conftest import cli
    from tests.test_cli import write_config

    with tmpfs(tmp_path / "mnt") as mnt:
        store = mnt / "state" / "fb.db"
        config = write_config(tmp_path, "http://127.0.0.1:9")
        config.write_text(config.read_text().replace('"state/fb.db"', f'"{store}"'))
        code, _, err = await cli("send", "--config", str(config), "desk", "Off", "--wait", "1")
        assert code == 0, err  # the store exists now, written by a real (in-process) bridge
        before = hashlib.sha256(store.read_bytes()).hexdigest()
        remount = ["mount", "-o", "remount,ro", str(mnt)]
        await asyncio.to_thread(subprocess.run, remount, check=True)
        code, _, err = await cli("run", "--config", str(config))
        assert code == 1, err
        assert str(store) in err and "Traceback" not in err
        assert hashlib.sha256(store.read_bytes()).hexdigest() == before


async def test_read_only_store_file_at_start_is_not_ready(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """A store file nobody may write (chattr +i: root included) in a writable folder: the
    daemon never says ready while the file cannot commit (it refuses, or answers 503)."""
    import shutil
    import subprocess

    from flicbridge.store import Store, StoreError

    config = make_config(tmp_path)
    first = Store(config.store.path)
    await first.open()
    await first.close()
    flag = [str(config.store.path)]
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not available here")
    made = await asyncio.to_thread(subprocess.run, ["chattr", "+i", *flag])
    if made.returncode:
        pytest.skip("chattr +i is not permitted here")
    refused: list[str] = []
    try:
        try:
            async with running(config) as bridge:
                status, body = await ready_status(http, bridge)
                assert status == 503, body
                assert any("store cannot commit" in r for r in body["reasons"]), body
        except* StoreError as group:
            refused.append(str(group.exceptions[0]))
    finally:
        await asyncio.to_thread(subprocess.run, ["chattr", "-i", *flag])
    assert not refused or str(config.store.path) in refused[0]


async def test_held_presses_survive_a_restart(
    tmp_path: Path, sim: Simulator, receiver: Receiver
) -> None:
    """Disk full, then the daemon stops: the held flicd presses are in the spill file (not
    lost, nothing logged press_lost), and the next start commits them in order, with their
    real press times, and delivers them."""
    spill = tmp_path / "run" / "held.jsonl"  # as on another filesystem ([store] spill)
    config = trouble_config(tmp_path, sim, receiver)
    config = config.model_copy(update={"store": config.store.model_copy(update={"spill": spill})})
    with capture_logs() as logs:
        async with asyncio.timeout(60):
            async with running(config) as bridge:
                await connected(bridge)
                with other_connection(config.store.path) as other:
                    other.execute("CREATE TABLE ballast (b BLOB)")
                    other.execute("INSERT INTO ballast VALUES (zeroblob(1048576))")
                    assert await bridge.store.run(pin_size) == 0
                    sim.press(A, "single")
                    await wait_until(lambda: not bridge.health.store_ok)
                    sim.press(A, "hold")
                    await wait_until(lambda: bridge.store.waiting >= 2)
                    await wait_until(lambda: len(bridge.spill.pending()) == 2)
            assert bridge.lost == 0
            assert not [e for e in logs if e["event"] == "press_lost"]
            held = bridge.spill.pending()
            assert [s.press.click.value for _, s in held if s.press] == ["single_click", "hold"]
            assert receiver.requests == []

            async with running(config) as again:
                got = await receiver.wait_for(1, timeout=15)
                await wait_until(lambda: not spill.exists())
                events = await again.store.recent_events()
            assert got[0].body["flic_state"] == "On"
            assert [(e["click"], e["decision"]) for e in reversed(events)] == [
                ("single_click", "open"),
                ("hold", "appended"),
            ]
            pressed = [s.press.pressed_at.isoformat() for _, s in held if s.press]
            assert [e["pressed_at"] for e in reversed(events)] == pressed
    assert any(e["event"] == "held_presses_replayed" and e["count"] == 2 for e in logs)


async def test_status_answers_while_the_disk_is_frozen(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """The store's filesystem frozen (fsfreeze) while a signal's commit is in flight: the
    writer is stuck, yet /api/v1/status keeps answering (from memory where it must), and
    /readyz says the store cannot commit once the commit has waited ``stall_after``; after
    the thaw the signal commits and the bridge is ready again."""
    import shutil
    import subprocess

    if not all(shutil.which(t) for t in ("fsfreeze", "mkfs.ext4")):
        pytest.skip("fsfreeze or mkfs.ext4 is not installed")
    image, mnt = tmp_path / "disk.img", tmp_path / "mnt"
    mnt.mkdir()
    image.write_bytes(b"\0" * (16 << 20))
    await asyncio.to_thread(subprocess.run, ["mkfs.ext4", "-q", "-F", str(image)], check=True)
    mounted = await asyncio.to_thread(
        subprocess.run, ["mount", "-o", "loop", str(image), str(mnt)], capture_output=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot loop-mount here: {mounted.stderr.decode().strip()}")
    frozen = False
    try:
        config = make_config(tmp_path, store={"path": str(mnt / "fb.db")})
        async with running(config) as bridge:
            assert (await ready_status(http, bridge))[0] == 200
            # Any commit still in flight counts as stalled, so no wall-clock wait is needed.
            bridge.store.stall_after = 0.0
            await asyncio.to_thread(subprocess.run, ["fsfreeze", "-f", str(mnt)], check=True)
            frozen = True
            url = f"{bridge.url}/api/v1/buttons/desk/signal"
            held = asyncio.ensure_future(http.post(url, json={"state": "On"}, headers=auth()))
            await wait_until(lambda: bridge.store.stalled() is not None)
            async with asyncio.timeout(5):  # the freeze lasts until we thaw it below
                for _ in range(3):
                    async with http.get(f"{bridge.url}/api/v1/status", headers=auth()) as r:
                        assert r.status == 200
                        assert (await r.json())["version"]
                status, body = await ready_status(http, bridge)
            assert status == 503
            assert [r for r in body["reasons"] if r.startswith("store cannot commit: a commit")]
            assert bridge.telemetry.unhealthy()  # the heartbeat is withheld too
            assert not held.done()  # the commit is still stuck on the frozen disk
            await asyncio.to_thread(subprocess.run, ["fsfreeze", "-u", str(mnt)], check=True)
            frozen = False
            async with asyncio.timeout(15):
                response = await held
            assert response.status == 202
            response.release()
            await wait_until(lambda: bridge.store.stalled() is None)
            assert (await ready_status(http, bridge))[0] == 200
    finally:
        if frozen:
            subprocess.run(["fsfreeze", "-u", str(mnt)], check=False)  # noqa: ASYNC221
        subprocess.run(["umount", "-l", str(mnt)], check=False)  # noqa: ASYNC221


async def test_presses_refused_past_the_hold_commit_when_the_store_recovers(
    tmp_path: Path, sim: Simulator, receiver: Receiver
) -> None:
    """Past max_held a flicd press is spilled, not lost; when the disk recovers in the same
    run, the held press and then the spilled ones commit, in order, and the file is gone."""
    config = trouble_config(tmp_path, sim, receiver)
    with capture_logs() as logs:
        async with asyncio.timeout(60), running(config) as bridge:
            await connected(bridge)
            bridge.store.max_held = 1
            with other_connection(config.store.path) as other:
                other.execute("CREATE TABLE ballast (b BLOB)")
                other.execute("INSERT INTO ballast VALUES (zeroblob(1048576))")
                assert await bridge.store.run(pin_size) == 0
                sim.press(A, "single")  # open: held in memory
                await wait_until(lambda: not bridge.health.store_ok)
                sim.press(A, "double")  # refused past max_held: spilled
                sim.press(A, "single")  # refused past max_held: spilled
                await wait_until(lambda: len(bridge.spill.pending()) >= 3)
                bridge.store.max_held = 1000
                other.execute("DROP TABLE ballast")  # an operator frees space
            await wait_until(lambda: bridge.health.store_ok, timeout=20)
            await wait_until(lambda: not bridge.spill.path.exists(), timeout=20)
            events = await bridge.store.recent_events()
            await receiver.wait_for(3, timeout=15)
    assert [(e["click"], e["decision"]) for e in reversed(events)] == [
        ("single_click", "open"),
        ("double_click", "close"),
        ("single_click", "open"),
    ]
    assert not [e for e in logs if e["event"] == "press_lost"]
