"""The shipped systemd units keep the operations contract."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from flicbridge.config import FlicdConfig, StoreConfig

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
FLICBRIDGE = SYSTEMD_DIR / "flicbridge.service"
FLICD = SYSTEMD_DIR / "flicd.service"
ENV_EXAMPLE = SYSTEMD_DIR / "flicbridge.env.example"
CONFIG = "/etc/flicbridge/config.toml"

Unit = dict[str, dict[str, list[str]]]


def parse_unit(path: Path) -> Unit:
    """Sections → key → every value in file order (unit files repeat keys, so no configparser)."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"{path.name}: {line!r} before any [section]"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: {line!r} is not KEY=VALUE"
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def one(unit: Unit, section: str, key: str) -> str:
    """The single value of a key that must appear exactly once."""
    values = unit.get(section, {}).get(key, [])
    assert len(values) == 1, f"[{section}] {key}= should appear once, found {values}"
    return values[0]


def words(unit: Unit, section: str, key: str) -> list[str]:
    """All space-separated words of a list-valued key, across repeated lines."""
    return [word for value in unit.get(section, {}).get(key, []) for word in value.split()]


@pytest.fixture(scope="module")
def flicbridge() -> Unit:
    return parse_unit(FLICBRIDGE)


@pytest.fixture(scope="module")
def flicd() -> Unit:
    return parse_unit(FLICD)


# -- flicbridge.service ---------------------------------------------------------------


def test_flicbridge_is_a_notify_service_with_a_watchdog(flicbridge: Unit) -> None:
    """Type=notify with WatchdogSec=30, and only the main process may notify."""
    assert one(flicbridge, "Service", "Type") == "notify"
    assert one(flicbridge, "Service", "NotifyAccess") == "main"
    assert one(flicbridge, "Service", "WatchdogSec") == "30"


def test_flicbridge_restarts_on_failure(flicbridge: Unit) -> None:
    """Restart=on-failure after 5 s, with 30 s for a graceful stop."""
    assert one(flicbridge, "Service", "Restart") == "on-failure"
    assert one(flicbridge, "Service", "RestartSec") == "5"
    assert one(flicbridge, "Service", "TimeoutStopSec") == "30"


def test_flicbridge_checks_the_config_before_running_it(flicbridge: Unit) -> None:
    """ExecStartPre= runs check-config on the same binary and config file that ExecStart= runs."""
    pre = shlex.split(one(flicbridge, "Service", "ExecStartPre"))
    start = shlex.split(one(flicbridge, "Service", "ExecStart"))
    assert pre[1:] == ["check-config", "--config", CONFIG]
    assert start[1:] == ["run", "--config", CONFIG]
    assert pre[0] == start[0] == "/usr/local/bin/flicbridge"


def test_flicbridge_runs_as_its_own_user_with_its_state_directory(flicbridge: Unit) -> None:
    """A dedicated static user owns /var/lib/flicbridge, where the store lives by default."""
    assert one(flicbridge, "Service", "User") == "flicbridge"
    assert one(flicbridge, "Service", "Group") == "flicbridge"
    assert "DynamicUser" not in flicbridge["Service"]
    assert one(flicbridge, "Service", "StateDirectory") == "flicbridge"
    assert one(flicbridge, "Service", "ConfigurationDirectory") == "flicbridge"
    assert StoreConfig.model_validate({}).path.parent == Path("/var/lib/flicbridge")


def test_flicbridge_reads_secrets_from_an_optional_env_file(flicbridge: Unit) -> None:
    """EnvironmentFile= is the optional (leading '-') /etc/flicbridge/flicbridge.env."""
    assert one(flicbridge, "Service", "EnvironmentFile") == "-/etc/flicbridge/flicbridge.env"


def test_flicbridge_has_no_capabilities(flicbridge: Unit) -> None:
    """An empty CapabilityBoundingSet= and AmbientCapabilities=, and no way to gain privileges."""
    assert flicbridge["Service"]["CapabilityBoundingSet"] == [""]
    assert flicbridge["Service"].get("AmbientCapabilities", [""]) == [""]
    assert one(flicbridge, "Service", "NoNewPrivileges") == "yes"


