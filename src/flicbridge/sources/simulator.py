"""A flicd stand-in: a real fliclib-protocol TCP server with virtual buttons.

The daemon, the official client libraries and the tests talk to it exactly as they
talk to flicd. Packets are encoded and decoded with pyflic's own tables
(``pyflic.FlicClient._EVENTS`` / ``_COMMANDS``): a 2-byte little-endian length
(opcode + payload), the opcode, the payload; Bluetooth addresses travel byte-reversed.

Behaviour worth knowing (mirrors flicd):

- Every connection channel receives all four button event families for a gesture
  (up/down, click/hold, single/double, single/double/hold); a client picks one.
- A press on a button that is out of range, or that no client has a channel for, is
  kept by the button and delivered later marked ``was_queued`` with its age in seconds.
- ``drop()`` closes every client socket, as a flicd restart does; button state survives.
- Faults flicd really shows, for tests: ``remove_channels`` (flicd removes a button's
  channels, EvtConnectionChannelRemoved), ``refuse_channels`` (the next channel requests
  get an error such as MaxPendingConnectionsReached), ``controller`` (the Bluetooth
  controller is Detached, Resetting or Attached again: EvtBluetoothControllerStateChange,
  and CmdGetInfo reports it), ``hang`` (silent with sockets open) and ``garble`` (every
  packet sent as random bytes, cut short, or after a 65,535-byte length header).

All methods must be called on the event loop the simulator was started on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import struct
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TextIO, TypeVar

import pyflic
import structlog

from flicbridge.domain import is_bd_addr

log = structlog.get_logger(__name__)

CLICKS = ("single", "double", "hold")
_E = TypeVar("_E", bound=Enum)
WIZARD_TIMEOUT_S = 20.0  # flicd gives up finding a button after 20 s

_Flic: Any = pyflic.FlicClient
_EVENT_OPCODE: dict[str, int] = {name: i for i, (name, _f, _n) in enumerate(_Flic._EVENTS)}
_EVENT_STRUCT = [struct.Struct(fmt) for _name, fmt, _fields in _Flic._EVENTS]
_EVENT_FIELDS = [fields.split() for _name, _fmt, fields in _Flic._EVENTS]
_COMMAND_NAME = [name for name, _fmt, _fields in _Flic._COMMANDS]
_COMMAND_STRUCT = [struct.Struct(fmt) for _name, fmt, _fields in _Flic._COMMANDS]
_COMMAND_FIELDS = [fields.split() for _name, _fmt, fields in _Flic._COMMANDS]
_ADDR_FIELDS = frozenset({"bd_addr", "my_bd_addr"})
_TEXT_FIELDS = frozenset({"name", "color", "serial_number"})
_MY_BD_ADDR = "00:00:00:5e:f1:1c"  # the simulated controller's own address

# What flicd emits on each channel for one gesture, in order: (event, ClickType name).
_GESTURE_EVENTS: dict[str, tuple[tuple[str, str], ...]] = {
    "single": (
        ("EvtButtonUpOrDown", "ButtonDown"),
        ("EvtButtonUpOrDown", "ButtonUp"),
        ("EvtButtonClickOrHold", "ButtonClick"),
        ("EvtButtonSingleOrDoubleClick", "ButtonSingleClick"),
        ("EvtButtonSingleOrDoubleClickOrHold", "ButtonSingleClick"),
    ),
    "double": (
        ("EvtButtonUpOrDown", "ButtonDown"),
        ("EvtButtonUpOrDown", "ButtonUp"),
        ("EvtButtonClickOrHold", "ButtonClick"),
        ("EvtButtonUpOrDown", "ButtonDown"),
        ("EvtButtonUpOrDown", "ButtonUp"),
        ("EvtButtonClickOrHold", "ButtonClick"),
        ("EvtButtonSingleOrDoubleClick", "ButtonDoubleClick"),
        ("EvtButtonSingleOrDoubleClickOrHold", "ButtonDoubleClick"),
    ),
    "hold": (
        ("EvtButtonUpOrDown", "ButtonDown"),
        ("EvtButtonClickOrHold", "ButtonHold"),
        ("EvtButtonSingleOrDoubleClickOrHold", "ButtonHold"),
        ("EvtButtonUpOrDown", "ButtonUp"),
        # The single/double family only tells one press from two: a hold is one press.
        ("EvtButtonSingleOrDoubleClick", "ButtonSingleClick"),
    ),
}


def normalize_bd_addr(addr: str) -> str:
    """``addr`` as lowercase ``aa:bb:cc:dd:ee:ff``; ValueError if it is not a Bluetooth address."""
    norm = addr.strip().lower()
    if not is_bd_addr(norm):
        raise ValueError(f"not a Bluetooth address (aa:bb:cc:dd:ee:ff): {addr!r}")
    return norm


def parse_button_spec(spec: str) -> tuple[str, str]:
    """Parse the CLI's ``ADDR[=NAME]`` into (address, name); ValueError if malformed."""
    addr, _, name = spec.partition("=")
    norm = normalize_bd_addr(addr)
    return norm, name or default_button_name(norm)


