"""``GET /openapi.json``: an OpenAPI 3.1 description of every route of the bridge's app.

The document is built on its first request by walking the application's router, so it
lists exactly the routes the features registered (this module is registered last). Each
handler carries its own description (``server.http.operation``: summary, body, response
models, errors), with schemas generated from the pydantic models that validate the bodies
and build the answers; a route without one still appears, with a generic description, and
a test keeps the two in step.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from flicbridge import __version__
from flicbridge.config import Config
from flicbridge.server.http import (
    BRIDGE,
    JSON,
    ErrorOut,
    Operation,
    Param,
    Reply,
    operation,
    operation_of,
    requires_token,
)

REF = "#/components/schemas/{model}"

# The common meaning of each error status; an operation may say more (``why``).
ERRORS = {
    400: "bad input: not JSON, nested deeper than 32 levels, or a body/parameter that does not "
    "validate (every problem listed)",
    401: "missing or wrong credentials",
    403: "the API is disabled: [server] token is not set",
    404: "no such thing (or the feature is disabled)",
    409: "conflict",
    410: "gone",
    413: "body over 64 KiB",
    422: "understood, but names nothing this bridge knows",
    429: "an [ingest] source over its rate: wait Retry-After seconds",
    503: "shutting down, or the store cannot commit in time",
}
TOKEN_AUTH: list[dict[str, list[str]]] = [
    {"bearerToken": []},
    {"queryToken": []},
    {"cookieToken": []},
]
TOKEN_ERRORS = (401, 403)  # every token path: no or wrong token, API disabled


class Schemas:
    """Component schemas, generated from pydantic models and referenced by name."""

    def __init__(self) -> None:
        self.components: dict[str, Any] = {}

    def ref(self, model: type[BaseModel]) -> dict[str, str]:
        schema = model.model_json_schema(ref_template=REF)
        for name, sub in schema.pop("$defs", {}).items():
            self.components.setdefault(name, sub)
        self.components[model.__name__] = schema
        return {"$ref": REF.format(model=model.__name__)}


def _example(value: Any, config: Config) -> Any:
    """An example as given, or made from the config (so that it names a real button)."""
    return value(config) if callable(value) else value


def _param(param: Param, config: Config) -> dict[str, Any]:
    out = {
        "name": param.name,
        "in": param.where,
        "required": param.where == "path",
        "schema": param.schema,
        "description": param.description,
    }
    if param.example is not None:
        out["example"] = _example(param.example, config)
    return out


def _reply(reply: Reply, schemas: Schemas) -> dict[str, Any]:
    out: dict[str, Any] = {"description": reply.description}
    if reply.media is not None:
        if reply.model is not None:
            schema = schemas.ref(reply.model)
        else:
            schema = reply.schema or {"type": "string"}
        media: dict[str, Any] = {"schema": schema}
        if reply.data is not None:
            media["x-data-schema"] = schemas.ref(reply.data)
        out["content"] = {reply.media: media}
    return out


def _errors(codes: tuple[int, ...], why: dict[int, str], schemas: Schemas) -> dict[str, Any]:
    ref = schemas.ref(ErrorOut)
    out = {}
    for code in sorted(codes):
        description = why.get(code, ERRORS[code])
        if code == 400 and code in why:  # every JSON body is bounded in depth as well
            description += ", or nested deeper than 32 levels"
        out[str(code)] = {"description": description, "content": {JSON: {"schema": ref}}}
    return out


def _described(op: Operation, path: str, config: Config, schemas: Schemas) -> dict[str, Any]:
    """The OpenAPI operation of a handler that carries ``operation``'s description."""
    out: dict[str, Any] = {"summary": op.summary}
    if op.description is not None:
        out["description"] = op.description
    out["tags"] = [op.tag]
    codes = op.errors
    if requires_token(path):
        out["security"] = TOKEN_AUTH
        codes = (*codes, *TOKEN_ERRORS)
    elif op.security is not None:
        out["security"] = [{op.security: []}]
    if op.params:
        out["parameters"] = [_param(p, config) for p in op.params]
    if op.body is not None:
        media: dict[str, Any] = {"schema": schemas.ref(op.body)}
        if op.example is not None:
            media["example"] = _example(op.example, config)
        out["requestBody"] = {"required": True, "content": {JSON: media}}
    out["responses"] = {
        **{str(r.status): _reply(r, schemas) for r in op.replies},
        **_errors(codes, op.why, schemas),
    }
    return out


def _path_param(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": name,
    }


