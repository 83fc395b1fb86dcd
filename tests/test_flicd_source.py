"""FlicdSource over real sockets against the simulator: presses, links, battery, reconnects."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pyflic.asyncio as pyflic_asyncio
import pytest

from flicbridge.app import Bridge
from flicbridge.config import Config
from flicbridge.delivery import backoff_delay
from flicbridge.domain import Click, Press
from flicbridge.sources.flicd import FlicdSource, run_scan_wizard
from flicbridge.sources.flicd_client import connect
from flicbridge.sources.simulator import Simulator
from tests.conftest import make_config
from tests.conftest import running as running_bridge

A = "80:e4:da:70:00:01"
B = "80:e4:da:70:00:02"
STRANGER = "80:e4:da:70:00:77"  # paired in flicd but not configured in flicbridge


class Recorder:
    """A SourceListener that keeps every report and lets a test wait for one."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self._changed = asyncio.Event()

    def _add(self, *event: Any) -> None:
        self.events.append(event)
        self._changed.set()

    def press(self, press: Press) -> None:
        self._add("press", press)

    def link(self, source: str, up: bool, detail: str) -> None:
        self._add("link", source, up, detail)

    def button_link(self, button_id: str, connected: bool, detail: str) -> None:
        self._add("button", button_id, connected, detail)

    def battery(self, button_id: str, percent: int) -> None:
        self._add("battery", button_id, percent)

    def faults(self, source: str, reasons: list[str]) -> None:
        self._add("faults", source, tuple(reasons))

    @property
    def current_faults(self) -> tuple[str, ...]:
        reported = self.of("faults")
        return reported[-1][1] if reported else ()

    @property
    def presses(self) -> list[Press]:
        return [e[1] for e in self.events if e[0] == "press"]

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        return [e[1:] for e in self.events if e[0] == kind]

    def count(self, event: tuple[Any, ...]) -> int:
        return sum(1 for e in self.events if e[: len(event)] == event)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def wait_count(
        self,
        event: tuple[Any, ...],
        n: int = 1,
        timeout: float = 5.0,
    ) -> None:
        await self.wait_for(lambda: self.count(event) >= n, timeout)


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a condition nothing signals (simulator and backoff state) until it holds."""
    async with asyncio.timeout(timeout):
        while not predicate():  # no event to wait on: polling is the point
            await asyncio.sleep(0.01)


class CeilingRandom(random.Random):
    """Records each backoff ceiling and sleeps a fixed 20 ms, so tests see the schedule fast."""

    def __init__(self) -> None:
        super().__init__(0)
        self.ceilings: list[float] = []

    def uniform(self, a: float, b: float) -> float:
        self.ceilings.append(b)
        return 0.02


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    simulator = Simulator(buttons={A: "Reception", B: "Lab", STRANGER: "Elsewhere"})
    await simulator.start()
    yield simulator
    await simulator.stop()


def make_source(port: int, recorder: Recorder, **overrides: Any) -> FlicdSource:
    options: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "buttons": {A.upper(): "reception", B: "lab"},
        "listener": recorder,
        "reconnect_max": 0.2,
        "ping_interval": 0.1,
        "ping_timeout": 0.3,
        "rng": random.Random(1),
    }
    options.update(overrides)
    return FlicdSource(**options)


@contextlib.asynccontextmanager
async def running(source: FlicdSource) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(source.run(), name="flicd-source")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def ready(sim: Simulator, **overrides: Any) -> AsyncIterator[tuple[FlicdSource, Recorder]]:
    """A running source whose buttons have both reported Ready."""
    recorder = Recorder()
    source = make_source(sim.port, recorder, **overrides)
    async with running(source):
        await recorder.wait_count(("button", "reception", True))
        await recorder.wait_count(("button", "lab", True))
        yield source, recorder


async def settle(sim: Simulator, recorder: Recorder, percent: int) -> None:
    """Wait until everything flicd sent before now has arrived (a battery report as marker)."""
    sim.battery(A, percent)
    await recorder.wait_count(("battery", "reception", percent))


# -- presses ----------------------------------------------------------------------------


async def test_every_gesture_arrives_once_as_the_right_click(sim: Simulator) -> None:
    """single/double/hold arrive as Click.SINGLE/DOUBLE/HOLD, one Press per gesture."""
    async with ready(sim) as (_source, recorder):
        for gesture in ("single", "double", "hold"):
            sim.press(A, gesture)
        sim.press(B, "hold")
        await settle(sim, recorder, 77)
    assert [(p.button_id, p.click) for p in recorder.presses] == [
        ("reception", Click.SINGLE),
        ("reception", Click.DOUBLE),
        ("reception", Click.HOLD),
        ("lab", Click.HOLD),
    ]
    for press in recorder.presses:
        assert (press.source, press.queued, press.delay_s) == ("flicd", False, 0.0)


async def test_queued_presses_carry_their_delay(sim: Simulator) -> None:
    """A press made out of range arrives on reconnect with queued=True and its age as delay."""
    async with ready(sim) as (_source, recorder):
        sim.disconnect(A)
        await recorder.wait_count(("button", "reception", False, "TimedOut"))
        sim.press(A, "single", queued_age=42)
        sim.press(A, "double")
        sim.connect(A)
        await recorder.wait_for(lambda: len(recorder.presses) == 2)
        sim.press(A, "hold", queued_age=7)  # in range, but the button says it queued it
        await recorder.wait_for(lambda: len(recorder.presses) == 3)
    first, second, third = recorder.presses
    assert (first.click, first.queued, first.delay_s) == (Click.SINGLE, True, 42.0)
    assert first.pressed_at == first.received_at - timedelta(seconds=42)
    assert (second.click, second.queued, second.delay_s) == (Click.DOUBLE, True, 0.0)
    assert (third.click, third.queued, third.delay_s) == (Click.HOLD, True, 7.0)


async def test_unconfigured_buttons_and_unknown_channels_are_ignored(sim: Simulator) -> None:
    """Unconfigured buttons and events for unknown ids produce nothing and break nothing."""
    async with ready(sim) as (source, recorder):
        sim.press(STRANGER, "single")
        sim.emit(
            "EvtButtonSingleOrDoubleClickOrHold",
            conn_id=987_654,
            click_type=pyflic_asyncio.ClickType.ButtonHold,
            was_queued=False,
            time_diff=0,
        )
        sim.emit("EvtNewVerifiedButton", bd_addr=STRANGER)
        sim.emit("EvtButtonDeleted", bd_addr=STRANGER, deleted_by_this_client=False)
        sim.press(A, "double")
        await settle(sim, recorder, 66)
        assert source.connected
        assert recorder.count(("link", "flicd", False)) == 0
    assert [(p.button_id, p.click) for p in recorder.presses] == [("reception", Click.DOUBLE)]


async def test_a_configured_button_flicd_does_not_know_is_reported_disconnected(
    sim: Simulator,
) -> None:
    """A configured address flicd has never seen: its channel waits, reported not connected."""
    recorder = Recorder()
    source = make_source(sim.port, recorder, buttons={A: "reception", "11:22:33:44:55:66": "ghost"})
    async with running(source):
        await recorder.wait_count(("button", "ghost", False, "Disconnected"))
        await recorder.wait_count(("button", "reception", True, "Ready"))


# -- links and battery ------------------------------------------------------------------------


async def test_link_button_links_and_battery_are_reported(sim: Simulator) -> None:
    """link up on connect, Ready per button, battery at once and on change, out of range/back."""
    async with ready(sim) as (source, recorder):
        assert source.connected
        await recorder.wait_count(("battery", "reception", 100))
        await recorder.wait_count(("battery", "lab", 100))
        sim.battery(B, 12)
        await recorder.wait_count(("battery", "lab", 12))
        sim.disconnect(B)
        await recorder.wait_count(("button", "lab", False, "TimedOut"))
        sim.connect(B)
        await recorder.wait_count(("button", "lab", True, "Ready"), n=2)
    assert recorder.events[0] == ("link", "flicd", True, f"connected to 127.0.0.1:{sim.port}")
    assert recorder.of("link")[-1][:2] == ("flicd", False)  # reported down when stopped
    assert not source.connected


async def test_a_removed_channel_is_reported_with_its_reason(sim: Simulator) -> None:
    """Another client force-disconnecting a button removes our channel: not connected, reason."""
    async with ready(sim) as (_source, recorder):
        other = await connect("127.0.0.1", sim.port, timeout=2)
        other.force_disconnect(A)
        await recorder.wait_count(
            ("button", "reception", False, "channel removed: ForceDisconnectedByOtherClient")
        )
        other.close()


# -- reconnects -----------------------------------------------------------------------------


async def test_drop_reconnects_with_new_channels(sim: Simulator) -> None:
    """After flicd restarts, a new client re-creates channels and later presses arrive."""
    async with ready(sim) as (_source, recorder):
        sim.drop()
        await recorder.wait_count(("link", "flicd", False))
        await recorder.wait_count(("link", "flicd", True), n=2)
        await recorder.wait_count(("button", "reception", True), n=2)
        assert sim.client_count == 1
        assert sim.channel_count(A) == 1  # one fresh channel, not one per connection
        sim.press(A, "hold")
        await recorder.wait_for(lambda: len(recorder.presses) == 1)
    assert recorder.presses[0].click == Click.HOLD
    assert ("button", "reception", False, "flicd unreachable") in recorder.events


async def test_split_packets_are_framed(sim: Simulator) -> None:
    """Against a flicd whose packets arrive in 1–3 byte pieces, everything still works."""
    sim.split_writes = True
    async with ready(sim) as (_source, recorder):
        for gesture in ("hold", "single", "double"):
            sim.press(A, gesture)
        await settle(sim, recorder, 31)
    assert [p.click for p in recorder.presses] == [Click.HOLD, Click.SINGLE, Click.DOUBLE]


async def test_a_hung_flicd_is_detected_by_ping_and_reconnected(sim: Simulator) -> None:
    """flicd stops answering with its socket open: the ping times out, we reconnect."""
    async with ready(sim) as (source, recorder):
        sim.hang()
        await recorder.wait_for(
            lambda: any(not up and "ping" in detail for _s, up, detail in recorder.of("link"))
        )
        assert not source.connected
        sim.unhang()
        await recorder.wait_count(("link", "flicd", True), n=2)
        await recorder.wait_count(("button", "reception", True), n=2)
        sim.press(A, "single")
        await recorder.wait_for(lambda: len(recorder.presses) == 1)
        assert sim.client_count == 1  # the hung connections were closed, not leaked


async def test_connection_refused_at_start_retries_until_flicd_appears() -> None:
    """No flicd yet: link down is reported once, retries go on, then everything comes up."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    recorder = Recorder()
    source = make_source(port, recorder)
    async with running(source):
        await recorder.wait_count(("link", "flicd", False))
        await asyncio.sleep(0.5)  # several attempts, all failing the same way
        assert recorder.count(("link", "flicd", False)) == 1
        simulator = Simulator(port=port, buttons={A: "Reception"})
        await simulator.start()
        try:
            await recorder.wait_count(("button", "reception", True))
            simulator.press(A, "double")
            await recorder.wait_for(lambda: len(recorder.presses) == 1)
        finally:
            await simulator.stop()


