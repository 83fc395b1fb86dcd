"""FixedFlicClient: each pyflic.asyncio defect is pinned upstream and shown repaired here.

Every "upstream" test documents a defect of pyflic 2.0.4 as published; if one starts
failing after an upgrade, pyflic changed and the matching repair in
``flicbridge.sources.flicd_client`` should be revisited.
"""

from __future__ import annotations

import asyncio
import queue
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pyflic.asyncio as pyflic_asyncio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flicbridge.sources.flicd_client import FixedFlicClient, connect
from flicbridge.sources.simulator import Simulator, encode_event

ADDR = "80:e4:da:70:00:01"


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    simulator = Simulator(buttons={ADDR: "Reception"})
    await simulator.start()
    yield simulator
    await simulator.stop()


async def eventually(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    """Poll simulator state (nothing signals it) until the condition holds."""
    async with asyncio.timeout(timeout):
        while not predicate():  # no event to wait on: polling is the point
            await asyncio.sleep(0.01)


def upstream_client(monkeypatch: pytest.MonkeyPatch, loop: asyncio.AbstractEventLoop) -> Any:
    """The official client, made constructible by lending its module the missing import."""
    monkeypatch.setattr(pyflic_asyncio, "queue", queue, raising=False)
    return pyflic_asyncio.FlicClient(loop)


def click_packet(conn_id: int, click: str = "ButtonSingleClick") -> bytes:
    return encode_event(
        "EvtButtonSingleOrDoubleClickOrHold",
        conn_id=conn_id,
        click_type=pyflic_asyncio.ClickType[click],
        was_queued=False,
        time_diff=0,
    )


def channel_recording(into: list[Any]) -> Any:
    channel = pyflic_asyncio.ButtonConnectionChannel(ADDR)
    channel.on_button_single_or_double_click_or_hold = lambda _ch, click, queued, diff: into.append(
        (click, queued, diff)
    )
    return channel


# -- (a) NameError at construction ---------------------------------------------------------


async def test_upstream_constructor_raises_name_error() -> None:
    """Upstream: constructing pyflic.asyncio.FlicClient raises NameError (queue not imported)."""
    with pytest.raises(NameError, match="queue"):
        pyflic_asyncio.FlicClient(asyncio.get_running_loop())


async def test_fixed_client_constructs_with_upstream_attributes() -> None:
    """Ours constructs and keeps every attribute upstream's methods rely on."""
    client = FixedFlicClient(asyncio.get_running_loop())
    assert isinstance(client, pyflic_asyncio.FlicClient)
    for name in ("_scanners", "_scan_wizards", "_connection_channels", "_get_button_info_queue"):
        assert hasattr(client, name)
    assert not client.closed.done()


# -- (b) a lost connection goes unnoticed -----------------------------------------------------


def test_upstream_does_not_override_connection_lost() -> None:
    """Upstream: connection_lost is asyncio.Protocol's no-op, so nobody learns of a loss."""
    assert pyflic_asyncio.FlicClient.connection_lost is asyncio.Protocol.connection_lost
    assert "eof_received" not in vars(pyflic_asyncio.FlicClient)


async def test_closed_resolves_when_flicd_drops_the_connection(sim: Simulator) -> None:
    """Ours: `closed` resolves when flicd goes away, and pending pings fail at once."""
    client = await connect("127.0.0.1", sim.port, timeout=2)
    sim.hang()  # the ping below stays unanswered until the drop
    ping = asyncio.create_task(client.ping(timeout=5))
    await asyncio.sleep(0.05)
    sim.drop()
    async with asyncio.timeout(2):
        reason = await client.closed
        with pytest.raises(ConnectionError):
            await ping
    assert "closed" in reason or "lost" in reason
    with pytest.raises(ConnectionError):
        await client.ping(timeout=1)


# -- (c) framing when TCP cuts the length header ------------------------------------------


async def test_upstream_crashes_and_loses_bytes_on_a_split_header(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Upstream: one byte of a length header → IndexError, and that byte is thrown away."""
    client = upstream_client(monkeypatch, asyncio.get_running_loop())
    packet = click_packet(0)
    with pytest.raises(IndexError):
        client.data_received(packet[:1])
    assert client.buffer == b""  # the byte is gone: the rest of the stream is mis-framed


async def test_fixed_client_frames_a_stream_delivered_one_byte_at_a_time() -> None:
    """Ours: a stream fed byte by byte yields exactly the packets it holds, in order."""
    client = FixedFlicClient(asyncio.get_running_loop())
    clicks: list[Any] = []
    channel = channel_recording(clicks)
    client.add_connection_channel(channel)  # no transport yet: the command is dropped
    stream = b"".join(
        click_packet(channel._conn_id, c)
        for c in ("ButtonSingleClick", "ButtonDoubleClick", "ButtonHold")
    )
    for i in range(len(stream)):
        client.data_received(stream[i : i + 1])
    assert [c[0].name for c in clicks] == ["ButtonSingleClick", "ButtonDoubleClick", "ButtonHold"]


@settings(max_examples=60, deadline=None)
@given(data=st.data(), count=st.integers(min_value=1, max_value=8))
def test_any_cut_of_the_stream_gives_the_same_events(data: st.DataObject, count: int) -> None:
    """Ours: wherever the stream is cut into reads, the same events come out."""
    loop = asyncio.new_event_loop()
    try:
        client = FixedFlicClient(loop)
        clicks: list[Any] = []
        channel = channel_recording(clicks)
        client.add_connection_channel(channel)
        kinds = ["ButtonSingleClick", "ButtonDoubleClick", "ButtonHold"]
        sent = [kinds[i % 3] for i in range(count)]
        stream = b"".join(click_packet(channel._conn_id, k) for k in sent)
        cuts = sorted(
            data.draw(st.sets(st.integers(min_value=1, max_value=len(stream) - 1), max_size=20))
        )
        for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            client.data_received(stream[start:end])
        assert [c[0].name for c in clicks] == sent
    finally:
        loop.close()


async def test_split_writes_over_a_real_socket(sim: Simulator) -> None:
    """Ours: against a peer that writes 1–3 bytes at a time, every event still arrives."""
    sim.split_writes = True
    client = await connect("127.0.0.1", sim.port, timeout=2)
    clicks: list[Any] = []
    client.add_connection_channel(channel_recording(clicks))
    for click in ("single", "double", "hold"):
        sim.press(ADDR, click)
    await client.ping(timeout=5)  # answered after the presses: they have all arrived
    assert [c[0].name for c in clicks] == ["ButtonSingleClick", "ButtonDoubleClick", "ButtonHold"]
    client.close()


# -- (d) scanner callback arity ---------------------------------------------------------------


def advertisement(scan_id: int) -> bytes:
    return encode_event(
        "EvtAdvertisementPacket",
        scan_id=scan_id,
        bd_addr=ADDR,
        name="F2A",
        rssi=-40,
        is_private=False,
        already_verified=True,
        already_connected_to_this_device=False,
        already_connected_to_other_device=True,
    )


async def test_upstream_calls_the_scanner_with_six_arguments(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Upstream: on_advertisement_packet gets 6 of its 8 documented arguments (TypeError)."""
    client = upstream_client(monkeypatch, asyncio.get_running_loop())
    scanner = pyflic_asyncio.ButtonScanner()  # its default callback takes 8 arguments
    client._scanners[scanner._scan_id] = scanner
    with pytest.raises(TypeError):
        client.data_received(advertisement(scanner._scan_id))


async def test_scanner_gets_all_eight_arguments_over_a_socket(sim: Simulator) -> None:
    """Ours: the documented 8-argument callback is called, with the simulator's adverts."""
    sim.add_unpaired("80:e4:da:70:00:99", "F2New")
    client = await connect("127.0.0.1", sim.port, timeout=2)
    seen: list[tuple[Any, ...]] = []
    scanner = pyflic_asyncio.ButtonScanner()
    scanner.on_advertisement_packet = lambda *args: seen.append(args)
    client.add_scanner(scanner)
    await client.ping(timeout=2)
    assert {(a[1], a[2], a[5]) for a in seen} == {
        (ADDR, "Reception", True),
        ("80:e4:da:70:00:99", "F2New", False),
    }
    assert all(len(a) == 8 for a in seen)
    client.close()


# -- (e) battery, button deleted and ping responses are dropped -------------------------------


async def test_upstream_drops_battery_status(monkeypatch: pytest.MonkeyPatch) -> None:
    """Upstream: EvtBatteryStatus never reaches the BatteryStatusListener."""
    client = upstream_client(monkeypatch, asyncio.get_running_loop())
    got: list[int] = []
    listener = pyflic_asyncio.BatteryStatusListener(ADDR)
    listener.on_battery_status = lambda _l, percent, _ts: got.append(percent)
    client._battery_status_listeners[listener._listener_id] = listener
    client.data_received(
        encode_event(
            "EvtBatteryStatus",
            listener_id=listener._listener_id,
            battery_percentage=42,
            timestamp=1,
        )
    )
    assert got == []


async def test_upstream_crashes_on_button_deleted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Upstream: EvtButtonDeleted matches its `startswith("EvtButton")` test → KeyError."""
    client = upstream_client(monkeypatch, asyncio.get_running_loop())
    got: list[Any] = []
    client.on_button_deleted = lambda addr, by_me: got.append((addr, by_me))
    with pytest.raises(KeyError, match="click_type"):
        client.data_received(
            encode_event("EvtButtonDeleted", bd_addr=ADDR, deleted_by_this_client=1)
        )
    assert got == []


def test_upstream_has_no_way_to_await_a_ping() -> None:
    """Upstream: nothing handles EvtPingResponse, so a hung flicd looks like a quiet one."""
    assert not hasattr(pyflic_asyncio.FlicClient, "ping")


async def test_battery_and_ping_work_over_a_socket(sim: Simulator) -> None:
    """Ours: battery listeners hear the current level and changes; ping round-trips."""
    client = await connect("127.0.0.1", sim.port, timeout=2)
    got: list[int] = []
    listener = pyflic_asyncio.BatteryStatusListener(ADDR)
    listener.on_battery_status = lambda _l, percent, _ts: got.append(percent)
    client.add_battery_status_listener(listener)
    await client.ping(timeout=2)
    sim.battery(ADDR, 37)
    await client.ping(timeout=2)
    assert got == [100, 37]
    client.close()


async def test_button_deleted_reaches_every_client(sim: Simulator) -> None:
    """Ours: EvtButtonDeleted is dispatched, telling each client whether it was the deleter."""
    first = await connect("127.0.0.1", sim.port, timeout=2)
    second = await connect("127.0.0.1", sim.port, timeout=2)
    got: list[Any] = []
    first.on_button_deleted = lambda addr, by_me: got.append(("first", addr, by_me))
    second.on_button_deleted = lambda addr, by_me: got.append(("second", addr, by_me))
    await second.ping(timeout=2)
    first._send_command("CmdDeleteButton", {"bd_addr": ADDR})
    await first.ping(timeout=2)
    await second.ping(timeout=2)
    assert sorted(got) == [("first", ADDR, True), ("second", ADDR, False)]
    first.close()
    second.close()


async def test_ping_times_out_when_flicd_hangs(sim: Simulator) -> None:
    """Ours: a flicd that keeps the socket open but answers nothing fails the ping."""
    client = await connect("127.0.0.1", sim.port, timeout=2)
    await client.ping(timeout=2)
    sim.hang()
    with pytest.raises(TimeoutError):
        await client.ping(timeout=0.2)
    assert not client.closed.done()  # the socket itself is still open
    client.abort()  # close() would wait to flush to a peer that may never read
    async with asyncio.timeout(2):
        await client.closed


# -- (f) events for unknown ids ---------------------------------------------------------------


async def test_upstream_raises_key_error_for_an_unknown_channel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Upstream: a button event for a conn_id it does not know raises KeyError."""
    client = upstream_client(monkeypatch, asyncio.get_running_loop())
    with pytest.raises(KeyError):
        client.data_received(click_packet(424242))


async def test_unknown_ids_are_ignored_and_the_connection_lives_on(sim: Simulator) -> None:
    """Ours: events for unknown channels, wizards or listeners are logged and skipped."""
    client = await connect("127.0.0.1", sim.port, timeout=2)
    clicks: list[Any] = []
    client.add_connection_channel(channel_recording(clicks))
    await client.ping(timeout=2)
    sim.emit(
        "EvtButtonSingleOrDoubleClickOrHold",
        conn_id=424242,
        click_type=pyflic_asyncio.ClickType.ButtonHold,
        was_queued=False,
        time_diff=0,
    )
    sim.emit("EvtConnectionChannelRemoved", conn_id=424243, removed_reason=0)
    sim.emit("EvtScanWizardCompleted", scan_wizard_id=424244, result=0)
    sim.emit("EvtBatteryStatus", listener_id=424245, battery_percentage=1, timestamp=0)
    sim.emit("EvtGetButtonInfoResponse", bd_addr=ADDR, uuid=bytes(16), color="", serial_number="",
             flic_version=0, firmware_version=0)  # fmt: skip
    sim.press(ADDR, "double")
    await client.ping(timeout=2)
    assert [c[0].name for c in clicks] == ["ButtonDoubleClick"]
    assert not client.closed.done()
    client.close()


async def test_a_failing_callback_does_not_kill_the_connection(sim: Simulator) -> None:
    """Ours: an exception in one callback is logged; later events are still delivered."""
    client = await connect("127.0.0.1", sim.port, timeout=2)
    clicks: list[Any] = []
    channel = channel_recording(clicks)
    original = channel.on_button_single_or_double_click_or_hold

    def explode_once(*args: Any) -> None:
        channel.on_button_single_or_double_click_or_hold = original
        raise RuntimeError("listener bug")

    channel.on_button_single_or_double_click_or_hold = explode_once
    client.add_connection_channel(channel)
    sim.press(ADDR, "single")
    sim.press(ADDR, "hold")
    await client.ping(timeout=2)
    assert [c[0].name for c in clicks] == ["ButtonHold"]
    client.close()


# -- (g) close() leaves the socket open -----------------------------------------------------


async def test_upstream_close_leaves_the_socket_open(
    monkeypatch: pytest.MonkeyPatch, sim: Simulator
) -> None:
    """Upstream: close() sets a flag and leaves the transport (and flicd's channels) open."""
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(pyflic_asyncio, "queue", queue, raising=False)
    transport, client = await loop.create_connection(
        lambda: pyflic_asyncio.FlicClient(loop), "127.0.0.1", sim.port
    )
    client.close()
    assert client._closed
    assert not transport.is_closing()
    transport.close()


async def test_close_closes_the_socket(sim: Simulator) -> None:
    """Ours: close() closes the transport, flicd sees the client go, `closed` resolves."""
    client = await connect("127.0.0.1", sim.port, timeout=2)
    client.add_connection_channel(pyflic_asyncio.ButtonConnectionChannel(ADDR))
    await client.ping(timeout=2)
    assert sim.channel_count(ADDR) == 1
    client.close()
    async with asyncio.timeout(2):
        await client.closed
    await eventually(lambda: sim.client_count == 0)
    assert sim.channel_count(ADDR) == 0
    client.add_connection_channel(pyflic_asyncio.ButtonConnectionChannel(ADDR))  # dropped quietly


# -- connect ------------------------------------------------------------------------------------


async def test_connect_refused_raises_oserror() -> None:
    """connect() raises OSError when nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ConnectionRefusedError):
        await connect("127.0.0.1", port, timeout=2)


async def test_get_button_info_uses_the_repaired_queue(sim: Simulator) -> None:
    """Upstream's get_button_info works on ours (it needs the queue upstream never imports)."""
    client = await connect("127.0.0.1", sim.port, timeout=2)
    answer: asyncio.Future[tuple[Any, ...]] = asyncio.get_running_loop().create_future()
    client.get_button_info(ADDR, lambda *info: answer.set_result(info))
    async with asyncio.timeout(2):
        bd_addr, uuid, color, serial, flic_version, _firmware = await answer
    assert (bd_addr, color, flic_version) == (ADDR, "black", 2)
    assert uuid is not None
    assert len(uuid) == 32
    assert serial.startswith("SIM")
    client.close()


async def test_skipped_families_are_not_decoded_and_the_listened_one_still_is() -> None:
    """With the duplicate gesture families skipped, only SingleOrDoubleClickOrHold arrives."""
    from flicbridge.sources.flicd_client import DUPLICATE_GESTURE_EVENTS

    client = FixedFlicClient(asyncio.get_running_loop())
    ups: list[Any] = []
    clicks: list[Any] = []
    channel = channel_recording(clicks)
    channel.on_button_up_or_down = lambda _ch, click, _q, _d: ups.append(click)
    client.add_connection_channel(channel)
    up = encode_event(
        "EvtButtonUpOrDown",
        conn_id=channel._conn_id,
        click_type=pyflic_asyncio.ClickType.ButtonDown,
        was_queued=False,
        time_diff=0,
    )
    client.data_received(up + click_packet(channel._conn_id))
    assert len(ups) == 1 and len(clicks) == 1
    client.skip_events = DUPLICATE_GESTURE_EVENTS
    client.data_received(up + click_packet(channel._conn_id))
    assert len(ups) == 1 and len(clicks) == 2
