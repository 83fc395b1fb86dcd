"""MQTT sink: retained state, an event per decision, availability, Home Assistant discovery
and, optionally, On/Off commands.

The dispatcher hands each row to ``deliver``; it counts as delivered only once the broker
acknowledged both publishes (PUBACK, QoS 1). The connection itself is owned by ``run``:
connect, announce ``online`` (the broker's retained last will says ``offline``), publish
discovery and the last known states, and reconnect with capped, jittered backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import socket
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt
import structlog

from flicbridge.config import ButtonConfig, SinkConfig
from flicbridge.config import MqttSink as MqttSinkConfig
from flicbridge.domain import Click, Message, Signal, SignalState, utcnow
from flicbridge.sinks.base import DirectResult, DirectSink, SignalTaker

log = structlog.get_logger(__name__)

RECONNECT_INITIAL = 0.5
RECONNECT_MAX = 30.0
STATUS_INTERVAL = 5.0  # how often battery and connectivity are looked at
# CONNACK answers that no retry will change: the row is a dead letter with this reason.
_REFUSED = {4, 5, 134, 135}  # MQTT 3.1.1 codes and their MQTT 5 reason codes
GESTURES = [c.value for c in Click] + ["signal"]


def _slug(text: str) -> str:
    """An id HA accepts in a discovery topic: letters, digits, ``_`` and ``-``."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


