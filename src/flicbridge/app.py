"""The bridge: the one wiring point. It builds every part, hands each what it needs, and runs
them under one TaskGroup.

Sources → ``Intake`` (mapping, state machine, commit; intake.py) → store → dispatcher →
sinks. Beside the pipeline: ``Telemetry`` (metrics, readiness, health alerts;
telemetry.py), ``Acknowledgements`` (acks.py), ``ExecTokens`` and the announcements of
local alerts (tokens.py), the subscriptions, the direct sinks, the HTTP server and the
heartbeat. The parts never see the Bridge: each gets the shared values and the narrow
callables it needs. The Bridge is the ``core.Core`` the server and the CLI are handed,
and the ``SourceListener`` of every radio source; it delegates both to the parts.

Constructors only assign; ``run`` starts every unit under one TaskGroup and stops them in
order on ``stop``: sources first (no new presses), then deliveries in flight (bounded by
the HTTP timeout), then pending commits, then the store.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import structlog
from aiohttp import web

from flicbridge import __version__
from flicbridge.acks import Acknowledgements, FeedbackEvent
from flicbridge.alerts import AlertBus
from flicbridge.clock import ScheduleClock, loop_time
from flicbridge.config import ButtonConfig, Config
from flicbridge.core import Accepted, ExecToken
from flicbridge.dispatcher import Dispatcher
from flicbridge.domain import Action, Press, Signal, action_signal
from flicbridge.heartbeat import Heartbeat
from flicbridge.intake import Intake
from flicbridge.metrics import Metrics
from flicbridge.notify import Notifier, watchdog_loop
from flicbridge.server.limits import BoundedRunner
from flicbridge.server.wiring import build_app
from flicbridge.sinks import build_sink
from flicbridge.sinks.base import DirectSink, Sink
from flicbridge.spill import Spill, default_path
from flicbridge.state import AlertState
from flicbridge.status import ButtonStatus, Health, StatusOut, snapshot
from flicbridge.store import AckRecord, OutboxRow, Store
from flicbridge.subscriptions import Subscriptions
from flicbridge.telemetry import Telemetry
from flicbridge.tokens import Announcements, ExecTokens

log = structlog.get_logger(__name__)


class Bridge:
    """One running flicbridge. Implements ``core.Core`` and, for every source,
    ``SourceListener``."""

    def __init__(
        self,
        config: Config,
        *,
        notifier: Notifier | None = None,
        clock: Callable[[], float] = time.time,
        mono: Callable[[], float] = loop_time,
        radio: bool = True,
    ) -> None:
        self.config = config
        self.radio = radio  # False: no flicd or BLE source (a one-off send from the CLI)
        self.clock = clock  # the wall clock, which NTP may step (clock.py)
        # Lifetimes kept in this process (exec tokens, silence, uptime) are measured on a
        # clock NTP cannot step; schedules kept in the store, on the schedule clock.
        self.mono = mono
        self.schedule = ScheduleClock(clock, mono)
        self.notifier = notifier or Notifier.from_env()
        self.metrics = Metrics()
        self.alerts_bus = AlertBus()
        self.health = Health()
        self.store = Store(
            config.store.path,
            history=config.store.history,
            on_health=self._store_health,
            clock=self.schedule.now,
        )
        self.sinks: dict[str, Sink] = {s.id: build_sink(s, config.site) for s in config.sinks}
        # Shared by the parts: the intake moves ``states``; the others only read it.
        self.states: dict[str, AlertState] = {}
        self.button_config: dict[str, ButtonConfig] = {b.id: b for b in config.buttons}
        self.buttons: dict[str, ButtonStatus] = {b.id: ButtonStatus() for b in config.buttons}
        self.telemetry = Telemetry(
            config,
            self.button_config,
            self.buttons,
            self.states,
            metrics=self.metrics,
            bus=self.alerts_bus,
            health=self.health,
            store_path=config.store.path,
            store_stalled=self.store.stalled,
            submit=self.submit,  # health alerts are signals like any other
            mono=mono,
        )
        self.dispatcher = Dispatcher(
            self.store,
            self.sinks,
            timeout=config.delivery.timeout,
            backoff_initial=config.delivery.backoff_initial,
            backoff_max=config.delivery.backoff_max,
            max_age=config.delivery.max_age,
            listener=self.telemetry,
            clock=self.schedule,
        )
        self.telemetry.watch_queues(self.dispatcher, list(self.sinks))
        self.acknowledgements = Acknowledgements(
            config, self.button_config, self.states, self.store, self.metrics, self.alerts_bus
        )
        self.acks: dict[str, AckRecord] = self.acknowledgements.records
        self.tokens = ExecTokens(mono)
        announcements = Announcements(
            self.alerts_bus,
            self.tokens,
            alert_key=config.alert_key,
            clear_ack=self.acknowledgements.clear,
        )
        # Presses held while the store cannot commit, also kept in a file (spill.py).
        spill = config.store.spill
        if spill is not None and not spill.is_absolute():
            spill = config.store.path.parent / spill
        self.spill = Spill(spill or default_path(config.store.path))
        self.intake = Intake(
            config,
            self.button_config,
            self.buttons,
            self.states,
            store=self.store,
            dispatcher=self.dispatcher,
            spill=self.spill,
            metrics=self.metrics,
            bus=self.alerts_bus,
            heard=self.telemetry.heard,
            announce=announcements.announce,
        )
        self.started_at = mono()
        self.url: str | None = None
        self._stop = asyncio.Event()
        self._ready = asyncio.Event()
        self.subscriptions = Subscriptions(self.store, self.alerts_bus, config, self.dispatcher)
        # Sinks with a connection of their own (MQTT) run beside the dispatcher, each with
        # the alert keys (and buttons) it serves.
        self.direct_sinks: list[tuple[DirectSink, dict[str, ButtonConfig]]] = [
            (
                sink,
                {
                    config.alert_key(b): b
                    for b in config.buttons
                    if any(s.id == sink.id for s in config.sinks_of(b))
                },
            )
            for sink in self.sinks.values()
            if isinstance(sink, DirectSink)
        ]
        self.heartbeat: Heartbeat | None = None

    # -- lifecycle -------------------------------------------------------------------

    def stop(self) -> None:
        """Ask ``run`` to shut down (SIGTERM)."""
        self._stop.set()

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def run(self) -> None:
        """Run until ``stop``; raises StoreError when the store cannot be opened."""
        await self.store.open()
        runner: web.AppRunner | None = None
        try:
            self.states.update(await self.store.alerts())  # shared: filled, never rebound
            pushover = await self.acknowledgements.load(self.sinks)
            self.telemetry.start()
            await self.dispatcher.prepare()  # finds the backlog's lanes; rows stay on disk
            runner = BoundedRunner(build_app(self), access_log=None, handle_signals=False)
            await runner.setup()
            site = web.TCPSite(runner, self.config.server.host, self.config.server.port)
            await site.start()
            self.url = _site_url(runner)
            self.accepting = True
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.dispatcher.run(), name="dispatcher")
                tg.create_task(self.intake.replay_held(), name="replay-held")
                sources = [tg.create_task(c, name=n) for n, c in self._sources()]
                extras = [tg.create_task(self.subscriptions.run(), name="subscriptions")]
                extras += [
                    tg.create_task(sink.run(self, keys), name=f"sink:{sink.id}")
                    for sink, keys in self.direct_sinks
                ]
                tg.create_task(watchdog_loop(self.notifier), name="watchdog")
                tg.create_task(self.telemetry.run(), name="button-health")
                for sink in pushover:
                    on_ack = self.acknowledgements.receipt_acknowledged
                    tg.create_task(sink.watch(on_ack), name="pushover")
                if self.config.heartbeat.url is not None:
                    self.heartbeat = Heartbeat(self.config.heartbeat, self.telemetry.unhealthy)
                    tg.create_task(self.heartbeat.run(), name="heartbeat")
                await asyncio.sleep(0)  # let sources make their first connection attempt
                self.notifier.ready(f"listening on {self.url}")
                self._ready.set()
                log.info("started", version=__version__, url=self.url, sinks=list(self.sinks))
                await self._stop.wait()
                log.info("stopping")
                self.notifier.stopping()
                self.accepting = False
                for task in sources + extras:
                    task.cancel()
                await self.dispatcher.stop()
                await self.intake.drain(self.config.delivery.timeout)
                # Unwind the TaskGroup: every remaining task (dispatcher, watchdog) is cancelled.
                raise _Stopped
        except* _Stopped:
            pass
        finally:
            self.intake.close()  # a replay under way stops; the spill file keeps the rest
            self.acknowledgements.cancel_feedback()
            if runner is not None:
                await runner.cleanup()
            await self.store.close()
            log.info("stopped")

    def _sources(self) -> list[tuple[str, Any]]:
        coroutines: list[tuple[str, Any]] = []
        if not self.radio:
            return coroutines

        def addresses(source: str) -> dict[str, str]:
            """Address → button id of the buttons this source serves."""
            return {
                b.address.lower(): b.id
                for b in self.config.buttons
                if b.source == source and b.address is not None
            }

        flicd_buttons = addresses("flicd")
        if flicd_buttons:
            from flicbridge.sources.flicd import FlicdSource

            source = FlicdSource(
                host=self.config.flicd.host,
                port=self.config.flicd.port,
                buttons=flicd_buttons,
                listener=self,
                reconnect_max=self.config.flicd.reconnect_max,
                ping_interval=self.config.flicd.ping_interval,
            )
            self.health.source_up["flicd"] = False
            self.health.source_detail["flicd"] = "connecting"
            coroutines.append(("source:flicd", source.run()))
        ble_buttons = addresses("ble")
        if ble_buttons:
            from flicbridge.sources.ble import BleSource  # loads pyflic-ble only in its run()

            ble = BleSource(
                buttons=ble_buttons,
                listener=self,
                pairings=self.config.store.path.parent / "ble-pairings.json",
            )
            self.health.source_up["ble"] = False
            self.health.source_detail["ble"] = "starting"
            coroutines.append(("source:ble", ble.run()))
        return coroutines

    def _store_health(self, ok: bool, error: str) -> None:
        """The store's commits started failing or work again: the intake keeps or replays
        its held presses; telemetry records it and alerts."""
        self.intake.store_health(ok)
        self.telemetry.store_health(ok, error)

    @property
    def accepting(self) -> bool:
        """Whether new signals are taken (False before start and from ``stop`` on)."""
        return self.intake.accepting

    @accepting.setter
    def accepting(self, value: bool) -> None:
        self.intake.accepting = value

    def readiness(self) -> list[str]:
        """Why the bridge is not ready; empty when it is (``/readyz``, status)."""
        return self.telemetry.readiness(self.accepting)

    @property
    def lost(self) -> int:
        """Presses neither committed nor spilled: the exit status says so."""
        return self.intake.lost

    # -- SourceListener: presses to the intake, the rest to telemetry -------------------

    def press(self, press: Press) -> None:
        self.intake.press(press)

    def link(self, source: str, up: bool, detail: str) -> None:
        self.telemetry.link(source, up, detail)

    def faults(self, source: str, reasons: list[str]) -> None:
        self.telemetry.faults(source, reasons)

    def button_link(self, button_id: str, connected: bool, detail: str) -> None:
        self.telemetry.button_link(button_id, connected, detail)

    def battery(self, button_id: str, percent: int) -> None:
        self.telemetry.battery(button_id, percent)

    # -- Core ------------------------------------------------------------------------

    def submit(
        self, signal: Signal, *, callback: tuple[str, str] | None = None, health: bool = False
    ) -> asyncio.Future[Accepted]:
        """Decide ``signal`` now and commit it (``Intake.submit``)."""
        return self.intake.submit(signal, callback=callback, health=health)

    def run_action(
        self,
        button_id: str,
        action: Action,
        *,
        origin: str,
        actor: str,
        callback: tuple[str, str] | None = None,
    ) -> asyncio.Future[Accepted]:
        """Submit the action's Off signal (``domain.action_signal``)."""
        signal = action_signal(button_id, action, origin=origin, actor=actor)
        return self.intake.submit(signal, callback=callback)

    def acknowledge(
        self, button_id: str, by: str, at: datetime | None = None, *, source: str
    ) -> AckRecord | None:
        """Record an acknowledgement of the button's open alert (``Acknowledgements``)."""
        return self.acknowledgements.acknowledge(button_id, by, at, source=source)

    def feedback(self, event: FeedbackEvent, button_id: str, by: str) -> None:
        """Start ``[feedback] command`` in the background (nothing when none is set)."""
        self.acknowledgements.feedback(event, button_id, by)

    def exec_token(self, token: str) -> ExecToken:
        """Take a single-use token for its action (``ExecTokens.take``)."""
        return self.tokens.take(token)

    def token_done(self, token: str, *, committed: bool) -> None:
        """The token's action was committed (spent) or not (usable again)."""
        self.tokens.done(token, committed=committed)

    async def drop(self, row_id: int) -> bool:
        """Delete a pending or dead row (an operator's choice); False if there is none."""
        dropped = await self.store.drop(row_id)
        if dropped is None:
            return False
        status, sink_id = dropped
        if status == "pending":
            self.dispatcher.forget(row_id, sink_id)
        return True

    async def requeue(self, row_id: int | None) -> list[OutboxRow]:
        steps = self.dispatcher.steps
        rows = await self.store.requeue(row_id)
        self.dispatcher.add(rows, since=steps)
        return rows

    async def outbox_rows(self, status: str, limit: int) -> list[OutboxRow]:
        """The newest ``limit`` rows of a status (pending, dead, delivered)."""
        return await self.store.rows(status, limit)

    async def status(self) -> StatusOut:
        """The status document (status.py)."""
        return await snapshot(
            self.config,
            store=self.store,
            dispatcher=self.dispatcher,
            sinks=self.sinks,
            states=self.states,
            buttons=self.buttons,
            acks=self.acks,
            health=self.health,
            readiness=self.readiness,
            uptime_s=self.mono() - self.started_at,
        )


class _Stopped(Exception):
    """Raised inside the TaskGroup to unwind it after an orderly stop."""


def _site_url(runner: web.AppRunner) -> str | None:
    for site in runner.sites:
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        for sock in sockets:
            host, port = sock.getsockname()[:2]
            return f"http://{host}:{port}"
    return None
