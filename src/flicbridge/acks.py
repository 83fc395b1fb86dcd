"""Acknowledgement feedback: the ``[feedback] command`` run beside the button.

When a responder acknowledges (or a platform resolves) a button's alert, the bridge may run
a local command — a sound, a GPIO lamp — so the person who pressed learns that help is
coming. The command is an argv list run without a shell, with three environment
variables added: ``FLICBRIDGE_EVENT`` (``acknowledged`` or ``resolved``),
``FLICBRIDGE_BUTTON`` (the button id) and ``FLICBRIDGE_BY`` (who, possibly empty). It runs
in the background with a timeout: a command that fails, hangs or does not exist is logged
and killed, and never delays a press or an HTTP answer.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Literal

import structlog

log = structlog.get_logger(__name__)

FeedbackEvent = Literal["acknowledged", "resolved"]


async def run_feedback(
    command: Sequence[str],
    limit_s: float,
    *,
    event: FeedbackEvent,
    button: str,
    by: str,
) -> int | None:
    """Run ``command`` once; its exit code, or None when it could not start or timed out."""
    env = {**os.environ, "FLICBRIDGE_EVENT": event, "FLICBRIDGE_BUTTON": button}
    env["FLICBRIDGE_BY"] = by
    ctx = {"button": button, "feedback_event": event, "program": command[0]}
    try:
        process = await asyncio.create_subprocess_exec(
            *command,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        log.error("feedback_failed", **ctx, error=str(exc))
        return None
    try:
        async with asyncio.timeout(limit_s or None):
            _, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        log.error("feedback_timeout", **ctx, timeout_s=limit_s)
        return None
    except asyncio.CancelledError:
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise
    code = process.returncode
    if code != 0:
        tail = stderr.decode(errors="replace").strip()[-500:]
        log.error("feedback_failed", **ctx, exit_code=code, stderr=tail or None)
    else:
        log.info("feedback_ran", **ctx)
    return code
