"""Sink adapters, one module per platform; ``build_sink`` turns a sink config into one."""

from __future__ import annotations

from flicbridge.config import SinkConfig
from flicbridge.sinks.alertops import AlertOpsSink
from flicbridge.sinks.base import HttpRequest, Sink
from flicbridge.sinks.flashduty import FlashdutySink
from flicbridge.sinks.ilert import IlertSink
from flicbridge.sinks.incidentio import IncidentIoSink
from flicbridge.sinks.mqtt import MqttSink
from flicbridge.sinks.ntfy import NtfySink
from flicbridge.sinks.opsgenie import OpsgenieSink
from flicbridge.sinks.pagerduty import PagerDutySink
from flicbridge.sinks.pushover import PushoverSink
from flicbridge.sinks.splunk_oncall import SplunkOnCallSink
from flicbridge.sinks.webhook import WebhookSink

SINK_CLASSES: dict[str, type[Sink]] = {
    cls.type: cls
    for cls in (
        AlertOpsSink,
        WebhookSink,
        PagerDutySink,
        IlertSink,
        FlashdutySink,
        OpsgenieSink,
        SplunkOnCallSink,
        IncidentIoSink,
        NtfySink,
        PushoverSink,
        MqttSink,
    )
}


def build_sink(config: SinkConfig, site: str | None) -> Sink:
    """The sink for ``config``; ``site`` names the bridge where a platform wants a source."""
    return SINK_CLASSES[config.type](config, site=site)


__all__ = [
    "SINK_CLASSES",
    "AlertOpsSink",
    "FlashdutySink",
    "HttpRequest",
    "IlertSink",
    "IncidentIoSink",
    "MqttSink",
    "NtfySink",
    "OpsgenieSink",
    "PagerDutySink",
    "PushoverSink",
    "Sink",
    "SplunkOnCallSink",
    "WebhookSink",
    "build_sink",
]
