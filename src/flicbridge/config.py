"""Configuration: one TOML file, environment overrides, declared once and frozen.

Key names are fixed: outside checks drive the daemon by them. Every error is reported at
once with its key path (``buttons[0].address``); unknown keys are errors because they are
usually typos.
Secrets may be written literally, as ``env:NAME`` or as ``file:PATH``.
"""

from __future__ import annotations

import contextvars
import os
import re
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from flicbridge import secrecy
from flicbridge.domain import Click, is_bd_addr
from flicbridge.errors import FlicbridgeError

# The folder relative secret files and store paths are resolved against while loading.
_base_dir: contextvars.ContextVar[Path | None] = contextvars.ContextVar("_base_dir", default=None)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: object) -> object:
    """Seconds from a number or a string like "30s", "5m", "1h", "250ms"."""
    if isinstance(value, bool):
        raise ValueError("expected seconds as a number or a string like '30s', '5m', '1h'")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _UNITS[match.group(2)]
    raise ValueError("expected seconds as a number or a string like '30s', '5m', '1h'")


def resolve_secret(value: object) -> object:
    """A literal, ``env:NAME`` (from the environment) or ``file:PATH`` (first line of a file).

    An empty result is an error: the bridge never compares against an empty expected value.
    """
    resolved = _resolve_secret(value)
    if isinstance(resolved, str) and not resolved.strip():
        where = "" if value == resolved else f" ({value} gave an empty value)"
        raise ValueError(f"a secret must not be empty{where}; set it, or disable what needs it")
    return resolved


def _resolve_secret(value: object) -> object:
    if not isinstance(value, str):
        return value
    if value.startswith("env:"):
        name = value[4:]
        if name not in os.environ:
            raise ValueError(f"environment variable {name} is not set")
        return os.environ[name]
    if value.startswith("file:"):
        raw = Path(value[5:])
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        path = raw if raw.is_absolute() else Path(creds or _base_dir.get() or Path.cwd()) / raw
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"cannot read secret file {path}: {exc.strerror}") from None
    return value


Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0, allow_inf_nan=False)]
# Bounded durations and rates: a 0 s ping or reconnect cap spins a core and floods the log,
# and a rate of 1e-320 per second overflows the bucket's arithmetic. Each bound is a
# minimum a real installation never needs to go below (or a maximum above).
_DAY = 86_400.0
PingInterval = Annotated[Duration, Field(ge=1.0, le=3600.0)]
ReconnectMax = Annotated[Duration, Field(ge=0.1, le=3600.0)]
HttpTimeout = Annotated[Duration, Field(ge=0.1, le=600.0)]
Backoff = Annotated[Duration, Field(ge=0.01, le=_DAY)]
LongDuration = Annotated[Duration, Field(le=3650 * _DAY)]
Rate = Annotated[float, Field(ge=0.001, le=1_000_000.0, allow_inf_nan=False)]
Secret = Annotated[SecretStr, BeforeValidator(resolve_secret)]
Severity = Literal["critical", "error", "warning", "info"]
_ID = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FlicdConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(5551, ge=1, le=65535)
    reconnect_max: ReconnectMax = 30.0
    ping_interval: PingInterval = 10.0  # a silent flicd (socket open, nothing said) is noticed


def _non_empty_path(value: object) -> object:
    if isinstance(value, str) and not value.strip():
        raise ValueError("must not be empty: the path of the store file")
    return value


class StoreConfig(_Section):
    path: Annotated[Path, BeforeValidator(_non_empty_path)] = Path(
        "/var/lib/flicbridge/flicbridge.db"
    )
    history: int = Field(10_000, ge=0)  # delivered rows kept for the status API
    # Held presses while the store cannot commit (default: $RUNTIME_DIRECTORY, else beside
    # the store): best on another filesystem than the store.
    spill: Path | None = None


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8470, ge=0, le=65535)
    token: Secret | None = None


