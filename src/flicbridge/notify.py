"""systemd service notification (sd_notify) without libsystemd.

The protocol is one datagram per message, newline-separated ``KEY=VALUE``
fields, sent to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a filesystem
path, or ``@name`` for the abstract namespace). See sd_notify(3).

Invariants:

- Without ``$NOTIFY_SOCKET`` (not run by systemd, or not ``Type=notify``)
  every method is a no-op.
- A send never blocks and never raises: the socket is non-blocking, so a
  full queue (EAGAIN) or a missing or refused socket is an ``OSError`` that is
  logged once at warning (and again only after a send has succeeded) and
  then dropped. The event loop must never stall on systemd.
- ``WATCHDOG=1`` is sent from the event loop itself (:func:`watchdog_loop`):
  a stuck loop stops the pings and systemd restarts the service.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping

import structlog

__all__ = ["Notifier", "watchdog_loop"]


class Notifier:
    """Sends sd_notify messages to systemd; every method is a no-op without a socket."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        """``address`` as in ``$NOTIFY_SOCKET``; ``watchdog_usec`` as in ``$WATCHDOG_USEC``
        (already checked against ``$WATCHDOG_PID``)."""
        self._address = address
        self._watchdog_usec = watchdog_usec
        self._socket: socket.socket | None = None
        self._failing = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """The notifier systemd asked for through ``environ``, disabled if it asked for none."""
        address = environ.get("NOTIFY_SOCKET") or None
        if address is not None and (len(address) < 2 or address[0] not in "/@"):
            # vsock: and other transports of newer systemd are not needed on a Pi.
            structlog.get_logger(__name__).warning("notify_socket_unsupported", socket=address)
            address = None
        return cls(address, _watchdog_usec(environ) if address is not None else None)

    @property
    def enabled(self) -> bool:
        """Whether systemd gave us a notify socket."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings (half of ``WatchdogSec=``), or None."""
        if self._address is None or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2_000_000

    def ready(self, status: str = "") -> None:
        """Startup is complete (``READY=1``), optionally with a status line."""
        if status:
            self._send("READY=1", _status_field(status))
        else:
            self._send("READY=1")

    def stopping(self) -> None:
        """Shutdown has begun (``STOPPING=1``)."""
        self._send("STOPPING=1")

    def watchdog(self) -> None:
        """Keep the watchdog from firing (``WATCHDOG=1``)."""
        self._send("WATCHDOG=1")

    def status(self, text: str) -> None:
        """A one-line status shown by ``systemctl status`` (``STATUS=...``; empty clears it)."""
        self._send(_status_field(text))

    def close(self) -> None:
        """Release the socket; later sends open a new one."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _send(self, *fields: str) -> None:
        if self._address is None:
            return
        message = "\n".join(fields).encode("utf-8")
        target = "\0" + self._address[1:] if self._address.startswith("@") else self._address
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX,
                    socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK,
                )
            # sendto() each time rather than connect() once: a socket that is
            # missing now (systemd re-executing, say) works again when it is back.
            self._socket.sendto(message, target)
        except OSError as exc:
            if not self._failing:
                self._failing = True
                structlog.get_logger(__name__).warning(
                    "notify_send_failed",
                    socket=self._address,
                    field=fields[0],
                    error=exc.strerror or type(exc).__name__,
                )
            return
        if self._failing:
            self._failing = False
            structlog.get_logger(__name__).info("notify_send_recovered", socket=self._address)


async def watchdog_loop(notifier: Notifier) -> None:
    """Ping systemd's watchdog every ``watchdog_interval`` until cancelled.

    Returns at once when no watchdog is configured. Runs on the event loop on
    purpose: if the loop hangs, the pings stop and systemd restarts us.
    """
    interval = notifier.watchdog_interval
    if interval is None:
        return
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)


def _watchdog_usec(environ: Mapping[str, str]) -> int | None:
    """``$WATCHDOG_USEC`` if it is meant for this process, as sd_watchdog_enabled(3) decides."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid is not None:
        try:
            if int(pid) != os.getpid():
                return None  # meant for our parent; we were started by it
        except ValueError:
            return None
    return usec


def _status_field(text: str) -> str:
    """``STATUS=`` with the text on one line (a newline would start a new field)."""
    return "STATUS=" + " ".join(text.splitlines())