def default_button_name(addr: str) -> str:
    """The advertised name a virtual button gets when none is given."""
    return "F2" + addr.replace(":", "")[-6:].upper()


def _addr_bytes(addr: str) -> bytes:
    return bytes(reversed(bytes.fromhex(addr.replace(":", ""))))


def _addr_string(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in reversed(raw))


def encode_event(event: str, /, *, tail: bytes = b"", **fields: Any) -> bytes:
    """One framed event packet; ``tail`` is appended raw (EvtGetInfoResponse's address list)."""
    opcode = _EVENT_OPCODE[event]
    values: list[Any] = []
    for key in _EVENT_FIELDS[opcode]:
        value = fields[key]
        if isinstance(value, Enum):
            value = value.value
        if key in _ADDR_FIELDS:
            value = _addr_bytes(value)
        elif key in _TEXT_FIELDS and isinstance(value, str):
            value = value.encode("utf-8")
        values.append(value)
    payload = bytes([opcode]) + _EVENT_STRUCT[opcode].pack(*values) + tail
    return struct.pack("<H", len(payload)) + payload


def decode_command(packet: bytes) -> tuple[str, dict[str, Any]]:
    """(command name, fields) of one unframed command packet; ValueError if malformed."""
    if not packet:
        raise ValueError("empty packet")
    opcode = packet[0]
    if opcode >= len(_COMMAND_NAME):
        raise ValueError(f"unknown command opcode {opcode}")
    fmt = _COMMAND_STRUCT[opcode]
    body = packet[1 : 1 + fmt.size]
    if len(body) < fmt.size:
        raise ValueError(f"{_COMMAND_NAME[opcode]}: {len(body)} bytes, expected {fmt.size}")
    fields = dict(zip(_COMMAND_FIELDS[opcode], fmt.unpack(body), strict=True))
    if "bd_addr" in fields:
        fields["bd_addr"] = _addr_string(fields["bd_addr"])
    return _COMMAND_NAME[opcode], fields


@dataclass
class _Button:
    name: str
    connected: bool = True
    battery: int = 100
    backlog: list[tuple[str, float]] = field(default_factory=list)  # (click, monotonic time)


@dataclass(eq=False)
class _Session:
    """One client connection and the objects it created."""

    writer: asyncio.StreamWriter
    outbox: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    channels: dict[int, str] = field(default_factory=dict)  # conn_id -> bd_addr
    battery_listeners: dict[int, str] = field(default_factory=dict)  # listener_id -> bd_addr
    scanners: set[int] = field(default_factory=set)
    wizards: dict[int, asyncio.TimerHandle] = field(default_factory=dict)
    sender: asyncio.Task[None] | None = None

    def send(self, event: str, /, *, tail: bytes = b"", **fields: Any) -> None:
        self.outbox.put_nowait(encode_event(event, tail=tail, **fields))


