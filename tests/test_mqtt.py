"""The MQTT sink against a real Mosquitto started here on a free loopback port: retained
state, events, availability and its last will, Home Assistant discovery, commands, a broker
restart mid-backlog, refused credentials and two sites on one broker."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal as signals
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from flicbridge.config import ConfigError, config_from_mapping
from flicbridge.sinks.mqtt import MqttSink
from tests.conftest import EXE, cli, free_port, make_config, running
from tests.test_sink_pipeline import signal

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
)
needs_broker = pytest.mark.skipif(MOSQUITTO is None, reason="no mosquitto binary on this machine")


class Broker:
    """One Mosquitto process; ``kill`` and ``start`` again keep the port (no persistence)."""

    def __init__(
        self, tmp: Path, users: dict[str, str] | None = None, tls: tuple[Path, Path] | None = None
    ) -> None:
        self.port = free_port()
        self.conf = tmp / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1", "persistence false"]
        if tls is not None:
            lines += [f"certfile {tls[0]}", f"keyfile {tls[1]}"]
        if os.geteuid() == 0:  # else it drops to user "mosquitto", who cannot read tmp files
            lines.append("user root")
        if users:
            pwfile = tmp / "passwd"
            pwfile.write_text("")
            for user, password in users.items():
                subprocess.run(
                    [_passwd(), "-b", str(pwfile), user, password], check=True, capture_output=True
                )
            pwfile.chmod(0o600)
            lines += ["allow_anonymous false", f"password_file {pwfile}"]
        else:
            lines.append("allow_anonymous true")
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        assert MOSQUITTO is not None
        self.proc = await asyncio.create_subprocess_exec(
            MOSQUITTO,
            "-c",
            str(self.conf),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        async with asyncio.timeout(10):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                    writer.close()
                    return
                except OSError:
                    await asyncio.sleep(0.02)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


def _passwd() -> str:
    return shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Broker]:
    b = Broker(tmp_path)
    await b.start()
    yield b
    await b.kill()


async def retained(broker: Broker, pattern: str, settle: float = 0.3) -> dict[str, bytes]:
    """Every retained message under ``pattern`` as a fresh subscriber sees it."""
    found: dict[str, bytes] = {}
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        await client.subscribe(pattern, qos=1)
        try:
            async with asyncio.timeout(settle):
                async for msg in client.messages:
                    if msg.retain:
                        found[str(msg.topic)] = bytes(msg.payload)  # type: ignore[arg-type]
        except TimeoutError:
            pass
    return found


async def until(check: Any, timeout: float = 10) -> Any:
    async with asyncio.timeout(timeout):
        while True:
            value = await check()
            if value:
                return value
            await asyncio.sleep(0.05)


def mqtt_sink(url: str, **extra: Any) -> dict[str, Any]:
    return {"id": "ha", "type": "mqtt", "url": url, **extra}


@pytest.mark.parametrize(
    ("sink", "path"),
    [
        (mqtt_sink("http://broker.invalid"), "sinks[0].url"),
        (mqtt_sink("mqtt://"), "sinks[0].url"),
        (mqtt_sink("mqtt://h.invalid", qos=0), "sinks[0].qos"),
        (mqtt_sink("mqtt://h.invalid", topic_prefix="a/#"), "sinks[0].topic_prefix"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, sink: dict[str, Any], path: str) -> None:
    """A wrong scheme, no host, QoS 0 (not a delivery) or a wildcard prefix: refused by key."""
    data = {
        "store": {"path": str(tmp_path / "s.db")},
        "buttons": [{"id": "desk", "source": "ingest"}],
        "sinks": [sink],
    }
    with pytest.raises(ConfigError) as caught:
        config_from_mapping(data, base_dir=tmp_path)
    assert path in [p for p, _ in caught.value.problems], caught.value


async def test_check_config_exits_2_for_a_bad_scheme(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(
        '[[buttons]]\nid = "desk"\nsource = "ingest"\n'
        '[[sinks]]\nid = "ha"\ntype = "mqtt"\nurl = "https://u:pw@h.invalid"\n'
    )
    code, _out, err = await cli("check-config", "--config", str(tmp_path / "c.toml"))
    assert code == 2
    assert "sinks[0].url" in err and "Traceback" not in err and "pw@" not in err


@needs_broker
async def test_state_event_availability_and_discovery(tmp_path: Path, broker: Broker) -> None:
    """An open reaches the broker as retained state On, an event JSON, availability online
    and one HA device with its four entities, all pointing at the bridge's availability."""
    config = make_config(tmp_path, site="hq", sinks=[mqtt_sink(broker.url)])
    async with aiomqtt.Client("127.0.0.1", broker.port) as watcher:
        await watcher.subscribe("flicbridge/hq/desk/event", qos=1)
        async with running(config) as bridge:
            await signal(bridge, "On")
            async with asyncio.timeout(10):
                msg = await anext(aiter(watcher.messages))
            event = json.loads(bytes(msg.payload))  # type: ignore[arg-type]
            assert event["state"] == "On" and event["action"] == "open"
            assert event["button_id"] == "desk" and event["origin"] == "api"
            assert set(event) == {
                "action",
                "state",
                "click",
                "pressed_at",
                "delay_s",
                "origin",
                "button_id",
            }
            seen = await retained(broker, "#")
            assert seen["flicbridge/hq/desk/state"] == b"On"
            assert seen["flicbridge/hq/bridge/availability"] == b"online"
            configs = {t: json.loads(p) for t, p in seen.items() if t.startswith("homeassistant/")}
            kinds = sorted(t.split("/")[1] for t in configs)
            assert kinds == ["binary_sensor", "binary_sensor", "event", "sensor"]
            for payload in configs.values():
                assert payload["availability_topic"] == "flicbridge/hq/bridge/availability"
                assert payload["device"]["name"] == "Desk"
                assert payload["unique_id"].startswith(payload["device"]["identifiers"][0])
            alert = next(p for p in configs.values() if p["unique_id"].endswith("_alert"))
            assert alert["state_topic"] == "flicbridge/hq/desk/state"
            assert alert["device_class"] == "problem" and alert["payload_on"] == "On"
            gesture = next(p for p in configs.values() if p["unique_id"].endswith("_gesture"))
            assert "single_click" in gesture["event_types"]
            await signal(bridge, "Off")
            await until(lambda: _state_is(broker, "flicbridge/hq/desk/state", b"Off"), timeout=10)
    # A clean stop says offline itself, without waiting for the broker's last will.
    assert await _state_is(broker, "flicbridge/hq/bridge/availability", b"offline")


