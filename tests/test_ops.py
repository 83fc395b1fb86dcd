"""Operating the daemon: readiness, metrics, and the operator's CLI.

Everything goes through real boundaries: the flicd simulator on a TCP port, aiohttp
receivers as sinks, the daemon's HTTP server, SQLite files, and ``python -m flicbridge``
as a subprocess for the commands an operator types.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from flicbridge.config import config_from_mapping
from flicbridge.sources.simulator import Simulator
from tests.conftest import EXE, TOKEN, A, B, auth, cli, free_port, make_config, running
from tests.receiver import Receiver

NEW = "80:e4:da:70:00:09"


# -- helpers ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def simulator(port: int = 0, **buttons: str) -> AsyncIterator[Simulator]:
    sim = Simulator(host="127.0.0.1", port=port, buttons=buttons or {A: "Alpha", B: "Bravo"})
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


async def wait_until(condition: Any, timeout: float = 10.0) -> None:
    """Poll a sync or async predicate until it holds."""
    async with asyncio.timeout(timeout):
        while True:
            value = condition()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return
            await asyncio.sleep(0.02)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus exposition, by (name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def series(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


def toml_config(
    tmp_path: Path,
    *,
    port: int,
    sink_url: str | None = None,
    flicd_port: int | None = None,
    token: bool = True,
    name: str = "config.toml",
) -> Path:
    """A configuration file for the CLI: an ingest button ``desk`` and ``door``, optionally
    the flicd button ``alpha`` and one AlertOps-style sink ``ao``."""
    text = f"""
[store]
path = "state/fb.db"
[server]
host = "127.0.0.1"
port = {port}
{f'token = "{TOKEN}"' if token else ""}
[delivery]
timeout = 2
backoff_initial = 0.05
backoff_max = 0.2
[[buttons]]
id = "desk"
source = "ingest"
name = "Front desk"
[[buttons]]
id = "door"
source = "ingest"
"""
    if flicd_port is not None:
        text += f"""
[[buttons]]
id = "alpha"
address = "{A}"
name = "Alpha"
[flicd]
port = {flicd_port}
reconnect_max = 0.5
ping_interval = 1
"""
    if sink_url is not None:
        text += f"""
