"""Per-source tokens and rate limits for POST /api/v1/ingest/flic (the ``[ingest]`` section).

The Flic app's "HTTP request" action cannot always set headers, so each source (a phone,
a hub) may carry a token of its own in the query, ``?token=``. The token names the
source; a request admitted this way needs no bearer token, and each source has its own
token bucket of ``rate`` requests per second and ``burst`` at once (over it: 429 with
Retry-After). Requests with the server's bearer token are not limited here. A token
that names no source falls through to the bearer check, which answers 401.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import structlog
from aiohttp import web

from flicbridge.bucket import TokenBucket
from flicbridge.config import Config
from flicbridge.secrecy import same_secret
from flicbridge.server.http import Handler, error

log = structlog.get_logger(__name__)

PATH = "/api/v1/ingest/flic"
SOURCE: web.RequestKey[str] = web.RequestKey("ingest_source", str)
"""Set on a request admitted by a source's own token: the source's name."""


class IngestGate:
    """Which source a query token names, and whether that source may send right now."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic) -> None:
        self._secrets = [
            (name, secret.get_secret_value().encode())
            for name, secret in config.ingest.tokens.items()
        ]
        self._rate = config.ingest.rate
        self._burst = float(config.ingest.burst)
        self._bearer = config.server.token is not None
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    @property
    def enabled(self) -> bool:
        return bool(self._secrets)

    @property
    def bearer_enabled(self) -> bool:
        """Whether the server's own token can still admit a request ([server] token)."""
        return self._bearer

    def source(self, given: str) -> str | None:
        """The source whose token this is, or None; every token is compared, in constant time."""
        found = None
        for name, secret in self._secrets:
            if same_secret(given, secret.decode()) and found is None:
                found = name
        return found

    def admit(self, source: str) -> float:
        """0 when ``source`` may send now (and it is counted), else seconds until it may."""
        bucket = self._buckets.setdefault(source, TokenBucket(self._rate, self._burst))
        return bucket.take(self._clock())


GATE: web.AppKey[IngestGate] = web.AppKey("ingest_gate", IngestGate)


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Admit ingest requests by a source's own ``?token=``, within that source's rate."""
    gate = request.app[GATE]
    if request.path != PATH or not gate.enabled:
        return await handler(request)
    given = request.query.get("token")
    source = gate.source(given) if given else None
    if source is None:
        if gate.bearer_enabled:
            return await handler(request)  # the server's token may still admit it, or 401
        if given is None:
            return error(401, "missing token", "?token=INGEST_TOKEN (see [ingest] tokens)")
        return error(401, "wrong token", None)
    wait = gate.admit(source)
    if wait > 0:
        retry_after = max(1, math.ceil(wait))
        log.warning("ingest_rate_limited", source=source, retry_after_s=retry_after)
        response = error(429, "too many requests", {"source": source, "retry_after": retry_after})
        response.headers["Retry-After"] = str(retry_after)
        return response
    request[SOURCE] = source
    return await handler(request)