async def _state_is(broker: Broker, topic: str, value: bytes) -> bool:
    return (await retained(broker, topic, settle=0.2)).get(topic) == value


@needs_broker
async def test_discovery_comes_back_when_ha_says_online_and_removed_buttons_go(
    tmp_path: Path, broker: Broker
) -> None:
    """HA's ``online`` re-publishes discovery; a config left by a removed button is emptied."""
    config = make_config(tmp_path, sinks=[mqtt_sink(broker.url)])
    sink = MqttSink(config.sinks[0])
    stale = f"homeassistant/sensor/{sink.node_id}/{sink.node_id}_gone_battery/config"
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        await client.publish(stale, b'{"name": "Battery"}', qos=1, retain=True)
    async with running(config) as bridge:
        assert bridge is not None
        await until(lambda: _has(broker, "homeassistant/#", 4))
        await until(lambda: _gone(broker, stale))
        mine = next(iter(await retained(broker, "homeassistant/event/#")))
        async with aiomqtt.Client("127.0.0.1", broker.port) as client:
            await client.publish(mine, b"", qos=1, retain=True)
            await client.publish("homeassistant/status", b"online", qos=1)
        await until(lambda: _has(broker, "homeassistant/event/#", 1))


async def _has(broker: Broker, pattern: str, count: int) -> bool:
    return len(await retained(broker, pattern, settle=0.2)) >= count


async def _gone(broker: Broker, topic: str) -> bool:
    return topic not in await retained(broker, topic, settle=0.2)