class DeliveryConfig(_Section):
    timeout: HttpTimeout = 10.0
    backoff_initial: Backoff = 1.0
    backoff_max: Backoff = 300.0
    max_age: LongDuration = 604_800.0


class AlertsConfig(_Section):
    suppress_repeat_for: LongDuration = 60.0
    battery_warn_percent: int = Field(15, ge=0, le=100)
    max_press_age: LongDuration = 0.0
    silent_after: LongDuration = 0.0  # a radio button unheard this long opens its health alert
    health_sinks: tuple[str, ...] | None = None  # where health alerts go; None: the button's


class IlertConfig(_Section):
    enabled: bool = False
    authorization: Secret | None = None


class FlashdutyConfig(_Section):
    enabled: bool = False
    header: str = "X-Flicbridge-Token"
    secret: Secret | None = None


class PagerDutyConfig(_Section):
    """PagerDuty Webhooks v3 receiver (POST /pagerduty/webhook); off while no secret is set."""

    webhook_secret: Secret | None = None


class HeartbeatConfig(_Section):
    """The bridge's dead-man's switch: ``url`` is called every ``interval`` while healthy."""

    url: Secret | None = None
    interval: Annotated[Duration, Field(ge=1.0, le=_DAY)] = 60.0
    method: Literal["GET", "POST", "HEAD"] = "GET"
    fail_url: Secret | None = None


class FeedbackConfig(_Section):
    """A local command run on each acknowledgement/resolution (argv, no shell)."""

    command: tuple[str, ...] = ()
    timeout: HttpTimeout = 10.0


class IngestConfig(_Section):
    """Per-source tokens for POST /api/v1/ingest/flic, for clients that cannot set headers."""

    tokens: dict[Annotated[str, Field(pattern=_ID)], Secret] = Field(default_factory=dict)
    rate: Rate = 10.0  # requests per second per source (token bucket)
    burst: int = Field(20, ge=1, le=1_000_000)


class ButtonConfig(_Section):
    id: Annotated[str, Field(pattern=_ID)]
    address: str | None = None
    name: str = ""
    info: str = ""
    source: Literal["flicd", "ble", "ingest"] = "flicd"
    on: tuple[Click, ...] = (Click.SINGLE, Click.HOLD)
    off: tuple[Click, ...] = (Click.DOUBLE,)
    toggle: tuple[Click, ...] = ()
    name_id: str | None = None
    ingest_name: str | None = None
    severity: Severity = "critical"
    sinks: tuple[str, ...] | None = None

    @property
    def display_name(self) -> str:
        return self.name or self.id


class _SinkBase(_Section):
    id: Annotated[str, Field(pattern=_ID)]
    headers: dict[str, Secret] = Field(default_factory=dict)
    timeout: HttpTimeout | None = None  # default: [delivery] timeout
    rate: Rate | None = None  # messages per second; default per type
    burst: int = Field(5, ge=1, le=1_000_000)


class AlertOpsSink(_SinkBase):
    type: Literal["alertops"]
    url: Secret


class WebhookSink(_SinkBase):
    type: Literal["webhook"]
    url: Secret
    method: Literal["POST", "PUT", "PATCH"] = "POST"
    body: dict[str, Any] = Field(
        default_factory=lambda: {
            "alert_key": "{alert_key}",
            "state": "{state}",
            "action": "{action}",
            "button": "{button_name}",
            "info": "{info}",
            "pressed_at": "{pressed_at}",
        }
    )


class PagerDutySink(_SinkBase):
    type: Literal["pagerduty"]
    url: Secret = SecretStr("https://events.pagerduty.com/v2/enqueue")
    routing_key: Secret


class IlertSink(_SinkBase):
    type: Literal["ilert"]
    url: Secret = SecretStr("https://api.ilert.com/api/events")
    integration_key: Secret


class FlashdutySink(_SinkBase):
    type: Literal["flashduty"]
    url: Secret = SecretStr("https://api.flashcat.cloud/event/push/alert/standard")
    integration_key: Secret