async def test_backoff_grows_to_the_cap_and_resets_after_a_healthy_connection() -> None:
    """Failures back off 0.5, 1, 2 … capped; a connection that answered a ping resets it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    recorder = Recorder()
    rng = CeilingRandom()
    source = make_source(port, recorder, reconnect_max=3.0, rng=rng)
    async with running(source):
        await eventually(lambda: len(rng.ceilings) >= 5)
        assert rng.ceilings[:5] == [0.5, 1.0, 2.0, 3.0, 3.0]
        simulator = Simulator(port=port, buttons={A: "Reception"})
        await simulator.start()
        try:
            await recorder.wait_count(("link", "flicd", True))
            # Let the connection prove itself with a ping, then cut it.
            await asyncio.sleep(0.3)
            before = len(rng.ceilings)
            simulator.drop()
            await recorder.wait_count(("link", "flicd", True), n=2)
            assert rng.ceilings[before:] == [0.5]
        finally:
            await simulator.stop()


def test_backoff_delay_is_full_jitter_under_the_cap() -> None:
    """Each delay lies in [0, min(cap, 0.5·2^attempt)]."""
    rng = random.Random(3)
    for attempt in range(40):
        delay = backoff_delay(attempt, initial=0.5, cap=30.0, rng=rng)
        assert 0.0 <= delay <= min(30.0, 0.5 * 2**attempt)


async def test_cancel_propagates_and_closes_the_connection(sim: Simulator) -> None:
    """Cancelling run() raises CancelledError out of it and closes the flicd connection."""
    recorder = Recorder()
    source = make_source(sim.port, recorder)
    task = asyncio.create_task(source.run())
    await recorder.wait_count(("button", "reception", True))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: sim.client_count == 0)
    assert recorder.of("link")[-1][:2] == ("flicd", False)


# -- scan wizard ------------------------------------------------------------------------------


async def test_scan_wizard_pairs_a_button(sim: Simulator) -> None:
    """run_scan_wizard returns WizardSuccess with the new button's address and name."""
    sim.add_unpaired("80:e4:da:70:00:99", "F2New")
    progress: list[str] = []
    async with asyncio.timeout(2):  # completes when flicd says so, not at the wizard's timeout
        result = await run_scan_wizard(
            "127.0.0.1", sim.port, timeout=5, on_progress=progress.append
        )
    assert result == ("WizardSuccess", "80:e4:da:70:00:99", "F2New")
    assert progress == ["found F2New (80:e4:da:70:00:99)", "connected to F2New, pairing"]
    assert "80:e4:da:70:00:99" in sim.verified_buttons


