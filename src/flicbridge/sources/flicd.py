"""The flicd source: presses, button links and battery levels from the Flic SDK daemon.

One ``FixedFlicClient`` per TCP connection. On every (re)connect the source creates a
new client, one connection channel per configured button that listens only to the
ButtonSingleOrDoubleClickOrHold family (flicd sends all four families for every
gesture; listening to more would count a press twice), and one battery listener per
button. A ping every ``ping_interval`` proves flicd still answers: a hung flicd with an
open socket is treated like a lost one. Reconnects go on forever with capped,
fully jittered exponential backoff starting at 0.5 s; a connection that answered a
ping counts as up, and resets the backoff when it later drops.

A connection is reported up only once flicd has answered a ping on it: a flicd that
accepts connections but says nothing (hung, or sending garbage or a packet that never
ends) never looks alive. While it is up, the source also reports what keeps a button
unheard (``SourceListener.faults``): a button whose connection channel flicd removed
(for any reason) or refused (e.g. MaxPendingConnectionsReached) until a new channel is
live, and a Bluetooth controller that is not Attached (from CmdGetInfo at connect and
every EvtBluetoothControllerStateChange). A removed or refused channel is re-created
for as long as the connection lasts, with the same capped, jittered backoff per button.

Presses are logged at debug level only: the bridge logs one event per press with its
decision.
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Callable, Mapping
from typing import Any

import structlog
from pyflic import asyncio as pyflic_asyncio

from flicbridge.delivery import backoff_delay
from flicbridge.domain import Click, Press, utcnow
from flicbridge.sources import SourceListener
from flicbridge.sources.flicd_client import DUPLICATE_GESTURE_EVENTS, FixedFlicClient, connect

log = structlog.get_logger(__name__)

SOURCE = "flicd"
BACKOFF_INITIAL_S = 0.5

# The enums must come from pyflic.asyncio: pyflic and pyflic.asyncio each define their
# own (unequal) ClickType, ConnectionStatus, … classes.
_ClickType: Any = pyflic_asyncio.ClickType
_ConnectionStatus: Any = pyflic_asyncio.ConnectionStatus
_CreateError: Any = pyflic_asyncio.CreateConnectionChannelError
_CLICKS: dict[Any, Click] = {
    _ClickType.ButtonSingleClick: Click.SINGLE,
    _ClickType.ButtonDoubleClick: Click.DOUBLE,
    _ClickType.ButtonHold: Click.HOLD,
}


class FlicdSource:
    """Reports presses, button links and battery levels from flicd to a ``SourceListener``."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        buttons: Mapping[str, str],
        listener: SourceListener,
        reconnect_max: float,
        ping_interval: float = 10.0,
        ping_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._buttons = {addr.lower(): button_id for addr, button_id in buttons.items()}
        self._listener = listener
        self._reconnect_max = reconnect_max
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._connect_timeout = connect_timeout
        self._rng = rng if rng is not None else random.Random()
        self._client: FixedFlicClient | None = None
        self._button_up: dict[str, bool] = {}
        self._last_link: tuple[bool, str] | None = None
        # Per connection: which buttons have a live channel, why not, and the controller.
        self._channel_live: dict[str, bool] = {}
        self._channel_detail: dict[str, str] = {}
        self._channel_attempts: dict[str, int] = {}  # re-creations since the button was Ready
        self._recreate: dict[str, asyncio.TimerHandle] = {}
        self._controller: str | None = None
        self._last_faults: tuple[str, ...] | None = None

    @property
    def connected(self) -> bool:
        """Whether a live connection to flicd is open right now."""
        return self._client is not None and not self._client.closed.done()

    async def run(self) -> None:
        """Stay connected to flicd until cancelled, reconnecting forever."""
        attempt = 0
        while True:
            try:
                client = await connect(self._host, self._port, self._connect_timeout)
                # Only ButtonSingleOrDoubleClickOrHold is listened to; flicd sends every
                # gesture four times over (one per family), so skip decoding the rest.
                client.skip_events = DUPLICATE_GESTURE_EVENTS
            except (OSError, TimeoutError) as exc:
                reason = f"connect to {self._host}:{self._port} failed: {exc or 'timed out'}"
                self._report_link(False, reason)
            else:
                healthy = await self._serve(client)
                if healthy:
                    attempt = 0  # the connection stayed up: a fresh outage starts small
            delay = backoff_delay(
                attempt, initial=BACKOFF_INITIAL_S, cap=self._reconnect_max, rng=self._rng
            )
            attempt += 1
            # One line per backoff step; once at the cap a flicd that stays down costs no
            # more log (the failure itself is logged once per distinct reason).
            if BACKOFF_INITIAL_S * 2 ** min(attempt - 2, 32) < self._reconnect_max:
                log.info("flicd_reconnect_scheduled", delay_s=round(delay, 3), attempt=attempt)
            else:
                log.debug("flicd_reconnect_scheduled", delay_s=round(delay, 3), attempt=attempt)
            await asyncio.sleep(delay)

    # -- one connection -----------------------------------------------------------------

    async def _serve(self, client: FixedFlicClient) -> bool:
        """Use ``client`` until it dies; True if it answered at least one ping."""
        self._client = client
        answered = False
        hung = False
        reason = "stopped"
        try:
            # Proof of life first: flicd answers commands in order, so nothing is
            # subscribed (and nothing reported up) before it has answered this ping.
            try:
                await client.ping(self._ping_timeout)
            except TimeoutError:
                reason = (
                    f"flicd accepted the connection but did not answer a ping within "
                    f"{self._ping_timeout:g} s"
                )
                hung = True
                return answered
            except ConnectionError as exc:
                reason = str(exc)
                return answered
            answered = True
            # Both reports run without a pause between them: nobody sees a link that is
            # up before its faults (no channel yet, controller unknown) are known.
            self._report_link(True, f"connected to {self._host}:{self._port}")
            self._start_connection(client)
            client.get_info()  # its answer (the controller state) comes before the channels'
            self._subscribe(client)
            while True:
                done, _ = await asyncio.wait({client.closed}, timeout=self._ping_interval)
                if done:
                    reason = client.closed.result()
                    break
                try:
                    await client.ping(self._ping_timeout)
                except TimeoutError:
                    reason = f"flicd did not answer a ping within {self._ping_timeout:g} s"
                    hung = True
                    break
                except ConnectionError as exc:
                    reason = str(exc)
                    break
                answered = True
        finally:
            if hung:
                client.abort()  # a hung flicd may never read what close() would wait to flush
            else:
                client.close()
            self._client = None
            for timer in self._recreate.values():
                timer.cancel()
            self._recreate.clear()
            self._report_link(False, reason)
        return answered

    def _start_connection(self, client: FixedFlicClient) -> None:
        """Fresh per-connection state: no channel live yet, controller state unknown."""
        self._channel_live = dict.fromkeys(self._buttons.values(), False)
        self._channel_detail = dict.fromkeys(self._buttons.values(), "channel requested")
        self._controller = None
        client.on_get_info = self._on_get_info
        client.on_bluetooth_controller_state_change = self._on_controller_state
        self._report_faults()

    def _subscribe(self, client: FixedFlicClient) -> None:
        client.on_new_verified_button = self._on_new_verified_button
        client.on_button_deleted = self._on_button_deleted
        for addr, button_id in self._buttons.items():
            self._add_channel(client, addr, button_id)
            battery: Any = pyflic_asyncio.BatteryStatusListener(addr)
            battery.on_battery_status = functools.partial(self._on_battery, button_id)
            client.add_battery_status_listener(battery)

    def _add_channel(self, client: FixedFlicClient, addr: str, button_id: str) -> None:
        channel: Any = pyflic_asyncio.ButtonConnectionChannel(addr)
        channel.on_create_connection_channel_response = functools.partial(
            self._on_channel_created, button_id
        )
        channel.on_connection_status_changed = functools.partial(self._on_status_changed, button_id)
        channel.on_removed = functools.partial(self._on_channel_removed, button_id)
        channel.on_button_single_or_double_click_or_hold = functools.partial(
            self._on_click, button_id
        )
        client.add_connection_channel(channel)

    def _channel_lost(self, button_id: str, detail: str) -> None:
        """The button has no channel: report it and schedule a new one (capped backoff)."""
        self._channel_live[button_id] = False
        self._channel_detail[button_id] = detail
        self._report_faults()
        client = self._client
        if client is None or client.closed.done() or button_id in self._recreate:
            return
        attempt = self._channel_attempts.get(button_id, 0)
        self._channel_attempts[button_id] = attempt + 1
        delay = backoff_delay(
            attempt, initial=BACKOFF_INITIAL_S, cap=self._reconnect_max, rng=self._rng
        )
        growing = BACKOFF_INITIAL_S * 2 ** min(attempt - 1, 32) < self._reconnect_max
        (log.info if growing else log.debug)(
            "flicd_channel_recreate_scheduled", button=button_id, delay_s=round(delay, 3)
        )
        loop = asyncio.get_running_loop()
        self._recreate[button_id] = loop.call_later(
            delay, self._recreate_channel, client, button_id
        )

    def _recreate_channel(self, client: FixedFlicClient, button_id: str) -> None:
        self._recreate.pop(button_id, None)
        if client is not self._client or client.closed.done():
            return  # that connection is gone; a new one creates its own channels
        addr = next(a for a, b in self._buttons.items() if b == button_id)
        # The fault keeps its reason (why the last channel went) until a channel is live:
        # a flicd that keeps refusing then changes nothing that is reported or logged.
        self._add_channel(client, addr, button_id)

    def faults(self) -> list[str]:
        """What keeps a connected flicd from hearing every configured button; [] when none."""
        if self._client is None:
            return []  # the link itself is down, and reported as such
        reasons: list[str] = []
        if self._controller is None:
            reasons.append("Bluetooth controller state not reported yet")
        elif self._controller != "Attached":
            reasons.append(f"Bluetooth controller is {self._controller}")
        for button_id, live in self._channel_live.items():
            if not live:
                detail = self._channel_detail.get(button_id, "")
                reasons.append(f"button {button_id} has no live channel: {detail}")
        return reasons

    def _report_faults(self) -> None:
        faults = tuple(self.faults())
        if faults == self._last_faults:
            return
        self._last_faults = faults
        self._listener.faults(SOURCE, list(faults))

    def _on_get_info(self, items: dict[str, Any]) -> None:
        self._on_controller_state(items["bluetooth_controller_state"])

    def _on_controller_state(self, state: Any) -> None:
        name = str(getattr(state, "name", state))
        if name != self._controller:
            level = log.info if name == "Attached" else log.warning
            level("flicd_bluetooth_controller", state=name)
        self._controller = name
        self._report_faults()

    # -- reports ------------------------------------------------------------------------

    def _report_link(self, up: bool, detail: str) -> None:
        if self._last_link == (up, detail):
            return  # a repeated failure (same reason) is not news
        self._last_link = (up, detail)
        if up:
            log.info("flicd_connected", detail=detail)
        else:
            log.warning("flicd_disconnected", detail=detail)
            self._report_faults()  # a link that is down speaks for itself
            # Without flicd nobody knows where the buttons are.
            for button_id, was_up in self._button_up.items():
                if was_up:
                    self._report_button(button_id, False, "flicd unreachable")
        self._listener.link(SOURCE, up, detail)

    def _report_button(self, button_id: str, connected: bool, detail: str) -> None:
        self._button_up[button_id] = connected
        log.info("button_link", button=button_id, connected=connected, detail=detail)
        self._listener.button_link(button_id, connected, detail)

    # -- pyflic callbacks (first argument bound with functools.partial) -------------------

    def _on_click(
        self, button_id: str, channel: Any, click_type: Any, was_queued: Any, time_diff: Any
    ) -> None:
        click = _CLICKS.get(click_type)
        if click is None:
            log.warning("flicd_unexpected_click_type", button=button_id, click_type=str(click_type))
            return
        queued = bool(was_queued)
        press = Press(
            button_id=button_id,
            click=click,
            received_at=utcnow(),
            delay_s=float(time_diff) if queued else 0.0,
            queued=queued,
            source=SOURCE,
        )
        log.debug(
            "press_received",
            button=button_id,
            click=click.value,
            queued=queued,
            delay_s=press.delay_s,
        )
        self._listener.press(press)

    def _on_channel_created(
        self, button_id: str, channel: Any, error: Any, connection_status: Any
    ) -> None:
        if error != _CreateError.NoError:
            # Loud the first time; a flicd that keeps refusing costs one debug line per retry.
            if self._channel_attempts.get(button_id, 0) == 0:
                log.error("flicd_channel_refused", button=button_id, error=error.name)
                self._report_button(button_id, False, error.name)
            else:
                log.debug("flicd_channel_refused", button=button_id, error=error.name)
            self._channel_lost(button_id, f"channel refused: {error.name}")
            return
        self._channel_live[button_id] = True
        self._channel_detail[button_id] = ""
        self._report_faults()
        if connection_status == _ConnectionStatus.Ready:
            self._channel_attempts.pop(button_id, None)
        self._report_button(
            button_id, connection_status == _ConnectionStatus.Ready, connection_status.name
        )

    def _on_status_changed(
        self, button_id: str, channel: Any, connection_status: Any, disconnect_reason: Any
    ) -> None:
        if connection_status == _ConnectionStatus.Ready:
            self._channel_attempts.pop(button_id, None)  # heard again: a new removal starts small
            self._report_button(button_id, True, connection_status.name)
        elif connection_status == _ConnectionStatus.Disconnected:
            # Flic 2 buttons disconnect on purpose to save power: news, not a fault.
            self._report_button(button_id, False, disconnect_reason.name)
        else:  # Connected: still verifying, Ready follows
            log.debug("button_verifying", button=button_id)

    def _on_channel_removed(self, button_id: str, channel: Any, removed_reason: Any) -> None:
        # flicd sends no more events on this channel: the button is deaf until a new one.
        log.warning("flicd_channel_removed", button=button_id, reason=removed_reason.name)
        self._report_button(button_id, False, f"channel removed: {removed_reason.name}")
        self._channel_lost(button_id, f"channel removed: {removed_reason.name}")

    def _on_battery(self, button_id: str, listener: Any, percent: Any, timestamp: Any) -> None:
        if not isinstance(percent, int) or percent < 0:
            log.debug("battery_unknown", button=button_id)  # flicd sends -1 until it knows
            return
        log.debug("battery_reported", button=button_id, percent=percent)
        self._listener.battery(button_id, percent)

    def _on_new_verified_button(self, bd_addr: str) -> None:
        button_id = self._buttons.get(bd_addr.lower())
        if button_id is None:
            log.info("flicd_unconfigured_button_verified", address=bd_addr)
        else:
            log.info("flicd_button_verified", button=button_id)

    def _on_button_deleted(self, bd_addr: str, deleted_by_this_client: bool) -> None:
        button_id = self._buttons.get(bd_addr.lower())
        if button_id is None:
            log.info("flicd_unconfigured_button_deleted", address=bd_addr)
        else:
            log.warning("flicd_button_deleted", button=button_id)