@needs_broker
async def test_broker_restart_mid_backlog_keeps_order_and_republishes(
    tmp_path: Path, broker: Broker
) -> None:
    """Rows decided while the broker is down wait; after its restart (it forgot every retained
    message) they arrive in order, and availability, discovery and state are back."""
    config = make_config(tmp_path, site="hq", sinks=[mqtt_sink(broker.url)])
    async with running(config) as bridge:
        sink = bridge.sinks["ha"]
        assert isinstance(sink, MqttSink)
        await until(lambda: _ready(sink))
        await broker.kill()
        for state in ("On", "Off", "On", "Off", "On"):
            await signal(bridge, state)
        await asyncio.sleep(0.3)
        assert len(await bridge.store.rows("pending")) == 5
        await broker.start()
        events: list[str] = []
        async with aiomqtt.Client("127.0.0.1", broker.port) as watcher:
            await watcher.subscribe("flicbridge/hq/desk/event", qos=1)
            async with asyncio.timeout(30):
                async for msg in watcher.messages:
                    events.append(json.loads(bytes(msg.payload))["state"])  # type: ignore[arg-type]
                    if len(events) == 5:
                        break
        assert events == ["On", "Off", "On", "Off", "On"]
        assert not await bridge.store.rows("dead")
        seen = await retained(broker, "#")
        assert seen["flicbridge/hq/desk/state"] == b"On"
        assert seen["flicbridge/hq/bridge/availability"] == b"online"
        assert sum(t.startswith("homeassistant/") for t in seen) == 4
        assert sink.connects >= 2


async def _ready(sink: MqttSink) -> bool:
    return sink.connected.is_set()


