"""``python -m benchmarks.mqtt [--presses N]``: the MQTT sink against a bare client.

One Mosquitto on a free loopback port, one run: the bridge (in this process, ingest
buttons) turns signals into publishes; a bare aiomqtt client publishes the same number of
QoS 1 messages. Both are timed from the call to the moment a subscriber holds the message
(which the broker forwards only once it took the publish), on the loop's clock. Prints
p50/p99 per message and throughput, and the bridge/bare ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import aiomqtt

from benchmarks.stats import percentile
from flicbridge.app import Bridge
from flicbridge.config import config_from_mapping
from flicbridge.domain import Signal, SignalState, utcnow

BUTTONS = 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _broker(workdir: Path) -> tuple[asyncio.subprocess.Process, int]:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = _free_port()
    conf = workdir / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", "persistence false", "allow_anonymous true"]
    if os.geteuid() == 0:
        lines.append("user root")
    conf.write_text("\n".join(lines) + "\n")
    proc = await asyncio.create_subprocess_exec(
        exe, "-c", str(conf), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    async with asyncio.timeout(10):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                return proc, port
            except OSError:
                await asyncio.sleep(0.02)


async def _sequential(send: Any, arrived: asyncio.Queue[float], n: int) -> list[float]:
    """Latency of n messages sent one at a time (each waits for the previous one)."""
    loop = asyncio.get_running_loop()
    out: list[float] = []
    for i in range(n):
        start = loop.time()
        await send(i)
        end = await asyncio.wait_for(arrived.get(), 10)
        out.append(end - start)
    return out


async def _burst(send: Any, arrived: asyncio.Queue[float], n: int) -> float:
    """Messages per second for n sent at once."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(n):
        await send(i)
    for _ in range(n):
        await asyncio.wait_for(arrived.get(), 30)
    return n / (loop.time() - start)


async def run(presses: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        proc, port = await _broker(workdir)
        try:
            arrived: dict[str, asyncio.Queue[float]] = {
                "bridge": asyncio.Queue(),
                "bare": asyncio.Queue(),
            }
            async with aiomqtt.Client("127.0.0.1", port) as watcher:
                await watcher.subscribe("flicbridge/+/event", qos=1)
                await watcher.subscribe("bare/+", qos=1)

                async def listen() -> None:
                    async for msg in watcher.messages:
                        kind = "bare" if str(msg.topic).startswith("bare/") else "bridge"
                        arrived[kind].put_nowait(loop.time())

                listener = asyncio.create_task(listen())
                config = config_from_mapping(
                    {
                        "store": {"path": str(workdir / "b.db")},
                        "server": {"host": "127.0.0.1", "port": 0, "token": "t"},
                        "buttons": [{"id": f"b{i}", "source": "ingest"} for i in range(BUTTONS)],
                        "sinks": [
                            {
                                "id": "mq",
                                "type": "mqtt",
                                "url": f"mqtt://127.0.0.1:{port}",
                                "discovery_prefix": "",
                                "rate": 100000,
                                "burst": 100000,
                            }
                        ],
                    },
                    base_dir=workdir,
                    source="benchmark",
                )
                bridge = Bridge(config)
                task = asyncio.create_task(bridge.run())
                await bridge.wait_ready()
                sink: Any = bridge.sinks["mq"]
                await asyncio.wait_for(sink.connected.wait(), 10)
                is_on: dict[str, bool] = {}

                async def press(i: int) -> None:
                    button = f"b{i % BUTTONS}"  # each press flips its button: every one sends
                    is_on[button] = not is_on.get(button, False)
                    state = SignalState.ON if is_on[button] else SignalState.OFF
                    bridge.submit(Signal(button, state, origin="benchmark", received_at=utcnow()))

                async with aiomqtt.Client("127.0.0.1", port) as bare:

                    async def publish(i: int) -> None:
                        await bare.publish(f"bare/{i % BUTTONS}", b'{"state": "On"}', qos=1)

                    bridge_lat = await _sequential(press, arrived["bridge"], presses)
                    bare_lat = await _sequential(publish, arrived["bare"], presses)
                    bridge_rate = await _burst(press, arrived["bridge"], presses)
                    bare_rate = await _burst(publish, arrived["bare"], presses)
                bridge.stop()
                await task
                listener.cancel()
        finally:
            proc.kill()
            await proc.wait()

    def ms(values: list[float], p: float) -> float:
        return round(percentile(values, p) * 1000, 2)

    result = {
        "presses": presses,
        "bridge_p50_ms": ms(bridge_lat, 50),
        "bridge_p99_ms": ms(bridge_lat, 99),
        "bare_p50_ms": ms(bare_lat, 50),
        "bare_p99_ms": ms(bare_lat, 99),
        "bridge_per_s": round(bridge_rate),
        "bare_per_s": round(bare_rate),
    }
    result["ratio_p99"] = round(result["bridge_p99_ms"] / max(result["bare_p99_ms"], 0.001), 1)
    result["ratio_throughput"] = round(bare_rate / max(bridge_rate, 0.001), 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--presses", type=int, default=200)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.presses)), indent=2))


if __name__ == "__main__":
    main()