async def test_scan_wizard_gives_up_at_its_timeout(sim: Simulator) -> None:
    """No button in public mode: the wizard is cancelled at the timeout."""
    async with asyncio.timeout(3):
        result = await run_scan_wizard("127.0.0.1", sim.port, timeout=0.2)
    assert result == ("WizardCancelledByUser", None, None)


# -- channels flicd removes or refuses, the controller, a flicd that is not alive -------------


async def test_a_channel_flicd_removes_is_re_created_and_heard_again(sim: Simulator) -> None:
    """Whatever flicd's reason, a removed channel is a fault naming the button, then a new
    channel is made and presses on it arrive."""
    async with ready(sim) as (_source, recorder):
        for n, reason in enumerate(("CouldntLoadDevice", "DeletedByOtherClient"), start=1):
            sim.remove_channels(A, reason)
            await recorder.wait_for(
                lambda reason=reason: any(
                    f"button reception has no live channel: channel removed: {reason}" in f
                    for _s, faults in recorder.of("faults")
                    for f in faults
                )
            )
            await recorder.wait_count(("button", "reception", True, "Ready"), n=n + 1)
            await recorder.wait_for(lambda: recorder.current_faults == ())
            assert sim.channel_count(A) == 1
        sim.press(A, "hold")
        await recorder.wait_for(lambda: len(recorder.presses) == 1)
    assert recorder.presses[0].button_id == "reception"


