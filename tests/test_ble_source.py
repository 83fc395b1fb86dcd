"""BleSource against a fake of pyflic-ble's FlicClient: pairing, sessions, gestures, reconnects.

The fake has the real client's interface (checked against the installed library) and is
scripted per test: which buttons advertise, which sessions fail, what the buttons send.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import random
import stat
import sys
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from flicbridge.domain import Click
from flicbridge.sources import ble
from flicbridge.sources.ble import (
    BleSource,
    Pairing,
    battery_percent,
    read_pairings,
    write_pairings,
)
from tests.conftest import make_config, running
from tests.receiver import Receiver
from tests.test_flicd_source import CeilingRandom, Recorder, eventually
from tests.test_flicd_source import running as running_source  # any source with run()

if sys.version_info < (3, 12):
    pytest.skip(
        "the BLE source needs Python >= 3.12 (pyflic-ble requires it); "
        "run this file with a 3.12 venv: pip install -e '.[dev,ble]'",
        allow_module_level=True,
    )

pyflic_ble = pytest.importorskip(
    "pyflic_ble", reason="pyflic-ble is not installed: pip install -e '.[dev,ble]'"
)
flic_const = pytest.importorskip("pyflic_ble.const")
BleakError = pytest.importorskip("bleak.exc").BleakError
DeviceType = pyflic_ble.DeviceType
FlicClient = pyflic_ble.FlicClient
FlicProtocolError = pyflic_ble.FlicProtocolError
FlicState = pyflic_ble.FlicState
PushTwistMode = pyflic_ble.PushTwistMode

A = "80:e4:da:70:00:01"
B = "80:e4:da:70:00:02"
DOWN, UP = flic_const.EVENT_TYPE_DOWN, flic_const.EVENT_TYPE_UP
CLICK, DOUBLE, HOLD = (
    flic_const.EVENT_TYPE_CLICK,
    flic_const.EVENT_TYPE_DOUBLE_CLICK,
    flic_const.EVENT_TYPE_HOLD,
)
SETTLE = 0.05
KEY = bytes(range(16))


# -- the fake library boundary ------------------------------------------------------------


class FakeDevice:
    """Stands for bleak's BLEDevice: the source only passes it on."""

    def __init__(self, address: str) -> None:
        self.address = address


class Radio:
    """The fake world around the fake clients: advertisements, scripted failures, sessions."""

    def __init__(self) -> None:
        self.in_range: set[str] = set()
        self.scan_error: Exception | None = None
        self.connect_failures: dict[str, deque[Exception]] = defaultdict(deque)
        self.start_failures: dict[str, deque[Exception]] = defaultdict(deque)
        self.queued: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
        self.pairing = (7, KEY, "BG00-A00001", 2950, 0, b"uuid", 11)
        self.volts = 3.0
        self.battery_error: Exception | None = None
        self.clients: list[FakeFlicClient] = []
        self.scans = 0
        self.clock_base_ms = 5_000_000  # the buttons' clocks did not start with ours

    def factory(self, *args: Any, **kwargs: Any) -> FakeFlicClient:
        client = FakeFlicClient(*args, **kwargs)
        client.radio = self
        self.clients.append(client)
        return client

    async def find_device(self, address: str, timeout: float) -> FakeDevice | None:
        self.scans += 1
        await asyncio.sleep(0)
        if self.scan_error is not None:
            raise self.scan_error
        return FakeDevice(address) if address.lower() in self.in_range else None

    def button_ms(self) -> int:
        return self.clock_base_ms + int(asyncio.get_running_loop().time() * 1000)

    def sessions(self, address: str) -> list[FakeFlicClient]:
        return [c for c in self.clients if c.address.lower() == address and c.started]

    def session(self, address: str) -> FakeFlicClient:
        return self.sessions(address)[-1]


