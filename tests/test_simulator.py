"""The flicd simulator speaks the real protocol: proven with the official synchronous client."""

from __future__ import annotations

import asyncio
import io
import os
import queue
import sys
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import pyflic
import pyflic.asyncio as pyflic_asyncio
import pytest

from flicbridge.sources.flicd_client import connect
from flicbridge.sources.simulator import (
    Simulator,
    apply_command,
    decode_command,
    encode_event,
    parse_button_spec,
    serve_stdin,
)

A = "80:e4:da:70:00:01"
B = "80:e4:da:70:00:02"
NEW = "80:e4:da:70:00:99"


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    simulator = Simulator(buttons={A: "Reception", B: "Lab"})
    await simulator.start()
    yield simulator
    await simulator.stop()


class SyncClient:
    """The official blocking pyflic.FlicClient, its event loop on a thread; callbacks → queue."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.thread = threading.Thread(target=client.handle_events, daemon=True)

    @classmethod
    async def open(cls, port: int) -> SyncClient:
        client = await asyncio.to_thread(pyflic.FlicClient, "127.0.0.1", port)
        opened = cls(client)
        opened.thread.start()
        return opened

    def record(self, *tag: Any) -> Callable[..., None]:
        return lambda *args: self.events.put((*tag, *args))

    async def next(self, timeout: float = 2.0) -> tuple[Any, ...]:
        return await asyncio.to_thread(self.events.get, True, timeout)

    async def take(self, count: int) -> list[tuple[Any, ...]]:
        return [await self.next() for _ in range(count)]

    async def close(self) -> None:
        self.client.close()
        await asyncio.to_thread(self.thread.join, 2)
        assert not self.thread.is_alive()


@pytest.fixture
async def official(sim: Simulator) -> AsyncIterator[SyncClient]:
    client = await SyncClient.open(sim.port)
    yield client
    if client.thread.is_alive():
        await client.close()


def sync_channel(client: SyncClient, addr: str = A) -> Any:
    channel = pyflic.ButtonConnectionChannel(addr)
    channel.on_create_connection_channel_response = client.record("created")
    channel.on_connection_status_changed = client.record("status")
    channel.on_removed = client.record("removed")
    for family in (
        "up_or_down",
        "click_or_hold",
        "single_or_double_click",
        "single_or_double_click_or_hold",
    ):
        setattr(channel, f"on_button_{family}", client.record(family))
    return channel


def clicks(events: list[tuple[Any, ...]]) -> list[tuple[str, str]]:
    return [(e[0], e[2].name) for e in events]


# -- the official client ---------------------------------------------------------------------


async def test_get_info_lists_the_verified_buttons(official: SyncClient) -> None:
    """CmdGetInfo answers EvtGetInfoResponse with the controller state and verified buttons."""
    official.client.get_info(official.record("info"))
    (_tag, info) = await official.next()
    assert info["bluetooth_controller_state"] == pyflic.BluetoothControllerState.Attached
    assert sorted(info["bd_addr_of_verified_buttons"]) == [A, B]
    assert info["nb_verified_buttons"] == 2


async def test_a_channel_is_ready_for_a_connected_button(official: SyncClient) -> None:
    """CmdCreateConnectionChannel answers NoError, Ready for a button in range."""
    channel = sync_channel(official)
    official.client.add_connection_channel(channel)
    assert await official.next() == (
        "created",
        channel,
        pyflic.CreateConnectionChannelError.NoError,
        pyflic.ConnectionStatus.Ready,
    )


async def test_a_channel_for_an_unknown_button_waits_disconnected(official: SyncClient) -> None:
    """An address flicd has never seen still gets NoError, status Disconnected."""
    channel = sync_channel(official, "11:22:33:44:55:66")
    official.client.add_connection_channel(channel)
    (_t, _c, error, status) = await official.next()
    assert (error, status) == (
        pyflic.CreateConnectionChannelError.NoError,
        pyflic.ConnectionStatus.Disconnected,
    )


@pytest.mark.parametrize(
    ("gesture", "expected"),
    [
        (
            "single",
            [
                ("up_or_down", "ButtonDown"),
                ("up_or_down", "ButtonUp"),
                ("click_or_hold", "ButtonClick"),
                ("single_or_double_click", "ButtonSingleClick"),
                ("single_or_double_click_or_hold", "ButtonSingleClick"),
            ],
        ),
        (
            "double",
            [
                ("up_or_down", "ButtonDown"),
                ("up_or_down", "ButtonUp"),
                ("click_or_hold", "ButtonClick"),
                ("up_or_down", "ButtonDown"),
                ("up_or_down", "ButtonUp"),
                ("click_or_hold", "ButtonClick"),
                ("single_or_double_click", "ButtonDoubleClick"),
                ("single_or_double_click_or_hold", "ButtonDoubleClick"),
            ],
        ),
        (
            "hold",
            [
                ("up_or_down", "ButtonDown"),
                ("click_or_hold", "ButtonHold"),
                ("single_or_double_click_or_hold", "ButtonHold"),
                ("up_or_down", "ButtonUp"),
                ("single_or_double_click", "ButtonSingleClick"),
            ],
        ),
    ],
)
async def test_a_press_emits_every_event_family(
    sim: Simulator, official: SyncClient, gesture: str, expected: list[tuple[str, str]]
) -> None:
    """A gesture emits what flicd emits: up/down, click/hold, single/double, single/double/hold."""
    official.client.add_connection_channel(sync_channel(official))
    await official.next()  # created
    sim.press(A, gesture)
    events = await official.take(len(expected))
    assert clicks(events) == expected
    assert all(e[3] is False or e[3] == 0 for e in events)  # not queued
    assert official.events.empty()


async def test_disconnect_queues_presses_and_connect_delivers_them(
    sim: Simulator, official: SyncClient
) -> None:
    """Out of range: Disconnected (TimedOut); back: Connected, Ready, then queued presses aged."""
    official.client.add_connection_channel(sync_channel(official))
    await official.next()
    sim.disconnect(A)
    (_t, _c, status, reason) = await official.next()
    assert (status, reason) == (
        pyflic.ConnectionStatus.Disconnected,
        pyflic.DisconnectReason.TimedOut,
    )
    sim.press(A, "hold", queued_age=30)
    await asyncio.sleep(0.05)
    assert official.events.empty()  # nothing while out of range
    sim.connect(A)
    statuses = [(await official.next())[2] for _ in range(2)]
    assert statuses == [pyflic.ConnectionStatus.Connected, pyflic.ConnectionStatus.Ready]
    events = await official.take(5)
    hold = next(e for e in events if e[0] == "single_or_double_click_or_hold")
    assert hold[2] == pyflic.ClickType.ButtonHold
    assert hold[3]  # was_queued
    assert hold[4] == 30  # time_diff, in seconds


async def test_remove_channel(official: SyncClient, sim: Simulator) -> None:
    """CmdRemoveConnectionChannel answers EvtConnectionChannelRemoved(RemovedByThisClient)."""
    channel = sync_channel(official)
    official.client.add_connection_channel(channel)
    await official.next()
    official.client.remove_connection_channel(channel)
    assert await official.next() == ("removed", channel, pyflic.RemovedReason.RemovedByThisClient)
    sim.press(A, "single")
    await asyncio.sleep(0.05)
    assert official.events.empty()


async def test_battery_listener_hears_the_level_at_once_and_on_change(
    sim: Simulator, official: SyncClient
) -> None:
    """A battery listener gets the current level immediately (100 % at start), then changes."""
    listener = pyflic.BatteryStatusListener(A)
    listener.on_battery_status = official.record("battery")
    official.client.add_battery_status_listener(listener)
    assert (await official.next())[2] == 100
    sim.battery(A, 9)
    assert (await official.next())[2] == 9
    official.client.remove_battery_status_listener(listener)
    await asyncio.sleep(0.05)
    sim.battery(A, 8)
    await asyncio.sleep(0.05)
    assert official.events.empty()


async def test_button_info(official: SyncClient) -> None:
    """CmdGetButtonInfo answers with a uuid for a verified button and none for a stranger."""
    official.client.get_button_info(A, official.record("info"))
    official.client.get_button_info("11:22:33:44:55:66", official.record("info"))
    known, unknown = await official.take(2)
    assert (known[1], known[3]) == (A, "black")
    assert known[2] is not None
    assert unknown[1:3] == ("11:22:33:44:55:66", None)


async def test_ping_and_hang(sim: Simulator, official: SyncClient) -> None:
    """CmdPing is answered; while hung nothing is sent, and it all comes after unhang."""
    listener = pyflic.BatteryStatusListener(A)
    listener.on_battery_status = official.record("battery")
    official.client.add_battery_status_listener(listener)
    await official.next()
    sim.hang()
    sim.battery(A, 50)
    await asyncio.sleep(0.1)
    assert official.events.empty()
    sim.unhang()
    assert (await official.next())[2] == 50


async def test_scan_wizard_pairs_a_public_button(sim: Simulator, official: SyncClient) -> None:
    """A scan wizard finds the public button, connects, succeeds; the button is then verified."""
    other = await SyncClient.open(sim.port)
    other.client.on_new_verified_button = other.record("verified")
    wizard = pyflic.ScanWizard()
    wizard.on_found_public_button = official.record("found")
    wizard.on_button_connected = official.record("connected")
    wizard.on_completed = official.record("completed")
    official.client.add_scan_wizard(wizard)
    await asyncio.sleep(0.05)
    assert official.events.empty()  # no public button around yet
    sim.add_unpaired(NEW, "F2New")
    found, connected, completed = await official.take(3)
    assert found == ("found", wizard, NEW, "F2New")
    assert connected == ("connected", wizard, NEW, "F2New")
    assert completed == ("completed", wizard, pyflic.ScanWizardResult.WizardSuccess, NEW, "F2New")
    assert await other.next() == ("verified", NEW)
    assert NEW in sim.verified_buttons
    await other.close()


async def test_scan_wizard_can_be_cancelled_and_times_out() -> None:
    """CmdCancelScanWizard completes WizardCancelledByUser; no button → WizardFailedTimeout."""
    simulator = Simulator(wizard_timeout=0.1)
    await simulator.start()
    try:
        client = await SyncClient.open(simulator.port)
        first, second = pyflic.ScanWizard(), pyflic.ScanWizard()
        first.on_completed = client.record("first")
        second.on_completed = client.record("second")
        client.client.add_scan_wizard(first)
        client.client.cancel_scan_wizard(first)
        assert (await client.next())[2] == pyflic.ScanWizardResult.WizardCancelledByUser
        client.client.add_scan_wizard(second)
        assert (await client.next())[2] == pyflic.ScanWizardResult.WizardFailedTimeout
        await client.close()
    finally:
        await simulator.stop()


async def test_split_writes_still_speak_the_protocol(sim: Simulator, official: SyncClient) -> None:
    """With every packet cut into 1–3 byte writes, the official client still reads it right."""
    sim.split_writes = True
    official.client.add_connection_channel(sync_channel(official))
    await official.next()
    sim.press(A, "double")
    assert clicks(await official.take(8))[-1] == (
        "single_or_double_click_or_hold",
        "ButtonDoubleClick",
    )


async def test_drop_closes_every_connection(sim: Simulator, official: SyncClient) -> None:
    """drop() cuts every client, as a flicd restart does: handle_events returns."""
    second = await connect("127.0.0.1", sim.port, timeout=2)
    await second.ping(timeout=2)
    assert sim.client_count == 2
    sim.drop()
    async with asyncio.timeout(2):
        await second.closed
        await asyncio.to_thread(official.thread.join, 2)
    assert not official.thread.is_alive()
    assert sim.client_count == 0


async def test_presses_without_any_channel_wait_for_one(sim: Simulator) -> None:
    """A press nobody listens to is kept by the button and delivered queued to the next channel."""
    sim.press(A, "single")
    client = await connect("127.0.0.1", sim.port, timeout=2)
    got: list[Any] = []
    channel = pyflic_asyncio.ButtonConnectionChannel(A)
    channel.on_button_single_or_double_click_or_hold = lambda _c, *rest: got.append(rest)
    client.add_connection_channel(channel)
    await client.ping(timeout=2)
    assert [(click.name, bool(queued)) for click, queued, _diff in got] == [
        ("ButtonSingleClick", True)
    ]
    client.close()


# -- flicd's faults -------------------------------------------------------------------------


async def test_flicd_removes_a_channel_with_its_reason(
    sim: Simulator, official: SyncClient
) -> None:
    """remove_channels: the official client's channel sees on_removed with flicd's reason."""
    official.client.add_connection_channel(sync_channel(official))
    assert (await official.next())[0] == "created"
    apply_command(sim, f"remove {A} CouldntLoadDevice")
    tag, _channel, reason = await official.next()
    assert (tag, reason) == ("removed", pyflic.RemovedReason.CouldntLoadDevice)
    assert sim.channel_count(A) == 0


async def test_refused_channels_get_the_error_then_flicd_accepts(
    sim: Simulator, official: SyncClient
) -> None:
    """refuse_channels(1): the next request gets MaxPendingConnectionsReached, the one after
    is accepted."""
    apply_command(sim, "refuse 1")
    official.client.add_connection_channel(sync_channel(official))
    tag, _channel, error, _status = await official.next()
    assert (tag, error) == (
        "created",
        pyflic.CreateConnectionChannelError.MaxPendingConnectionsReached,
    )
    assert sim.channel_count(A) == 0
    official.client.add_connection_channel(sync_channel(official))
    tag, _channel, error, status = await official.next()
    assert (tag, error, status) == (
        "created",
        pyflic.CreateConnectionChannelError.NoError,
        pyflic.ConnectionStatus.Ready,
    )


async def test_controller_state_is_announced_and_reported_by_get_info(
    sim: Simulator, official: SyncClient
) -> None:
    """controller(): EvtBluetoothControllerStateChange to every client; CmdGetInfo agrees."""
    official.client.on_bluetooth_controller_state_change = official.record("controller")
    apply_command(sim, "controller Detached")
    assert await official.next() == ("controller", pyflic.BluetoothControllerState.Detached)
    official.client.get_info(official.record("info"))
    _tag, info = await official.next()
    assert info["bluetooth_controller_state"] == pyflic.BluetoothControllerState.Detached


@pytest.mark.parametrize("mode", ["garbage", "truncate", "huge"])
async def test_garbled_output_never_answers_a_ping(sim: Simulator, mode: str) -> None:
    """garble(): no ping is ever answered; garble(None) makes flicd whole again."""
    apply_command(sim, f"garble {mode}")
    client = await connect("127.0.0.1", sim.port, timeout=2)
    with pytest.raises(TimeoutError):
        await client.ping(timeout=0.3)
    client.abort()
    apply_command(sim, "garble off")
    client = await connect("127.0.0.1", sim.port, timeout=2)
    await client.ping(timeout=2)
    client.close()


# -- wire format ----------------------------------------------------------------------------


def test_encode_event_matches_pyflic_framing() -> None:
    """An event is a 2-byte LE length, the opcode, the payload; bd_addr goes byte-reversed."""
    packet = encode_event("EvtNewVerifiedButton", bd_addr="08:09:0a:0b:0c:0d")
    assert packet == bytes([7, 0, 8, 0x0D, 0x0C, 0x0B, 0x0A, 0x09, 0x08])


def test_decode_command_round_trips_pyflic_commands() -> None:
    """Commands encoded like pyflic's _send_command decode to their fields."""
    packet = bytes([3]) + pyflic.FlicClient._COMMAND_STRUCTS[3].pack(
        7, bytes.fromhex("0d0c0b0a0908"), 0, 511
    )
    assert decode_command(packet) == (
        "CmdCreateConnectionChannel",
        {
            "conn_id": 7,
            "bd_addr": "08:09:0a:0b:0c:0d",
            "latency_mode": 0,
            "auto_disconnect_time": 511,
        },
    )
    with pytest.raises(ValueError, match="opcode"):
        decode_command(bytes([200]))
    with pytest.raises(ValueError, match="expected"):
        decode_command(bytes([7, 1]))