[[sinks]]
id = "ao"
type = "alertops"
url = "{sink_url}/POSTAlert/SECRETKEY/Flic"
"""
    path = tmp_path / name
    path.write_text(text)
    return path


@contextlib.asynccontextmanager
async def daemon(config: Path, port: int) -> AsyncIterator[aiohttp.ClientSession]:
    """``python -m flicbridge run`` as a real process; a session on its API while it runs."""
    log = (config.parent / "daemon.log").open("ab")
    proc = await asyncio.create_subprocess_exec(
        *EXE, "run", "--config", str(config), stdout=log, stderr=log
    )
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", headers=auth()) as http:

            async def healthy() -> bool:
                assert proc.returncode is None, (config.parent / "daemon.log").read_text()
                try:
                    async with http.get("/healthz") as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_until(healthy, timeout=20)
            yield http
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            await proc.wait()
        log.close()
        assert proc.returncode == 0, (config.parent / "daemon.log").read_text()


async def post_signal(http: aiohttp.ClientSession, button: str, state: str) -> dict[str, Any]:
    async with http.post(f"/api/v1/buttons/{button}/signal", json={"state": state}) as r:
        assert r.status == 202, await r.text()
        body: dict[str, Any] = await r.json()
        return body


async def outbox(http: aiohttp.ClientSession) -> dict[str, list[dict[str, Any]]]:
    async with http.get("/api/v1/outbox") as r:
        assert r.status == 200
        body: dict[str, list[dict[str, Any]]] = await r.json()
        return body


# -- readiness -------------------------------------------------------------------------


async def test_readyz_follows_flicd(tmp_path: Path) -> None:
    """503 with the reason while flicd is unreachable, 200 once it is up and connected,
    503 again when it goes away; liveness stays 200 throughout."""
    port = free_port()
    config = make_config(
        tmp_path,
        flicd={"port": port, "reconnect_max": 0.2, "ping_interval": 1},
        buttons=[{"id": "alpha", "address": A}],
    )

    async def ready(http: aiohttp.ClientSession) -> tuple[int, dict[str, Any]]:
        async with http.get("/healthz") as r:
            assert r.status == 200
        async with http.get("/readyz") as r:
            body: dict[str, Any] = await r.json()
            return r.status, body

    async with (
        asyncio.timeout(30),
        running(config) as bridge,
        aiohttp.ClientSession(bridge.url) as http,
    ):
        status, body = await ready(http)
        assert status == 503 and body["ready"] is False
        assert [r for r in body["reasons"] if r.startswith("flicd not connected")]

        async with simulator(port, **{A: "Alpha"}):
            # Up, and its channel live (a link that is up with a channel still pending is 503).
            await wait_until(
                lambda: (
                    bridge.health.source_up["flicd"]
                    and bridge.health.source_faults.get("flicd") == []
                )
            )
            status, body = await ready(http)
            assert (status, body) == (200, {"ready": True, "reasons": []})

        await wait_until(lambda: not bridge.health.source_up["flicd"])
        status, body = await ready(http)
        assert status == 503
        assert [r for r in body["reasons"] if r.startswith("flicd not connected")]


# -- metrics ---------------------------------------------------------------------------


async def test_metrics_after_a_scripted_run(tmp_path: Path, receiver: Receiver) -> None:
    """After a scripted run every series holds exactly what happened: presses by button and
    decision, attempts by sink and outcome, retries, dead letters, queue depth, latency
    observations, battery and link of each button, the flicd link and the store's health."""
    receiver.script.extend(
        [(503, "<html>down</html>", {}), (202, {"ok": True}, {}), (400, {"message": "no"}, {})]
    )
    async with (
        asyncio.timeout(40),
        Receiver() as hook,  # a second receiver (the fixture gives one)
        simulator() as sim,
    ):
        config = make_config(
            tmp_path,
            flicd={"port": sim.port, "reconnect_max": 0.5, "ping_interval": 1},
            buttons=[{"id": "alpha", "address": A}, {"id": "bravo", "address": B}],
            sinks=[
                {"id": "ao", "type": "alertops", "url": f"{receiver.url}/POSTAlert/K/Flic"},
                {"id": "hook", "type": "webhook", "url": f"{hook.url}/hook"},
            ],
        )
        async with running(config) as bridge, aiohttp.ClientSession(bridge.url) as http:

            async def scrape() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
                async with http.get("/metrics") as r:
                    assert r.status == 200
                    return samples(await r.text())

            await wait_until(
                lambda: bridge.buttons["alpha"].connected and bridge.buttons["bravo"].connected
            )
            sim.press(B, "double")  # Off with nothing open: ignored
            sim.press(A, "single")  # open → ao (503, then 202) and hook
            sim.press(A, "single")  # appended: recorded, not sent
            sim.press(A, "double")  # close → ao answers 400 (dead), hook delivers
            sim.battery(A, 42)
            await wait_until(lambda: len(hook.requests) == 2 and len(receiver.requests) == 3)
            await wait_until(lambda: sum(bridge.dispatcher.depth().values()) == 0)
            sim.disconnect(B)
            await wait_until(lambda: bridge.buttons["bravo"].connected is False)
            await wait_until(lambda: bridge.buttons["alpha"].battery == 42)

            got = await scrape()
            expected = {
                series(
                    "flicbridge_presses_total", button="bravo", origin="press", decision="ignored"
                ): 1,
                series(
                    "flicbridge_presses_total", button="alpha", origin="press", decision="open"
                ): 1,
                series(
                    "flicbridge_presses_total", button="alpha", origin="press", decision="appended"
                ): 1,
                series(
                    "flicbridge_presses_total", button="alpha", origin="press", decision="close"
                ): 1,
                series("flicbridge_deliveries_total", sink="ao", outcome="retry"): 1,
                series("flicbridge_deliveries_total", sink="ao", outcome="delivered"): 1,
                series("flicbridge_deliveries_total", sink="ao", outcome="dead"): 1,
                series("flicbridge_deliveries_total", sink="hook", outcome="delivered"): 2,
                series("flicbridge_retries_total", sink="ao"): 1,
                series("flicbridge_dead_letters_total", sink="ao"): 1,
                series("flicbridge_queue_depth_rows", sink="ao"): 0,
                series("flicbridge_queue_depth_rows", sink="hook"): 0,
                series("flicbridge_oldest_pending_age_seconds", sink="ao"): 0,
                series("flicbridge_oldest_pending_age_seconds", sink="hook"): 0,
                series("flicbridge_delivery_latency_seconds_count", sink="ao"): 1,
                series("flicbridge_delivery_latency_seconds_count", sink="hook"): 2,
                series("flicbridge_delivery_latency_seconds_bucket", sink="ao", le="+Inf"): 1,
                series("flicbridge_delivery_latency_seconds_bucket", sink="hook", le="+Inf"): 2,
                series("flicbridge_store_commit_seconds_count"): 4,
                series("flicbridge_button_battery_percent", button="alpha"): 42,
                series("flicbridge_button_battery_percent", button="bravo"): 100,
                series("flicbridge_button_connected", button="alpha"): 1,
                series("flicbridge_button_connected", button="bravo"): 0,
                series("flicbridge_source_connected", source="flicd"): 1,
                series("flicbridge_store_healthy"): 1,
            }
            assert {key: got.get(key) for key in expected} == expected
            # No other outcome was ever counted, and hook never needed a retry.
            outcomes = {k for k in got if k[0] == "flicbridge_deliveries_total"}
            assert outcomes == {k for k in expected if k[0] == "flicbridge_deliveries_total"}
            assert series("flicbridge_retries_total", sink="hook") not in got
            assert not [k for k in got if k[0] == "flicbridge_presses_dropped_total"]

            # Queue depth is read at scrape time: a row the hook keeps refusing counts now.
            hook.default = (503, "down", {})
            sim.press(A, "single")
            await hook.wait_for(4)
            got = await scrape()
            assert got[series("flicbridge_queue_depth_rows", sink="hook")] == 1
            assert got[series("flicbridge_oldest_pending_age_seconds", sink="hook")] > 0
            assert got[series("flicbridge_retries_total", sink="hook")] >= 1
            await wait_until(lambda: len(receiver.requests) == 4)  # ao delivers the open
            await wait_until(lambda: bridge.dispatcher.depth()["ao"] == 0)
            got = await scrape()
            assert got[series("flicbridge_queue_depth_rows", sink="ao")] == 0
            assert (
                got[
                    series(
                        "flicbridge_presses_total", button="alpha", origin="press", decision="open"
                    )
                ]
                == 2
            )