async def test_a_refused_channel_is_retried_with_capped_backoff(sim: Simulator) -> None:
    """MaxPendingConnectionsReached over and over: retried at 0.5, 1, 2, cap, cap … until
    flicd accepts, then the button is heard."""
    rng = CeilingRandom()
    recorder = Recorder()
    sim.refuse_channels(10)  # requests alternate between the buttons: five refusals each
    source = make_source(sim.port, recorder, reconnect_max=3.0, rng=rng, ping_interval=5.0)
    async with running(source):
        await recorder.wait_count(("button", "reception", True, "Ready"))
        await recorder.wait_count(("button", "lab", True, "Ready"))
        await recorder.wait_for(lambda: recorder.current_faults == ())
        assert sim.channel_count(A) == 1 and sim.channel_count(B) == 1
        sim.press(B, "single")
        await recorder.wait_for(lambda: len(recorder.presses) == 1)
    refusals = [e for e in recorder.of("button") if e[2] == "MaxPendingConnectionsReached"]
    # Reported once per button (a flicd that keeps refusing is not news every time) …
    assert sorted(e[0] for e in refusals) == ["lab", "reception"]
    # … and retried five times each, each button's own schedule doubling up to the cap.
    assert sorted(rng.ceilings) == sorted([0.5, 1.0, 2.0, 3.0, 3.0] * 2)


async def test_a_detached_controller_is_a_fault_until_attached(sim: Simulator) -> None:
    """EvtBluetoothControllerStateChange Detached/Resetting: a fault naming the controller;
    Attached clears it. CmdGetInfo at connect reports a controller detached already."""
    async with ready(sim) as (_source, recorder):
        await recorder.wait_for(lambda: recorder.current_faults == ())
        sim.controller("Detached")
        await recorder.wait_for(
            lambda: recorder.current_faults == ("Bluetooth controller is Detached",)
        )
        sim.controller("Resetting")
        await recorder.wait_for(
            lambda: recorder.current_faults == ("Bluetooth controller is Resetting",)
        )
        sim.controller("Attached")
        await recorder.wait_for(lambda: recorder.current_faults == ())
        sim.controller("Detached")
        sim.drop()  # a new connection learns the state from CmdGetInfo
        await recorder.wait_count(("link", "flicd", True), n=2)
        await recorder.wait_for(
            lambda: recorder.current_faults == ("Bluetooth controller is Detached",)
        )


@pytest.mark.parametrize("mode", ["hang", "garbage", "truncate", "huge"])
async def test_a_flicd_that_never_answers_a_ping_is_never_reported_up(
    sim: Simulator, mode: str
) -> None:
    """Silent, garbage, truncated packets, a 65,535-byte length: connections are made and
    dropped, but the link is never reported up until flicd answers a ping again."""
    rng = CeilingRandom()
    async with ready(sim, rng=rng) as (_source, recorder):
        if mode == "hang":
            sim.hang()
        else:
            sim.garble(mode)
        sim.drop()
        await recorder.wait_count(("link", "flicd", False))
        # Several connections, each dropped for not answering its first ping.
        await eventually(lambda: len(rng.ceilings) >= 3)
        assert recorder.count(("link", "flicd", True)) == 1
        assert "did not answer a ping" in recorder.of("link")[-1][2]
        sim.unhang()
        sim.garble(None)
        await recorder.wait_count(("link", "flicd", True), n=2, timeout=10)
        await recorder.wait_for(lambda: recorder.current_faults == ())