async def run_scan_wizard(
    host: str,
    port: int,
    timeout: float,  # noqa: ASYNC109  # the wizard's deadline is the caller's (CLI --timeout)
    on_progress: Callable[[str], None] | None = None,
) -> tuple[str, str | None, str | None]:
    """Run flicd's scan wizard once: (ScanWizardResult name, bd_addr or None, name or None).

    Past ``timeout`` the wizard is cancelled (result ``WizardCancelledByUser``, or
    ``WizardFailedTimeout`` if flicd never confirms the cancel). OSError/TimeoutError
    if flicd cannot be reached.
    """
    progress = on_progress if on_progress is not None else (lambda _message: None)
    client = await connect(host, port, timeout=min(timeout, 5.0))
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[tuple[str, str | None, str | None]] = loop.create_future()

    def completed(_wizard: Any, result: Any, bd_addr: str | None, name: str | None) -> None:
        if not outcome.done():
            outcome.set_result((result.name, bd_addr, name))

    wizard: Any = pyflic_asyncio.ScanWizard()
    wizard.on_found_private_button = lambda _w: progress(
        "found a private button: hold it down for 7 seconds to make it public"
    )
    wizard.on_found_public_button = lambda _w, addr, name: progress(f"found {name} ({addr})")
    wizard.on_button_connected = lambda _w, addr, name: progress(f"connected to {name}, pairing")
    wizard.on_completed = completed
    watched: set[asyncio.Future[Any]] = {outcome, client.closed}
    try:
        client.add_scan_wizard(wizard)
        await asyncio.wait(watched, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if outcome.done():
            return outcome.result()
        if client.closed.done():
            raise ConnectionError(f"flicd closed the connection: {client.closed.result()}")
        client.cancel_scan_wizard(wizard)
        await asyncio.wait(watched, timeout=2.0, return_when=asyncio.FIRST_COMPLETED)
        if outcome.done():
            return outcome.result()
        return ("WizardFailedTimeout", None, None)
    finally:
        client.close()