def security_schemes(config: Config) -> dict[str, Any]:
    return {
        "bearerToken": {
            "type": "http",
            "scheme": "bearer",
            "description": "`[server] token`, for /api/v1/* and the status page",
        },
        "queryToken": {
            "type": "apiKey",
            "in": "query",
            "name": "token",
            "description": "`[server] token` as `?token=` (a browser EventSource sends no headers)",
        },
        "cookieToken": {
            "type": "apiKey",
            "in": "cookie",
            "name": "flicbridge_token",
            "description": "`[server] token` as a cookie (the status page)",
        },
        "ilertAuthorization": {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": "must equal `[ilert] authorization` (the credentials of the "
            "dynamic action connector)",
        },
        "pagerdutySignature": {
            "type": "apiKey",
            "in": "header",
            "name": "X-PagerDuty-Signature",
            "description": "`v1=` + hex HMAC-SHA256 of the raw body with "
            "`[pagerduty] webhook_secret`",
        },
        "flashdutyHeader": {
            "type": "apiKey",
            "in": "header",
            "name": config.flashduty.header,
            "description": "the custom header of the Flashduty action: must equal "
            "`[flashduty] secret`",
        },
    }


_PARAM = re.compile(r"\{([^}:]+)(:[^}]*)?\}")


def _routes(app: web.Application) -> list[tuple[str, str, Callable[..., Any]]]:
    """(method, OpenAPI path, handler) of every route, HEAD and OPTIONS left out."""
    out = []
    for route in app.router.routes():
        if route.method in ("HEAD", "OPTIONS"):
            continue
        resource = route.resource
        if resource is None:
            continue
        if isinstance(resource, web.StaticResource):
            path = resource.canonical.rstrip("/") + "/{filename}"
        else:
            path = _PARAM.sub(lambda m: "{" + m.group(1) + "}", resource.canonical)
        methods = (
            ["GET", "POST", "PUT", "PATCH", "DELETE"] if route.method == "*" else [route.method]
        )
        out += [(method, path, route.handler) for method in methods]
    return out


def _generic(method: str, path: str, handler: Callable[..., Any]) -> dict[str, Any]:
    """A route whose handler carries no description: its docstring's first line."""
    doc = (handler.__doc__ or "").strip().splitlines()
    op: dict[str, Any] = {
        "summary": doc[0] if doc else f"{method} {path}",
        "responses": {"default": {"description": "see the handler"}},
    }
    params = re.findall(r"\{([^}]+)\}", path)
    if params:
        op["parameters"] = [_path_param(p) for p in params]
    if requires_token(path):
        op["security"] = TOKEN_AUTH
    return op


def build_document(app: web.Application) -> dict[str, Any]:
    """The OpenAPI document of ``app`` as its router stands."""
    config = app[BRIDGE].config
    schemas = Schemas()
    paths: dict[str, dict[str, Any]] = {}
    op_ids: set[str] = set()
    for method, path, handler in _routes(app):
        described = operation_of(handler)
        if described is None:
            op = _generic(method, path, handler)
        else:
            op = _described(described, path, config, schemas)
        op_id = getattr(handler, "__name__", "") or "op"
        if op_id in op_ids or not op_id.isidentifier():
            op_id = f"{method.lower()}_{re.sub(r'[^A-Za-z0-9]+', '_', path).strip('_')}"
        op_ids.add(op_id)
        op["operationId"] = op_id
        paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "flicbridge",
            "version": __version__,
            "description": "Flic button presses to incident platforms, durably. Errors are "
            '`{"error": ..., "detail": ...}`; bodies over 64 KiB get 413, bodies nested deeper '
            "than 32 levels get 400, a body not sent within 10 s gets 408, and a connection "
            "that has not sent a whole request head within 10 s is closed.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas.components,
            "securitySchemes": security_schemes(config),
        },
    }


DOCUMENT: web.AppKey[dict[str, Any]] = web.AppKey("openapi_document", dict)


@operation(
    "This document",
    tag="operations",
    replies=(Reply(200, "OpenAPI 3.1", schema={"type": "object"}),),
)
async def openapi_json(request: web.Request) -> web.Response:
    """This document."""
    cache = request.app[DOCUMENT]
    if "document" not in cache:
        # Built once: the router is frozen by the time the first request arrives.
        cache["document"] = build_document(request.app)
    return web.json_response(cache["document"])


def add_routes(app: web.Application) -> None:
    """Register ``GET /openapi.json`` (last: it describes every route added before it)."""
    app[DOCUMENT] = {}
    app.router.add_get("/openapi.json", openapi_json)
