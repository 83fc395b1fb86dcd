"""A real flicbridge daemon process and what it needs around it: config, notify socket, /proc.

Used by the tests that need a process to kill and by the benchmarks: the daemon runs as
``python -m flicbridge run --config FILE`` with ``NOTIFY_SOCKET`` pointing at a socket we
own (so READY=1 is observed exactly as systemd observes it), its JSON log goes to a file,
and its memory and CPU are read from /proc. The platform it talks to is
``tests.receiver.Receiver``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")

# -- TOML (the config format; the standard library only reads it) ----------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return (
            "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
        )
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def toml_dumps(data: Mapping[str, Any]) -> str:
    """TOML for a flicbridge config: scalars, [sections] and [[arrays of tables]]."""
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, Any]]] = []
    arrays: list[tuple[str, Sequence[Mapping[str, Any]]]] = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            tables.append((key, value))
        elif isinstance(value, list | tuple) and value and isinstance(value[0], Mapping):
            arrays.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for key, table in tables:
        lines += ["", f"[{key}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    for key, items in arrays:
        for item in items:
            lines += ["", f"[[{key}]]"] + [f"{k} = {_toml_value(v)}" for k, v in item.items()]
    return "\n".join(lines) + "\n"


# -- /proc -----------------------------------------------------------------------------


def proc_status_kb(pid: int, field_name: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM, …)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise KeyError(field_name)


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (and its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        after_name = f.read().rsplit(")", 1)[1].split()
    utime, stime = int(after_name[11]), int(after_name[12])
    return (utime + stime) / CLK_TCK


# -- sd_notify ------------------------------------------------------------------------------


class NotifySocket:
    """The AF_UNIX datagram socket systemd would own; records every message with its time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._sock: socket.socket | None = None
        self._arrived: asyncio.Event | None = None

    def open(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        self._sock.bind(str(self.path))
        self._arrived = asyncio.Event()
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._read)

    def _read(self) -> None:
        assert self._sock is not None and self._arrived is not None
        while True:
            try:
                data = self._sock.recv(4096)
            except BlockingIOError:
                break
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.perf_counter(), fields))
        self._arrived.set()

    async def wait_for(self, key: str, since: int = 0) -> tuple[float, dict[str, str]]:
        """The first message at index ≥ ``since`` that has ``key`` (e.g. READY)."""
        assert self._arrived is not None
        while True:
            for stamp, fields in self.messages[since:]:
                if key in fields:
                    return stamp, fields
            self._arrived.clear()
            await self._arrived.wait()

    def close(self) -> None:
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


# -- the daemon process ------------------------------------------------------------------


class DaemonFailed(RuntimeError):
    """The daemon exited before it said READY=1."""


class Daemon:
    """``python -m flicbridge run --config FILE`` with its own notify socket and log file."""

    def __init__(
        self,
        config: Mapping[str, Any],
        workdir: Path,
        *,
        env: Mapping[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
        log_level: str = "info",
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "flicbridge.toml"
        self.config_path.write_text(toml_dumps(config))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FLICBRIDGE_")}
        self.env.update(env or {})
        self.preexec_fn = preexec_fn
        self.log_level = log_level
        self.notify = NotifySocket(workdir / "notify.sock")
        self.process: asyncio.subprocess.Process | None = None
        self.url = ""
        self.incarnation = 0
        self.ready_s = math.nan
        self._log_files: list[Path] = []

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def log_path(self) -> Path:
        return self.workdir / f"daemon-{self.incarnation}.log"

    def command(self) -> list[str]:
        """The command line that starts this daemon."""
        return [
            sys.executable,
            "-m",
            "flicbridge",
            "run",
            "--config",
            str(self.config_path),
            "--log-level",
            self.log_level,
        ]

    async def start(self, timeout: float = 20.0) -> float:
        """Spawn the daemon and wait for READY=1; return the seconds from spawn to READY."""
        command = self.command()
        if self.notify._sock is None:
            self.notify.open()
        self.incarnation += 1
        self._log_files.append(self.log_path)
        since = len(self.notify.messages)
        env = {**self.env, "NOTIFY_SOCKET": str(self.notify.path)}
        # A local file, opened once before the spawn: nothing to wait for.
        with open(self.log_path, "wb") as log:  # noqa: ASYNC230
            spawned = time.perf_counter()
            self.process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                preexec_fn=self.preexec_fn,
            )
        ready = asyncio.ensure_future(self.notify.wait_for("READY", since))
        exited = asyncio.ensure_future(self.process.wait())
        try:
            async with asyncio.timeout(timeout):
                await asyncio.wait({ready, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
        if not ready.done():
            ready.cancel()
            raise DaemonFailed(
                f"daemon exited with {self.process.returncode} before READY=1:\n{self.log_text()}"
            )
        stamp, fields = ready.result()
        status = fields.get("STATUS", "")
        self.url = status.rsplit(" ", 1)[-1] if "http" in status else ""
        self.ready_s = stamp - spawned
        return self.ready_s

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)

    async def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait (SIGKILL after ``timeout``); the exit code."""
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout):
                return await self.process.wait()
        except TimeoutError:
            self.kill()
            return await self.process.wait()

    async def wait(self) -> int:
        assert self.process is not None
        return await self.process.wait()

    def rss_kb(self) -> int:
        return proc_status_kb(self.pid, "VmRSS")

    def hwm_kb(self) -> int:
        """Peak resident set size since start (the kernel's high-water mark)."""
        return proc_status_kb(self.pid, "VmHWM")

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def log_text(self, incarnation: int | None = None) -> str:
        path = self._log_files[(incarnation or self.incarnation) - 1]
        return path.read_text(errors="replace") if path.exists() else ""

    def log_events(self, incarnation: int | None = None) -> list[dict[str, Any]]:
        """The JSON log lines of one incarnation (default: the current one)."""
        events = []
        for line in self.log_text(incarnation).splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    events.append(json.loads(line))
        return events

    def close(self) -> None:
        self.kill()
        self.notify.close()
