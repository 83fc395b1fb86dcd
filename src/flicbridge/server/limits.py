"""Connection limits of the HTTP server: slow or idle clients never starve the bridge.

- A connection that sends nothing, or only part of a request head, is closed after
  ``HEAD_TIMEOUT`` seconds (aiohttp's keep-alive timer runs from the moment a connection
  is made; it also closes a kept-alive connection that stays idle that long).
- A body must arrive within ``server.http.BODY_TIMEOUT`` seconds (``read_json``).
- At most ``max_connections()`` connections are open at once, well below the process's
  file-descriptor limit, so deliveries, the store and flicd always have descriptors left.
  A connection beyond the bound is closed at once; that is logged at most once a minute.
"""

from __future__ import annotations

import asyncio
import resource
import time
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

log = structlog.get_logger(__name__)

HEAD_TIMEOUT = 10.0  # seconds from connect (or the last response) to a complete request head
RESERVED_FDS = 128  # descriptors kept for the store, sinks, flicd, logs
MAX_CONNECTIONS = 512


def max_connections() -> int:
    """The connection bound for this process: 512, or less under a low file limit."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(16, min(MAX_CONNECTIONS, (soft - RESERVED_FDS) // 2))


class _Handler(RequestHandler):
    """aiohttp's connection handler; a request its parser rejects is answered with the
    API's JSON error shape, and neither the answer nor the log repeats the request bytes."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        response = super().handle_error(request, status, exc, message)
        if 400 <= status < 500:
            body = {"error": "bad request", "detail": "the request could not be parsed"}
            answer = web.json_response(body, status=status)
            answer.force_close()
            return answer
        return response


class _BoundedServer(Server):
    """aiohttp's Server with a ceiling on open connections."""

    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)

    limit = MAX_CONNECTIONS
    _refused = 0
    _refused_logged = 0.0

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if len(self._connections) > self.limit:
            self._refused += 1
            now = time.monotonic()
            if now - self._refused_logged >= 60.0:
                self._refused_logged = now
                log.warning("http_connections_refused", limit=self.limit, total=self._refused)
            handler.force_close()
            transport.abort()


class BoundedRunner(web.AppRunner):
    """An AppRunner with the head timeout and the connection bound above."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        kwargs.setdefault("keepalive_timeout", HEAD_TIMEOUT)
        self._limit = kwargs.pop("max_connections", None) or max_connections()
        super().__init__(app, **kwargs)

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        # aiohttp builds its Server itself; the subclass only adds connection_made's check.
        server.__class__ = _BoundedServer
        server.limit = self._limit  # type: ignore[attr-defined]
        return server
