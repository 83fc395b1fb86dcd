"""What every route module shares: the app key of the core, the one error shape, the
bounded JSON body reader and validator, the bounded wait for a commit, and ``operation``,
the decorator that gives a handler its response model and its OpenAPI description.

A leaf of the server package: route modules import it, it imports none of them.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from flicbridge.errors import FlicbridgeError

if TYPE_CHECKING:
    from flicbridge.config import Config
    from flicbridge.core import Core

MAX_BODY = 64 * 1024
BRIDGE: web.AppKey[Core] = web.AppKey("bridge")
COMMIT_WAIT = 30.0  # seconds a request waits for its commit before answering 503


class ErrorOut(BaseModel):
    """The one error shape of the API."""

    error: str
    detail: Any = None


def error(status: int, message: str, detail: Any = None) -> web.Response:
    """The one error shape of the API."""
    return reply(ErrorOut(error=message, detail=detail), status)


def reply(model: BaseModel, status: int = 200) -> web.Response:
    """A response model as the JSON body of a response."""
    return web.json_response(model.model_dump(mode="json"), status=status)


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


# -- operations: a handler's response model and its description --------------------------

JSON = "application/json"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ModelHandler = Callable[[web.Request], Awaitable[BaseModel | web.StreamResponse]]
Example = Any  # a value, or a function of the Config that makes one (it names a real button)


@dataclass(frozen=True)
class Reply:
    """One documented response: a model as JSON, another media type, or no body."""

    status: int
    description: str
    model: type[BaseModel] | None = None
    media: str | None = JSON  # None: no body
    schema: dict[str, Any] | None = None  # without a model; a string when neither is set
    data: type[BaseModel] | None = None  # each event of a stream (x-data-schema)


@dataclass(frozen=True)
class Param:
    """A path or query parameter."""

    name: str
    schema: dict[str, Any]
    description: str
    where: str = "path"
    example: Example = None


@dataclass(frozen=True)
class Operation:
    """What ``operation`` attaches to a handler; ``server/openapi`` renders it."""

    summary: str
    tag: str
    replies: tuple[Reply, ...]
    description: str | None = None
    body: type[BaseModel] | None = None
    example: Example = None
    params: tuple[Param, ...] = ()
    errors: tuple[int, ...] = ()
    why: dict[int, str] = field(default_factory=dict)  # error texts beyond the common ones
    security: str | None = None  # a scheme of its own; token paths always take the token


_OPERATION = "__flicbridge_operation__"


def operation(
    summary: str,
    *,
    tag: str,
    replies: tuple[Reply, ...],
    description: str | None = None,
    body: type[BaseModel] | None = None,
    example: Example = None,
    params: tuple[Param, ...] = (),
    errors: tuple[int, ...] = (),
    why: dict[int, str] | None = None,
    security: str | None = None,
) -> Callable[[ModelHandler], Handler]:
    """Describe a handler and answer with its response model.

    The handler returns an instance of the first reply's model, sent as JSON with that
    reply's status, or a response it built itself (a stream, a page, another status).
    Token paths (``requires_token``) get the token's security and its 401/403 on their own.
    """
    spec = Operation(
        summary, tag, replies, description, body, example, params, errors, why or {}, security
    )
    first = replies[0]

    def attach(handler: ModelHandler) -> Handler:
        @functools.wraps(handler)
        async def answer(request: web.Request) -> web.StreamResponse:
            result = await handler(request)
            if isinstance(result, web.StreamResponse):
                return result
            if first.model is None or not isinstance(result, first.model):
                raise TypeError(f"{handler.__name__} returned {type(result).__name__}")
            return reply(result, first.status)

        setattr(answer, _OPERATION, spec)
        return answer

    return attach


def operation_of(handler: Callable[..., Any]) -> Operation | None:
    """The description ``operation`` attached to a handler, if any."""
    spec = getattr(handler, _OPERATION, None)
    return spec if isinstance(spec, Operation) else None


def requires_token(path: str) -> bool:
    """Whether a path takes the server token (the auth middleware and the document agree)."""
    return path.startswith("/api/v1/") or path == "/"


def sample_button(config: Config) -> tuple[str, str]:
    """The id and alert key of the first button, for examples that reach real work."""
    button = config.buttons[0] if config.buttons else None
    button_id = button.id if button else "reception"
    return button_id, config.alert_key(button) if button else button_id
