"""The platform stand-in: one real aiohttp server on 127.0.0.1 for every test and benchmark.

It records every request and answers it from, in this order: ``respond`` (a function of
the request and its decoded body) if one is given, else the ``script`` (answers used
once, in order, or ``"hang"``), else ``default``. An answer is ``(status, payload,
headers)``: a ``str``/``bytes`` payload goes out as it is, anything else as JSON.

Two views of what came in: ``requests`` in the order the requests arrived (an answer
still pending included), ``arrivals`` in the order they were answered, each with its
status. Every record carries ``at`` (``time.perf_counter()``, for wall-clock latency in
benchmarks) and ``loop_at`` (the event loop's time: virtual in time-accelerated tests).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

Answer = tuple[int, Any, Mapping[str, str]]
Responder = Callable[[web.Request, Any], Awaitable[Answer] | Answer]


@dataclass
class Received:
    """One request the receiver got."""

    method: str
    path: str
    query: dict[str, str]
    headers: CIMultiDict[str]  # case-insensitive, as HTTP headers are
    raw: bytes
    body: Any  # the JSON decoded, else the text; None when empty
    raw_path: str  # as sent, percent-escapes kept, no query
    at: float  # time.perf_counter() when the whole request was read
    loop_at: float  # the event loop's time then
    status: int | None = None  # the answer's, once it was given

    def json(self) -> Any:
        return json.loads(self.raw)


@dataclass
class Receiver:
    """A loopback aiohttp server standing in for every platform (see the module docstring)."""

    respond: Responder | None = None
    script: deque[Answer | str] = field(default_factory=deque)
    default: Answer = (202, {"status": "ok"}, {})
    hang_for: float = 30.0  # a scripted "hang" answers ``default`` after this many seconds
    url: str = ""
    requests: list[Received] = field(default_factory=list)
    arrivals: list[Received] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Receiver:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        at = time.perf_counter()
        loop_at = asyncio.get_running_loop().time()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        received = Received(
            request.method,
            request.path,
            dict(request.query),
            CIMultiDict(request.headers),
            raw,
            body,
            request.raw_path.split("?")[0],
            at,
            loop_at,
        )
        self.requests.append(received)
        self._changed.set()
        status, payload, headers = await self._answer(request, body)
        received.status = status
        self.arrivals.append(received)
        self._changed.set()
        if isinstance(payload, str | bytes):
            return web.Response(status=status, body=payload, headers=headers)
        return web.json_response(payload, status=status, headers=headers)

    async def _answer(self, request: web.Request, body: Any) -> Answer:
        if self.respond is not None:
            result = self.respond(request, body)
            return await result if asyncio.iscoroutine(result) else result  # type: ignore[return-value]
        answer = self.script.popleft() if self.script else self.default
        if answer == "hang":
            await asyncio.sleep(self.hang_for)
            return self.default
        assert not isinstance(answer, str)
        return answer

    def delivered(self) -> list[Received]:
        """The requests answered with a 2xx, in the order they were answered."""
        return [a for a in self.arrivals if a.status is not None and 200 <= a.status < 300]

    def clear(self) -> None:
        """Forget every request seen so far."""
        self.requests.clear()
        self.arrivals.clear()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait (no timeout of its own) until ``predicate()`` holds after some request."""
        while not predicate():
            self._changed.clear()
            await self._changed.wait()

    async def wait_for(
        self, count: int, timeout: float = 10.0, where: Callable[[Received], bool] | None = None
    ) -> list[Received]:
        """Wait until ``count`` requests (matching ``where``) arrived; return them."""

        def matching() -> list[Received]:
            return [r for r in self.requests if where is None or where(r)]

        async with asyncio.timeout(timeout):
            await self.wait_until(lambda: len(matching()) >= count)
        return matching()