@needs_broker
async def test_refused_credentials_are_a_dead_letter_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong password is not retried forever: dead, with the broker's reason; the password
    shows nowhere, neither in the row nor in the log."""
    broker = Broker(tmp_path, users={"mq-user-7": "right-password"})
    await broker.start()
    try:
        url = f"mqtt://mq-user-7:wrong-password@127.0.0.1:{broker.port}"
        config = make_config(tmp_path, sinks=[mqtt_sink(url)])
        async with running(config) as bridge:
            await signal(bridge, "On")
            dead = await until(lambda: bridge.store.rows("dead"), timeout=20)
            error = dead[0].last_error or ""
            assert "refused" in error
            assert "not authori" in error.lower() or "password" in error.lower()
            assert "wrong-password" not in error
            out, err = capsys.readouterr()
            assert "mqtt disconnected" in out + err
            assert "wrong-password" not in out + err
        # The right password delivers.
        good = f"mqtt://mq-user-7:right-password@127.0.0.1:{broker.port}"
        config = make_config(
            tmp_path / "ok" if _mk(tmp_path / "ok") else tmp_path, sinks=[mqtt_sink(good)]
        )
        async with running(config) as bridge:
            await signal(bridge, "On")
            await until(lambda: _no_pending(bridge))
            assert not await bridge.store.rows("dead")
    finally:
        await broker.kill()


def _mk(path: Path) -> bool:
    path.mkdir(exist_ok=True)
    return True


async def _no_pending(bridge: Any) -> bool:
    return not await bridge.store.rows("pending")


@needs_broker
async def test_commands_become_signals_and_garbage_is_ignored(
    tmp_path: Path, broker: Broker
) -> None:
    config = make_config(tmp_path, site="hq", sinks=[mqtt_sink(broker.url, commands=True)])
    async with running(config) as bridge:
        sink = bridge.sinks["ha"]
        assert isinstance(sink, MqttSink)
        await until(lambda: _ready(sink))
        async with aiomqtt.Client("127.0.0.1", broker.port) as client:
            await client.publish("flicbridge/hq/desk/set", b"\xff garbage", qos=1)
            await client.publish("flicbridge/hq/nobody/set", b"On", qos=1)
            await client.publish("flicbridge/hq/desk/set", b"On", qos=1)
        await until(lambda: _state_is(broker, "flicbridge/hq/desk/state", b"On"))
        events = await bridge.store.rows("delivered")
        assert len(events) == 1
        async with aiomqtt.Client("127.0.0.1", broker.port) as client:
            await client.publish("flicbridge/hq/desk/set", b"Off", qos=1)
        await until(lambda: _state_is(broker, "flicbridge/hq/desk/state", b"Off"))
        assert sink.connected.is_set()


@needs_broker
async def test_two_sites_share_one_broker_without_collisions(
    tmp_path: Path, broker: Broker
) -> None:
    a = make_config(
        tmp_path / "a" if _mk(tmp_path / "a") else tmp_path,
        site="north",
        sinks=[mqtt_sink(broker.url)],
    )
    b = make_config(
        tmp_path / "b" if _mk(tmp_path / "b") else tmp_path,
        site="south",
        sinks=[mqtt_sink(broker.url)],
    )
    async with running(a) as one, running(b) as two:
        await signal(one, "On")
        await signal(two, "Off")
        await signal(two, "On")
        await until(lambda: _state_is(broker, "flicbridge/south/desk/state", b"On"))
        await until(lambda: _state_is(broker, "flicbridge/north/desk/state", b"On"))
        sa, sb = one.sinks["ha"], two.sinks["ha"]
        assert isinstance(sa, MqttSink) and isinstance(sb, MqttSink)
        assert sa.client_id != sb.client_id
        await asyncio.sleep(0.5)
        # Same client id would have made the broker drop one of them over and over.
        assert sa.connects == 1 and sb.connects == 1
        seen = await retained(broker, "#")
        assert seen["flicbridge/north/bridge/availability"] == b"online"
        assert seen["flicbridge/south/bridge/availability"] == b"online"
        ids = [json.loads(p)["unique_id"] for t, p in seen.items() if "homeassistant" in t]
        assert len(ids) == 8 and len(set(ids)) == 8


@needs_broker
async def test_last_will_says_offline_when_the_daemon_is_killed(
    tmp_path: Path, broker: Broker
) -> None:
    """SIGKILL gives the bridge no chance to say goodbye: the broker's retained will does."""
    port = free_port()
    (tmp_path / "c.toml").write_text(
        f'site = "hq"\n[store]\npath = "{tmp_path / "s.db"}"\n'
        f'[server]\nhost = "127.0.0.1"\nport = {port}\ntoken = "t"\n'
        '[[buttons]]\nid = "desk"\nsource = "ingest"\n'
        f'[[sinks]]\nid = "ha"\ntype = "mqtt"\nurl = "{broker.url}"\n'
    )
    proc = await asyncio.create_subprocess_exec(
        *EXE,
        "run",
        "--config",
        str(tmp_path / "c.toml"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        topic = "flicbridge/hq/bridge/availability"
        await until(lambda: _state_is(broker, topic, b"online"), timeout=30)
        proc.send_signal(signals.SIGKILL)
        await proc.wait()
        await until(lambda: _state_is(broker, topic, b"offline"), timeout=10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@needs_broker
@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl to make a certificate")
async def test_mqtts_verifies_the_broker_against_ca_file(tmp_path: Path) -> None:
    """mqtts with ca_file delivers; without it a self-signed broker is not trusted (retried,
    not delivered, not dead: the operator can fix the trust and the rows go)."""
    cert, key = _self_signed(tmp_path)
    broker = Broker(tmp_path, tls=(cert, key))
    await broker.start()
    try:
        url = f"mqtts://127.0.0.1:{broker.port}"
        untrusted = make_config(_dir(tmp_path / "u"), sinks=[mqtt_sink(url)])
        async with running(untrusted) as bridge:
            await signal(bridge, "On")
            await asyncio.sleep(1.0)
            assert len(await bridge.store.rows("pending")) == 1
            assert not await bridge.store.rows("dead")
            sink = bridge.sinks["ha"]
            assert isinstance(sink, MqttSink) and sink.connects == 0
        trusted = make_config(_dir(tmp_path / "t"), sinks=[mqtt_sink(url, ca_file=str(cert))])
        async with running(trusted) as bridge:
            await signal(bridge, "On")
            await until(lambda: _no_pending(bridge))
            assert not await bridge.store.rows("dead")
    finally:
        await broker.kill()


def _dir(path: Path) -> Path:
    path.mkdir(exist_ok=True)
    return path


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that no system CA store trusts, and its key."""
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@needs_broker
async def test_battery_and_connectivity_are_retained_when_they_change(
    tmp_path: Path, broker: Broker
) -> None:
    """What the bridge knows of a button's battery and link reaches the broker, retained."""
    config = make_config(tmp_path, site="hq", sinks=[mqtt_sink(broker.url)])
    async with running(config) as bridge:
        sink = bridge.sinks["ha"]
        assert isinstance(sink, MqttSink)
        sink.status_interval = 0.05
        bridge.buttons["desk"].battery = 42
        bridge.buttons["desk"].connected = True
        await until(lambda: _state_is(broker, "flicbridge/hq/desk/battery", b"42"))
        await until(lambda: _state_is(broker, "flicbridge/hq/desk/connectivity", b"online"))
        bridge.buttons["desk"].connected = False
        await until(lambda: _state_is(broker, "flicbridge/hq/desk/connectivity", b"offline"))
