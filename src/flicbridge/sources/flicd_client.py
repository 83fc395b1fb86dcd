"""The official asyncio flicd client (``pyflic.asyncio.FlicClient``), with its defects repaired.

pyflic 2.0.4 is pinned: this subclass keeps upstream's wire tables (``_EVENTS``,
``_COMMANDS``), its command encoder (``_send_command``) and its event decoder
(``_dispatch_event``) and only replaces what is broken. Each repair names the
upstream defect it fixes; ``tests/test_flicd_client.py`` pins every one of them, so
a pyflic upgrade that fixes (or changes) them shows up as a failing test.

A client object lives for one TCP connection: once ``closed`` resolves it is dead,
and reconnecting means a new client with new channels (flicd forgets a client's
channels when its socket closes).
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import struct
from typing import Any

import structlog
from pyflic import asyncio as pyflic_asyncio

log = structlog.get_logger(__name__)

_UpstreamClient: Any = pyflic_asyncio.FlicClient

# Opcodes of the events this subclass handles itself instead of upstream's dispatcher.
_OPCODE = {name: i for i, (name, _fmt, _fields) in enumerate(_UpstreamClient._EVENTS)}
_EVT_ADVERTISEMENT = _OPCODE["EvtAdvertisementPacket"]
_EVT_PING_RESPONSE = _OPCODE["EvtPingResponse"]
_EVT_GET_BUTTON_INFO = _OPCODE["EvtGetButtonInfoResponse"]
_EVT_BUTTON_DELETED = _OPCODE["EvtButtonDeleted"]
_EVT_BATTERY_STATUS = _OPCODE["EvtBatteryStatus"]
# The gesture families a channel reports besides ButtonSingleOrDoubleClickOrHold: the same
# gesture again. A client that listens to that one family can skip decoding these.
DUPLICATE_GESTURE_EVENTS = frozenset(
    _OPCODE[name]
    for name in ("EvtButtonUpOrDown", "EvtButtonClickOrHold", "EvtButtonSingleOrDoubleClick")
)

# Events whose first field is a conn_id / scan_wizard_id that must name a live object.
_CONN_ID_EVENTS = frozenset(
    _OPCODE[name]
    for name in (
        "EvtCreateConnectionChannelResponse",
        "EvtConnectionStatusChanged",
        "EvtConnectionChannelRemoved",
        "EvtButtonUpOrDown",
        "EvtButtonClickOrHold",
        "EvtButtonSingleOrDoubleClick",
        "EvtButtonSingleOrDoubleClickOrHold",
    )
)
_SCAN_WIZARD_EVENTS = frozenset(
    _OPCODE[name]
    for name in (
        "EvtScanWizardFoundPrivateButton",
        "EvtScanWizardFoundPublicButton",
        "EvtScanWizardButtonConnected",
        "EvtScanWizardCompleted",
    )
)
_LEADING_U32 = struct.Struct("<I")
_HEADER = 2  # little-endian uint16 length of opcode + payload


def _decode(opcode: int, packet: bytes) -> dict[str, Any]:
    """The fields of an event packet, decoded with upstream's tables (bd_addr as a string)."""
    fmt: Any = _UpstreamClient._EVENT_STRUCTS[opcode]
    fields: dict[str, Any] = (
        _UpstreamClient._EVENT_NAMED_TUPLES[opcode]
        ._make(fmt.unpack(packet[1 : 1 + fmt.size]))
        ._asdict()
    )
    if "bd_addr" in fields:
        fields["bd_addr"] = _UpstreamClient._bdaddr_bytes_to_string(fields["bd_addr"])
    if "name" in fields:
        fields["name"] = fields["name"].decode("utf-8", "replace")
    return fields