def test_parse_button_spec() -> None:
    """--button ADDR[=NAME]: the address is normalised; a name is made up when missing."""
    assert parse_button_spec("80:E4:DA:70:00:01=Front desk") == (A, "Front desk")
    assert parse_button_spec(A)[1] == "F2700001"
    with pytest.raises(ValueError, match="Bluetooth address"):
        parse_button_spec("not-an-address")


# -- control lines ----------------------------------------------------------------------------


async def test_control_lines_drive_the_buttons(sim: Simulator, official: SyncClient) -> None:
    """The stdin language: press (also queued), disconnect, connect, battery, drop."""
    official.client.add_connection_channel(sync_channel(official))
    listener = pyflic.BatteryStatusListener(A)
    listener.on_battery_status = official.record("battery")
    official.client.add_battery_status_listener(listener)
    await official.take(2)
    apply_command(sim, f"press {A} hold queued 12")
    hold = [e for e in await official.take(5) if e[0] == "single_or_double_click_or_hold"]
    assert (hold[0][2], hold[0][3], hold[0][4]) == (pyflic.ClickType.ButtonHold, True, 12)
    apply_command(sim, f"battery {A} 44")
    assert (await official.next())[2] == 44
    apply_command(sim, f"disconnect {A}")
    assert (await official.next())[2] == pyflic.ConnectionStatus.Disconnected
    apply_command(sim, f"connect {A.upper()}")
    assert (await official.next())[2] == pyflic.ConnectionStatus.Connected
    apply_command(sim, "  ")  # blank lines are fine
    apply_command(sim, "drop")
    await asyncio.to_thread(official.thread.join, 2)
    assert not official.thread.is_alive()