class OpsgenieSink(_SinkBase):
    """Opsgenie; the same API serves Jira Service Management Ops and EU accounts via url."""

    type: Literal["opsgenie"]
    url: Secret = SecretStr("https://api.opsgenie.com/v2/alerts")
    api_key: Secret


class SplunkOnCallSink(_SinkBase):
    """Splunk On-Call (VictorOps) REST endpoint: both keys are in the url."""

    type: Literal["splunk_oncall"]
    url: Secret


class IncidentIoSink(_SinkBase):
    type: Literal["incidentio"]
    url: Secret  # the HTTP alert source's URL (…/v2/alert_events/http/<config id>)
    token: Secret


class NtfySink(_SinkBase):
    type: Literal["ntfy"]
    url: Secret = SecretStr("https://ntfy.sh")
    topic: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    token: Secret | None = None


class PushoverSink(_SinkBase):
    type: Literal["pushover"]
    url: Secret = SecretStr("https://api.pushover.net/1/")  # the API base
    token: Secret  # the application's API token
    user: Secret  # the user or group key
    # An emergency (critical) message repeats every ``retry`` until acknowledged or until
    # ``expire`` has passed: Pushover's own bounds.
    retry: Annotated[Duration, Field(ge=30.0, le=10800.0)] = 60.0
    expire: Annotated[Duration, Field(ge=30.0, le=10800.0)] = 3600.0
    # How often an emergency message's receipt is asked whether someone acknowledged it
    # (Pushover asks for no more than once every 5 s).
    poll: Annotated[Duration, Field(ge=5.0, le=3600.0)] = 30.0
    sound: Annotated[str, Field(pattern=r"^[a-z0-9_-]{1,32}$")] | None = None

    @model_validator(mode="after")
    def _retry_within_expire(self) -> PushoverSink:
        if self.retry > self.expire:
            raise ValueError(
                f"retry ({self.retry:g} s) is longer than expire ({self.expire:g} s): "
                "the emergency message would never repeat"
            )
        return self


class MqttSink(_SinkBase):
    """An MQTT broker (Home Assistant's usual bus): retained state, events, discovery."""

    type: Literal["mqtt"]
    url: Secret  # mqtt://[user:pass@]host[:port] or mqtts://…
    topic_prefix: Annotated[str, Field(pattern=r"^[^#+\s]+$")] = "flicbridge"
    # QoS 0 would count a row delivered before the broker has it: refused here.
    qos: Literal[1] = 1
    discovery_prefix: Annotated[str, Field(pattern=r"^[^#+\s]*$")] = "homeassistant"  # "": off
    commands: bool = False
    ca_file: Path | None = None  # mqtts: trust this CA file instead of the system store


SinkConfig = Annotated[
    AlertOpsSink
    | WebhookSink
    | PagerDutySink
    | IlertSink
    | FlashdutySink
    | OpsgenieSink
    | SplunkOnCallSink
    | IncidentIoSink
    | NtfySink
    | PushoverSink
    | MqttSink,
    Field(discriminator="type"),
]
SINK_TYPES = (
    "alertops",
    "webhook",
    "pagerduty",
    "ilert",
    "flashduty",
    "opsgenie",
    "splunk_oncall",
    "incidentio",
    "ntfy",
    "pushover",
    "mqtt",
)


