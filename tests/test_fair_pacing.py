"""A live press goes first, lanes take turns, and a sink's limit holds over every window.

Each scenario runs on the time-accelerated loop of ``test_faults`` against a real aiohttp
receiver standing in for the platform, with the sink at its type's default pace. Every
time asserted is the loop's (``Received.loop_at``), never wall-clock arrivals.
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Any

import pytest

from flicbridge.sinks import SINK_CLASSES
from tests.conftest import running
from tests.receiver import Received, Receiver
from tests.test_faults import accelerated, arrived, eventually, hook_config, loop, signal
from tests.test_sink_pipeline import KEY_FIELD, sink_config

DEFAULT_BURST = 5


class Platform(Receiver):
    """The receiver, answering 503 while ``down``."""

    def __init__(self) -> None:
        super().__init__(self.answer)
        self.down = False

    def answer(self, request: Any, body: Any) -> tuple[int, Any, dict[str, str]]:
        return (503, {"down": True}, {}) if self.down else (202, {"status": "success"}, {})


def config_for(tmp_path: Path, kind: str, url: str, buttons: list[str], **sink: Any) -> Any:
    return hook_config(
        tmp_path,
        url,
        delivery={"timeout": 5, "backoff_initial": 0.5, "backoff_max": 2},
        buttons=[{"id": b, "source": "ingest"} for b in buttons],
        sinks=[{**sink_config(kind, url), **sink}],
    )


def busiest_window(times: list[float], window: float = 60.0) -> int:
    """The most arrivals in any ``window`` seconds (each window starting at an arrival)."""
    times = sorted(times)
    return max(bisect.bisect_left(times, t + window) - i for i, t in enumerate(times))


async def backlog(bridge: Any, platform: Platform, buttons: int, presses: int) -> None:
    """``buttons`` × ``presses`` rows queued during a 2 s outage, then the platform is back.

    At a slow pace most lanes' first rows have not even been tried when it comes back:
    they were live presses once, and must not keep a later panic press waiting."""
    platform.down = True
    for p in range(presses):
        for b in range(buttons):
            await signal(bridge, f"busy{b}", "On" if p % 2 == 0 else "Off")
    await eventually(lambda: len(platform.arrivals) >= 1, 60)
    start = loop().time()
    await eventually(lambda: loop().time() >= start + 2, 10)
    platform.down = False


def key_of(kind: str, arrival: Received) -> str:
    return str(arrival.body[KEY_FIELD[kind]])


@pytest.mark.parametrize("kind", ["pagerduty", "ilert"])
def test_a_live_press_overtakes_a_backlog_at_the_default_pace(tmp_path: Path, kind: str) -> None:
    """20 buttons × 10 presses queued during an outage; the platform is back; then six panic
    presses on other buttons, at least 1.5 s apart, each just after a request went out.
    Each lands at the sink's next opportunity (one token interval), while the backlog is
    still draining."""
    rate = SINK_CLASSES[kind].default_rate
    busy = [f"busy{b}" for b in range(20)]
    panics = [f"panic{i}" for i in range(6)]

    async def main() -> None:
        platform = Platform()
        await platform.start()
        async with running(config_for(tmp_path, kind, platform.url, busy + panics)) as bridge:
            await backlog(bridge, platform, 20, 10)
            sent: dict[str, float] = {}
            for button in panics:
                # Just after a request went out: the next token is a whole interval away
                # (longer than a second at iLert's pace), the hardest moment to press.
                seen = len(platform.arrivals)
                await eventually(lambda n=seen: len(platform.arrivals) > n, 60)
                sent[button] = loop().time()
                await signal(bridge, button, "On")
                await eventually(
                    lambda b=button: any(key_of(kind, a) == b for a in platform.delivered()), 60
                )
                await eventually(lambda t=sent[button]: loop().time() >= t + 1.5, 5)
            pending = sum(bridge.dispatcher.depth().values())
            await arrived(platform, 200 + 6, 3600)
        await platform.stop()
        landed = {key_of(kind, a): a.loop_at for a in platform.delivered()}
        latencies = [landed[b] - sent[b] for b in panics]
        # The next token comes within 1 / rate; 0.1 s is the loop's own slack.
        assert max(latencies) <= 1 / rate + 0.1, latencies
        assert pending > 100, "the backlog was still draining"

    accelerated(main())


@pytest.mark.parametrize("kind", ["pagerduty", "ilert", "alertops"])
def test_no_60_s_window_exceeds_the_limit(tmp_path: Path, kind: str) -> None:
    """A 200-row backlog drains with live presses in between: in every 60 s window the sink
    gets at most rate × 60 + burst requests, refused ones and live presses included."""
    rate = SINK_CLASSES[kind].default_rate
    busy = [f"busy{b}" for b in range(20)]
    panics = [f"panic{i}" for i in range(10)]

    async def main() -> None:
        platform = Platform()
        await platform.start()
        async with running(config_for(tmp_path, kind, platform.url, busy + panics)) as bridge:
            await backlog(bridge, platform, 20, 10)
            for button in panics:
                await signal(bridge, button, "On")
                start = loop().time()
                await eventually(lambda s=start: loop().time() >= s + 7, 10)
            await arrived(platform, 210, 3600)
        await platform.stop()
        times = [a.loop_at for a in platform.arrivals]
        assert times[-1] - times[0] > 60, "the drain must outlast one window"
        assert busiest_window(times) <= rate * 60 + DEFAULT_BURST

    accelerated(main())


def test_a_long_lane_does_not_starve_a_short_one(tmp_path: Path) -> None:
    """One key with 60 rows and one with 5, both queued during an outage, at 2 requests/s:
    turns alternate, so the short lane is done within ten turns, not after the long one."""

    async def main() -> None:
        platform = Platform()
        await platform.start()
        config = config_for(
            tmp_path, "webhook", platform.url, ["long", "short"], rate=2, burst=DEFAULT_BURST
        )
        async with running(config) as bridge:
            platform.down = True
            for i in range(60):
                await signal(bridge, "long", "On" if i % 2 == 0 else "Off")
            for i in range(5):
                await signal(bridge, "short", "On" if i % 2 == 0 else "Off")
            await eventually(lambda: len(platform.arrivals) >= 2, 60)
            platform.down = False
            await arrived(platform, 65, 3600)
        await platform.stop()
        keys = [a.body["alert_key"] for a in platform.delivered()]
        shorts = [i for i, k in enumerate(keys) if k == "short"]
        # Once the short lane's retry is due, turns alternate: its 5 rows go within 9
        # deliveries, not after the long lane's 60.
        assert shorts[-1] - shorts[0] <= 9, keys[:20]
        long_states = [
            a.body["state"] for a in platform.delivered() if a.body["alert_key"] == "long"
        ]
        assert long_states[:4] == ["On", "Off", "On", "Off"]  # per-key order kept

    accelerated(main())


def test_the_newest_live_press_goes_first_even_when_the_pace_is_slow(tmp_path: Path) -> None:
    """At one request per 5 s, 12 buttons pressed together have used the burst and wait for
    turns (live presses, never tried). A panic press after them waits one token interval
    (however long it is), not for the twelve: the newest press goes first."""
    busy = [f"busy{b}" for b in range(12)]

    async def main() -> None:
        platform = Platform()
        await platform.start()
        config = config_for(
            tmp_path, "webhook", platform.url, [*busy, "panic"], rate=0.2, burst=DEFAULT_BURST
        )
        async with running(config) as bridge:
            for button in busy:
                await signal(bridge, button, "On")
            await arrived(platform, DEFAULT_BURST, 60)
            start = loop().time()
            await eventually(lambda: loop().time() >= start + 3, 10)
            sent = loop().time()
            await signal(bridge, "panic", "On")
            await eventually(
                lambda: any(a.body["alert_key"] == "panic" for a in platform.delivered()), 60
            )
            await arrived(platform, len(busy) + 1, 600)
        await platform.stop()
        keys = [a.body["alert_key"] for a in platform.delivered()]
        landed = next(a.loop_at for a in platform.delivered() if a.body["alert_key"] == "panic")
        assert landed - sent <= 5.1, (keys, landed - sent)
        assert keys.index("panic") == DEFAULT_BURST + 1 or keys.index("panic") == DEFAULT_BURST
        assert sorted(keys) == sorted([*busy, "panic"])  # the others all go after it

    accelerated(main())
