"""The BLE source: Flic 2 and Duo buttons over BlueZ with the official ``pyflic-ble``, no flicd.

One connection loop per configured button: find the button's advertisement (bleak), pair
it once if this bridge holds no pairing for it (the button must be in pairing mode: hold
it 7 s until it blinks), then open a session with the stored pairing
(``FlicClient.start``: connect, quick verify, init button events), report presses until
the link drops, and start again. Failures back off with capped, fully jittered
exponential delays from 0.5 s (as the flicd source); a button that is simply not
advertising is looked for again at once, since the scan itself is the wait. pyflic-ble's
own reconnect loop is never used: every session gets a new client, stopped when it ends.

Pairings (the key a session is verified with) are kept in a JSON file beside the store,
mode 0600, written atomically off the event loop. The key is never logged.

Offline queue. While a button is out of range it keeps presses and delivers them, marked
queued, on the next session. pyflic-ble 0.2.5 asks the button to keep at most 30 packets
of events (a press is 2 to 4 events: down, up, click, hold), none older than 60 s; these
values are fixed inside the library (``init_button_events`` takes no parameter; the wire
format would allow 31 packets and about 12 days), so a press made
more than about a minute before the button is back in range is lost by the button. With
flicd such presses arrive even hours late: use it where buttons leave range for long.

Gestures. pyflic-ble reports "down", "up", "click" (the single-click timeout),
"double_click" and "hold", and maps the button's "up, single click" event (a click the
button already knows is single when it is released; no timeout follows) to a plain
"up". The official Flic 2 C module reports that event as a single click; so does this
source: see ``GestureDecoder``. A queued press's age is estimated from the button's
clock (``timestamp_ms``), offset by the latest live event's arrival.

The pyflic-ble and bleak imports happen in ``run`` only, so Python 3.11 installs (without
the ``ble`` extra) never load them.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import json
import os
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from flicbridge.delivery import backoff_delay
from flicbridge.domain import Click, Press, utcnow
from flicbridge.errors import FlicbridgeError
from flicbridge.sources import SourceListener

log = structlog.get_logger(__name__)

SOURCE = "ble"
BACKOFF_INITIAL_S = 0.5
RESCAN_PAUSE_S = 0.5  # between scans that found nothing: the scan timeout paces the loop
SETTLE_S = 1.0  # an "up" not followed by click/double/press within this was a single click
BATTERY_INTERVAL_S = 3 * 3600.0  # as the Flic 2 C module
COMMAND_TIMEOUT_S = 15.0  # one request to a connected button (the library waits 10 s)
STOP_TIMEOUT_S = 10.0
# The age limit of the button's offline queue as pyflic-ble 0.2.5 sets it (not configurable).
BUTTON_QUEUE_AGE_S = 60.0
# A queued event older than this by our estimate means the estimate is wrong (the button
# rebooted and its clock restarted): the button drops events after BUTTON_QUEUE_AGE_S.
_PLAUSIBLE_AGE_S = BUTTON_QUEUE_AGE_S + 120.0
PAIR_HINT = "hold the button 7 s until it blinks to pair it"

ClientFactory = Callable[..., Any]
"""Builds a ``pyflic_ble.FlicClient``: (address, ble_device=..., pairing_id=..., ...)."""
DeviceFinder = Callable[[str, float], Awaitable[Any]]
"""(address, timeout) → the advertising ``BLEDevice``, or None if it was not seen."""


def library() -> tuple[ClientFactory, DeviceFinder]:
    """pyflic-ble's client class and bleak's scanner lookup; ImportError without the extra."""
    pyflic_ble: Any = importlib.import_module("pyflic_ble")
    bleak: Any = importlib.import_module("bleak")

    async def find_device(address: str, timeout: float) -> Any:  # noqa: ASYNC109
        return await bleak.BleakScanner.find_device_by_address(address, timeout=timeout)

    factory: ClientFactory = pyflic_ble.FlicClient
    return factory, find_device


def battery_percent(volts: float) -> int:
    """Flic's own rough estimate for a Flic 2 coin cell (flic2lib-android ``BatteryLevel``).

    Coarse above 50 %; below 2.74 V little is left.
    """
    mv = round(volts * 1000)
    if mv >= 3000:
        return 100
    if mv >= 2900:
        return 42 + (mv - 2900) * 58 // 100
    if mv >= 2740:
        return 18 + (mv - 2740) * 24 // 160
    if mv >= 2440:
        return 6 + (mv - 2440) * 12 // 300
    if mv >= 2100:
        return (mv - 2100) * 6 // 340
    return 0


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- pairings ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pairing:
    """What a session with one button is verified with (``FlicClient`` credentials)."""

    pairing_id: int
    pairing_key: bytes
    serial_number: str
    sig_bits: int = 0

    def __repr__(self) -> str:  # the key stays out of logs and tracebacks
        return f"Pairing(pairing_id={self.pairing_id}, serial_number={self.serial_number!r})"


class PairingFileError(FlicbridgeError):
    """The pairing file exists but cannot be read or understood."""


def read_pairings(path: Path) -> dict[str, Pairing]:
    """Pairings by lower-case address; empty when the file does not exist yet."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise PairingFileError(f"cannot read {path}: {exc.strerror}") from None
    try:
        entries = json.loads(raw)["buttons"]
        return {
            address.lower(): Pairing(
                pairing_id=int(entry["pairing_id"]),
                pairing_key=bytes.fromhex(entry["pairing_key"]),
                serial_number=str(entry["serial_number"]),
                sig_bits=int(entry.get("sig_bits", 0)),
            )
            for address, entry in entries.items()
        }
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PairingFileError(f"{path} is not a flicbridge pairing file: {exc!r}") from None


