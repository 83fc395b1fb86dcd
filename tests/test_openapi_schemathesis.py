"""GET /openapi.json describes every route, and schemathesis finds no 5xx nor schema drift."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from flicbridge.app import Bridge
from flicbridge.config import Config
from flicbridge.server.openapi import build_document
from flicbridge.server.wiring import build_app
from tests.conftest import TOKEN, make_config, running
from tests.receiver import Receiver

FLASHDUTY_HEADER = "X-Flicbridge-Token"
FLASHDUTY_SECRET = "fd-secret"
MAX_EXAMPLES = 15  # per operation and phase: about 20 s on a laptop


def api_config(tmp_path: Path, receiver: Receiver) -> Config:
    """No flicd: ingest buttons, every callback on, a webhook sink to a local receiver."""
    return make_config(
        tmp_path,
        buttons=[
            {"id": "desk", "source": "ingest", "name": "Desk"},
            {"id": "lab", "source": "ingest", "name": "Lab"},
        ],
        sinks=[{"id": "hook", "type": "webhook", "url": f"{receiver.url}/hook"}],
        # The bearer header schemathesis sends everywhere also opens the iLert routes.
        ilert={"enabled": True, "authorization": f"Bearer {TOKEN}"},
        flashduty={"enabled": True, "header": FLASHDUTY_HEADER, "secret": FLASHDUTY_SECRET},
        pagerduty={"webhook_secret": "pd-webhook-secret"},
    )


def router_operations(bridge: Bridge) -> set[tuple[str, str]]:
    app = build_app(bridge)
    out = set()
    for route in app.router.routes():
        if route.method in ("HEAD", "OPTIONS") or route.resource is None:
            continue
        out.add((route.method.lower(), route.resource.canonical))
    return out


async def test_document_describes_every_route(tmp_path: Path, receiver: Receiver) -> None:
    """Every route of the app is in the document, with its own responses and security."""
    config = api_config(tmp_path, receiver)
    async with asyncio.timeout(10), running(config) as bridge, aiohttp.ClientSession() as http:
        async with http.get(f"{bridge.url}/openapi.json") as response:
            assert response.status == 200
            document: dict[str, Any] = await response.json()
        assert document["openapi"] == "3.1.0"
        described = {(method, path) for path, ops in document["paths"].items() for method in ops}
        assert described == router_operations(Bridge(config))
        for path, ops in document["paths"].items():
            for method, op in ops.items():
                assert "default" not in op["responses"], f"{method} {path} is not described"
                if path.startswith("/api/v1/"):
                    assert {"bearerToken": []} in op["security"]
                    assert "401" in op["responses"]
        schemes = document["components"]["securitySchemes"]
        assert schemes["flashdutyHeader"]["name"] == FLASHDUTY_HEADER
        assert schemes["ilertAuthorization"] == {**schemes["ilertAuthorization"], "in": "header"}
        assert set(schemes) == {
            "bearerToken",
            "queryToken",
            "cookieToken",
            "ilertAuthorization",
            "flashdutyHeader",
            "pagerdutySignature",
        }
        signal = document["paths"]["/api/v1/buttons/{id}/signal"]["post"]
        body_schema = signal["requestBody"]["content"]["application/json"]["schema"]
        assert body_schema == {"$ref": "#/components/schemas/SignalBody"}
        assert build_document(build_app(Bridge(config)))["paths"].keys() == document["paths"].keys()
        for path, ops in document["paths"].items():
            for method, op in ops.items():
                if "requestBody" in op:  # every JSON body is bounded in size and depth
                    assert {"400", "413"} <= set(op["responses"]), f"{method} {path}"
                    assert "nested deeper" in op["responses"]["400"]["description"]


def schemathesis_command() -> str:
    found = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert found, "schemathesis is not installed (pip install -e '.[dev]')"
    return found


@pytest.mark.timeout(120)
async def test_schemathesis_finds_no_server_error_nor_schema_violation(
    tmp_path: Path, receiver: Receiver
) -> None:
    """Generated and mutated requests to every operation: no 5xx, every answer as described."""
    config = api_config(tmp_path, receiver)
    async with asyncio.timeout(100), running(config) as bridge:
        process = await asyncio.create_subprocess_exec(
            schemathesis_command(),
            "run",
            f"{bridge.url}/openapi.json",
            "--checks",
            "not_a_server_error,response_schema_conformance,"
            "status_code_conformance,content_type_conformance",
            "--header",
            f"Authorization: Bearer {TOKEN}",
            "--header",
            f"{FLASHDUTY_HEADER}: {FLASHDUTY_SECRET}",
            # The stream never ends by design; test_local_alerts reads it as a client does.
            "--exclude-path",
            "/api/v1/alerts/stream",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--seed",
            "4",
            "--request-timeout",
            "10",
            cwd=tmp_path,
            env={**os.environ, "NO_COLOR": "1", "COLUMNS": "120"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await process.communicate()
        report = output.decode(errors="replace")
        print(report)  # shown with -s, and on failure
        assert process.returncode == 0, report
        assert " passed" in report and "failures" not in report.lower(), report
        assert bridge.accepting  # the daemon is still up after all of it