# -- the daemon's /readyz ---------------------------------------------------------------------


async def readyz(http: aiohttp.ClientSession, bridge: Bridge) -> tuple[int, list[str]]:
    async with http.get(f"{bridge.url}/readyz") as response:
        body = await response.json()
        return response.status, body["reasons"]


async def readyz_until(
    http: aiohttp.ClientSession,
    bridge: Bridge,
    predicate: Callable[[int, list[str]], bool],
    timeout: float = 10.0,
) -> list[tuple[int, list[str]]]:
    """Sample /readyz every 20 ms until ``predicate`` holds; every sample taken."""
    samples: list[tuple[int, list[str]]] = []
    async with asyncio.timeout(timeout):
        while True:
            samples.append(await readyz(http, bridge))
            if predicate(*samples[-1]):
                return samples
            await asyncio.sleep(0.02)


@pytest.fixture
def flicd_config(tmp_path: Path, sim: Simulator) -> Config:
    return make_config(
        tmp_path,
        flicd={"port": sim.port, "reconnect_max": 1, "ping_interval": 1},
        buttons=[{"id": "reception", "address": A}, {"id": "lab", "address": B}],
    )


def is_ready(status: int, reasons: list[str]) -> bool:
    return status == 200


async def test_readyz_names_a_button_whose_channel_flicd_removed_or_refused(
    sim: Simulator, flicd_config: Config, http: aiohttp.ClientSession
) -> None:
    """/readyz is 503 naming the button from the removal until a new channel is live."""
    async with running_bridge(flicd_config) as bridge:
        await readyz_until(http, bridge, is_ready)
        sim.refuse_channels(4)  # refused 4 more times: the reason lasts several backoffs
        sim.remove_channels(A, "CouldntLoadDevice")
        samples = await readyz_until(
            http, bridge, lambda s, r: any("MaxPendingConnectionsReached" in x for x in r)
        )
        assert samples[-1][0] == 503
        assert [r for r in samples[-1][1] if r.startswith("flicd: button reception")]
        assert not [r for r in samples[-1][1] if "button lab" in r]
        samples = await readyz_until(http, bridge, is_ready)
        assert all(status == 503 for status, _ in samples[:-1])
        sim.press(A, "single")
        await readyz_until(http, bridge, lambda s, r: bridge.buttons["reception"].last_press)


async def test_readyz_names_a_detached_controller(
    sim: Simulator, flicd_config: Config, http: aiohttp.ClientSession
) -> None:
    """Detached and Resetting: 503 naming the controller; Attached: 200 again."""
    async with running_bridge(flicd_config) as bridge:
        await readyz_until(http, bridge, is_ready)
        for state in ("Detached", "Resetting"):
            sim.controller(state)
            samples = await readyz_until(http, bridge, lambda s, r: s == 503)
            assert samples[-1][1] == [f"flicd: Bluetooth controller is {state}"]
        sim.controller("Attached")
        await readyz_until(http, bridge, is_ready)


@pytest.mark.parametrize("mode", ["hang", "garbage", "huge"])
async def test_readyz_stays_503_against_a_broken_flicd(
    sim: Simulator, flicd_config: Config, http: aiohttp.ClientSession, mode: str
) -> None:
    """A hung or garbling flicd keeps /readyz at 503 over several reconnects (it used to
    flip back to 200 after each one), and 200 returns only once flicd answers again."""
    async with running_bridge(flicd_config) as bridge:
        await readyz_until(http, bridge, is_ready)
        if mode == "hang":
            sim.hang()
        else:
            sim.garble(mode)
        sim.drop()
        await readyz_until(http, bridge, lambda s, r: s == 503)
        loop = asyncio.get_running_loop()
        until = loop.time() + 4.0  # several 5 s-ping-less reconnects at reconnect_max 1 s
        samples: list[tuple[int, list[str]]] = []
        while loop.time() < until:
            samples.append(await readyz(http, bridge))
            await asyncio.sleep(0.05)
        assert samples and all(status == 503 for status, _ in samples)
        sim.unhang()
        sim.garble(None)
        await readyz_until(http, bridge, is_ready, timeout=20)