class FakeFlicClient:
    """pyflic_ble.FlicClient's interface as the source uses it, scripted through a Radio."""

    radio: Radio

    def __init__(
        self,
        address: str,
        ble_device: Any = None,
        pairing_id: int | None = None,
        pairing_key: bytes | None = None,
        serial_number: str | None = None,
        device_type: DeviceType | None = None,
        sig_bits: int = 0,
        push_twist_mode: PushTwistMode = PushTwistMode.DEFAULT,
    ) -> None:
        self.address = address
        self.ble_device = ble_device
        self.pairing_id = pairing_id
        self.pairing_key = pairing_key
        self.serial_number = serial_number
        self.sig_bits = sig_bits
        self._device_type = device_type or (
            DeviceType.from_serial_number(serial_number) if serial_number else DeviceType.FLIC2
        )
        self.on_button_event: Any = None
        self.on_disconnect: Any = None
        self._state = FlicState(
            connected=False, battery_voltage=None, firmware_version=None, device_name=None
        )
        self._connected = False
        self.calls: list[str] = []
        self.started = False
        self.stopped = False

    @property
    def state(self) -> FlicState:
        return self._state

    @property
    def device_type(self) -> DeviceType:
        return self._device_type

    @property
    def is_connected(self) -> bool:
        return self._connected

    async def connect(self) -> None:
        self.calls.append("connect")
        await asyncio.sleep(0)
        failures = self.radio.connect_failures[self.address.lower()]
        if failures:
            raise failures.popleft()
        self._connected = True

    async def full_verify_pairing(self) -> tuple[int, bytes, str, int, int, bytes, int]:
        self.calls.append("full_verify_pairing")
        await asyncio.sleep(0)
        return self.radio.pairing

    async def start(self) -> None:
        self.calls.append("start")
        await asyncio.sleep(0)
        failures = self.radio.start_failures[self.address.lower()]
        if failures:
            raise failures.popleft()
        if not self.pairing_id or not self.pairing_key:
            raise FlicProtocolError("No pairing credentials available")
        self._connected = True
        self._state.connected = True
        self._state.battery_voltage = self.radio.volts
        self.started = True
        # As the real client: queued events arrive once button events are initialised.
        for kind, data in self.radio.queued.pop(self.address.lower(), []):
            self.on_button_event(kind, data)

    async def stop(self) -> None:
        self.calls.append("stop")
        self.stopped = True
        self._connected = False
        self._state.connected = False

    async def disconnect(self) -> None:
        self.calls.append("disconnect")
        self._connected = False

    async def get_battery_voltage(self) -> float:
        self.calls.append("get_battery_voltage")
        await asyncio.sleep(0)
        if self.radio.battery_error is not None:
            raise self.radio.battery_error
        return self.radio.volts

    # -- scripting (not part of the library's interface) -----------------------------

    def emit(
        self, *kinds: str, queued: bool = False, ts: int | None = None, index: int | None = None
    ) -> None:
        """The button sends these events now (pyflic-ble's on_button_event)."""
        for kind in kinds:
            data: dict[str, Any] = {
                "timestamp_ms": self.radio.button_ms() if ts is None else ts,
                "was_queued": queued,
            }
            if index is not None:
                data["button_index"] = index
            assert self.on_button_event is not None, "no listener on this client"
            self.on_button_event(kind, data)

    def drop(self) -> None:
        """The BLE link is lost (pyflic-ble calls on_disconnect)."""
        self._connected = False
        self._state.connected = False
        if self.on_disconnect is not None:
            self.on_disconnect()


# -- helpers ------------------------------------------------------------------------------


@pytest.fixture
def radio() -> Radio:
    return Radio()


def pair(path: Path, *addresses: str) -> None:
    write_pairings(path, {a: Pairing(7, KEY, f"BG00-A0000{i}") for i, a in enumerate(addresses)})


def make_source(radio: Radio, recorder: Recorder, path: Path, **overrides: Any) -> BleSource:
    options: dict[str, Any] = {
        "buttons": {A.upper(): "reception", B: "lab"},
        "listener": recorder,
        "pairings": path,
        "reconnect_max": 0.2,
        "scan_timeout": 0.05,
        "settle": SETTLE,
        "rescan_pause": 0.01,
        "client_factory": radio.factory,
        "find_device": radio.find_device,
        "rng": random.Random(1),
    }
    options.update(overrides)
    return BleSource(**options)


@contextlib.asynccontextmanager
async def connected(
    radio: Radio, tmp_path: Path, **overrides: Any
) -> AsyncIterator[tuple[FakeFlicClient, Recorder]]:
    """A running source with button A paired, in range and in a session."""
    path = tmp_path / "ble-pairings.json"
    pair(path, A, B)
    radio.in_range.add(A)
    recorder = Recorder()
    async with running_source(make_source(radio, recorder, path, **overrides)):
        await recorder.wait_count(("button", "reception", True))
        yield radio.session(A), recorder


def clicks(recorder: Recorder) -> list[Click]:
    return [p.click for p in recorder.presses]


