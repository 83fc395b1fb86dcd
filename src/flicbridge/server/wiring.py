"""The one place the HTTP application is put together: every route module's routes, its
middlewares, and the core they serve."""

from __future__ import annotations

from aiohttp import web

from flicbridge.core import Core
from flicbridge.server import acks, callbacks, ingest, local, openapi, page
from flicbridge.server.app import (
    auth_middleware,
    button_signal,
    errors_middleware,
    healthz,
    ingest_flic,
    metrics,
    outbox,
    outbox_drop,
    outbox_retry,
    readyz,
    redact_middleware,
    status,
)
from flicbridge.server.http import BRIDGE, MAX_BODY


def build_app(bridge: Core) -> web.Application:
    """The aiohttp application for one bridge."""
    app = web.Application(
        middlewares=[redact_middleware, errors_middleware, ingest.middleware, auth_middleware],
        client_max_size=MAX_BODY,
    )
    app[BRIDGE] = bridge
    app[ingest.GATE] = ingest.IngestGate(bridge.config)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/v1/status", status)
    app.router.add_post("/api/v1/buttons/{id}/signal", button_signal)
    app.router.add_post(ingest.PATH, ingest_flic)
    app.router.add_get("/api/v1/outbox", outbox)
    app.router.add_post("/api/v1/outbox/{row}/retry", outbox_retry)
    app.router.add_delete("/api/v1/outbox/{row}", outbox_drop)
    # Features with routes of their own, registered by hand in one place.
    acks.add_routes(app)
    callbacks.add_routes(app)
    local.add_routes(app)
    page.add_routes(app)
    openapi.add_routes(app)  # last: it describes every route added before it
    return app