# -- flicbridge status -----------------------------------------------------------------


async def test_status_command_against_a_running_daemon(tmp_path: Path, receiver: Receiver) -> None:
    """``status`` prints what the daemon reports, ``--json`` the document itself; with no
    daemon answering it exits 1 with one line and no traceback."""
    port = free_port()
    async with asyncio.timeout(60), simulator(**{A: "Alpha"}) as sim:
        config = toml_config(tmp_path, port=port, sink_url=receiver.url, flicd_port=sim.port)
        async with daemon(config, port) as http:

            async def ready() -> bool:
                async with http.get("/readyz") as r:
                    return r.status == 200

            await wait_until(ready)
            sim.battery(A, 37)
            await post_signal(http, "desk", "On")
            await receiver.wait_for(1)

            async def battery_seen() -> bool:
                async with http.get("/api/v1/status") as r:
                    body = await r.json()
                    return any(b["battery"] == 37 for b in body["buttons"])

            await wait_until(battery_seen)

            code, out, err = await cli("status", "--config", str(config))
            assert code == 0, err
            lines = out.splitlines()
            assert lines[0].endswith("— ready")
            [desk] = [line for line in lines if line.strip().startswith("desk ")]
            assert desk.split()[1] == "open"
            [alpha] = [line for line in lines if line.strip().startswith("alpha ")]
            assert "battery 37 %" in alpha and "in range" in alpha
            [ao] = [line for line in lines if line.strip().startswith("ao ")]
            assert ao.split()[1:6] == ["alertops", "pending", "0", "dead", "0"]
            assert "SECRETKEY" not in out

            code, out, err = await cli("status", "--config", str(config), "--json")
            assert code == 0, err
            data = json.loads(out)
            assert data["ready"] is True and data["reasons"] == []
            assert data["store"]["ok"] is True
            assert data["sources"]["flicd"]["connected"] is True
            buttons = {b["id"]: b for b in data["buttons"]}
            assert buttons["desk"]["state"] == "open"
            assert buttons["desk"]["last_decision"] == "open"
            assert (buttons["alpha"]["battery"], buttons["alpha"]["connected"]) == (37, True)
            [sink] = data["sinks"]
            assert (sink["id"], sink["pending"], sink["dead"]) == ("ao", 0, 0)
            assert sink["last_success"] is not None
            assert "SECRETKEY" not in out

    # The daemon is gone: nobody answers.
    for extra in ([], ["--json"]):
        code, out, err = await cli("status", "--config", str(config), *extra)
        assert code == 1 and out == ""
        assert "no flicbridge daemon answers" in err and "Traceback" not in err