async def settled() -> None:
    """Long enough for every owed click to have been inferred."""
    await asyncio.sleep(SETTLE * 4)


# -- the library boundary -------------------------------------------------------------------


def test_fake_has_the_library_interface() -> None:
    """The fake's constructor and every member the source uses match pyflic_ble.FlicClient."""

    def shape(func: Any) -> list[tuple[str, Any]]:
        return [(p.name, p.default) for p in inspect.signature(func).parameters.values()]

    assert shape(FakeFlicClient.__init__) == shape(FlicClient.__init__)
    for name in ("connect", "full_verify_pairing", "start", "stop", "get_battery_voltage"):
        real = getattr(FlicClient, name)
        assert inspect.iscoroutinefunction(real), name
        assert shape(getattr(FakeFlicClient, name)) == shape(real), name
    for name in ("state", "device_type", "is_connected"):
        assert isinstance(getattr(FlicClient, name), property), name
    client = FlicClient(A.upper())
    assert client.on_button_event is None and client.on_disconnect is None
    assert {f for f in FlicState.__dataclass_fields__} >= {"connected", "battery_voltage"}


def test_library_builds_the_real_client_from_a_pairing() -> None:
    """library() gives pyflic-ble's FlicClient, which takes the source's arguments."""
    factory, find_device = ble.library()
    assert factory is FlicClient
    assert inspect.iscoroutinefunction(find_device)
    for serial, kind in (("BG00-A00001", DeviceType.FLIC2), ("D000-A00001", DeviceType.DUO)):
        client = factory(
            A.upper(),
            ble_device=None,
            pairing_id=7,
            pairing_key=KEY,
            serial_number=serial,
            sig_bits=0,
        )
        assert client.device_type is kind
        assert not client.is_connected


def test_the_decoder_speaks_the_library_event_names() -> None:
    """The event names the source decodes are pyflic-ble's own constants."""
    assert (DOWN, UP, CLICK, DOUBLE, HOLD) == ("down", "up", "click", "double_click", "hold")


# -- pairing ----------------------------------------------------------------------------------


async def test_an_unpaired_button_is_paired_once_and_its_key_kept(
    radio: Radio, tmp_path: Path
) -> None:
    """Pairing runs once (connect + full verify), its key is saved 0600, sessions use it."""
    path = tmp_path / "state" / "ble-pairings.json"
    radio.in_range.add(A)
    recorder = Recorder()
    async with running_source(make_source(radio, recorder, path)):
        await recorder.wait_count(("button", "reception", True))
    pairer, session = radio.clients[0], radio.session(A)
    assert pairer.calls == ["connect", "full_verify_pairing", "stop"]
    assert pairer.pairing_id is None
    assert (session.pairing_id, session.pairing_key, session.serial_number) == (
        7,
        KEY,
        "BG00-A00001",
    )
    assert session.address == A.upper() and isinstance(session.ble_device, FakeDevice)
    assert any("not paired" in e[2] for e in recorder.of("button") if e[0] == "reception")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    saved = json.loads(path.read_text())["buttons"]
    assert saved[A]["pairing_key"] == KEY.hex()
    assert read_pairings(path) == {A: Pairing(7, KEY, "BG00-A00001", 0)}
    assert KEY.hex() not in repr(read_pairings(path))

    radio.clients.clear()
    recorder = Recorder()
    async with running_source(make_source(radio, recorder, path)):
        await recorder.wait_count(("button", "reception", True))
    assert [c.calls[0] for c in radio.clients] == ["start"]  # no second pairing


async def test_a_failed_pairing_is_retried(radio: Radio, tmp_path: Path) -> None:
    """A button not in pairing mode fails to pair, is reported so, and pairs later."""
    radio.in_range.add(A)
    radio.connect_failures[A].extend([FlicProtocolError("Failed to connect: refused")] * 2)
    recorder = Recorder()
    path = tmp_path / "ble-pairings.json"
    async with running_source(make_source(radio, recorder, path)):
        await recorder.wait_count(("button", "reception", True))
    details = [e[2] for e in recorder.of("button") if e[0] == "reception" and not e[1]]
    assert any("Failed to connect: refused" in d for d in details)
    assert read_pairings(path)[A].pairing_id == 7


