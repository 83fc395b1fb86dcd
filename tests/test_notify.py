"""sd_notify against real Unix datagram sockets, as systemd would listen on them."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from flicbridge.notify import Notifier, watchdog_loop


class Receiver:
    """The systemd side: a bound AF_UNIX datagram socket and the NOTIFY_SOCKET naming it."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address

    def recv(self) -> bytes:
        self.sock.settimeout(2)
        return self.sock.recv(4096)

    def pending(self) -> list[bytes]:
        """Every datagram already queued, without waiting."""
        self.sock.setblocking(False)
        datagrams = []
        while True:
            try:
                datagrams.append(self.sock.recv(4096))
            except BlockingIOError:
                return datagrams


def _bind(address: str, bind_to: str) -> Iterator[Receiver]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    sock.bind(bind_to)
    try:
        yield Receiver(sock, address)
    finally:
        sock.close()


@pytest.fixture
def path_receiver(tmp_path: Path) -> Iterator[Receiver]:
    path = str(tmp_path / "notify.sock")
    yield from _bind(path, path)


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    name = f"flicbridge-test-{uuid.uuid4().hex}"
    yield from _bind("@" + name, "\0" + name)


@pytest.fixture(params=["path", "abstract"])
def receiver(request: pytest.FixtureRequest) -> Receiver:
    name = "path_receiver" if request.param == "path" else "abstract_receiver"
    value: Receiver = request.getfixturevalue(name)
    return value


def _notifier(receiver: Receiver, **env: str) -> Notifier:
    return Notifier.from_env({"NOTIFY_SOCKET": receiver.address, **env})


def test_ready_sends_ready(receiver: Receiver) -> None:
    """ready() sends exactly READY=1."""
    notifier = _notifier(receiver)
    assert notifier.enabled
    notifier.ready()
    assert receiver.recv() == b"READY=1"


def test_ready_with_status_sends_both_fields(receiver: Receiver) -> None:
    """ready(status) sends READY=1 and STATUS= in one datagram."""
    _notifier(receiver).ready("connected to flicd")
    assert receiver.recv() == b"READY=1\nSTATUS=connected to flicd"


def test_status_is_one_line(receiver: Receiver) -> None:
    """status() sends STATUS= with newlines folded, since a newline would start a new field."""
    _notifier(receiver).status("3 queued\nflicd down")
    assert receiver.recv() == b"STATUS=3 queued flicd down"


def test_stopping_sends_stopping(receiver: Receiver) -> None:
    """stopping() sends exactly STOPPING=1."""
    _notifier(receiver).stopping()
    assert receiver.recv() == b"STOPPING=1"


def test_watchdog_sends_watchdog(receiver: Receiver) -> None:
    """watchdog() sends exactly WATCHDOG=1."""
    _notifier(receiver).watchdog()
    assert receiver.recv() == b"WATCHDOG=1"


def test_messages_arrive_in_order(path_receiver: Receiver) -> None:
    """Each call is its own datagram, in call order."""
    notifier = _notifier(path_receiver)
    notifier.ready()
    notifier.watchdog()
    notifier.stopping()
    assert [path_receiver.recv() for _ in range(3)] == [b"READY=1", b"WATCHDOG=1", b"STOPPING=1"]


def test_watchdog_interval_is_half_of_watchdog_usec(path_receiver: Receiver) -> None:
    """WATCHDOG_USEC=30 s (WatchdogSec=30) means a ping every 15 s."""
    assert _notifier(path_receiver, WATCHDOG_USEC="30000000").watchdog_interval == 15.0


def test_watchdog_pid_of_this_process_keeps_the_watchdog(path_receiver: Receiver) -> None:
    """WATCHDOG_PID naming this process enables the watchdog."""
    notifier = _notifier(path_receiver, WATCHDOG_USEC="2000000", WATCHDOG_PID=str(os.getpid()))
    assert notifier.watchdog_interval == 1.0


def test_watchdog_pid_of_another_process_disables_the_watchdog(path_receiver: Receiver) -> None:
    """WATCHDOG_PID naming another process (our parent) means the watchdog is not ours."""
    notifier = _notifier(path_receiver, WATCHDOG_USEC="30000000", WATCHDOG_PID=str(os.getppid()))
    assert notifier.watchdog_interval is None
    assert notifier.enabled