def test_flicbridge_may_open_only_unix_and_ip_sockets(flicbridge: Unit) -> None:
    """RestrictAddressFamilies= allows AF_UNIX (notify, journal) and AF_INET/AF_INET6 only."""
    families = words(flicbridge, "Service", "RestrictAddressFamilies")
    assert sorted(families) == ["AF_INET", "AF_INET6", "AF_UNIX"]


def test_flicbridge_starts_after_the_network_and_flicd(flicbridge: Unit) -> None:
    """Wanted and ordered after network-online.target and flicd.service, enabled for boot."""
    for key in ("Wants", "After"):
        assert {"network-online.target", "flicd.service"} <= set(words(flicbridge, "Unit", key))
    assert "Requires" not in flicbridge["Unit"]  # flicbridge reconnects to flicd by itself
    assert words(flicbridge, "Install", "WantedBy") == ["multi-user.target"]


# -- flicd.service --------------------------------------------------------------------


def test_flicd_serves_where_flicbridge_connects_by_default(flicd: Unit) -> None:
    """flicd listens on flicbridge's default [flicd] host and port, waits for the adapter."""
    argv = shlex.split(one(flicd, "Service", "ExecStart"))
    assert argv == [
        "/usr/local/bin/flicd",
        "-f",
        "/var/lib/flicd/flic.sqlite3",
        "-s",
        "127.0.0.1",
        "-p",
        "5551",
        "-w",
    ]
    defaults = FlicdConfig.model_validate({})
    assert (defaults.host, defaults.port) == ("127.0.0.1", 5551)


def test_flicd_has_cap_net_admin_only(flicd: Unit) -> None:
    """CAP_NET_ADMIN (the HCI user channel) is flicd's one capability, ambient and bounding."""
    assert words(flicd, "Service", "AmbientCapabilities") == ["CAP_NET_ADMIN"]
    assert words(flicd, "Service", "CapabilityBoundingSet") == ["CAP_NET_ADMIN"]
    # In a user namespace CAP_NET_ADMIN would not reach the Bluetooth controller.
    assert flicd["Service"].get("PrivateUsers", ["no"]) == ["no"]


def test_flicd_keeps_its_database_in_its_state_directory(flicd: Unit) -> None:
    """The -f database lies in StateDirectory=flicd, owned by an unprivileged user."""
    assert one(flicd, "Service", "StateDirectory") == "flicd"
    assert one(flicd, "Service", "DynamicUser") == "yes" or "User" in flicd["Service"]
    assert one(flicd, "Service", "Restart") == "on-failure"


def test_env_example_names_every_secret() -> None:
    """The env-file example sets each secret the documentation refers to, and nothing else."""
    names = {
        line.partition("=")[0]
        for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    }
    assert names == {
        "FLICBRIDGE_TOKEN",
        "ALERTOPS_URL",
        "PAGERDUTY_ROUTING_KEY",
        "ILERT_INTEGRATION_KEY",
        "FLASHDUTY_INTEGRATION_KEY",
        "HOOK_AUTH",
    }


# -- systemd's own verdict --------------------------------------------------------------


def _systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("unit", [FLICBRIDGE, FLICD], ids=lambda p: p.name)
def test_systemd_parses_every_line(unit: Path) -> None:
    """systemd-analyze verify reports no unknown or malformed setting (a missing binary is fine)."""
    result = _systemd_analyze("verify", "--man=no", str(unit))
    complaints = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if re.search(rf"{re.escape(unit.name)}:\d+:", line)
    ]
    assert complaints == []


@pytest.mark.parametrize("unit", [FLICBRIDGE, FLICD], ids=lambda p: p.name)
def test_systemd_rates_exposure_at_most_2(unit: Path) -> None:
    """systemd-analyze security --offline=yes rates the unit's exposure at 2.0 or lower."""
    result = _systemd_analyze("security", "--offline=yes", "--no-pager", str(unit))
    if result.returncode != 0 and "offline" in result.stderr:
        pytest.skip(f"this systemd-analyze has no --offline (systemd < 250): {result.stderr}")
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout
