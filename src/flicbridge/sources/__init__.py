"""Sources of presses: flicd (pyflic), BLE direct, HTTP ingest, and the flicd simulator."""

from __future__ import annotations

from typing import Protocol

from flicbridge.domain import Press


class SourceListener(Protocol):
    """What a source reports to the bridge. Every method is called on the event loop and
    returns at once; a source never waits for the store or a sink."""

    def press(self, press: Press) -> None:
        """A gesture on a configured button, in arrival order."""

    def link(self, source: str, up: bool, detail: str) -> None:
        """The source's own connection (e.g. to flicd) went up or down."""

    def button_link(self, button_id: str, connected: bool, detail: str) -> None:
        """A button came into range (Ready) or went out of it."""

    def faults(self, source: str, reasons: list[str]) -> None:
        """What keeps a connected source from hearing every button (a button without a
        live channel, a detached controller); an empty list once nothing does."""

    def battery(self, button_id: str, percent: int) -> None:
        """A battery report for a button."""
