"""What every route module shares: the app key of the core, the one error shape, the
bounded JSON body reader and validator, and the bounded wait for a commit.

A leaf of the server package: route modules import it, it imports none of them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from flicbridge.errors import FlicbridgeError

if TYPE_CHECKING:
    from flicbridge.core import Core

MAX_BODY = 64 * 1024
BRIDGE: web.AppKey[Core] = web.AppKey("bridge")
COMMIT_WAIT = 30.0  # seconds a request waits for its commit before answering 503


def error(status: int, message: str, detail: Any = None) -> web.Response:
    """The one error shape of the API."""
    return web.json_response({"error": message, "detail": detail}, status=status)


class ApiError(FlicbridgeError):
    """Raised by handlers; rendered by the middleware as a JSON error."""

    def __init__(self, status: int, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.status, self.message, self.detail = status, message, detail


MAX_DEPTH = 32  # nesting of a JSON body; every body the API takes is 3 levels deep or less
BODY_TIMEOUT = 10.0  # seconds a client may take to send its body


def json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in ``raw``, counted outside strings."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


async def read_json(request: web.Request) -> Any:
    """The request body as JSON, or a 400/408/413 ApiError; every JSON route reads here."""
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, "body too large", f"at most {MAX_BODY} bytes") from None
    except TimeoutError:
        raise ApiError(408, "body too slow", f"send it within {BODY_TIMEOUT:g} s") from None
    if json_depth(raw) > MAX_DEPTH:
        raise ApiError(400, "body is nested too deeply", f"at most {MAX_DEPTH} levels")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ApiError(400, "body is not valid JSON", str(exc)[:200]) from None


M = TypeVar("M", bound=BaseModel)


def parse(model: type[M], data: Any) -> M:
    """Validate a JSON body against a pydantic model, or a 400 ApiError with every problem."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [
            {"field": ".".join(str(p) for p in e["loc"]) or "(body)", "problem": e["msg"]}
            for e in exc.errors()
        ]
        raise ApiError(400, "invalid body", problems) from None


T = TypeVar("T")


async def committed(
    work: Awaitable[T],
    held: str,
    *,
    wait: float | None = None,
    failure: type[Exception] | tuple[type[Exception], ...] = Exception,
) -> T:
    """``work`` (a commit) within ``wait`` seconds (default COMMIT_WAIT), else a 503 ApiError.

    Past the wait it is 503 "store is slow" with ``held`` as the detail: only the request's
    wait ends, the work itself goes on. A ``failure`` the work raises is 503 "store
    unavailable"; any other error propagates for the caller to name.
    """
    task = asyncio.ensure_future(work)
    try:
        async with asyncio.timeout(COMMIT_WAIT if wait is None else wait):
            return await asyncio.shield(task)
    except TimeoutError:
        raise ApiError(503, "store is slow", held) from None
    except failure as exc:
        raise ApiError(503, "store unavailable", str(exc)) from None
