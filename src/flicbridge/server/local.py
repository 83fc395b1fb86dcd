"""Routes of the local feature (to be filled in)."""

from __future__ import annotations

from aiohttp import web


def add_routes(app: web.Application) -> None:
    """Register this feature's routes on the bridge's application."""