@pytest.mark.parametrize("usec", ["", "0", "-5", "soon"])
def test_unusable_watchdog_usec_means_no_watchdog(path_receiver: Receiver, usec: str) -> None:
    """A missing, zero, negative or garbled WATCHDOG_USEC disables the watchdog."""
    assert _notifier(path_receiver, WATCHDOG_USEC=usec).watchdog_interval is None


def test_without_notify_socket_every_method_is_a_noop() -> None:
    """Without NOTIFY_SOCKET nothing is sent, nothing raises and there is no watchdog."""
    notifier = Notifier.from_env({"WATCHDOG_USEC": "30000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    with capture_logs() as logs:
        notifier.ready("up")
        notifier.status("x")
        notifier.watchdog()
        notifier.stopping()
        notifier.close()
    assert logs == []


def test_unsupported_notify_socket_is_disabled() -> None:
    """A NOTIFY_SOCKET that is neither a path nor @abstract disables notification, warned."""
    with capture_logs() as logs:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:9999"})
    assert not notifier.enabled
    assert [entry["event"] for entry in logs] == ["notify_socket_unsupported"]


def test_missing_socket_path_does_not_raise_and_warns_once(tmp_path: Path) -> None:
    """A socket path that does not exist drops every message and logs one warning."""
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "absent.sock")})
    with capture_logs() as logs:
        notifier.ready()
        notifier.watchdog()
        notifier.stopping()
    assert [(e["event"], e["log_level"]) for e in logs] == [("notify_send_failed", "warning")]


def test_stale_socket_file_does_not_raise(tmp_path: Path) -> None:
    """A socket file nobody listens on any more (connection refused) is dropped with a warning."""
    path = str(tmp_path / "stale.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as gone:
        gone.bind(path)
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    with capture_logs() as logs:
        notifier.ready()
        notifier.watchdog()
    assert [e["event"] for e in logs] == ["notify_send_failed"]


def test_full_socket_never_blocks_and_recovers(path_receiver: Receiver) -> None:
    """A receiver that stops reading makes sends fail fast, warned once, until it drains."""
    path_receiver.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    notifier = _notifier(path_receiver)
    with capture_logs() as logs:
        for _ in range(2000):  # far beyond net.unix.max_dgram_qlen and the buffer
            notifier.watchdog()
        queued = path_receiver.pending()
        notifier.stopping()
    assert 0 < len(queued) < 2000
    assert path_receiver.recv() == b"STOPPING=1"
    assert [e["event"] for e in logs] == ["notify_send_failed", "notify_send_recovered"]


async def test_watchdog_loop_returns_at_once_without_watchdog(path_receiver: Receiver) -> None:
    """With no WATCHDOG_USEC the loop has nothing to do and returns."""
    async with asyncio.timeout(1):
        await watchdog_loop(_notifier(path_receiver))
    assert path_receiver.pending() == []


async def test_watchdog_loop_pings_repeatedly_until_cancelled(path_receiver: Receiver) -> None:
    """With a 20 ms watchdog the loop keeps sending WATCHDOG=1 and stops when cancelled."""
    notifier = _notifier(path_receiver, WATCHDOG_USEC="20000")
    path_receiver.sock.setblocking(False)
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(watchdog_loop(notifier))
    async with asyncio.timeout(5):
        pings = [await loop.sock_recv(path_receiver.sock, 64) for _ in range(3)]
    assert pings == [b"WATCHDOG=1"] * 3

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    path_receiver.pending()  # sent before the cancellation landed
    await asyncio.sleep(0.05)  # five intervals
    assert path_receiver.pending() == []


async def test_watchdog_loop_sleeps_the_interval_between_pings(
    path_receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop pings first, then waits watchdog_interval (half of WATCHDOG_USEC) each round."""

    class Stop(Exception):
        pass

    delays: list[float] = []

    async def fake_sleep(delay: float) -> None:
        delays.append(delay)
        if len(delays) == 3:
            raise Stop

    # Time is the one thing faked: the loop's sleep, so the test need not wait 15 s.
    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    with pytest.raises(Stop):
        await watchdog_loop(_notifier(path_receiver, WATCHDOG_USEC="30000000"))
    assert delays == [15.0, 15.0, 15.0]
    assert path_receiver.pending() == [b"WATCHDOG=1"] * 3
