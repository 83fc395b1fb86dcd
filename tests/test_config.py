"""Configuration: its keys, every error with its key path, secrets resolved."""

import re
from pathlib import Path

import pytest

from flicbridge.config import ConfigError, config_from_mapping, load_config, parse_duration

BUTTON = {"id": "reception", "address": "80:e4:da:70:00:01"}


def load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return load_config(path)


def test_example_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    """config.example.toml documents a configuration that loads."""
    for name in (
        "FLICBRIDGE_TOKEN",
        "ALERTOPS_URL",
        "HOOK_AUTH",
        "PAGERDUTY_ROUTING_KEY",
        "ILERT_INTEGRATION_KEY",
        "FLASHDUTY_INTEGRATION_KEY",
        "ILERT_AUTHORIZATION",
        "FLASHDUTY_SECRET",
    ):
        monkeypatch.setenv(name, "secret-" + name.lower())
    monkeypatch.setenv("ALERTOPS_URL", "https://example.invalid/POSTAlert/k3y-123456/Flic")
    config = load_config(Path(__file__).parent.parent / "config.example.toml")
    assert config.buttons and config.sinks


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(5, 5.0), (2.5, 2.5), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("250ms", 0.25)],
)
def test_durations(value: object, seconds: float) -> None:
    """Durations are numbers of seconds or strings with a unit."""
    assert parse_duration(value) == seconds


def test_every_error_is_reported_with_its_key_path(tmp_path: Path) -> None:
    """One run lists every problem, each with where it is."""
    with pytest.raises(ConfigError) as info:
        load(
            tmp_path,
            """
[delivery]
backoff_max = "soon"
[[buttons]]
id = "a"
address = "80:e4:da:70:00:01"
on = ["triple_click"]
colour = "red"
[[sinks]]
id = "pd"
type = "pagerduty"
""",
        )
    paths = {path for path, _ in info.value.problems}
    assert paths == {
        "delivery.backoff_max",
        "buttons[0].on[0]",
        "buttons[0].colour",
        "sinks[0].routing_key",
    }
    assert "config.toml" in str(info.value)


def test_cross_checks(tmp_path: Path) -> None:
    """References, duplicates and per-source requirements are checked together."""
    with pytest.raises(ConfigError) as info:
        config_from_mapping(
            {
                "buttons": [
                    {"id": "a", "address": "80:e4:da:70:00:01", "sinks": ["nope"]},
                    {"id": "a", "source": "flicd"},
                    {"id": "c", "address": "zz", "on": ["hold"], "off": ["hold"]},
                ],
                "sinks": [],
            },
            base_dir=tmp_path,
        )
    problems = dict(info.value.problems)
    assert "no sink with id 'nope'" in problems["buttons[0].sinks[0]"]
    assert "duplicate button id" in problems["buttons[1].id"]
    assert "required for source 'flicd'" in problems["buttons[1].address"]
    assert "Bluetooth address" in problems["buttons[2].address"]
    assert "hold is also in on" in problems["buttons[2].off"]


def test_secrets_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """env:NAME and file:PATH resolve; a missing variable names itself."""
    (tmp_path / "key.txt").write_text("from-file\n")
    monkeypatch.setenv("RK", "from-env")
    config = config_from_mapping(
        {
            "buttons": [BUTTON],
            "server": {"token": "file:key.txt"},
            "sinks": [{"id": "pd", "type": "pagerduty", "routing_key": "env:RK"}],
        },
        base_dir=tmp_path,
    )
    assert config.server.token is not None
    assert config.server.token.get_secret_value() == "from-file"
    assert config.sinks[0].routing_key.get_secret_value() == "from-env"  # type: ignore[union-attr]
    assert "from-env" not in repr(config)
    monkeypatch.delenv("RK")
    with pytest.raises(ConfigError) as info:
        config_from_mapping(
            {
                "buttons": [BUTTON],
                "sinks": [{"id": "pd", "type": "pagerduty", "routing_key": "env:RK"}],
            },
            base_dir=tmp_path,
        )
    assert info.value.problems == [("sinks[0].routing_key", "environment variable RK is not set")]


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FLICBRIDGE_SECTION__KEY wins over the file."""
    monkeypatch.setenv("FLICBRIDGE_SERVER__PORT", "9999")
    config = config_from_mapping({"buttons": [BUTTON], "server": {"port": 1234}}, base_dir=tmp_path)
    assert config.server.port == 9999


def test_relative_store_path_is_beside_the_config(tmp_path: Path) -> None:
    """A relative store path is resolved against the config file's folder."""
    config = config_from_mapping(
        {"buttons": [BUTTON], "store": {"path": "state/fb.db"}}, base_dir=tmp_path
    )
    assert config.store.path == tmp_path / "state" / "fb.db"


def test_alert_key_uses_site(tmp_path: Path) -> None:
    """Alert key is the button id, or site/id when a site is set."""
    config = config_from_mapping({"buttons": [BUTTON], "site": "hq"}, base_dir=tmp_path)
    assert config.alert_key(config.buttons[0]) == "hq/reception"


def test_not_toml(tmp_path: Path) -> None:
    """A file that is not TOML is one clear problem, not a traceback."""
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(tmp_path, "[[buttons]\nid=")


def test_every_commented_sink_block_of_the_example_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each commented-out ``[[sinks]]`` block of config.example.toml, uncommented, is a
    valid sink (its env: secrets set), so the example cannot drift from the loader."""
    lines = (Path(__file__).parent.parent / "config.example.toml").read_text().splitlines()
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for line in lines:
        if line.strip() == "# [[sinks]]":
            current = []
            blocks.append(current)
        elif current is not None and line.startswith("# ") and "=" in line:
            current.append(line[2:])
        else:
            current = None
    types = [re.search(r'^type = "([a-z_]+)"', "\n".join(b), re.M) for b in blocks]
    assert {t.group(1) for t in types if t} >= {
        "opsgenie", "splunk_oncall", "incidentio", "ntfy", "pushover", "mqtt"
    }  # fmt: skip
    for number, block in enumerate(blocks):
        text = "\n".join(block)
        for name in re.findall(r'"env:([A-Z_]+)"', text):
            url = "mqtt://qx7user:Zk29vLq4pw@127.0.0.1:1883" if name.startswith("MQTT") else None
            monkeypatch.setenv(name, url or "https://example.invalid/k3y-1234567/x")
        toml = (
            f'[store]\npath = "{tmp_path / "s.db"}"\n'
            '[[buttons]]\nid = "desk"\nsource = "ingest"\n[[sinks]]\n' + text + "\n"
        )
        path = tmp_path / f"sink{number}.toml"
        path.write_text(toml)
        config = load_config(path)
        kind = types[number]
        assert kind is not None and config.sinks[0].type == kind.group(1)
