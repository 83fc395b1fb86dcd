"""A BLE button in the configuration: refused with a clear reason below Python 3.12."""

import sys
from pathlib import Path

import pytest

from tests.test_cli import cli

CONFIG = """
[store]
path = "state/fb.db"
[server]
port = 0
[[buttons]]
id = "reception"
address = "80:e4:da:70:00:01"
source = "ble"
"""

needs_311 = pytest.mark.skipif(sys.version_info >= (3, 12), reason="checks Python < 3.12")
needs_312 = pytest.mark.skipif(sys.version_info < (3, 12), reason="checks Python >= 3.12")


@needs_311
async def test_run_with_a_ble_button_below_312_is_a_config_error(tmp_path: Path) -> None:
    """`run` exits 2 naming the key, the Python needed and the extra; no traceback."""
    path = tmp_path / "config.toml"
    path.write_text(CONFIG)
    code, _, err = await cli("run", "--config", str(path))
    assert code == 2 and "Traceback" not in err
    assert "buttons[0].source: the BLE source needs Python 3.12 or newer" in err
    assert "pip install 'flicbridge[ble]'" in err
    assert not (tmp_path / "state").exists()  # refused before anything was created


@needs_312
async def test_a_ble_button_is_accepted_on_312(tmp_path: Path) -> None:
    """From Python 3.12 the same configuration is valid."""
    path = tmp_path / "config.toml"
    path.write_text(CONFIG)
    code, out, err = await cli("check-config", "--config", str(path))
    assert code == 0, err
    assert "1 button(s)" in out