class Simulator:
    """A flicd-protocol server with virtual buttons, driven from Python or ``serve_stdin``."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        buttons: Mapping[str, str] | None = None,
        *,
        split_writes: bool = False,
        rng: random.Random | None = None,
        wizard_timeout: float = WIZARD_TIMEOUT_S,
    ) -> None:
        self.host = host
        self._requested_port = port
        self._buttons = {normalize_bd_addr(a): _Button(name) for a, name in (buttons or {}).items()}
        self._unpaired: dict[str, str] = {}
        self.split_writes = split_writes  # test knob: deliver every packet in small pieces
        self._rng = rng if rng is not None else random.Random()
        self._wizard_timeout = wizard_timeout
        self._sessions: set[_Session] = set()
        self._tasks: set[asyncio.Task[None]] = set()  # per-client handler and sender tasks
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._controller = pyflic.BluetoothControllerState.Attached
        self._refusals: list[pyflic.CreateConnectionChannelError] = []
        self.garbling: str | None = None  # None, "garbage", "truncate" or "huge"

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on (host, port); ``port`` then holds the actual port."""
        self._server = await asyncio.start_server(self._serve, self.host, self._requested_port)

    @property
    def port(self) -> int:
        """The TCP port the server listens on (after ``start``)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("simulator not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        """Stop listening and close every client connection."""
        if self._server is not None:
            self._server.close()
        self.drop()
        async with asyncio.timeout(5):
            if self._server is not None:
                await self._server.wait_closed()
                self._server = None
            # Wait for the per-client tasks so none outlives the simulator (or its loop).
            await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def client_count(self) -> int:
        """How many client connections are open."""
        return len(self._sessions)

    def channel_count(self, addr: str) -> int:
        """How many connection channels (over all clients) exist for ``addr``."""
        addr = normalize_bd_addr(addr)
        return sum(1 for s in self._sessions for a in s.channels.values() if a == addr)

    @property
    def verified_buttons(self) -> list[str]:
        """Addresses of the paired (verified) virtual buttons."""
        return list(self._buttons)

    # -- what a person does to the buttons ------------------------------------------------

    def press(self, addr: str, click: str, queued_age: float | None = None) -> None:
        """A gesture; ``queued_age`` makes it one the button queued that many seconds ago."""
        button = self._button(addr)
        addr = normalize_bd_addr(addr)
        if click not in CLICKS:
            raise ValueError(f"click must be one of {', '.join(CLICKS)}: {click!r}")
        if queued_age is not None and queued_age < 0:
            raise ValueError(f"queued age must be >= 0: {queued_age}")
        pressed_at = time.monotonic() - (queued_age or 0.0)
        if not button.connected or not self._channels_for(addr):
            button.backlog.append((click, pressed_at))
            return
        self._emit_gesture(addr, click, queued=queued_age is not None, pressed_at=pressed_at)

    def disconnect(self, addr: str) -> None:
        """The button goes out of range: its channels see Disconnected (TimedOut)."""
        button = self._button(addr)
        if not button.connected:
            return
        button.connected = False
        for session, conn_id in self._channels_for(normalize_bd_addr(addr)):
            session.send(
                "EvtConnectionStatusChanged",
                conn_id=conn_id,
                connection_status=pyflic.ConnectionStatus.Disconnected,
                disconnect_reason=pyflic.DisconnectReason.TimedOut,
            )

    def connect(self, addr: str) -> None:
        """The button is back in range: channels see Connected, Ready, then its queued presses."""
        button = self._button(addr)
        addr = normalize_bd_addr(addr)
        if button.connected:
            return
        button.connected = True
        for status in (pyflic.ConnectionStatus.Connected, pyflic.ConnectionStatus.Ready):
            for session, conn_id in self._channels_for(addr):
                session.send(
                    "EvtConnectionStatusChanged",
                    conn_id=conn_id,
                    connection_status=status,
                    disconnect_reason=pyflic.DisconnectReason.Unspecified,
                )
        self._flush_backlog(addr)

    def battery(self, addr: str, percent: int) -> None:
        """A new battery level, reported to every battery listener of the button."""
        button = self._button(addr)
        if not 0 <= percent <= 100:
            raise ValueError(f"battery percent must be 0..100: {percent}")
        button.battery = percent
        addr = normalize_bd_addr(addr)
        for session in list(self._sessions):
            for listener_id, listened in session.battery_listeners.items():
                if listened == addr:
                    self._send_battery(session, listener_id, addr)

    def add_unpaired(self, addr: str, name: str | None = None) -> None:
        """A button in public mode nearby: the next scan wizard finds and pairs it."""
        addr = normalize_bd_addr(addr)
        if addr in self._buttons:
            raise ValueError(f"button {addr} is already paired")
        self._unpaired[addr] = name or default_button_name(addr)
        self._advance_wizards()

    # -- what happens to flicd ----------------------------------------------------------

    def drop(self) -> None:
        """Close every client connection, as a flicd restart does."""
        for session in list(self._sessions):
            self._end_session(session)

    def hang(self) -> None:
        """Stop sending anything (ping responses too) while keeping every socket open."""
        self._flowing.clear()

    def unhang(self) -> None:
        """Resume sending, starting with whatever was held back."""
        self._flowing.set()

    def remove_channels(self, addr: str, reason: str = "CouldntLoadDevice") -> None:
        """flicd removes every client's channels for ``addr`` (EvtConnectionChannelRemoved)."""
        removed = _member(pyflic.RemovedReason, reason)
        self._remove_channels(normalize_bd_addr(addr), None, removed, removed)

    def refuse_channels(self, count: int = 1, error: str = "MaxPendingConnectionsReached") -> None:
        """The next ``count`` channel requests (any client, any button) get ``error``."""
        refusal = _member(pyflic.CreateConnectionChannelError, error)
        if refusal == pyflic.CreateConnectionChannelError.NoError:
            raise ValueError("a refusal needs an error other than NoError")
        self._refusals.extend([refusal] * count)

    def controller(self, state: str) -> None:
        """The Bluetooth controller goes Detached, Resetting or Attached; clients are told."""
        self._controller = _member(pyflic.BluetoothControllerState, state)
        for session in list(self._sessions):
            session.send("EvtBluetoothControllerStateChange", state=self._controller)

    def garble(self, mode: str | None) -> None:
        """Send every packet broken: "garbage", "truncate", "huge"; None sends them whole."""
        if mode not in (None, "garbage", "truncate", "huge"):
            raise ValueError(f"garble mode must be garbage, truncate, huge or off: {mode!r}")
        self.garbling = mode

    def emit(self, event: str, /, **fields: Any) -> None:
        """Send a raw event to every client (tests: events for ids a client does not know)."""
        for session in list(self._sessions):
            session.send(event, **fields)

    # -- connection handling ------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = _Session(writer)
        self._sessions.add(session)
        handler = asyncio.current_task()
        if handler is not None:
            self._track(handler)
        session.sender = self._track(
            asyncio.create_task(self._send_loop(session), name="simulator-send")
        )
        log.debug("simulator_client_connected", peer=str(writer.get_extra_info("peername")))
        try:
            while True:
                (length,) = struct.unpack("<H", await reader.readexactly(2))
                packet = await reader.readexactly(length)
                try:
                    name, fields = decode_command(packet)
                except ValueError as exc:
                    log.warning("simulator_bad_command", error=str(exc))
                    continue
                self._handle(session, name, fields)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away (or drop() closed it)
        finally:
            self._end_session(session)

    async def _send_loop(self, session: _Session) -> None:
        writer = session.writer
        try:
            while True:
                data = self._garbled(await session.outbox.get())
                await self._flowing.wait()
                if not self.split_writes:
                    writer.write(data)
                    await writer.drain()
                    continue
                pos = 0
                while pos < len(data):
                    size = self._rng.randint(1, 3)
                    writer.write(data[pos : pos + size])
                    pos += size
                    await writer.drain()
                    # A pause lets each piece leave as its own TCP segment (nodelay is on),
                    # so the client really sees headers and payloads cut across reads.
                    await asyncio.sleep(0.001)
        except ConnectionError:
            self._end_session(session)

    def _garbled(self, packet: bytes) -> bytes:
        if self.garbling == "garbage":
            return self._rng.randbytes(len(packet))
        if self.garbling == "truncate":
            return packet[: max(1, len(packet) // 2)]
        if self.garbling == "huge":
            return b"\xff\xff" + packet[2:]  # announces 65,535 bytes that never come
        return packet

    def _track(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _end_session(self, session: _Session) -> None:
        if session not in self._sessions:
            return
        self._sessions.discard(session)
        for timer in session.wizards.values():
            timer.cancel()
        if session.sender is not None and session.sender is not asyncio.current_task():
            session.sender.cancel()
        session.writer.close()
        log.debug("simulator_client_closed")

    # -- commands -----------------------------------------------------------------------

    def _handle(self, session: _Session, name: str, fields: dict[str, Any]) -> None:
        handler = getattr(self, f"_cmd_{name}", None)
        if handler is None:
            log.warning("simulator_unhandled_command", command=name)
            return
        handler(session, **fields)

    # Command handlers are named after the protocol's commands: _handle looks them up.
    def _cmd_CmdGetInfo(self, session: _Session) -> None:
        session.send(
            "EvtGetInfoResponse",
            tail=b"".join(_addr_bytes(a) for a in self._buttons),
            bluetooth_controller_state=self._controller,
            my_bd_addr=_MY_BD_ADDR,
            my_bd_addr_type=pyflic.BdAddrType.PublicBdAddrType,
            max_pending_connections=128,
            max_concurrently_connected_buttons=-1,
            current_pending_connections=len(
                {a for s in self._sessions for a in s.channels.values()}
            ),
            currently_no_space_for_new_connection=False,
            nb_verified_buttons=len(self._buttons),
        )

    def _cmd_CmdCreateScanner(self, session: _Session, scan_id: int) -> None:
        if scan_id in session.scanners:
            return
        session.scanners.add(scan_id)
        adverts = [(a, b.name, True, b.connected) for a, b in self._buttons.items()]
        adverts += [(a, name, False, False) for a, name in self._unpaired.items()]
        for addr, name, verified, connected in adverts:
            session.send(
                "EvtAdvertisementPacket",
                scan_id=scan_id,
                bd_addr=addr,
                name=name,
                rssi=-60,
                is_private=False,
                already_verified=verified,
                already_connected_to_this_device=connected,
                already_connected_to_other_device=False,
            )

    def _cmd_CmdRemoveScanner(self, session: _Session, scan_id: int) -> None:
        session.scanners.discard(scan_id)

    def _cmd_CmdCreateConnectionChannel(
        self,
        session: _Session,
        conn_id: int,
        bd_addr: str,
        latency_mode: int,
        auto_disconnect_time: int,
    ) -> None:
        if conn_id in session.channels:
            return
        if self._refusals:
            session.send(
                "EvtCreateConnectionChannelResponse",
                conn_id=conn_id,
                error=self._refusals.pop(0),
                connection_status=pyflic.ConnectionStatus.Disconnected,
            )
            return
        session.channels[conn_id] = bd_addr
        button = self._buttons.get(bd_addr)
        # flicd accepts a channel for any address and waits for that button to show up.
        status = (
            pyflic.ConnectionStatus.Ready
            if button is not None and button.connected
            else pyflic.ConnectionStatus.Disconnected
        )
        session.send(
            "EvtCreateConnectionChannelResponse",
            conn_id=conn_id,
            error=pyflic.CreateConnectionChannelError.NoError,
            connection_status=status,
        )
        self._flush_backlog(bd_addr)

    def _cmd_CmdRemoveConnectionChannel(self, session: _Session, conn_id: int) -> None:
        if session.channels.pop(conn_id, None) is not None:
            session.send(
                "EvtConnectionChannelRemoved",
                conn_id=conn_id,
                removed_reason=pyflic.RemovedReason.RemovedByThisClient,
            )

    def _cmd_CmdForceDisconnect(self, session: _Session, bd_addr: str) -> None:
        self._remove_channels(
            bd_addr,
            session,
            pyflic.RemovedReason.ForceDisconnectedByThisClient,
            pyflic.RemovedReason.ForceDisconnectedByOtherClient,
        )

    def _cmd_CmdChangeModeParameters(self, session: _Session, **_fields: Any) -> None:
        pass  # latency and auto-disconnect mean nothing for a virtual button

    def _cmd_CmdPing(self, session: _Session, ping_id: int) -> None:
        session.send("EvtPingResponse", ping_id=ping_id)

    def _cmd_CmdGetButtonInfo(self, session: _Session, bd_addr: str) -> None:
        button = self._buttons.get(bd_addr)
        if button is None:
            info: dict[str, Any] = {
                "uuid": bytes(16),
                "color": "",
                "serial_number": "",
                "flic_version": 0,
                "firmware_version": 0,
            }
        else:
            info = {
                "uuid": hashlib.md5(bd_addr.encode(), usedforsecurity=False).digest(),
                "color": "black",
                "serial_number": "SIM" + bd_addr.replace(":", "")[-6:].upper(),
                "flic_version": 2,
                "firmware_version": 10,
            }
        session.send("EvtGetButtonInfoResponse", bd_addr=bd_addr, **info)

    def _cmd_CmdCreateScanWizard(self, session: _Session, scan_wizard_id: int) -> None:
        if scan_wizard_id in session.wizards:
            return
        loop = asyncio.get_running_loop()
        session.wizards[scan_wizard_id] = loop.call_later(
            self._wizard_timeout,
            self._complete_wizard,
            session,
            scan_wizard_id,
            pyflic.ScanWizardResult.WizardFailedTimeout,
        )
        self._advance_wizards()

    def _cmd_CmdCancelScanWizard(self, session: _Session, scan_wizard_id: int) -> None:
        if scan_wizard_id in session.wizards:
            self._complete_wizard(
                session, scan_wizard_id, pyflic.ScanWizardResult.WizardCancelledByUser
            )

    def _cmd_CmdDeleteButton(self, session: _Session, bd_addr: str) -> None:
        if self._buttons.pop(bd_addr, None) is None:
            return
        self._remove_channels(
            bd_addr,
            session,
            pyflic.RemovedReason.DeletedByThisClient,
            pyflic.RemovedReason.DeletedByOtherClient,
        )
        for other in list(self._sessions):
            other.send("EvtButtonDeleted", bd_addr=bd_addr, deleted_by_this_client=other is session)

    def _cmd_CmdCreateBatteryStatusListener(
        self, session: _Session, listener_id: int, bd_addr: str
    ) -> None:
        if listener_id in session.battery_listeners:
            return
        session.battery_listeners[listener_id] = bd_addr
        self._send_battery(session, listener_id, bd_addr)

    def _cmd_CmdRemoveBatteryStatusListener(self, session: _Session, listener_id: int) -> None:
        session.battery_listeners.pop(listener_id, None)

    # -- helpers ------------------------------------------------------------------------

    def _button(self, addr: str) -> _Button:
        button = self._buttons.get(normalize_bd_addr(addr))
        if button is None:
            raise ValueError(f"no virtual button {addr}")
        return button

    def _channels_for(self, addr: str) -> list[tuple[_Session, int]]:
        return [
            (session, conn_id)
            for session in self._sessions
            for conn_id, channel_addr in session.channels.items()
            if channel_addr == addr
        ]

    def _emit_gesture(self, addr: str, click: str, *, queued: bool, pressed_at: float) -> None:
        time_diff = max(0, round(time.monotonic() - pressed_at)) if queued else 0
        for session, conn_id in self._channels_for(addr):
            for event, click_type in _GESTURE_EVENTS[click]:
                session.send(
                    event,
                    conn_id=conn_id,
                    click_type=pyflic.ClickType[click_type],
                    was_queued=queued,
                    time_diff=time_diff,
                )

    def _flush_backlog(self, addr: str) -> None:
        button = self._buttons.get(addr)
        if button is None or not button.connected or not self._channels_for(addr):
            return
        backlog, button.backlog = button.backlog, []
        for click, pressed_at in backlog:
            self._emit_gesture(addr, click, queued=True, pressed_at=pressed_at)

    def _send_battery(self, session: _Session, listener_id: int, addr: str) -> None:
        button = self._buttons.get(addr)
        session.send(
            "EvtBatteryStatus",
            listener_id=listener_id,
            battery_percentage=button.battery if button is not None else -1,  # -1: unknown
            timestamp=int(time.time()) if button is not None else 0,
        )

    def _remove_channels(
        self,
        addr: str,
        actor: _Session | None,
        own: pyflic.RemovedReason,
        other: pyflic.RemovedReason,
    ) -> None:
        for session, conn_id in self._channels_for(addr):
            del session.channels[conn_id]
            session.send(
                "EvtConnectionChannelRemoved",
                conn_id=conn_id,
                removed_reason=own if session is actor else other,
            )

    def _advance_wizards(self) -> None:
        """Let the oldest running scan wizard pair the first button in public mode."""
        for session in list(self._sessions):
            for wizard_id in list(session.wizards):
                if not self._unpaired:
                    return
                addr, name = next(iter(self._unpaired.items()))
                del self._unpaired[addr]
                session.send(
                    "EvtScanWizardFoundPublicButton",
                    scan_wizard_id=wizard_id,
                    bd_addr=addr,
                    name=name,
                )
                session.send("EvtScanWizardButtonConnected", scan_wizard_id=wizard_id)
                self._buttons[addr] = _Button(name)
                for other in list(self._sessions):
                    other.send("EvtNewVerifiedButton", bd_addr=addr)
                self._complete_wizard(session, wizard_id, pyflic.ScanWizardResult.WizardSuccess)

    def _complete_wizard(
        self, session: _Session, wizard_id: int, result: pyflic.ScanWizardResult
    ) -> None:
        timer = session.wizards.pop(wizard_id, None)
        if timer is None:
            return
        timer.cancel()
        session.send("EvtScanWizardCompleted", scan_wizard_id=wizard_id, result=result)


def apply_command(sim: Simulator, line: str) -> None:
    """Run one control line (``press ADDR single [queued AGE]``, ``drop``, …); ValueError if bad."""
    words = line.split()
    if not words or words[0].startswith("#"):
        return
    verb, args = words[0].lower(), words[1:]
    if verb == "press" and len(args) in (2, 4):
        age: float | None = None
        if len(args) == 4:
            if args[2].lower() != "queued":
                raise ValueError("usage: press ADDR single|double|hold [queued AGE_SECONDS]")
            age = _number(args[3], "AGE_SECONDS")
        sim.press(args[0], args[1].lower(), queued_age=age)
    elif verb == "disconnect" and len(args) == 1:
        sim.disconnect(args[0])
    elif verb == "connect" and len(args) == 1:
        sim.connect(args[0])
    elif verb == "battery" and len(args) == 2:
        sim.battery(args[0], int(_number(args[1], "PERCENT")))
    elif verb == "drop" and not args:
        sim.drop()
    elif verb == "pair" and len(args) in (1, 2):
        sim.add_unpaired(args[0], args[1] if len(args) == 2 else None)
    elif verb == "hang" and not args:
        sim.hang()
    elif verb == "unhang" and not args:
        sim.unhang()
    elif verb == "remove" and len(args) in (1, 2):
        sim.remove_channels(args[0], *args[1:])
    elif verb == "refuse" and len(args) <= 2:
        count = int(_number(args[0], "COUNT")) if args else 1
        sim.refuse_channels(count, *args[1:])
    elif verb == "controller" and len(args) == 1:
        sim.controller(args[0])
    elif verb == "garble" and len(args) == 1:
        sim.garble(None if args[0].lower() == "off" else args[0].lower())
    else:
        raise ValueError(
            f"bad command {line.strip()!r}; expected one of: press ADDR single|double|hold "
            "[queued AGE_SECONDS] | disconnect ADDR | connect ADDR | battery ADDR PERCENT | drop "
            "| remove ADDR [REASON] | refuse [COUNT] [ERROR] | controller STATE "
            "| garble garbage|truncate|huge|off"
        )


def _member(enum: type[_E], name: str) -> _E:
    """The member of a protocol enum named ``name``; ValueError naming the choices if none."""
    try:
        return enum[name]
    except KeyError:
        choices = ", ".join(m.name for m in enum)
        raise ValueError(f"{name!r} is not a {enum.__name__}; one of: {choices}") from None


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{what} must be a number: {text!r}") from None


async def serve_stdin(sim: Simulator, stream: TextIO | None = None) -> None:
    """Apply control lines from ``stream`` (stdin) until EOF; bad lines are reported on stderr."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str | None] = asyncio.Queue()
    source = stream if stream is not None else sys.stdin

    def pump() -> None:
        # A daemon thread, not to_thread(): a read blocked on a silent terminal must not
        # keep the process alive at exit (the default executor is joined on shutdown).
        for line in _lines(source):
            _post(loop, lines, line)
        _post(loop, lines, None)

    threading.Thread(target=pump, name="simulator-stdin", daemon=True).start()
    while (line := await lines.get()) is not None:
        try:
            apply_command(sim, line)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)


def _lines(source: TextIO) -> Iterable[str]:
    return iter(source.readline, "")


def _post(
    loop: asyncio.AbstractEventLoop, lines: asyncio.Queue[str | None], line: str | None
) -> None:
    # RuntimeError: the loop is closed, the simulator is shutting down.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(lines.put_nowait, line)


async def main(port: int, buttons: Mapping[str, str], host: str = "127.0.0.1") -> None:
    """``flicbridge simulate``: serve until cancelled, driven by lines on stdin."""
    sim = Simulator(host=host, port=port, buttons=buttons)
    await sim.start()
    try:
        print(f"flicd simulator listening on {host}:{sim.port}", flush=True)
        await serve_stdin(sim)
        await asyncio.Event().wait()  # end of stdin leaves the server running
    finally:
        await sim.stop()
