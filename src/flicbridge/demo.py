"""``flicbridge demo``: the whole pipeline with no hardware.

The flicd simulator, the real daemon and a local capture sink (an aiohttp receiver) run
on loopback. A script presses the virtual button: an open, a repeated press (appended, not
sent), a close during a sink outage (retried, then delivered), a press made out of range
(delivered late, stamped with its real time). Exit 0 when everything arrived as it should.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from flicbridge.app import Bridge
from flicbridge.config import config_from_mapping
from flicbridge.sources.simulator import Simulator

ADDRESS = "80:e4:da:70:00:01"


class CaptureSink:
    """A loopback HTTP receiver that records every request; can play an outage."""

    def __init__(self) -> None:
        self.received: list[tuple[float, str, dict[str, Any]]] = []
        self.failures: list[tuple[float, str, int]] = []
        self.down = False
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.arrived = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.down:
            self.failures.append((time.monotonic(), request.path, 503))
            return web.json_response({"error": "demo outage"}, status=503)
        self.received.append((time.monotonic(), request.path, body))
        self.arrived.set()
        return web.json_response({"status": "ok"}, status=202)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()

    async def wait_for(self, count: int, timeout: float = 15.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.received) < count:
                self.arrived.clear()
                await self.arrived.wait()


def demo_config(store_dir: Path, flicd_port: int, sink_port: int) -> dict[str, Any]:
    """The embedded default: one simulated button, an AlertOps-style and a webhook sink."""
    base = f"http://127.0.0.1:{sink_port}"
    return {
        "flicd": {"host": "127.0.0.1", "port": flicd_port, "reconnect_max": 2},
        "store": {"path": str(store_dir / "demo.db")},
        "server": {"host": "127.0.0.1", "port": 0, "token": "demo-token"},
        "delivery": {"timeout": 2, "backoff_initial": 0.2, "backoff_max": 1},
        "alerts": {"suppress_repeat_for": 60},
        "buttons": [
            {
                "id": "reception",
                "address": ADDRESS,
                "name": "Reception panic button",
                "info": "Front desk, ground floor",
            }
        ],
        "sinks": [
            {"id": "alertops", "type": "alertops", "url": f"{base}/POSTAlert/DEMOKEY/Flic"},
            {"id": "hook", "type": "webhook", "url": f"{base}/hook"},
        ],
    }


async def run_demo(out: Callable[[str], None] = print) -> int:
    """Run the scripted demo; 0 when every expectation held."""
    start = time.monotonic()

    def say(text: str) -> None:
        out(f"[{time.monotonic() - start:6.2f}s] {text}")

    failures: list[str] = []

    def expect(ok: bool, what: str) -> None:
        say(("  ok   " if ok else "  FAIL ") + what)
        if not ok:
            failures.append(what)

    sim = Simulator(host="127.0.0.1", port=0, buttons={ADDRESS: "Reception"})
    sink = CaptureSink()
    await sim.start()
    await sink.start()
    with tempfile.TemporaryDirectory(prefix="flicbridge-demo-") as tmp:
        config = config_from_mapping(
            demo_config(Path(tmp), sim.port, sink.port), base_dir=Path(tmp), source="demo"
        )
        bridge = Bridge(config)
        task = asyncio.create_task(bridge.run())
        try:
            async with asyncio.timeout(10):
                await bridge.wait_ready()
                while not bridge.health.source_up.get("flicd"):
                    await asyncio.sleep(0.02)
                while not bridge.buttons["reception"].connected:
                    await asyncio.sleep(0.02)
            say(
                f"flicd simulator on 127.0.0.1:{sim.port}, daemon on {bridge.url}, "
                f"capture sink on 127.0.0.1:{sink.port}"
            )

            def show(index: int) -> None:
                _, path, body = sink.received[index]
                keys = ("flic_nameId", "flic_state", "key", "state", "click", "delay_s")
                shown = {k: body[k] for k in keys if k in body}
                say(f"  sink got POST {path.split('/')[1]} {json.dumps(shown)}")

            say("press 1: single click → On")
            sim.press(ADDRESS, "single")
            await sink.wait_for(2)
            show(0)
            show(1)
            expect(bridge.states["reception"].is_open, "alert is open, sent to both sinks")

            say("press 2: single click again within suppress_repeat_for")
            sim.press(ADDRESS, "single")
            await asyncio.sleep(0.5)
            events = await bridge.store.recent_events(1)
            expect(
                events[0]["decision"] == "appended" and len(sink.received) == 2,
                "appended: recorded, not sent again (pages once)",
            )

            say("sink outage begins (503 to everything)")
            sink.down = True
            say("press 3: double click → Off")
            sim.press(ADDRESS, "double")
            async with asyncio.timeout(10):
                while len(sink.failures) < 2:
                    await asyncio.sleep(0.05)
            say(f"  sink refused {len(sink.failures)} attempt(s); the close stays queued on disk")
            sink.down = False
            say("sink is back")
            await sink.wait_for(4)
            show(2)
            show(3)
            expect(
                all(b.get("flic_state", b.get("state")) == "Off" for _, _, b in sink.received[2:4]),
                "close retried and delivered after the outage",
            )

            say("button goes out of range; press 4 made there; back in range 1.5 s later")
            sim.disconnect(ADDRESS)
            await asyncio.sleep(0.1)
            sim.press(ADDRESS, "single")
            await asyncio.sleep(1.5)
            sim.connect(ADDRESS)
            await sink.wait_for(6)
            show(4)
            late = [b for _, p, b in sink.received[4:6] if "POSTAlert" in p]
            expect(
                bool(late) and float(late[0].get("delay_s", 0)) >= 1.0,
                "late press delivered, stamped with its real press time and delay",
            )

            def delivered_metric() -> int:
                return int(
                    sum(
                        float(line.rsplit(" ", 1)[1])
                        for line in bridge.metrics.render().decode().splitlines()
                        if line.startswith("flicbridge_deliveries_total{")
                        and 'outcome="delivered"' in line
                    )
                )

            async with asyncio.timeout(5):  # the count lands after the store marks the row
                while delivered_metric() < len(sink.received):
                    await asyncio.sleep(0.02)
            delivered = delivered_metric()
            say(
                f"summary: {len(sink.received)} deliveries, {len(sink.failures)} refused "
                f"attempts retried, {int(delivered)} counted in /metrics, "
                f"0 lost; store {config.store.path.name} in a temp folder"
            )
        except TimeoutError:
            failures.append("timed out waiting for the pipeline")
            say("FAIL: timed out waiting for the pipeline")
        finally:
            bridge.stop()
            await task
            await sink.stop()
            await sim.stop()
    if failures:
        out(f"demo FAILED: {'; '.join(failures)}")
        return 1
    out("demo ok: every press arrived as it should")
    return 0
