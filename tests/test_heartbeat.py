"""Heartbeat: pings only while healthy, one fail call per unhealthy spell, resumes after.

A real aiohttp receiver stands in for the monitoring platform and the flicd simulator is
really stopped and restarted; the run is on the fault suite's time-accelerated loop, so
the intervals below are loop time, not wall-clock.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from structlog.testing import capture_logs

from flicbridge.config import Config
from flicbridge.domain import Signal, SignalState, utcnow
from flicbridge.sources.simulator import Simulator
from tests.conftest import A, free_port, make_config, running
from tests.receiver import Receiver
from tests.test_faults import accelerated, eventually, loop

INTERVAL = 60.0
SECRET_PATH = "/ping/0f1e2d3c-secret-uuid"


def config(tmp_path: Path, port: int, url: str) -> Config:
    return make_config(
        tmp_path,
        flicd={"port": port, "reconnect_max": 2, "ping_interval": 10},
        buttons=[{"id": "alpha", "address": A}],
        heartbeat={
            "url": f"{url}{SECRET_PATH}",
            "interval": "1m",
            "method": "POST",
            "fail_url": f"{url}{SECRET_PATH}/fail",
        },
    )


def test_killed_flicd_stops_pings_fails_once_and_recovery_resumes(tmp_path: Path) -> None:
    """Pings every interval; flicd gone → no ping within an interval, one fail; back → pings."""

    async def main() -> None:
        receiver = Receiver()
        await receiver.start()
        port = free_port()
        sim = Simulator(host="127.0.0.1", port=port, buttons={A: "Alpha"})
        await sim.start()

        def pings() -> list[float]:
            return [a.loop_at for a in receiver.delivered() if a.path == SECRET_PATH]

        def fails() -> list[float]:
            return [a.loop_at for a in receiver.delivered() if a.path.endswith("/fail")]

        with capture_logs() as logs:
            async with running(config(tmp_path, port, receiver.url), clock=loop().wall) as bridge:
                async with asyncio.timeout(10 * INTERVAL):
                    await receiver.wait_until(lambda: len(pings()) >= 4)
                gaps = [b - a for a, b in zip(pings(), pings()[1:], strict=False)]
                assert all(INTERVAL - 1 <= g <= INTERVAL + 5 for g in gaps), gaps
                assert receiver.arrivals[0].body in (None, "")  # POST with no body

                await sim.stop()  # flicd dies
                died = loop().time()
                async with asyncio.timeout(10 * INTERVAL):
                    await receiver.wait_until(lambda: len(fails()) >= 1)
                assert fails()[0] - died <= INTERVAL + 5
                await asyncio.sleep(5 * INTERVAL)  # a long spell: still one fail, no ping
                assert len(fails()) == 1, [
                    (e["event"], e.get("detail"), e.get("reasons"))
                    for e in logs
                    if "heartbeat" in e["event"] or "flicd" in e["event"]
                ]
                assert [p for p in pings() if p > died + INTERVAL + 5] == []
                assert bridge.heartbeat is not None and bridge.heartbeat.failed_sent == 1

                sim = Simulator(host="127.0.0.1", port=port, buttons={A: "Alpha"})
                await sim.start()  # flicd is back
                back = loop().time()
                await eventually(lambda: bool(bridge.health.source_up.get("flicd")), 30)
                async with asyncio.timeout(10 * INTERVAL):
                    await receiver.wait_until(lambda: len([p for p in pings() if p > back]) >= 2)
                assert min(p for p in pings() if p > back) - back <= INTERVAL + 10
                assert len(fails()) == 1

                await sim.stop()  # a second spell fails once more
                async with asyncio.timeout(10 * INTERVAL):
                    await receiver.wait_until(lambda: len(fails()) >= 2)
        await receiver.stop()
        text = repr(logs)
        assert "secret-uuid" not in text and "heartbeat_withheld" in text

    accelerated(main())


def test_failing_heartbeat_endpoint_never_delays_presses(tmp_path: Path) -> None:
    """An endpoint that hangs or answers 500: pings time out in their own task; a press
    still opens and is delivered at once; the bridge keeps beating."""

    async def main() -> None:
        hang = asyncio.Event()

        async def respond(request: object, body: object) -> tuple[int, object, dict[str, str]]:
            path = getattr(request, "path", "")
            if path.startswith("/ping"):
                await hang.wait()
                return 500, "down", {}
            return 202, {"status": "ok"}, {}

        receiver = Receiver(respond=respond)
        await receiver.start()
        cfg = make_config(
            tmp_path,
            sinks=[{"id": "hook", "type": "webhook", "url": f"{receiver.url}/hook"}],
            heartbeat={"url": f"{receiver.url}/ping/x", "interval": 30},
        )
        async with running(cfg, clock=loop().wall) as bridge:
            await asyncio.sleep(95)  # three beats, each hanging
            assert bridge.heartbeat is not None and bridge.heartbeat.sent == 0
            start = loop().time()
            result = bridge.submit(
                Signal(button_id="desk", state=SignalState.ON, origin="api", received_at=utcnow())
            )
            await result
            async with asyncio.timeout(5):
                await receiver.wait_until(
                    lambda: any(a.path == "/hook" for a in receiver.delivered())
                )
            assert loop().time() - start < 5
            hang.set()
        await receiver.stop()

    accelerated(main())
