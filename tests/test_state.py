"""The state machine mirrors AlertOps' inbound mapping."""

from datetime import UTC, datetime, timedelta

from flicbridge.domain import Decision, SignalState
from flicbridge.state import AlertState, decide

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ON, OFF = SignalState.ON, SignalState.OFF


def test_on_when_closed_opens() -> None:
    """An On with nothing open opens the alert and remembers when it was sent."""
    decision, state = decide(AlertState("k", "b"), ON, T0, 60)
    assert decision is Decision.OPEN
    assert state.is_open and state.opened_at == T0 and state.last_on_sent_at == T0


def test_repeat_on_within_suppress_window_is_appended_not_sent() -> None:
    """A panicked second press pages once: appended, not sent."""
    _, state = decide(AlertState("k", "b"), ON, T0, 60)
    decision, after = decide(state, ON, T0 + timedelta(seconds=59), 60)
    assert decision is Decision.APPENDED and not decision.sends
    assert after.last_on_sent_at == T0


def test_repeat_on_after_window_is_resent() -> None:
    """An On long after the last sent one is re-sent (the platform may have closed it)."""
    _, state = decide(AlertState("k", "b"), ON, T0, 60)
    decision, after = decide(state, ON, T0 + timedelta(seconds=60), 60)
    assert decision is Decision.RESENT and decision.sends and decision.action == "open"
    assert after.last_on_sent_at == T0 + timedelta(seconds=60)
    assert after.opened_at == T0


def test_suppress_window_counts_from_last_sent_on() -> None:
    """Appended presses do not extend the window; the last *sent* On does."""
    _, s = decide(AlertState("k", "b"), ON, T0, 60)
    _, s = decide(s, ON, T0 + timedelta(seconds=50), 60)  # appended
    decision, _ = decide(s, ON, T0 + timedelta(seconds=61), 60)
    assert decision is Decision.RESENT


def test_off_when_open_closes() -> None:
    """An Off with an open alert closes it and is sent."""
    _, state = decide(AlertState("k", "b"), ON, T0, 60)
    decision, after = decide(state, OFF, T0, 60)
    assert decision is Decision.CLOSE and decision.sends and decision.action == "close"
    assert not after.is_open


def test_off_when_closed_is_ignored() -> None:
    """An Off with nothing open is recorded as ignored and not sent."""
    decision, after = decide(AlertState("k", "b"), OFF, T0, 60)
    assert decision is Decision.IGNORED and not decision.sends
    assert not after.is_open
