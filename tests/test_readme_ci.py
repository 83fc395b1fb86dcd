"""The README's two set-up commands are what CI runs, and each stands on its own."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).parent.parent


def readme_commands() -> list[str]:
    """The lines of the README's first ```sh block, by the same sed line .ci/run uses."""
    script = (ROOT / ".ci" / "run").read_text()
    line = next(x for x in script.splitlines() if x.startswith("readme_command()"))
    out = subprocess.run(
        ["bash", "-c", f"{line}\nreadme_command 1; readme_command 2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.splitlines()


def test_ci_runs_the_readme_commands() -> None:
    """.ci/run takes both commands from the README and runs them, in order."""
    script = (ROOT / ".ci" / "run").read_text()
    assert 'bash -c "$CMD1"' in script and 'bash -c "$CMD2"' in script
    assert script.index('bash -c "$CMD1"') < script.index('bash -c "$CMD2"')
    first, second = readme_commands()
    assert first.startswith("python3 -m venv .venv && ")
    assert second.startswith("python3 -m venv .venv && ")


def test_command_1_is_light_and_command_2_runs_the_tests() -> None:
    """Command 1 installs no dev extras and runs the demo; command 2 installs them and
    runs pytest."""
    first, second = readme_commands()
    assert "pip install -e . " in first and "[dev]" not in first
    assert first.endswith("flicbridge demo")
    assert "'.[dev]'" in second and second.endswith("python -m pytest")