# -- flicbridge queue ------------------------------------------------------------------


async def test_queue_commands_through_a_running_daemon(tmp_path: Path, receiver: Receiver) -> None:
    """list shows dead rows with the platform's words; retry ID, retry --all-dead and drop ID
    act through the daemon, which sends a re-queued row at once."""
    port = free_port()
    config = toml_config(tmp_path, port=port, sink_url=receiver.url)
    receiver.default = (400, {"message": "unknown integration"}, {})
    async with asyncio.timeout(60), daemon(config, port) as http:
        await post_signal(http, "desk", "On")
        await post_signal(http, "door", "On")
        await wait_until(lambda: len(receiver.requests) == 2)

        async def dead_count(n: int) -> bool:
            return len((await outbox(http))["dead"]) == n

        await wait_until(lambda: dead_count(2))
        dead = {r["button"]: r["id"] for r in (await outbox(http))["dead"]}

        code, out, err = await cli("queue", "--config", str(config), "list")
        assert code == 0, err
        pending_part, dead_part = out.split("dead:")
        assert "(none)" in pending_part
        for row_id in dead.values():
            assert f"{row_id:>6}  ao" in dead_part
        assert "unknown integration" in dead_part and "SECRETKEY" not in out

        receiver.default = (202, {"ok": True}, {})
        code, out, err = await cli("queue", "--config", str(config), "retry", str(dead["desk"]))
        assert code == 0, err
        assert out.strip() == f"re-queued 1 row(s): [{dead['desk']}]"
        got = await receiver.wait_for(3)
        assert (got[2].body["flic_nameId"], got[2].body["flic_state"]) == ("desk", "On")
        await wait_until(lambda: dead_count(1))

        code, out, err = await cli("queue", "--config", str(config), "retry", "999")
        assert code == 1 and "no dead row with that id" in err

        receiver.default = (400, {"message": "still unknown"}, {})
        await post_signal(http, "desk", "Off")
        await wait_until(lambda: dead_count(2))
        receiver.default = (202, {"ok": True}, {})
        code, out, err = await cli("queue", "--config", str(config), "retry", "--all-dead")
        assert code == 0, err
        assert out.startswith("re-queued 2 row(s)")
        got = await receiver.wait_for(6)
        assert sorted((r.body["flic_nameId"], r.body["flic_state"]) for r in got[4:]) == [
            ("desk", "Off"),
            ("door", "On"),
        ]
        await wait_until(lambda: dead_count(0))

        receiver.default = (503, "down", {})
        accepted = await post_signal(http, "door", "Off")
        await receiver.wait_for(7)
        [pending] = (await outbox(http))["pending"]
        assert pending["event"] == accepted["event"]
        code, out, err = await cli("queue", "--config", str(config), "drop", str(pending["id"]))
        assert code == 0, err
        assert out.strip() == f"dropped row {pending['id']}"
        assert await outbox(http) == {"pending": [], "dead": []}
        code, out, err = await cli("queue", "--config", str(config), "drop", str(pending["id"]))
        assert code == 1 and "no pending or dead row" in err


def store_rows(path: Path) -> dict[int, str]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return dict(conn.execute("SELECT id, status FROM outbox").fetchall())