class Config(BaseSettings):
    """The whole configuration. Environment variables ``FLICBRIDGE_<SECTION>__<KEY>``
    override the file (e.g. ``FLICBRIDGE_SERVER__TOKEN``)."""

    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        env_prefix="FLICBRIDGE_",
        env_nested_delimiter="__",
        nested_model_default_partial_update=True,
    )

    site: str | None = None
    flicd: FlicdConfig = FlicdConfig()
    store: StoreConfig = StoreConfig()
    server: ServerConfig = ServerConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    alerts: AlertsConfig = AlertsConfig()
    ilert: IlertConfig = IlertConfig()
    flashduty: FlashdutyConfig = FlashdutyConfig()
    ingest: IngestConfig = IngestConfig()
    pagerduty: PagerDutyConfig = PagerDutyConfig()
    feedback: FeedbackConfig = FeedbackConfig()
    heartbeat: HeartbeatConfig = HeartbeatConfig()
    buttons: tuple[ButtonConfig, ...] = ()
    sinks: tuple[SinkConfig, ...] = ()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over the file: secrets and per-host tweaks stay out of it.
        return (env_settings, init_settings)

    # -- derived views -------------------------------------------------------------

    def alert_key(self, button: ButtonConfig) -> str:
        """One open/close alert per button: ``id`` or ``site/id``."""
        return f"{self.site}/{button.id}" if self.site else button.id

    def button(self, button_id: str) -> ButtonConfig | None:
        for button in self.buttons:
            if button.id == button_id:
                return button
        return None

    def sinks_of(self, button: ButtonConfig) -> tuple[SinkConfig, ...]:
        if button.sinks is None:
            return self.sinks
        wanted = set(button.sinks)
        return tuple(s for s in self.sinks if s.id in wanted)


class ConfigError(FlicbridgeError):
    """A configuration that cannot be used: every problem with its key path."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem(s) in the configuration"]
        lines += [f"  {path or '(top level)'}: {reason}" for path, reason in problems]
        super().__init__("\n".join(lines))


def _key_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for i, item in enumerate(loc):
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif i >= 2 and loc[i - 2] == "sinks" and item in SINK_TYPES:
            continue  # the discriminator tag pydantic puts into the location
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def _reason(error: Mapping[str, Any]) -> str:
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return "unknown key (a typo?)"
    if kind == "missing":
        return "required key is missing"
    if kind == "union_tag_invalid":
        return f"unknown sink type; expected one of {', '.join(SINK_TYPES)}"
    message = str(error.get("msg", "invalid"))
    return message.removeprefix("Value error, ")


# URL schemes each sink type accepts in ``url``; any other type: http and https.
URL_SCHEMES: dict[str, tuple[str, ...]] = {"mqtt": ("mqtt", "mqtts")}


def url_problem(url: str, schemes: tuple[str, ...] = ("http", "https")) -> str | None:
    """Why ``url`` is not a usable URL with one of ``schemes`` (never echoes the URL)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return "not a valid URL"
    if parts.scheme not in schemes:
        return f"expected a URL starting with {' or '.join(s + '://' for s in schemes)}"
    if not parts.hostname or any(c.isspace() for c in url):
        return "not a valid URL (no host, or white space in it)"
    return None


