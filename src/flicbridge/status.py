"""The status document: one typed snapshot of a running bridge (``Core.status``).

The API's ``GET /api/v1/status``, the status page and ``flicbridge status`` all show this
one document. Its models are the API's response schema too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel

from flicbridge import __version__

if TYPE_CHECKING:
    from flicbridge.config import Config
    from flicbridge.dispatcher import Dispatcher
    from flicbridge.sinks.base import Sink
    from flicbridge.state import AlertState
    from flicbridge.store import AckRecord, Store

STATUS_READ_WAIT = 0.5  # seconds the status waits for the disk before answering from memory


@dataclass
class ButtonStatus:
    """What the bridge knows of a button's radio side."""

    connected: bool | None = None
    detail: str = ""
    battery: int | None = None
    battery_low: bool = False
    last_press: str | None = None
    last_decision: str | None = None


@dataclass
class Health:
    """Readiness inputs: the store and every radio source."""

    store_ok: bool = True
    store_error: str = ""
    source_up: dict[str, bool] = field(default_factory=dict)
    source_detail: dict[str, str] = field(default_factory=dict)
    source_faults: dict[str, list[str]] = field(default_factory=dict)


class StatusButton(BaseModel):
    id: str
    name: str
    alert_key: str
    source: str
    state: Literal["open", "closed"]
    opened_at: str | None
    last_press: str | None
    last_decision: str | None
    connected: bool | None
    link_detail: str
    battery: int | None
    acknowledged_by: str | None
    acknowledged_at: str | None
    sinks: list[str]


class StatusSink(BaseModel):
    id: str
    type: str
    url: str
    pending: int
    dead: int
    delivered_kept: int
    last_success: float | None
    last_error: str | None
    paused_until: float | None


class StatusStore(BaseModel):
    path: str
    ok: bool


class StatusSource(BaseModel):
    connected: bool
    detail: str


class StatusOut(BaseModel):
    version: str
    site: str | None
    uptime_s: float
    ready: bool
    reasons: list[str]
    store: StatusStore
    sources: dict[str, StatusSource]
    buttons: list[StatusButton]
    sinks: list[StatusSink]


async def snapshot(
    config: Config,
    *,
    store: Store,
    dispatcher: Dispatcher,
    sinks: Mapping[str, Sink],
    states: Mapping[str, AlertState],
    buttons: Mapping[str, ButtonStatus],
    acks: Mapping[str, AckRecord],
    health: Health,
    readiness: Callable[[], list[str]],
    uptime_s: float,
) -> StatusOut:
    """The status, from the running parts; answers within about ``STATUS_READ_WAIT``
    even while the disk stalls (the row counts then come from memory)."""
    counts = await store.counts_within(STATUS_READ_WAIT)  # memory if the disk stalls
    reasons = readiness()
    depth = dispatcher.depth()
    button_out: list[StatusButton] = []
    for button in config.buttons:
        key = config.alert_key(button)
        state = states.get(key)
        link = buttons[button.id]
        ack = acks.get(key)
        button_out.append(
            StatusButton(
                id=button.id,
                name=button.display_name,
                alert_key=key,
                source=button.source,
                state="open" if state and state.is_open else "closed",
                opened_at=state.opened_at.isoformat() if state and state.opened_at else None,
                last_press=link.last_press,
                last_decision=link.last_decision,
                connected=link.connected,
                link_detail=link.detail,
                battery=link.battery,
                acknowledged_by=ack.by if ack else None,
                acknowledged_at=ack.at.isoformat() if ack else None,
                sinks=[s.id for s in config.sinks_of(button)],
            )
        )
    sink_out: list[StatusSink] = []
    for sink_id, sink in sinks.items():
        gate = dispatcher.gates[sink_id]
        sink_out.append(
            StatusSink(
                id=sink_id,
                type=sink.type,
                url=sink.public_url,
                pending=depth.get(sink_id, 0),
                dead=counts.get(sink_id, {}).get("dead", 0),
                delivered_kept=counts.get(sink_id, {}).get("delivered", 0),
                last_success=gate.last_success,
                last_error=gate.last_error,
                paused_until=gate.paused_until or None,
            )
        )
    return StatusOut(
        version=__version__,
        site=config.site,
        uptime_s=round(uptime_s, 1),
        ready=not reasons,
        reasons=reasons,
        store=StatusStore(path=str(store.path), ok=health.store_ok),
        sources={
            name: StatusSource(connected=up, detail=health.source_detail.get(name, ""))
            for name, up in health.source_up.items()
        },
        buttons=button_out,
        sinks=sink_out,
    )