def write_pairings(path: Path, pairings: Mapping[str, Pairing]) -> None:
    """Replace the file atomically (readable by its owner only); blocking: run in a thread."""
    data = {
        "version": 1,
        "buttons": {
            address: {
                "pairing_id": p.pairing_id,
                "pairing_key": p.pairing_key.hex(),
                "serial_number": p.serial_number,
                "sig_bits": p.sig_bits,
            }
            for address, p in sorted(pairings.items())
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -- gestures ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ButtonEvent:
    """One pyflic-ble button event as it arrived."""

    queued: bool
    timestamp_ms: int | None  # the button's clock
    arrived: float  # loop time


class GestureDecoder:
    """pyflic-ble's events of one physical button → exactly one Click per gesture.

    "click" (single-click timeout) → SINGLE, "double_click" → DOUBLE, "hold" → HOLD.
    An "up" that ends a press without a hold is *owed*: the button sends "click" after
    its double-click window, "double_click" at the next release, or nothing at all when
    the "up" itself was its "up, single click" event (which pyflic-ble reports as "up").
    So the owed click is a SINGLE when nothing resolved it within ``settle`` seconds, or
    when the next press ends as another plain "up". A "click" that arrives after that
    inference, before the next press, is the same click and is not reported twice.
    A press that became a hold while a click was owed is a hold only (as flicd reports
    a double click whose second press was held).
    """

    def __init__(self, emit: Callable[[Click, ButtonEvent], None], settle: float) -> None:
        self._emit = emit
        self._settle = settle
        self._pressed = False
        self._held = False
        self._owed: ButtonEvent | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._single_sent = False  # for the current press: a repeated "click" is ignored

    def feed(self, kind: str, event: ButtonEvent) -> None:
        """One pyflic-ble event type ("down", "up", "click", "double_click", "hold", ...)."""
        if kind == "down":
            self._pressed, self._held, self._single_sent = True, False, False
        elif kind == "hold":
            self._forget_owed()
            self._pressed, self._held = True, True
            self._emit(Click.HOLD, event)
        elif kind == "up":
            self._pressed = False
            if self._held:
                self._held = False
                return
            self._pay_owed()  # no double click followed the earlier release: it was single
            self._owed = event
            self._timer = asyncio.get_running_loop().call_later(self._settle, self._on_settled)
        elif kind == "click":
            if self._owed is not None:
                owed = self._owed
                self._forget_owed()
                self._single(owed)
            elif self._single_sent:
                log.debug("ble_click_already_reported")
            else:
                self._single(event)
        elif kind == "double_click":
            self._forget_owed()
            self._pressed = False
            if self._held:  # Duo: a double click whose second press was held
                self._held = False
                return
            self._emit(Click.DOUBLE, event)
        # swipes, rotation and selector events are not gestures of an alarm button

    def released(self) -> None:
        """The link dropped: nobody knows whether the button is still down."""
        self._pressed = False
        self._held = False

    def close(self) -> None:
        """Stop the settle timer (the source is stopping)."""
        self._forget_owed()

    def _single(self, event: ButtonEvent) -> None:
        self._single_sent = True
        self._emit(Click.SINGLE, event)

    def _pay_owed(self) -> None:
        if self._owed is not None:
            owed = self._owed
            self._forget_owed()
            self._single(owed)

    def _forget_owed(self) -> None:
        self._owed = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_settled(self) -> None:
        self._timer = None
        if self._owed is None:
            return
        if self._pressed:
            # A second press is under way: its end tells whether this was a double click.
            self._timer = asyncio.get_running_loop().call_later(self._settle, self._on_settled)
            return
        self._pay_owed()


# -- the source ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Button:
    address: str  # lower case, as in the configuration
    button_id: str


class BleSource:
    """Reports presses, links and battery levels of Flic 2 / Duo buttons over BLE."""

    def __init__(
        self,
        *,
        buttons: Mapping[str, str],
        listener: SourceListener,
        pairings: Path,
        reconnect_max: float = 30.0,
        scan_timeout: float = 10.0,
        start_timeout: float = 60.0,
        pair_timeout: float = 150.0,
        settle: float = SETTLE_S,
        battery_interval: float = BATTERY_INTERVAL_S,
        rescan_pause: float = RESCAN_PAUSE_S,
        client_factory: ClientFactory | None = None,
        find_device: DeviceFinder | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._buttons = [_Button(addr.lower(), button_id) for addr, button_id in buttons.items()]
        self._listener = listener
        self._pairing_path = pairings
        self._reconnect_max = reconnect_max
        self._scan_timeout = scan_timeout
        self._start_timeout = start_timeout
        self._pair_timeout = pair_timeout
        self._settle = settle
        self._battery_interval = battery_interval
        self._rescan_pause = rescan_pause
        self._client_factory = client_factory
        self._find_device = find_device
        self._rng = rng if rng is not None else random.Random()
        self._pairings: dict[str, Pairing] = {}
        self._save_lock = asyncio.Lock()
        self._decoders: dict[tuple[str, int], GestureDecoder] = {}
        self._clock_offset_ms: dict[str, float] = {}
        self._last_link: tuple[bool, str] | None = None
        self._last_button: dict[str, tuple[bool, str]] = {}

    async def run(self) -> None:
        """Keep every configured button connected until cancelled."""
        if self._client_factory is None or self._find_device is None:
            try:
                factory, finder = library()
            except ImportError as exc:
                self._give_up(
                    "pyflic-ble is not installed: the BLE source needs Python 3.12 and "
                    f"pip install 'flicbridge[ble]' ({exc})"
                )
                return
            self._client_factory = self._client_factory or factory
            self._find_device = self._find_device or finder
        try:
            self._pairings = await asyncio.to_thread(read_pairings, self._pairing_path)
        except PairingFileError as exc:
            self._give_up(f"{exc}; fix or remove it (removed: every button pairs again)")
            return
        try:
            async with asyncio.TaskGroup() as tg:
                for button in self._buttons:
                    tg.create_task(self._keep_connected(button), name=f"ble:{button.button_id}")
        finally:
            for decoder in self._decoders.values():
                decoder.close()

    # -- one button ---------------------------------------------------------------------

    async def _keep_connected(self, button: _Button) -> None:
        assert self._find_device is not None
        attempt = 0
        while True:
            served = False
            try:
                device = await self._find_device(button.address.upper(), self._scan_timeout)
            # bleak raises BleakError, D-Bus and OS errors when the adapter or BlueZ is missing.
            except Exception as exc:
                self._report_link(False, f"Bluetooth scan failed: {_describe(exc)}")
            else:
                self._report_link(True, "Bluetooth adapter scanning")
                if device is None:
                    detail = f"not in range: no advertisement within {self._scan_timeout:g} s"
                    self._report_button(button, False, detail)
                    await asyncio.sleep(self._rescan_pause)
                    continue
                try:
                    served = await self._session(button, device)
                # pyflic-ble (alpha) raises ValueError, TimeoutError, BleakError and its own.
                except Exception as exc:
                    self._report_button(button, False, _describe(exc))
            if served:
                attempt = 0  # the session was up: a fresh outage starts small
            delay = backoff_delay(
                attempt, initial=BACKOFF_INITIAL_S, cap=self._reconnect_max, rng=self._rng
            )
            attempt += 1
            log.debug("ble_reconnect_scheduled", button=button.button_id, delay_s=round(delay, 3))
            await asyncio.sleep(delay)

    async def _session(self, button: _Button, device: Any) -> bool:
        """Pair if needed, start a session, serve it until the link drops; True if it ran."""
        assert self._client_factory is not None
        pairing = self._pairings.get(button.address)
        if pairing is None:
            pairing = await self._pair(button, device)
        client = self._client_factory(
            button.address.upper(),
            ble_device=device,
            pairing_id=pairing.pairing_id,
            pairing_key=pairing.pairing_key,
            serial_number=pairing.serial_number,
            sig_bits=pairing.sig_bits,
        )
        lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def on_disconnect() -> None:
            if not lost.done():
                lost.set_result("disconnected")

        client.on_button_event = functools.partial(self._on_button_event, button)
        client.on_disconnect = on_disconnect
        try:
            try:
                async with asyncio.timeout(self._start_timeout):
                    await client.start()
            except Exception as exc:
                log.warning(
                    "ble_session_failed",
                    button=button.button_id,
                    error=_describe(exc),
                    hint=f"if the button was reset, remove it from {self._pairing_path} and "
                    + PAIR_HINT,
                )
                raise
            self._report_button(button, True, f"connected ({client.device_type})")
            volts = client.state.battery_voltage
            if volts is not None:
                self._report_battery(button, float(volts))
            reason = await self._serve(button, client, lost)
        finally:
            client.on_button_event = None
            client.on_disconnect = None
            for (button_id, _index), decoder in self._decoders.items():
                if button_id == button.button_id:
                    decoder.released()
            await self._stop(client)
        self._report_button(button, False, reason)
        return True

    async def _serve(self, button: _Button, client: Any, lost: asyncio.Future[str]) -> str:
        """Wait for the link to drop, asking for the battery level now and then; the reason."""
        while True:
            done, _ = await asyncio.wait({lost}, timeout=self._battery_interval)
            if done:
                return lost.result()
            try:
                async with asyncio.timeout(COMMAND_TIMEOUT_S):
                    volts = await client.get_battery_voltage()
            except Exception as exc:  # a button that cannot answer is as good as gone
                return f"battery request failed: {_describe(exc)}"
            self._report_battery(button, float(volts))

    async def _pair(self, button: _Button, device: Any) -> Pairing:
        """Pair a button this bridge has no key for (it must be in pairing mode)."""
        assert self._client_factory is not None
        self._report_button(button, False, f"not paired: pairing ({PAIR_HINT})")
        client = self._client_factory(button.address.upper(), ble_device=device)
        try:
            async with asyncio.timeout(self._pair_timeout):
                await client.connect()
                result = await client.full_verify_pairing()
        finally:
            await self._stop(client)
        pairing_id, pairing_key, serial_number, _battery, sig_bits, _uuid, _firmware = result
        pairing = Pairing(int(pairing_id), bytes(pairing_key), str(serial_number), int(sig_bits))
        self._pairings[button.address] = pairing
        log.info("ble_paired", button=button.button_id, serial=pairing.serial_number)
        try:
            async with self._save_lock:
                await asyncio.to_thread(write_pairings, self._pairing_path, dict(self._pairings))
        except OSError as exc:
            log.error(
                "ble_pairing_not_saved",
                button=button.button_id,
                path=str(self._pairing_path),
                error=str(exc),
                consequence="the button must be paired again after a restart",
            )
        return pairing

    async def _stop(self, client: Any) -> None:
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await client.stop()
        except Exception as exc:  # the session is over either way
            log.debug("ble_stop_failed", error=_describe(exc))

    # -- pyflic-ble callbacks (on the event loop) ---------------------------------------

    def _on_button_event(self, button: _Button, kind: str, data: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        stamp = data.get("timestamp_ms")
        event = ButtonEvent(
            queued=bool(data.get("was_queued", False)),
            timestamp_ms=stamp if isinstance(stamp, int) else None,
            arrived=loop.time(),
        )
        if not event.queued and event.timestamp_ms is not None:
            # The latest live event ties the button's clock to ours (follows reboots, drift).
            self._clock_offset_ms[button.button_id] = event.arrived * 1000 - event.timestamp_ms
        index = data.get("button_index")
        key = (button.button_id, index if isinstance(index, int) else 0)
        decoder = self._decoders.get(key)
        if decoder is None:
            decoder = GestureDecoder(functools.partial(self._emit, button), self._settle)
            self._decoders[key] = decoder
        log.debug(
            "ble_event", button=button.button_id, kind=kind, index=key[1], queued=event.queued
        )
        decoder.feed(kind, event)

    def _emit(self, button: _Button, click: Click, event: ButtonEvent) -> None:
        now = asyncio.get_running_loop().time()
        delay = now - event.arrived  # an inferred single click is reported after it happened
        if event.queued:
            delay += self._queued_age(button, event)
        delay = round(max(0.0, delay), 3)
        press = Press(
            button_id=button.button_id,
            click=click,
            received_at=utcnow(),
            delay_s=delay,
            queued=event.queued,
            source=SOURCE,
        )
        log.debug(
            "press_received",
            button=button.button_id,
            click=click.value,
            queued=event.queued,
            delay_s=delay,
        )
        self._listener.press(press)

    def _queued_age(self, button: _Button, event: ButtonEvent) -> float:
        """How long before its arrival a queued event happened; 0 when unknown."""
        offset = self._clock_offset_ms.get(button.button_id)
        if offset is None or event.timestamp_ms is None:
            log.info("ble_queued_press_age_unknown", button=button.button_id)
            return 0.0
        age = (event.arrived * 1000 - offset - event.timestamp_ms) / 1000
        if not -1.0 <= age <= _PLAUSIBLE_AGE_S:
            log.info("ble_queued_press_age_unknown", button=button.button_id, estimate_s=age)
            return 0.0
        return max(0.0, age)

    # -- reports ------------------------------------------------------------------------

    def _give_up(self, detail: str) -> None:
        log.error("ble_source_unavailable", detail=detail)
        self._report_link(False, detail)
        for button in self._buttons:
            self._report_button(button, False, "BLE source unavailable")

    def _report_link(self, up: bool, detail: str) -> None:
        if self._last_link == (up, detail):
            return
        self._last_link = (up, detail)
        if up:
            log.info("ble_adapter_up", detail=detail)
        else:
            log.warning("ble_adapter_down", detail=detail)
        self._listener.link(SOURCE, up, detail)

    def _report_button(self, button: _Button, connected: bool, detail: str) -> None:
        if self._last_button.get(button.button_id) == (connected, detail):
            return  # the same miss every scan is not news
        self._last_button[button.button_id] = (connected, detail)
        self._listener.button_link(button.button_id, connected, detail)

    def _report_battery(self, button: _Button, volts: float) -> None:
        percent = battery_percent(volts)
        log.debug("battery_reported", button=button.button_id, volts=volts, percent=percent)
        self._listener.battery(button.button_id, percent)