async def test_an_unreadable_pairing_file_stops_only_this_source(
    radio: Radio, tmp_path: Path
) -> None:
    """A damaged pairing file is reported (source down, buttons down), not overwritten."""
    path = tmp_path / "ble-pairings.json"
    path.write_text("{not json")
    recorder = Recorder()
    await asyncio.wait_for(make_source(radio, recorder, path).run(), 5)
    (link,) = recorder.of("link")
    assert link[:2] == ("ble", False) and str(path) in link[2]
    assert ("reception", False, "BLE source unavailable") in recorder.of("button")
    assert path.read_text() == "{not json" and not radio.clients


async def test_without_the_library_the_source_says_how_to_install_it(
    radio: Radio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No pyflic-ble importable: the source reports the missing extra and stops."""
    monkeypatch.setitem(sys.modules, "pyflic_ble", None)  # makes the import fail
    recorder = Recorder()
    source = make_source(
        radio, recorder, tmp_path / "p.json", client_factory=None, find_device=None
    )
    await asyncio.wait_for(source.run(), 5)
    (link,) = recorder.of("link")
    assert link[:2] == ("ble", False) and "pip install 'flicbridge[ble]'" in link[2]


# -- gestures ----------------------------------------------------------------------------------


async def test_single_double_and_hold_arrive_once_each(radio: Radio, tmp_path: Path) -> None:
    """click → SINGLE, a double click → DOUBLE, hold (and its release) → HOLD; source ble."""
    async with connected(radio, tmp_path) as (client, recorder):
        client.emit(DOWN, UP, CLICK)
        client.emit(DOWN, UP, DOWN, DOUBLE)
        client.emit(DOWN, HOLD, UP)
        await settled()
    assert clicks(recorder) == [Click.SINGLE, Click.DOUBLE, Click.HOLD]
    press = recorder.presses[0]
    assert press.button_id == "reception" and press.source == "ble"
    assert not press.queued and press.delay_s < SETTLE


async def test_a_click_known_single_at_release_is_not_lost(radio: Radio, tmp_path: Path) -> None:
    """pyflic-ble reports the button's "up, single click" as plain "up": still one SINGLE."""
    async with connected(radio, tmp_path) as (client, recorder):
        client.emit(DOWN, UP)
        await recorder.wait_for(lambda: len(recorder.presses) == 1)
        client.emit(CLICK)  # a timeout that arrives late belongs to the same click
        await settled()
    assert clicks(recorder) == [Click.SINGLE]
    assert recorder.presses[0].delay_s >= SETTLE * 0.9  # stamped with its release time


async def test_quick_clicks_that_are_no_double_click_are_each_a_single(
    radio: Radio, tmp_path: Path
) -> None:
    """Two presses without "double_click" between them are two single clicks."""
    async with connected(radio, tmp_path) as (client, recorder):
        client.emit(DOWN, UP, DOWN, UP)
        await settled()
        client.emit(DOWN, UP, CLICK, DOWN, UP, CLICK)
        await settled()
    assert clicks(recorder) == [Click.SINGLE] * 4


async def test_a_double_click_whose_second_press_is_held_is_a_hold(
    radio: Radio, tmp_path: Path
) -> None:
    """An owed click followed by a held press is reported as the hold only, as flicd does."""
    async with connected(radio, tmp_path) as (client, recorder):
        client.emit(DOWN, UP, DOWN)
        await asyncio.sleep(SETTLE * 3)  # pressed past the settle time: nothing is decided yet
        assert recorder.presses == []
        client.emit(HOLD, UP)
        await settled()
    assert clicks(recorder) == [Click.HOLD]


async def test_duo_buttons_and_gestures(radio: Radio, tmp_path: Path) -> None:
    """Both Duo buttons press the configured button; swipes and rotation are not presses."""
    async with connected(radio, tmp_path) as (client, recorder):
        client.emit(DOWN, index=0)
        client.emit(DOWN, UP, CLICK, index=1)  # the small button, while the big one is down
        client.emit(UP, DOWN, HOLD, index=0)  # the big one: a double click that is held ...
        client.emit(flic_const.EVENT_TYPE_SWIPE_LEFT, index=1)
        client.emit(flic_const.EVENT_TYPE_ROTATE_CLOCKWISE, index=0)
        client.emit(DOUBLE, index=0)  # ... released: Duo's "double click that was also a hold"
        await settled()
    assert clicks(recorder) == [Click.SINGLE, Click.HOLD]


async def test_queued_presses_are_stamped_with_their_age(radio: Radio, tmp_path: Path) -> None:
    """Presses made out of range arrive queued; their age comes from the button's clock."""
    async with connected(radio, tmp_path) as (client, recorder):
        client.emit(DOWN, UP, CLICK)  # live: ties the button's clock to ours
        await recorder.wait_for(lambda: len(recorder.presses) == 1)
        client.drop()
        now = radio.button_ms()
        radio.queued[A] = [
            (kind, {"timestamp_ms": now - 20_000 + i, "was_queued": True})
            for i, kind in enumerate((DOWN, UP, CLICK))
        ] + [(DOWN, {"timestamp_ms": now - 5_000, "was_queued": True})]
        radio.queued[A] += [(HOLD, {"timestamp_ms": now - 4_000, "was_queued": True})]
        await recorder.wait_for(lambda: len(recorder.presses) == 3)
    late = recorder.presses[1:]
    assert [p.click for p in late] == [Click.SINGLE, Click.HOLD]
    assert all(p.queued and p.source == "ble" for p in late)
    assert 19.5 <= late[0].delay_s <= 22
    assert 3.5 <= late[1].delay_s <= 6
    assert late[0].pressed_at < late[1].pressed_at


async def test_a_queued_press_of_unknown_age_is_still_delivered(
    radio: Radio, tmp_path: Path
) -> None:
    """Without a live event to set the clock (or after a reboot) the age is 0, not a guess."""
    radio.queued[A] = [(DOWN, {"timestamp_ms": 10, "was_queued": True})]
    radio.queued[A] += [(HOLD, {"timestamp_ms": 1010, "was_queued": True})]
    async with connected(radio, tmp_path) as (client, recorder):
        await recorder.wait_for(lambda: len(recorder.presses) == 1)
        client.emit(DOWN, UP, CLICK)  # now the clock is known; the button then reboots:
        await recorder.wait_for(lambda: len(recorder.presses) == 2)
        client.emit(DOWN, UP, CLICK, queued=True, ts=3)
        await recorder.wait_for(lambda: len(recorder.presses) == 3)
    first, _, rebooted = recorder.presses
    assert first.queued and first.delay_s == 0.0 and first.click is Click.HOLD
    assert rebooted.queued and rebooted.delay_s < 1.0


# -- links, reconnects, battery ----------------------------------------------------------------


async def test_session_failures_back_off_and_recover(radio: Radio, tmp_path: Path) -> None:
    """Failed sessions are reported with their reason; retries back off, capped, then connect."""
    radio.start_failures[A].extend(
        [FlicProtocolError("Failed to connect: le-connection-abort-by-local")] * 4
    )
    rng = CeilingRandom()
    async with connected(radio, tmp_path, reconnect_max=2.0, rng=rng) as (client, recorder):
        assert client.started
    details = [e[2] for e in recorder.of("button") if e[0] == "reception"]
    assert "FlicProtocolError: Failed to connect: le-connection-abort-by-local" in details
    assert rng.ceilings[:4] == [0.5, 1.0, 2.0, 2.0]
    assert len(radio.sessions(A)) == 1 and all(c.stopped for c in radio.clients[:4])


async def test_a_lost_link_is_reported_and_a_new_session_started(
    radio: Radio, tmp_path: Path
) -> None:
    """A dropped link: the button is reported disconnected, its client stopped, a new one used."""
    async with connected(radio, tmp_path) as (first, recorder):
        first.drop()
        await recorder.wait_count(("button", "reception", False, "disconnected"))
        await recorder.wait_count(("button", "reception", True), 2)
        second = radio.session(A)
        assert second is not first and first.stopped and first.on_button_event is None
        second.emit(DOWN, HOLD, UP)
        await recorder.wait_for(lambda: len(recorder.presses) == 1)
    assert recorder.presses[0].click is Click.HOLD


async def test_a_release_lost_with_the_link_still_counts(radio: Radio, tmp_path: Path) -> None:
    """An owed click whose second press was cut off by a lost link is still a single."""
    async with connected(radio, tmp_path) as (client, recorder):
        client.emit(DOWN, UP, DOWN)
        client.drop()
        await recorder.wait_for(lambda: len(recorder.presses) == 1)
    assert clicks(recorder) == [Click.SINGLE]


async def test_a_button_out_of_range_is_looked_for_without_backoff(
    radio: Radio, tmp_path: Path
) -> None:
    """Not advertising: reported once, scanned for again at once, connected when back."""
    path = tmp_path / "ble-pairings.json"
    pair(path, A)
    recorder = Recorder()
    rng = CeilingRandom()
    async with running_source(make_source(radio, recorder, path, rng=rng)):
        await eventually(lambda: radio.scans >= 20)
        radio.in_range.add(A)
        await recorder.wait_count(("button", "reception", True))
    misses = [e for e in recorder.of("button") if e[0] == "reception" and not e[1]]
    assert len(misses) == 1 and "not in range" in misses[0][2]
    assert rng.ceilings == []  # no backoff while merely out of range
    assert recorder.of("link")[0][:2] == ("ble", True)


async def test_a_scan_failure_reports_the_adapter(radio: Radio, tmp_path: Path) -> None:
    """When BlueZ or the adapter fails, the BLE source is down with bleak's reason."""
    radio.scan_error = BleakError("No Bluetooth adapters found.")
    path = tmp_path / "ble-pairings.json"
    pair(path, A)
    recorder = Recorder()
    async with running_source(make_source(radio, recorder, path)):
        await recorder.wait_count(("link", "ble", False))
        radio.scan_error = None
        radio.in_range.add(A)
        await recorder.wait_count(("button", "reception", True))
    links = recorder.of("link")
    assert links[0] == (
        "ble",
        False,
        "Bluetooth scan failed: BleakError: No Bluetooth adapters found.",
    )
    assert links[-1][:2] == ("ble", True) and len(links) == 2


async def test_battery_is_reported_as_flics_percentage(radio: Radio, tmp_path: Path) -> None:
    """The voltage read at session start and polled later is reported as a percentage."""
    async with connected(radio, tmp_path, battery_interval=0.05) as (client, recorder):
        await recorder.wait_count(("battery", "reception", 100))
        radio.volts = 2.8
        await recorder.wait_count(("battery", "reception", 27))
        assert "get_battery_voltage" in client.calls


async def test_a_button_that_cannot_answer_gets_a_new_session(radio: Radio, tmp_path: Path) -> None:
    """A failed battery request ends the session like a lost link."""
    async with connected(radio, tmp_path, battery_interval=0.05) as (first, recorder):
        radio.battery_error = TimeoutError()
        await recorder.wait_for(lambda: len(radio.sessions(A)) > 1)
        radio.battery_error = None
    reasons = [e[2] for e in recorder.of("button") if e[0] == "reception" and not e[1]]
    assert "battery request failed: TimeoutError" in reasons
    assert first.stopped


@pytest.mark.parametrize(
    ("volts", "percent"),
    [(3.2, 100), (3.0, 100), (2.95, 71), (2.9, 42), (2.8, 27), (2.74, 18), (2.44, 6), (2.1, 0)],
)
def test_battery_percent_follows_flics_curve(volts: float, percent: int) -> None:
    """Voltage → percentage as Flic's own library estimates it for a Flic 2."""
    assert battery_percent(volts) == percent


async def test_stopping_the_source_stops_the_session(radio: Radio, tmp_path: Path) -> None:
    """Cancelling the source stops the client it was using."""
    async with connected(radio, tmp_path) as (client, _recorder):
        pass
    assert client.calls[-1] == "stop"


# -- through the bridge ---------------------------------------------------------------------------


async def test_a_ble_press_reaches_the_sink(
    radio: Radio, tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run() with a BLE button: a press goes through the bridge to an AlertOps sink."""
    monkeypatch.setattr(ble, "library", lambda: (radio.factory, radio.find_device))
    pair(tmp_path / "ble-pairings.json", A)  # beside the store, where the bridge keeps it
    radio.in_range.add(A)
    config = make_config(
        tmp_path,
        buttons=[{"id": "reception", "source": "ble", "address": A, "info": "Front desk"}],
        sinks=[{"id": "ao", "type": "alertops", "url": f"{receiver.url}/POSTAlert/KEY/Flic"}],
    )
    async with running(config) as bridge:
        async with asyncio.timeout(10):
            while not bridge.buttons["reception"].connected:
                await asyncio.sleep(0.01)
        assert bridge.health.source_up["ble"]
        radio.session(A).emit(DOWN, UP, CLICK)
        (got,) = await receiver.wait_for(1)
        assert got.body["flic_nameId"] == "reception"
        assert got.body["flic_state"] == "On" and got.body["info"] == "Front desk"
        events = await bridge.store.recent_events(1)
        assert events[0]["click"] == "single_click"