@pytest.mark.parametrize(
    "line",
    [
        "press",
        f"press {A} triple",
        f"press {A} single queued soon",
        f"press {A} single later 3",
        "press 11:22:33:44:55:66 single",
        f"battery {A} 101",
        f"battery {A} full",
        "explode",
        "disconnect nowhere",
        f"remove {A} BecauseISaidSo",
        "refuse 1 NoError",
        "refuse 1 Whatever",
        "controller Unplugged",
        "garble sometimes",
    ],
)
def test_bad_control_lines_raise_value_error(line: str) -> None:
    """A malformed line is a ValueError with a message, never a crash."""
    with pytest.raises(ValueError, match=r"\S"):
        apply_command(Simulator(buttons={A: "Reception"}), line)


async def test_serve_stdin_reports_bad_lines_and_returns_at_eof(
    sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad lines go to stderr and the rest still runs; EOF ends the reader, not the server."""
    client = await connect("127.0.0.1", sim.port, timeout=2)
    got: list[int] = []
    listener = pyflic_asyncio.BatteryStatusListener(A)
    listener.on_battery_status = lambda _l, percent, _ts: got.append(percent)
    client.add_battery_status_listener(listener)
    await client.ping(timeout=2)
    async with asyncio.timeout(5):
        await serve_stdin(sim, io.StringIO(f"nonsense\nbattery {A} 61\n"))
    await client.ping(timeout=2)
    assert got == [100, 61]
    assert "error:" in capsys.readouterr().err
    assert not client.closed.done()
    client.close()


async def test_main_serves_stdin_and_keeps_running_after_eof() -> None:
    """`flicbridge simulate`: one ready line on stdout, commands from stdin, alive after EOF."""
    code = (
        "import asyncio, sys; from flicbridge.sources.simulator import main; "
        f"asyncio.run(main(0, {{'{A}': 'Reception'}}))"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(10):
            ready = (await proc.stdout.readline()).decode()
            assert ready.startswith("flicd simulator listening on 127.0.0.1:")
            port = int(ready.rsplit(":", 1)[1])
            client = await connect("127.0.0.1", port, timeout=2)
            got: list[Any] = []
            channel = pyflic_asyncio.ButtonConnectionChannel(A)
            channel.on_button_single_or_double_click_or_hold = lambda _c, *rest: got.append(rest)
            client.add_connection_channel(channel)
            await client.ping(timeout=2)
            proc.stdin.write(f"press {A} double\n".encode())
            await proc.stdin.drain()
            proc.stdin.close()  # EOF: the server must stay up
            while not got:
                await client.ping(timeout=2)
            assert got[0][0] == pyflic_asyncio.ClickType.ButtonDoubleClick
            await asyncio.sleep(0.1)
            await client.ping(timeout=2)
            assert proc.returncode is None
            client.close()
    finally:
        proc.terminate()
        await proc.wait()
