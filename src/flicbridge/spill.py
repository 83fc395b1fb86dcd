"""Held presses that outlive the process: an fsync'd, append-only JSON-lines file.

While the store cannot commit (disk full, read-only, frozen, the file deleted), a press
is held in memory. So that a restart does not lose it, every held press is also appended
here, each line fsync'd: ``{"id": ..., "press": {...}}`` when it is held, ``{"done": id}``
once the store committed it. At start, and when the store recovers, the bridge replays,
in order, every press without its ``done`` line, then removes the file. The file should
live on another filesystem than the store (the default is ``$RUNTIME_DIRECTORY``, a tmpfs
under systemd), so that a full or read-only store disk does not stop it too. A press that
can be neither committed nor written here is logged ``press_lost`` with its content.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from flicbridge.domain import Click, Press, Signal, SignalState

log = structlog.get_logger(__name__)

FILE_NAME = "flicbridge-held-presses.jsonl"


def default_path(store: Path) -> Path:
    """``$RUNTIME_DIRECTORY`` (set by systemd's RuntimeDirectory=) or beside the store."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return Path(runtime) / FILE_NAME
    return store.with_name(store.name + ".held.jsonl")


def to_json(signal: Signal) -> dict[str, Any]:
    press = signal.press
    return {
        "button_id": signal.button_id,
        "state": signal.state.value,
        "origin": signal.origin,
        "received_at": signal.received_at.isoformat(),
        "info": signal.info,
        "press": None
        if press is None
        else {
            "click": press.click.value,
            "received_at": press.received_at.isoformat(),
            "delay_s": press.delay_s,
            "queued": press.queued,
            "source": press.source,
            "info": press.info,
        },
    }


def from_json(data: dict[str, Any]) -> Signal:
    p = data.get("press")
    press = (
        None
        if p is None
        else Press(
            button_id=data["button_id"],
            click=Click(p["click"]),
            received_at=datetime.fromisoformat(p["received_at"]),
            delay_s=float(p["delay_s"]),
            queued=bool(p["queued"]),
            source=str(p["source"]),
            info=str(p["info"]),
        )
    )
    return Signal(
        button_id=data["button_id"],
        state=SignalState(data["state"]),
        origin=data["origin"],
        received_at=datetime.fromisoformat(data["received_at"]),
        press=press,
        info=data.get("info", ""),
    )


class Spill:
    """The held-press file of one bridge."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _append(self, line: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (json.dumps(line) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def hold(self, spill_id: str, signal: Signal) -> None:
        """Keep ``signal`` durably until ``done``; OSError when it cannot be written."""
        self._append({"id": spill_id, "signal": to_json(signal)})

    def done(self, spill_id: str) -> None:
        self._append({"done": spill_id})

    def pending(self) -> list[tuple[str, Signal]]:
        """Held signals not yet committed, in the order they were held."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        except OSError as exc:  # unreadable: nothing can be replayed from it; say so
            log.error("spill_unreadable", path=str(self.path), error=str(exc))
            return []
        held: dict[str, Signal] = {}
        for line in text.splitlines():
            try:
                entry = json.loads(line)
                if "done" in entry:
                    held.pop(entry["done"], None)
                else:
                    held.setdefault(entry["id"], from_json(entry["signal"]))
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by a crash mid-write: the rest still counts
        return list(held.items())

    def clear(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("spill_not_cleared", path=str(self.path), error=str(exc))
