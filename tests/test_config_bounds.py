"""Bounds on every interval, duration and rate, and the one Bluetooth address check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flicbridge.config import ConfigError, config_from_mapping
from flicbridge.domain import is_bd_addr
from tests.conftest import cli

BUTTON = {"id": "desk", "address": "80:e4:da:70:00:01"}


def problems(**sections: Any) -> dict[str, str]:
    """Key path → reason of every problem with a config of BUTTON plus ``sections``."""
    try:
        config_from_mapping({"buttons": [BUTTON], **sections}, base_dir=Path("/"))
    except ConfigError as exc:
        return dict(exc.problems)
    return {}


@pytest.mark.parametrize(
    ("sections", "path"),
    [
        ({"flicd": {"ping_interval": 0}}, "flicd.ping_interval"),
        ({"flicd": {"ping_interval": "500ms"}}, "flicd.ping_interval"),
        ({"flicd": {"reconnect_max": 0}}, "flicd.reconnect_max"),
        ({"flicd": {"reconnect_max": "2h"}}, "flicd.reconnect_max"),
        ({"delivery": {"timeout": 0}}, "delivery.timeout"),
        ({"delivery": {"timeout": float("inf")}}, "delivery.timeout"),
        ({"delivery": {"backoff_initial": 0}}, "delivery.backoff_initial"),
        ({"delivery": {"backoff_max": float("nan")}}, "delivery.backoff_max"),
        ({"delivery": {"max_age": float("inf")}}, "delivery.max_age"),
        ({"alerts": {"suppress_repeat_for": -1}}, "alerts.suppress_repeat_for"),
        ({"alerts": {"max_press_age": float("inf")}}, "alerts.max_press_age"),
        ({"ingest": {"rate": 1e-320}}, "ingest.rate"),
        ({"ingest": {"rate": 0}}, "ingest.rate"),
        ({"ingest": {"rate": float("inf")}}, "ingest.rate"),
        (
            {"sinks": [{"id": "s", "type": "alertops", "url": "http://x", "rate": 1e-9}]},
            "sinks[0].rate",
        ),
        (
            {"sinks": [{"id": "s", "type": "alertops", "url": "http://x", "timeout": 0}]},
            "sinks[0].timeout",
        ),
    ],
)
def test_out_of_bounds_values_are_errors_on_their_key_path(
    sections: dict[str, Any], path: str
) -> None:
    """Each value outside its bounds is one problem, reported on its own key path."""
    assert list(problems(**sections)) == [path]


def test_values_at_the_bounds_are_accepted() -> None:
    """The smallest allowed values (and a 0 meaning "off" where it means that) pass."""
    assert (
        problems(
            flicd={"ping_interval": "1s", "reconnect_max": "100ms"},
            delivery={"timeout": 0.1, "backoff_initial": 0.01, "backoff_max": 0.01, "max_age": 0},
            alerts={"suppress_repeat_for": 0, "max_press_age": 0},
            ingest={"rate": 0.001},
        )
        == {}
    )


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("80:e4:da:70:00:01", True),
        ("80:E4:DA:70:00:01", True),
        ("80:e4:da:70:00:01\n", False),
        ("80:e4:da:70:00", False),
        ("80:e4:da:70:00:01:02", False),
        ("80-e4-da-70-00-01", False),
        ("80:e4:da:70:00:0g", False),
        ("", False),
    ],
)
def test_one_bluetooth_address_check(text: str, ok: bool) -> None:
    """Six hex pairs with colons, any case, nothing before or after; config agrees."""
    assert is_bd_addr(text) is ok
    reported = problems(buttons=[{"id": "desk", "address": text}])
    assert ("buttons[0].address" in reported) is not ok


async def test_check_config_exits_2_naming_every_bad_key(tmp_path: Path) -> None:
    """check-config: exit 2, each out-of-bounds key named, no traceback; then a bad
    address (checked once every value is in bounds) on its key path."""
    path = tmp_path / "c.toml"
    path.write_text(
        """
[flicd]
ping_interval = 0
reconnect_max = 0

[ingest]
rate = 1e-320

[[buttons]]
id = "desk"
address = "80:e4:da:70:00:01"
"""
    )
    code, _out, err = await cli("check-config", "--config", str(path))
    assert code == 2, err
    for key in ("flicd.ping_interval", "flicd.reconnect_max", "ingest.rate"):
        assert key in err
    assert "Traceback" not in err
    path.write_text('[[buttons]]\nid = "desk"\naddress = "80:e4:da:70:00:1"\n')
    code, _out, err = await cli("check-config", "--config", str(path))
    assert code == 2 and "buttons[0].address" in err and "Traceback" not in err