@pytest.mark.parametrize("token", [True, False], ids=["daemon-down", "api-closed"])
async def test_queue_commands_offline_on_the_store_file(
    tmp_path: Path, receiver: Receiver, token: bool
) -> None:
    """With no daemon answering (or no API token) queue works on the store file itself; a
    row re-queued offline is sent when the daemon starts again."""
    receiver.default = (400, {"message": "unknown integration"}, {})
    bridge_config = make_config(
        tmp_path,
        store={"path": str(tmp_path / "state" / "fb.db")},
        buttons=[{"id": "desk", "source": "ingest"}, {"id": "door", "source": "ingest"}],
        sinks=[{"id": "ao", "type": "alertops", "url": f"{receiver.url}/POSTAlert/SECRETKEY/F"}],
    )
    async with asyncio.timeout(60):
        async with (
            running(bridge_config) as bridge,
            aiohttp.ClientSession(bridge.url, headers=auth()) as http,
        ):
            await post_signal(http, "desk", "On")
            await post_signal(http, "door", "On")
            await wait_until(lambda: dead_count_sync(tmp_path) == 2)
        store = tmp_path / "state" / "fb.db"
        rows = store_rows(store)
        desk_row, door_row = sorted(rows)
        config = toml_config(tmp_path, port=free_port(), token=token, name="cli.toml")

        code, out, err = await cli("queue", "--config", str(config), "list")
        assert code == 0, err
        assert f"{desk_row:>6}  ao" in out.split("dead:")[1]
        assert "unknown integration" in out and "SECRETKEY" not in out

        code, out, err = await cli("queue", "--config", str(config), "retry", str(desk_row))
        assert code == 0, err
        assert "re-queued 1 row(s); the daemon sends them when it starts" in out
        code, out, err = await cli("queue", "--config", str(config), "drop", str(door_row))
        assert code == 0, err
        assert out.strip() == f"dropped row {door_row}"
        assert store_rows(store) == {desk_row: "pending"}
        code, out, err = await cli("queue", "--config", str(config), "retry", "--all-dead")
        assert code == 1 and "no dead row to re-queue" in err
        code, out, err = await cli("queue", "--config", str(config), "drop", "999")
        assert code == 1 and "no pending or dead row 999" in err

        receiver.default = (202, {"ok": True}, {})
        async with running(bridge_config):
            got = await receiver.wait_for(3)
            assert (got[2].body["flic_nameId"], got[2].body["flic_state"]) == ("desk", "On")
            await wait_until(lambda: store_rows(store) == {desk_row: "delivered"})


def dead_count_sync(tmp_path: Path) -> int:
    rows = store_rows(tmp_path / "state" / "fb.db")
    return sum(1 for status in rows.values() if status == "dead")


# -- flicbridge scan -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Lobby", 'Lab "B" (2)'])
async def test_scan_pairs_a_button_and_prints_a_ready_block(tmp_path: Path, name: str) -> None:
    """scan runs flicd's wizard: the new button is paired and the printed [[buttons]] block,
    pasted into the file, is a valid configuration for it."""
    async with asyncio.timeout(30), simulator(**{A: "Alpha"}) as sim:
        sim.add_unpaired(NEW, name)
        config = toml_config(tmp_path, port=free_port(), flicd_port=sim.port)
        code, out, err = await cli("scan", "--config", str(config), "--timeout", "10")
        assert code == 0, err
        assert f"Paired {name} at {NEW}" in out
        assert NEW in sim.verified_buttons
        block = out[out.index("[[buttons]]") :]
        [button] = tomllib.loads(block)["buttons"]
        assert button["address"] == NEW and button["name"] == name
        config.write_text(config.read_text() + "\n" + block)
        checked = config_from_mapping(tomllib.loads(config.read_text()), base_dir=tmp_path)
        assert checked.button(button["id"]) is not None
        code, out, err = await cli("check-config", "--config", str(config))
        assert code == 0, err
        assert "3 button(s)" not in out and "4 button(s)" in out


async def test_scan_without_a_button_or_flicd_exits_1(tmp_path: Path) -> None:
    """No button in public mode before the timeout, or no flicd at all: exit 1, one line."""
    async with asyncio.timeout(30), simulator(**{A: "Alpha"}) as sim:
        config = toml_config(tmp_path, port=free_port(), flicd_port=sim.port)
        code, _, err = await cli("scan", "--config", str(config), "--timeout", "0.5")
        assert code == 1 and "no button paired" in err and "Traceback" not in err
    config = toml_config(tmp_path, port=free_port(), flicd_port=free_port())
    code, _, err = await cli("scan", "--config", str(config), "--timeout", "2")
    assert code == 1 and "cannot reach flicd" in err and "Traceback" not in err