class MqttSink(DirectSink):
    type = "mqtt"
    default_rate = 100.0

    def __init__(self, config: SinkConfig, *, site: str | None = None) -> None:
        super().__init__(config, site=site)
        assert isinstance(config, MqttSinkConfig)
        self.mqtt = config
        parts = urlsplit(self.url)
        self.tls = parts.scheme == "mqtts"
        self.host = parts.hostname or ""
        self.port = parts.port or (8883 if self.tls else 1883)
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        self.prefix = config.topic_prefix.rstrip("/")
        # Per bridge: a fleet shares a broker, so the site is part of every bridge-wide name.
        bridge_name = site or socket.gethostname()
        self.node_id = _slug(f"{self.prefix}_{bridge_name}_{self.id}")
        self.client_id = f"flicbridge-{_slug(bridge_name)}-{_slug(self.id)}"
        bridge_topic = f"{self.prefix}/{site}/bridge" if site else f"{self.prefix}/bridge"
        self.availability = f"{bridge_topic}/availability"
        self.client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()
        self.refused: str | None = None  # the broker's reason, when it refused our credentials
        self.last_error = "not connected yet"
        self.connects = 0  # successful connections, for tests and the log
        self.buttons: dict[str, ButtonConfig] = {}  # alert key → button
        self.states: dict[str, str] = {}  # alert key → last state the broker acknowledged
        self._status: dict[str, tuple[Any, Any]] = {}
        self._rng = random.Random()
        self.status_interval = STATUS_INTERVAL

    # -- topics --------------------------------------------------------------------

    def topic(self, key: str, leaf: str) -> str:
        return f"{self.prefix}/{key}/{leaf}"

    def discovery(self, key: str, button: ButtonConfig) -> dict[str, dict[str, Any]]:
        """Discovery topic → payload for one button (HA's MQTT discovery shapes)."""
        if not self.mqtt.discovery_prefix:
            return {}
        uid = _slug(f"{self.node_id}_{button.id}")
        device = {
            "identifiers": [uid],
            "name": button.display_name,
            "manufacturer": "Flic",
            "model": "Flic button",
        }
        common = {
            "availability_topic": self.availability,
            "payload_available": "online",
            "payload_not_available": "offline",
            "device": device,
        }
        dp = self.mqtt.discovery_prefix.rstrip("/")
        entities: dict[str, dict[str, Any]] = {
            f"{dp}/binary_sensor/{self.node_id}/{uid}_alert/config": {
                "name": "Alert",
                "unique_id": f"{uid}_alert",
                "state_topic": self.topic(key, "state"),
                "payload_on": "On",
                "payload_off": "Off",
                "device_class": "problem",
            },
            f"{dp}/sensor/{self.node_id}/{uid}_battery/config": {
                "name": "Battery",
                "unique_id": f"{uid}_battery",
                "state_topic": self.topic(key, "battery"),
                "device_class": "battery",
                "unit_of_measurement": "%",
                "state_class": "measurement",
            },
            f"{dp}/binary_sensor/{self.node_id}/{uid}_connectivity/config": {
                "name": "Connectivity",
                "unique_id": f"{uid}_connectivity",
                "state_topic": self.topic(key, "connectivity"),
                "payload_on": "online",
                "payload_off": "offline",
                "device_class": "connectivity",
            },
            f"{dp}/event/{self.node_id}/{uid}_gesture/config": {
                "name": "Gesture",
                "unique_id": f"{uid}_gesture",
                "state_topic": self.topic(key, "event"),
                "event_types": GESTURES,
                # HA's documented form: a JSON object with event_type; API signals have no click.
                "value_template": '{"event_type": "{{ value_json.click or \'signal\' }}"}',
            },
        }
        if self.mqtt.commands:
            entities[f"{dp}/switch/{self.node_id}/{uid}_command/config"] = {
                "name": "Alert switch",
                "unique_id": f"{uid}_command",
                "state_topic": self.topic(key, "state"),
                "command_topic": self.topic(key, "set"),
                "payload_on": "On",
                "payload_off": "Off",
            }
        for payload in entities.values():
            payload.update(common)
        return entities

    # -- delivery --------------------------------------------------------------------

    @staticmethod
    def event_payload(message: Message) -> dict[str, Any]:
        return {
            "action": message.action,
            "state": message.state.value,
            "click": message.click,
            "pressed_at": message.pressed_at.isoformat(),
            "delay_s": message.delay_s,
            "origin": message.origin,
            "button_id": message.button_id,
        }

    async def deliver(self, message: Message, timeout: float) -> DirectResult:  # noqa: ASYNC109

        if self.refused is not None:
            return DirectResult("dead", f"broker refused the connection: {self.refused}")
        try:
            async with asyncio.timeout(timeout):
                await self.connected.wait()
        except TimeoutError:
            why = f"broker {self.public_url} unreachable: {self.last_error}"
            return DirectResult("retry", why)
        client = self.client
        if client is None:
            return DirectResult("retry", "broker connection lost")
        key = message.alert_key
        try:
            await client.publish(
                self.topic(key, "state"), message.state.value, qos=1, retain=True, timeout=timeout
            )
            await client.publish(
                self.topic(key, "event"),
                json.dumps(self.event_payload(message)),
                qos=1,
                timeout=timeout,
            )
        except (aiomqtt.MqttError, TimeoutError) as exc:
            return DirectResult("retry", f"publish not acknowledged: {exc}")
        self.states[key] = message.state.value
        return DirectResult("delivered", "PUBACK")

    # -- connection --------------------------------------------------------------------

    def _tls(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        ca = str(self.mqtt.ca_file) if self.mqtt.ca_file else None
        return ssl.create_default_context(cafile=ca)

    def _refusal(self, exc: aiomqtt.MqttError) -> str | None:
        rc = getattr(exc, "rc", None)
        value = getattr(rc, "value", rc)
        if isinstance(value, int) and value in _REFUSED:
            return str(rc)
        return None

    async def run(self, bridge: SignalTaker, keys: Mapping[str, ButtonConfig]) -> None:
        """Connect, keep the connection, reconnect with capped jittered backoff."""
        self.buttons = dict(keys)
        failures = 0
        while True:
            try:
                await self._session(bridge)
                failures = 0
            except aiomqtt.MqttError as exc:
                refused = self._refusal(exc)
                if refused is not None:
                    self.refused = refused
                self.last_error = str(exc)
                log.warning(
                    "mqtt disconnected", sink=self.id, broker=self.public_url, error=str(exc)
                )
            except Exception as exc:  # e.g. an unreadable ca_file: retried, never a crash
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.error(
                    "mqtt connection failed",
                    sink=self.id,
                    broker=self.public_url,
                    error=self.last_error,
                )
            finally:
                self.connected.clear()
                self.client = None
            failures += 1
            ceiling = min(RECONNECT_MAX, RECONNECT_INITIAL * 2 ** min(failures, 16))
            await asyncio.sleep(self._rng.uniform(ceiling / 2, ceiling))

    async def _session(self, bridge: SignalTaker) -> None:
        client = aiomqtt.Client(
            self.host,
            self.port,
            username=self.username,
            password=self.password,
            identifier=self.client_id,
            will=aiomqtt.Will(self.availability, "offline", qos=1, retain=True),
            tls_context=self._tls(),
            timeout=10,
        )
        # One lane per alert key publishes at once: dozens in flight is normal, not a warning.
        client.pending_calls_threshold = 1000
        async with client:
            self.refused = None
            self.connects += 1
            await client.publish(self.availability, "online", qos=1, retain=True)
            dp = self.mqtt.discovery_prefix.rstrip("/")
            if dp:
                await client.subscribe(f"{dp}/status", qos=1)
                await client.subscribe(f"{dp}/+/{self.node_id}/+/config", qos=1)
            if self.mqtt.commands:
                for key in self.buttons:
                    await client.subscribe(self.topic(key, "set"), qos=1)
            await self._announce(client)
            for key, state in list(self.states.items()):
                await client.publish(self.topic(key, "state"), state, qos=1, retain=True)
            self._status.clear()
            self.client = client
            self.connected.set()
            log.info("mqtt connected", sink=self.id, broker=self.public_url)
            try:
                watcher = asyncio.create_task(self._watch_status(client, bridge))
                try:
                    await self._listen(client, bridge)
                finally:
                    watcher.cancel()
            finally:
                self.connected.clear()
                self.client = None
                if _cancelling():
                    # A clean stop: say so now rather than leave it to the last will.
                    with contextlib.suppress(aiomqtt.MqttError):
                        await client.publish(self.availability, "offline", qos=1, retain=True)

    async def _announce(self, client: aiomqtt.Client) -> None:
        for key, button in self.buttons.items():
            for topic, payload in self.discovery(key, button).items():
                await client.publish(topic, json.dumps(payload), qos=1, retain=True)

    def _current_configs(self) -> set[str]:
        return {t for k, b in self.buttons.items() for t in self.discovery(k, b)}

    async def _listen(self, client: aiomqtt.Client, bridge: SignalTaker) -> None:
        dp = self.mqtt.discovery_prefix.rstrip("/")
        async for msg in client.messages:
            topic = str(msg.topic)
            payload = bytes(msg.payload) if isinstance(msg.payload, bytes | bytearray) else b""
            text = payload.decode("utf-8", errors="replace").strip()
            if dp and topic == f"{dp}/status":
                if text == "online":
                    await self._announce(client)
            elif dp and topic.startswith(f"{dp}/") and topic.endswith("/config"):
                if payload and topic not in self._current_configs():
                    # A button no longer in the configuration: its entities go.
                    await client.publish(topic, b"", qos=1, retain=True)
            elif topic.endswith("/set"):
                self._command(bridge, topic, text)

    def _command(self, bridge: SignalTaker, topic: str, text: str) -> None:
        key = topic[len(self.prefix) + 1 : -len("/set")]
        button = self.buttons.get(key)
        if button is None or text not in ("On", "Off"):
            log.info("mqtt command ignored", sink=self.id, topic=topic, payload=text[:40])
            return
        try:
            bridge.submit(
                Signal(
                    button_id=button.id,
                    state=SignalState(text),
                    origin="mqtt",
                    received_at=utcnow(),
                )
            )
        except Exception as exc:  # not accepting, unknown button: never a crash
            log.warning("mqtt command not taken", sink=self.id, topic=topic, error=str(exc))

    async def _watch_status(self, client: aiomqtt.Client, bridge: SignalTaker) -> None:
        """Battery and connectivity of each button, published retained when they change."""
        with contextlib.suppress(aiomqtt.MqttError):  # the listener sees the disconnect
            await self._publish_status(client, bridge)

    async def _publish_status(self, client: aiomqtt.Client, bridge: SignalTaker) -> None:
        while True:
            for key, button in self.buttons.items():
                status = bridge.buttons.get(button.id)
                if status is None:
                    continue
                now = (status.battery, status.connected)
                if self._status.get(key) == now:
                    continue
                if status.battery is not None:
                    await client.publish(
                        self.topic(key, "battery"), str(status.battery), qos=1, retain=True
                    )
                if status.connected is not None:
                    online = "online" if status.connected else "offline"
                    await client.publish(
                        self.topic(key, "connectivity"), online, qos=1, retain=True
                    )
                self._status[key] = now
            await asyncio.sleep(self.status_interval)


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