class FixedFlicClient(_UpstreamClient):  # type: ignore[misc]  # pyflic is untyped
    """``pyflic.asyncio.FlicClient`` that frames, notices loss, pings and closes correctly."""

    _ping_ids = itertools.count(1)

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, parent: Any = None) -> None:
        # Defect (a): upstream's __init__ calls queue.Queue() but pyflic/asyncio.py never
        # imports `queue`, so constructing the official client raises NameError. We set
        # the same attributes here (with `queue` imported) instead of calling it.
        self.loop = loop if loop is not None else asyncio.get_running_loop()
        self.buffer = b""  # upstream's attribute; unused by our framing, kept for parity
        self.transport: asyncio.Transport | None = None
        self.parent = parent
        self._scanners: dict[int, Any] = {}
        self._scan_wizards: dict[int, Any] = {}
        self._connection_channels: dict[int, Any] = {}
        self._battery_status_listeners: dict[int, Any] = {}
        self._get_info_response_queue: queue.Queue[Any] = queue.Queue()
        self._get_button_info_queue: queue.Queue[Any] = queue.Queue()
        self._closed = False

        self.on_new_verified_button: Any = lambda bd_addr: None
        self.on_no_space_for_new_connection: Any = lambda max_concurrently_connected_buttons: None
        self.on_got_space_for_new_connection: Any = lambda max_concurrently_connected_buttons: None
        self.on_bluetooth_controller_state_change: Any = lambda state: None
        self.on_get_info: Any = lambda items: None
        self.on_button_deleted: Any = lambda bd_addr, deleted_by_this_client: None

        # Defect (c): upstream keeps `bytes` and re-slices; we keep one growing buffer.
        self._inbox = bytearray()
        # Defect (b): upstream has no way to learn that the socket is gone.
        self.closed: asyncio.Future[str] = self.loop.create_future()
        self._pings: dict[int, asyncio.Future[None]] = {}
        self.skip_events: frozenset[int] = frozenset()  # opcodes dropped undecoded

    # -- connection lifecycle ---------------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        """Resolve ``closed`` and fail pending pings: the client is dead from here on."""
        # Defect (b): upstream does not override connection_lost, so a lost connection
        # is never noticed and a daemon would wait for presses on a dead socket forever.
        self._finish(f"connection lost: {exc}" if exc is not None else "connection closed")

    def eof_received(self) -> bool | None:
        """flicd closed its side: treat as lost (returning None lets asyncio close ours)."""
        self._finish("flicd closed the connection")
        return None

    def close(self) -> None:
        """Close the socket; ``closed`` resolves once it is gone."""
        # Defect (g): upstream's close() only sets a flag and never closes the transport,
        # so the socket (and flicd's channels for it) stay open.
        self._closed = True
        if self.transport is not None:
            self.transport.close()
        else:
            self._finish("closed before connecting")

    def abort(self) -> None:
        """Drop the socket now, discarding unsent commands (for a flicd that stopped reading)."""
        # close() waits for the write buffer to drain, which a hung peer may never allow.
        self._closed = True
        if self.transport is not None:
            self.transport.abort()
        else:
            self._finish("aborted before connecting")

    def _finish(self, reason: str) -> None:
        self._closed = True
        if not self.closed.done():
            self.closed.set_result(reason)
        for waiter in self._pings.values():
            if not waiter.done():
                waiter.set_exception(ConnectionError(reason))
        self._pings.clear()

    # -- commands -----------------------------------------------------------------------

    def _send_command(self, name: str, items: dict[str, Any]) -> None:
        # Upstream writes to `self.transport` even when it is None or closed (an
        # AttributeError, or asyncio's "socket.send() raised exception" spam). A command
        # for a dead client is dropped: that client will be replaced anyway.
        if self._closed or self.transport is None or self.transport.is_closing():
            log.debug("flicd_command_dropped", command=name, reason="connection closed")
            return
        super()._send_command(name, items)

    # ASYNC109: the deadline is part of the contract (a ping without one proves nothing).
    async def ping(self, timeout: float) -> None:  # noqa: ASYNC109
        """Send CmdPing and await its EvtPingResponse; TimeoutError/ConnectionError if none."""
        if self._closed:
            raise ConnectionError("flicd connection is closed")
        ping_id = next(self._ping_ids) & 0xFFFFFFFF
        waiter: asyncio.Future[None] = self.loop.create_future()
        self._pings[ping_id] = waiter
        try:
            self._send_command("CmdPing", {"ping_id": ping_id})
            async with asyncio.timeout(timeout):
                await waiter
        finally:
            self._pings.pop(ping_id, None)

    # -- events -------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """Split the byte stream into packets, however TCP cut it, and dispatch each one."""
        # Defect (c): upstream reads cdata[1] when a read ends one byte into the length
        # header (IndexError, which asyncio turns into a fatal connection error), and it
        # clears its buffer before parsing, so the bytes of that read are lost and every
        # following packet is mis-framed.
        self._inbox += data
        while len(self._inbox) >= _HEADER:
            length = self._inbox[0] | (self._inbox[1] << 8)
            if len(self._inbox) < _HEADER + length:
                break
            packet = bytes(self._inbox[_HEADER : _HEADER + length])
            del self._inbox[: _HEADER + length]
            if self._closed:
                return  # a callback closed us: the rest belongs to a dead client
            try:
                self._dispatch_event(packet)
            except Exception:
                # A malformed packet or a failing callback must not kill the connection
                # (upstream lets it escape, and asyncio then aborts the socket).
                log.exception("flicd_event_failed", opcode=packet[0] if packet else None)

    def _dispatch_event(self, data: bytes) -> None:
        if not data:
            return
        opcode = data[0]
        if opcode in self.skip_events:
            return
        if opcode >= len(_UpstreamClient._EVENTS):
            log.debug("flicd_unknown_event", opcode=opcode)
            return
        if opcode in _CONN_ID_EVENTS or opcode in _SCAN_WIZARD_EVENTS:
            # Defect (f): upstream indexes `self._connection_channels[conn_id]` (and
            # `_scan_wizards[id]`) directly, so an event for a channel it no longer knows
            # (removed locally while flicd still had events in flight) raises KeyError.
            (object_id,) = _LEADING_U32.unpack_from(data, 1)
            known = self._connection_channels if opcode in _CONN_ID_EVENTS else self._scan_wizards
            if object_id not in known:
                log.info(
                    "flicd_event_for_unknown_id",
                    packet=_UpstreamClient._EVENTS[opcode][0],
                    id=object_id,
                )
                return
        if opcode == _EVT_ADVERTISEMENT:
            self._on_advertisement(_decode(opcode, data))
        elif opcode == _EVT_PING_RESPONSE:
            self._on_ping_response(_decode(opcode, data))
        elif opcode == _EVT_BATTERY_STATUS:
            self._on_battery_status(_decode(opcode, data))
        elif opcode == _EVT_BUTTON_DELETED:
            fields = _decode(opcode, data)
            # Defect (e): upstream's asyncio dispatcher never calls on_button_deleted, and
            # worse, its `event_name.startswith("EvtButton")` check treats EvtButtonDeleted
            # as a button event and raises KeyError('click_type'). Never let it see one.
            self.on_button_deleted(fields["bd_addr"], fields["deleted_by_this_client"])
        elif opcode == _EVT_GET_BUTTON_INFO and self._get_button_info_queue.empty():
            # Upstream would call queue.Queue.get() and block the event loop forever.
            log.info("flicd_unrequested_button_info")
        else:
            super()._dispatch_event(data)

    def _on_advertisement(self, fields: dict[str, Any]) -> None:
        # Defect (d): upstream calls on_advertisement_packet with 6 arguments although
        # ButtonScanner documents (and its default lambda takes) 8, so every scanner
        # callback written to the documentation raises TypeError.
        scanner = self._scanners.get(fields["scan_id"])
        if scanner is None:
            return
        scanner.on_advertisement_packet(
            scanner,
            fields["bd_addr"],
            fields["name"],
            fields["rssi"],
            fields["is_private"],
            fields["already_verified"],
            fields["already_connected_to_this_device"],
            fields["already_connected_to_other_device"],
        )

    def _on_ping_response(self, fields: dict[str, Any]) -> None:
        # Defect (e): upstream decodes EvtPingResponse (opcode 13) and then drops it, so a
        # client cannot tell a live flicd from a hung one.
        waiter = self._pings.get(fields["ping_id"])
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_battery_status(self, fields: dict[str, Any]) -> None:
        # Defect (e): upstream's asyncio dispatcher never delivers EvtBatteryStatus
        # (opcode 20), so BatteryStatusListener.on_battery_status is never called. The
        # call signature follows the synchronous client: (listener, percentage, timestamp).
        listener = self._battery_status_listeners.get(fields["listener_id"])
        if listener is None:
            log.info(
                "flicd_event_for_unknown_id", packet="EvtBatteryStatus", id=fields["listener_id"]
            )
            return
        listener.on_battery_status(listener, fields["battery_percentage"], fields["timestamp"])


# ASYNC109: callers pass the connect deadline explicitly; every network wait has one.
async def connect(host: str, port: int, timeout: float) -> FixedFlicClient:  # noqa: ASYNC109
    """Open a TCP connection to flicd and return its client; OSError or TimeoutError if not."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        _transport, client = await loop.create_connection(lambda: FixedFlicClient(loop), host, port)
    return client
