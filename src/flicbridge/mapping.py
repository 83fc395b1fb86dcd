"""Mapping: which gesture on which button means On and which means Off."""

from __future__ import annotations

from flicbridge.config import ButtonConfig
from flicbridge.domain import Click, SignalState


def signal_for(button: ButtonConfig, click: Click, is_open: bool) -> SignalState | None:
    """The signal a gesture means for this button, or None when the gesture is unmapped.

    A ``toggle`` gesture flips the state the bridge knows: On when closed, Off when open.
    """
    if click in button.on:
        return SignalState.ON
    if click in button.off:
        return SignalState.OFF
    if click in button.toggle:
        return SignalState.OFF if is_open else SignalState.ON
    return None
