"""Logging: structlog, JSON lines when stderr is not a terminal (journald), console otherwise.

The standard library's loggers (aiohttp, asyncio) go through the same processors, so every
line is one JSON event and passes the secret mask (``secrecy.structlog_processor``). A
request aiohttp's parser rejects becomes one ``http_bad_request`` event without the
request's bytes (they can carry tokens), and a message that repeats (asyncio's "out of
file descriptors" on every accept) is written at most once a minute.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import structlog

from flicbridge import secrecy

REPEAT_WINDOW = 60.0  # seconds a repeated stdlib message is held back


class _BadRequestFilter(logging.Filter):
    """aiohttp's "Error handling request" carries the raw request: keep only its kind."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("aiohttp") and str(record.msg).startswith(
            "Error handling request"
        ):
            exc = record.exc_info[1] if record.exc_info else None
            record.msg = "http_bad_request"
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
            record.reason = type(exc).__name__ if exc is not None else "unknown"
            record.status = getattr(exc, "code", 400)
        return True


class _RepeatFilter(logging.Filter):
    """Let the same (logger, message) through at most once per ``REPEAT_WINDOW``."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        super().__init__()
        self._clock = clock
        self._last: dict[tuple[str, str], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < REPEAT_WINDOW:
            return False
        if len(self._last) > 1000:
            self._last.clear()
        self._last[key] = now
        return True


def setup(level: str = "info", json: bool | None = None, stream: Any = None) -> None:
    """Configure structlog and the standard library's root logger (aiohttp logs there)."""
    stream = stream or sys.stderr
    if json is None:
        json = not stream.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            stamp,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            secrecy.structlog_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                structlog.stdlib.ExtraAdder(),
                stamp,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                secrecy.structlog_processor,
                renderer,
            ],
        )
    )
    handler.addFilter(_BadRequestFilter())
    handler.addFilter(_RepeatFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
