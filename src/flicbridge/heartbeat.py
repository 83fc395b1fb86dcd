"""The bridge's own dead-man's switch: call a monitoring URL only while all is well.

Every ``[heartbeat] interval`` the bridge calls ``[heartbeat] url`` (iLert heartbeat,
Healthchecks.io, Better Stack, Uptime Kuma push, ...) — but only while it is healthy: the
store commits, every configured radio source (flicd, BLE) is connected, and the event loop
is responsive (this task woke up on time). When it turns unhealthy it stops calling, so the
monitoring platform notices the silence and pages someone; it calls ``fail_url`` (when
set) once per unhealthy spell, and resumes calling ``url`` on recovery.

Heartbeats never enter the outbox: a missed one is not worth keeping. Each call runs in a
task of its own with a timeout below the interval, so a slow or failing endpoint delays
nothing else. URLs are secrets (the key is in the path): logs show scheme://host:port only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
import structlog

from flicbridge.config import HeartbeatConfig
from flicbridge.sinks.base import public_url

log = structlog.get_logger(__name__)

MAX_CALL_TIMEOUT = 10.0  # seconds per call, and never longer than the interval


class Heartbeat:
    """Calls the heartbeat URLs; ``reasons()`` says why the bridge is unhealthy (empty: ok)."""

    def __init__(self, config: HeartbeatConfig, reasons: Callable[[], list[str]]) -> None:
        self.config = config
        self.reasons = reasons
        self.sent = 0  # calls of ``url`` that answered 2xx
        self.failed_sent = 0  # calls of ``fail_url`` made
        self._calls: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Beat forever (cancel to stop)."""
        assert self.config.url is not None
        loop = asyncio.get_running_loop()
        interval = self.config.interval
        timeout = aiohttp.ClientTimeout(total=min(interval, MAX_CALL_TIMEOUT))
        in_spell = False
        async with aiohttp.ClientSession(timeout=timeout) as session:
            try:
                # The first beat comes one interval after start: sources get that long to
                # connect before a missing connection counts as unhealthy.
                planned = loop.time() + interval
                while True:
                    await asyncio.sleep(max(planned - loop.time(), 0.0))
                    lag = loop.time() - planned
                    why = list(self.reasons())
                    if lag > max(1.0, interval / 2):
                        why.append(f"event loop late by {lag:.1f} s")
                    if not why:
                        if in_spell:
                            log.info("heartbeat_resumed")
                            in_spell = False
                        self._call(session, self.config.url.get_secret_value(), "url")
                    elif not in_spell:
                        in_spell = True
                        log.warning("heartbeat_withheld", reasons=why)
                        if self.config.fail_url is not None:
                            self.failed_sent += 1
                            self._call(session, self.config.fail_url.get_secret_value(), "fail")
                    planned += interval
                    if planned < loop.time():  # the loop stalled past whole beats: skip them
                        planned = loop.time() + interval
            finally:
                for call in list(self._calls):
                    call.cancel()
                if self._calls:
                    await asyncio.wait(self._calls)

    def _call(self, session: aiohttp.ClientSession, url: str, which: str) -> None:
        task = asyncio.get_running_loop().create_task(
            self._request(session, url, which), name=f"heartbeat:{which}"
        )
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _request(self, session: aiohttp.ClientSession, url: str, which: str) -> None:
        where = public_url(url)
        try:
            async with session.request(self.config.method, url) as response:
                await response.read()
                status = response.status
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the message may carry the whole URL: log its type only
            log.warning("heartbeat_failed", which=which, url=where, error=type(exc).__name__)
            return
        if 200 <= status < 300:
            if which == "url":
                self.sent += 1
            log.debug("heartbeat_sent", which=which, url=where, status=status)
        else:
            log.warning("heartbeat_failed", which=which, url=where, status=status)