def _cross_checks(config: Config) -> list[tuple[str, str]]:
    """Rules that span keys: unique ids, references, per-source requirements."""
    problems: list[tuple[str, str]] = []
    for name in ("url", "fail_url"):
        beat = getattr(config.heartbeat, name)
        if beat is not None and (why := url_problem(beat.get_secret_value())):
            problems.append((f"heartbeat.{name}", why))
    for i, sink_cfg in enumerate(config.sinks):
        url = getattr(sink_cfg, "url", None)
        if isinstance(url, SecretStr):
            why = url_problem(
                url.get_secret_value(), URL_SCHEMES.get(sink_cfg.type, ("http", "https"))
            )
            if why:
                problems.append((f"sinks[{i}].url", why))
    sink_ids = [s.id for s in config.sinks]
    for i, sink_id in enumerate(sink_ids):
        if sink_id in sink_ids[:i]:
            problems.append((f"sinks[{i}].id", f"duplicate sink id {sink_id!r}"))
    for i, sink_id in enumerate(config.alerts.health_sinks or ()):
        if sink_id not in sink_ids:
            problems.append((f"alerts.health_sinks[{i}]", f"no sink has id {sink_id!r}"))
    seen_ids: set[str] = set()
    seen_addresses: set[str] = set()
    names: dict[str, str] = {}
    for i, button in enumerate(config.buttons):
        where = f"buttons[{i}]"
        if button.id in seen_ids:
            problems.append((f"{where}.id", f"duplicate button id {button.id!r}"))
        seen_ids.add(button.id)
        if button.address is None:
            if button.source != "ingest":
                problems.append((f"{where}.address", f"required for source {button.source!r}"))
        elif not is_bd_addr(button.address):
            problems.append(
                (f"{where}.address", "expected a Bluetooth address like '80:e4:da:70:00:01'")
            )
        elif button.address.lower() in seen_addresses:
            problems.append((f"{where}.address", f"address {button.address} is used twice"))
        else:
            seen_addresses.add(button.address.lower())
        if button.source == "ble" and sys.version_info < (3, 12):
            problems.append(
                (
                    f"{where}.source",
                    "the BLE source needs Python 3.12 or newer and the 'ble' extra "
                    "(pip install 'flicbridge[ble]'); this is Python "
                    f"{sys.version_info.major}.{sys.version_info.minor}",
                )
            )
        gestures = [("on", button.on), ("off", button.off), ("toggle", button.toggle)]
        for a, (name_a, list_a) in enumerate(gestures):
            for name_b, list_b in gestures[a + 1 :]:
                for click in set(list_a) & set(list_b):
                    problems.append(
                        (f"{where}.{name_b}", f"{click} is also in {name_a}: one meaning each")
                    )
        for j, sink_id in enumerate(button.sinks or ()):
            if sink_id not in sink_ids:
                problems.append((f"{where}.sinks[{j}]", f"no sink with id {sink_id!r}"))
        for key in {button.id, button.ingest_name, button.name_id} - {None}:
            assert key is not None
            other = names.get(key.casefold())
            if other is not None and other != button.id:
                problems.append(
                    (where, f"name {key!r} also names button {other!r}; ingest needs one")
                )
            names[key.casefold()] = button.id
    if not config.buttons:
        problems.append(("buttons", "at least one [[buttons]] entry is needed"))
    if config.ilert.enabled and config.ilert.authorization is None:
        problems.append(("ilert.authorization", "required when ilert.enabled = true"))
    if config.flashduty.enabled and config.flashduty.secret is None:
        problems.append(("flashduty.secret", "required when flashduty.enabled = true"))
    if config.delivery.backoff_initial > config.delivery.backoff_max:
        problems.append(("delivery.backoff_initial", "must not exceed delivery.backoff_max"))
    return problems


def load_config(path: str | Path, environ_overrides: bool = True) -> Config:
    """Read, validate and freeze a configuration file; raise ConfigError with every problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), [("", f"cannot read the file: {exc.strerror}")]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [("", f"not valid TOML: {exc}")]) from None
    return config_from_mapping(data, base_dir=path.resolve().parent, source=str(path))


def config_from_mapping(
    data: Mapping[str, Any], *, base_dir: Path, source: str = "<config>"
) -> Config:
    """Validate an already parsed configuration (tests, the demo's embedded default)."""
    token = _base_dir.set(base_dir)
    try:
        config = Config(**data)
    except ValidationError as exc:
        problems = [(_key_path(tuple(e["loc"])), _reason(e)) for e in exc.errors()]
        raise ConfigError(source, problems) from None
    except SettingsError as exc:  # an environment override that is not valid JSON
        field = re.search(r'field "([^"]+)"', str(exc))
        name = field.group(1) if field else "(environment)"
        reason = "the environment override does not parse (a JSON value is expected)"
        raise ConfigError(source, [(name, reason)]) from None
    finally:
        _base_dir.reset(token)
    problems = _cross_checks(config)
    if problems:
        raise ConfigError(source, problems)
    secrecy.register(secrecy.secrets_of(config))
    store_path = config.store.path
    if not store_path.is_absolute():
        store = config.store.model_copy(update={"path": base_dir / store_path})
        config = config.model_copy(update={"store": store})
    return config
