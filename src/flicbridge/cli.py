"""The ``flicbridge`` command. Exit codes: 0 ok, 2 bad config or usage,
1 runtime failure. User errors print one clear message, never a traceback."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from flicbridge import __version__, logs
from flicbridge.config import Config, ConfigError, load_config
from flicbridge.errors import FlicbridgeError

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2


class CliError(FlicbridgeError):
    """A failure to report in one line, with an exit code."""

    def __init__(self, message: str, code: int = EXIT_RUNTIME) -> None:
        super().__init__(message)
        self.code = code


def _config_path(args: argparse.Namespace) -> Path:
    path = args.config or os.environ.get("FLICBRIDGE_CONFIG")
    if not path:
        raise CliError("no configuration: pass --config PATH or set FLICBRIDGE_CONFIG", EXIT_USAGE)
    return Path(path)


def _load(args: argparse.Namespace) -> Config:
    try:
        return load_config(_config_path(args))
    except ConfigError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


# -- run -------------------------------------------------------------------------------


async def _run(config: Config) -> int:
    from flicbridge.app import Bridge

    bridge = Bridge(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, bridge.stop)
    # SIGHUP (a terminal hang-up, `kill -HUP`) must not kill a panic-button bridge. The
    # configuration is not reloaded in place: buttons, sinks and the store are wired at
    # start, and swapping them under pending deliveries is not safe. Log it and go on.
    loop.add_signal_handler(signal.SIGHUP, _sighup_ignored)
    await bridge.run()
    if bridge.lost:  # presses neither committed nor kept in the spill file: say so
        print(f"flicbridge: {bridge.lost} press(es) were LOST (see press_lost)", file=sys.stderr)
        return EXIT_RUNTIME
    return EXIT_OK


def _sighup_ignored() -> None:
    structlog.get_logger(__name__).warning(
        "sighup_ignored",
        detail="the configuration is not reloaded; restart flicbridge to apply changes",
    )


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args)
    logs.setup(args.log_level)
    from flicbridge.store import StoreError

    try:
        return asyncio.run(_run(config))
    except* StoreError as group:
        raise CliError(str(group.exceptions[0])) from None
    except* OSError as group:
        raise CliError(f"cannot start: {group.exceptions[0]}") from None


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args)
    from flicbridge.sinks.webhook import template_problems

    problems = []
    for i, sink in enumerate(config.sinks):
        if sink.type == "webhook":
            problems += [f"sinks[{i}].body: {p}" for p in template_problems(sink.body)]
    if problems:
        raise CliError(f"{_config_path(args)}:\n  " + "\n  ".join(problems), EXIT_USAGE)
    print(
        f"{_config_path(args)}: ok — {len(config.buttons)} button(s), {len(config.sinks)} "
        f"sink(s), store {config.store.path}"
    )
    return EXIT_OK


# -- talking to a running daemon -------------------------------------------------------


def _api_base(config: Config) -> str:
    host = config.server.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{config.server.port}"


def _headers(config: Config) -> dict[str, str]:
    token = config.server.token
    return {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}


async def _api(config: Config, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One call to the daemon's API; raises CliError(1) when no daemon answers."""
    url = _api_base(config) + path
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.request(method, url, json=body, headers=_headers(config)) as response,
        ):
            try:
                data = await response.json(content_type=None)
            except ValueError:
                data = await response.text()
            return response.status, data
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise CliError(f"no flicbridge daemon answers at {_api_base(config)} ({exc})") from None


def _need_token(config: Config) -> None:
    if config.server.token is None:
        raise CliError("[server] token is not set, so the daemon's API is closed", EXIT_USAGE)


def cmd_status(args: argparse.Namespace) -> int:
    config = _load(args)
    _need_token(config)
    code, data = asyncio.run(_api(config, "GET", "/api/v1/status"))
    if code != 200:
        raise CliError(f"the daemon answered {code}: {data}")
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    print(f"flicbridge {data['version']} — {'ready' if data['ready'] else 'NOT READY'}")
    for reason in data["reasons"]:
        print(f"  ! {reason}")
    print("buttons:")
    for b in data["buttons"]:
        battery = f"{b['battery']} %" if b["battery"] is not None else "?"
        link = {True: "in range", False: "out of range", None: "unknown"}[b["connected"]]
        print(
            f"  {b['id']:<16} {b['state']:<7} battery {battery:<6} {link:<13} "
            f"last press {b['last_press'] or '-'}"
        )
    print("sinks:")
    for s in data["sinks"]:
        print(
            f"  {s['id']:<16} {s['type']:<10} pending {s['pending']:<5} dead {s['dead']:<4} "
            f"{('last error: ' + s['last_error']) if s['last_error'] else ''}"
        )
    return EXIT_OK


def _print_rows(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("  (none)")
    for r in rows:
        error = f" — {r['last_error']}" if r.get("last_error") else ""
        print(
            f"  {r['id']:>6}  {r['sink']:<12} {r['alert_key']:<20} {r['action']:<6} "
            f"attempts {r['attempts']}{error}"
        )


def _queue_offline(config: Config, args: argparse.Namespace) -> int:
    """Queue commands straight on the store file. Listing reads only; retry and drop take
    the store's writer lock, so they refuse while a daemon runs on the file."""
    from flicbridge.server.app import row_json
    from flicbridge.store import StoreError, StoreLock, drop_row, open_offline, outbox_rows
    from flicbridge.store import requeue_dead as requeue_rows

    lock = StoreLock(config.store.path)
    try:
        if args.action != "list":
            lock.acquire()
        conn = open_offline(config.store.path)
        lock.stamp()
    except StoreError as exc:
        lock.release()
        raise CliError(_daemon_unreachable(config, str(exc))) from None
    try:
        if args.action == "list":
            for status in ("pending", "dead"):
                print(f"{status}:")
                _print_rows([row_json(r) for r in outbox_rows(conn, status)])
            return EXIT_OK
        conn.execute("BEGIN IMMEDIATE")
        if args.action == "retry":
            done = requeue_rows(conn, None if args.all_dead else args.id)
            conn.execute("COMMIT")
            if not done:
                raise CliError("no dead row to re-queue")
            print(f"re-queued {len(done)} row(s); the daemon sends them when it starts")
        else:
            dropped = drop_row(conn, args.id)
            conn.execute("COMMIT")
            if not dropped:
                raise CliError(f"no pending or dead row {args.id}")
            print(f"dropped row {args.id}")
        return EXIT_OK
    except sqlite3.Error as exc:
        raise CliError(f"{config.store.path}: {exc}") from None
    finally:
        conn.close()
        lock.release()


def _daemon_unreachable(config: Config, message: str) -> str:
    """``message``, plus why nothing was done when a daemon holds the store."""
    from flicbridge.store import lock_holder

    holder = lock_holder(config.store.path)
    if holder is None:
        return message
    how = (
        f"its API at {_api_base(config)} did not answer"
        if config.server.token is not None
        else "[server] token is not set, so its API is closed"
    )
    return (
        f"a running flicbridge (pid {holder or '?'}) holds {config.store.path} and {how}; "
        "nothing was changed. Retry when the daemon answers, or stop it first"
    )


def cmd_queue(args: argparse.Namespace) -> int:
    config = _load(args)
    if args.action in ("retry", "drop") and args.id is None and not args.all_dead:
        raise CliError(f"queue {args.action} needs a row ID", EXIT_USAGE)
    if args.action == "drop" and args.id is None:
        raise CliError("queue drop needs a row ID", EXIT_USAGE)
    if config.server.token is None:
        return _queue_offline(config, args)
    try:
        if args.action == "list":
            code, data = asyncio.run(_api(config, "GET", "/api/v1/outbox"))
        elif args.action == "retry":
            target = "dead" if args.all_dead else str(args.id)
            code, data = asyncio.run(_api(config, "POST", f"/api/v1/outbox/{target}/retry"))
        else:
            code, data = asyncio.run(_api(config, "DELETE", f"/api/v1/outbox/{args.id}"))
    except CliError:
        return _queue_offline(config, args)  # no daemon: work on the file itself
    if code >= 400:
        raise CliError(
            f"{data.get('error')}: {data.get('detail')}" if isinstance(data, dict) else str(data)
        )
    if args.action == "list":
        for status in ("pending", "dead"):
            print(f"{status}:")
            _print_rows(data[status])
    elif args.action == "retry":
        print(f"re-queued {len(data['requeued'])} row(s): {data['requeued']}")
    else:
        print(f"dropped row {data['dropped']}")
    return EXIT_OK


# -- send ------------------------------------------------------------------------------


async def _send(config: Config, button_id: str, state: str, wait: float) -> int:
    """Through the daemon when one answers, else through an in-process bridge."""
    from flicbridge.store import lock_holder

    if config.button(button_id) is None:
        raise CliError(f"no button {button_id!r} in the configuration", EXIT_USAGE)
    if config.server.token is not None:
        try:
            code, data = await _api(
                config, "POST", f"/api/v1/buttons/{button_id}/signal", {"state": state}
            )
        except CliError:
            pass
        else:
            if code >= 400:
                raise CliError(f"the daemon answered {code}: {data}")
            print(f"daemon: event {data['event']} → {data['decision']}, {data['rows']} row(s)")
            return await _follow_daemon(config, data["event"], wait)
    if lock_holder(config.store.path) is not None:  # never a second writer on the store
        raise CliError(_daemon_unreachable(config, ""))
    return await _send_in_process(config, button_id, state, wait)


async def _follow_daemon(config: Config, event: int, wait: float) -> int:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        _, data = await _api(config, "GET", "/api/v1/outbox")
        mine = [r for r in data["pending"] + data["dead"] if r["event"] == event]
        if not any(r["status"] == "pending" for r in mine):
            for r in mine:
                print(f"  {r['sink']}: DEAD — {r['last_error']}")
            print("  every other sink of the button: delivered")
            return EXIT_RUNTIME if mine else EXIT_OK
        await asyncio.sleep(0.2)
    print("  still pending after the wait; the daemon keeps retrying (flicbridge queue list)")
    return EXIT_RUNTIME


async def _send_in_process(config: Config, button_id: str, state: str, wait: float) -> int:
    from flicbridge.app import Bridge
    from flicbridge.domain import Signal, SignalState, utcnow

    server = config.server.model_copy(update={"port": 0, "host": "127.0.0.1"})
    quiet = config.model_copy(update={"server": server, "buttons": config.buttons})
    bridge = Bridge(quiet, radio=False)  # no radio for a test send
    outcomes: dict[int, str] = {}
    done = asyncio.Event()

    class Report:
        def delivered(self, row: Any, outcome: Any, latency: float) -> None:
            outcomes[row.id] = f"{row.sink_id}: delivered (HTTP {outcome.status})"
            check()

        def retrying(self, row: Any, outcome: Any, delay: float) -> None:
            print(
                f"  {row.sink_id}: attempt {row.attempts} failed ({outcome.detail}); "
                f"retry in {delay:.1f} s"
            )

        def dead(self, row: Any, outcome: Any) -> None:
            outcomes[row.id] = f"{row.sink_id}: DEAD — {outcome.detail}"
            check()

    expected: set[int] = set()

    def check() -> None:
        if expected and expected <= set(outcomes):
            done.set()

    bridge.dispatcher.listener = Report()
    task = asyncio.create_task(bridge.run())
    try:
        async with asyncio.timeout(10):
            await bridge.wait_ready()
        accepted = await bridge.submit(
            Signal(
                button_id=button_id, state=SignalState(state), origin="send", received_at=utcnow()
            )
        )
        print(f"event {accepted.event_id} → {accepted.decision.value}, {len(accepted.rows)} row(s)")
        expected.update(r.id for r in accepted.rows)
        check()
        if expected:
            try:
                async with asyncio.timeout(wait):
                    await done.wait()
            except TimeoutError:
                print("  still pending after the wait; rows stay queued for the daemon")
        for row_id in sorted(outcomes):
            print(f"  {outcomes[row_id]}")
        ok = not expected or (done.is_set() and all("delivered" in o for o in outcomes.values()))
        return EXIT_OK if ok else EXIT_RUNTIME
    finally:
        bridge.stop()
        await task


def cmd_send(args: argparse.Namespace) -> int:
    config = _load(args)
    logs.setup("warning")
    state = args.state.capitalize()
    if state not in ("On", "Off"):
        raise CliError("state must be On or Off", EXIT_USAGE)
    from flicbridge.store import StoreError

    try:
        return asyncio.run(_send(config, args.button, state, args.wait))
    except* StoreError as group:
        raise CliError(str(group.exceptions[0])) from None


# -- simulate, scan, demo --------------------------------------------------------------


def _parse_buttons(specs: Sequence[str]) -> dict[str, str]:
    from flicbridge.sources.simulator import parse_button_spec

    buttons: dict[str, str] = {}
    for spec in specs:
        try:
            addr, name = parse_button_spec(spec)
        except ValueError:
            raise CliError(
                f"--button {spec!r}: expected ADDR[=NAME], ADDR like 80:e4:da:70:00:01", EXIT_USAGE
            ) from None
        buttons[addr] = name
    return buttons


def cmd_simulate(args: argparse.Namespace) -> int:
    from flicbridge.sources.simulator import main as simulator_main

    buttons = _parse_buttons(args.button or ["80:e4:da:70:00:01=Reception"])
    logs.setup(args.log_level)
    try:
        asyncio.run(simulator_main(args.port, buttons, args.host))
    except OSError as exc:
        raise CliError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    return EXIT_OK


def cmd_scan(args: argparse.Namespace) -> int:
    config = _load(args)
    from flicbridge.sources.flicd import run_scan_wizard

    print(
        f"Scanning through flicd at {config.flicd.host}:{config.flicd.port}. "
        "Hold the new button for 7 seconds until it blinks…"
    )
    try:
        result, address, name = asyncio.run(
            run_scan_wizard(
                config.flicd.host,
                config.flicd.port,
                args.timeout,
                on_progress=lambda text: print(f"  {text}", flush=True),
            )
        )
    except (OSError, TimeoutError) as exc:
        raise CliError(
            f"cannot reach flicd at {config.flicd.host}:{config.flicd.port}: {exc}"
        ) from None
    if address is None or result != "WizardSuccess":
        raise CliError(f"no button paired: {result}")
    import re

    # A button's advertised name may hold any character: the id keeps the ones an id may
    # have, and every string is written as a JSON string, which TOML reads as the same text.
    button_id = re.sub(r"[^a-z0-9_.:-]+", "-", (name or "").lower()).strip("-_.:")
    button_id = button_id[:100] or address.replace(":", "")
    print(f"Paired {name or 'a button'} at {address}. Add this to {_config_path(args)}:\n")
    print(
        f"[[buttons]]\nid = {json.dumps(button_id)}\naddress = {json.dumps(address)}\n"
        f"name = {json.dumps(name or button_id)}\n"
        'info = ""\non = ["single_click", "hold"]\noff = ["double_click"]\n'
    )
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from flicbridge.demo import run_demo

    logs.setup("info" if args.verbose else "warning", json=False)
    return asyncio.run(run_demo())


# -- parser ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # usage errors exit 2 with one line
        self.print_usage(sys.stderr)
        raise CliError(f"{self.prog}: {message}", EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flicbridge", description=__doc__)
    parser.add_argument("--version", action="version", version=f"flicbridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", help="TOML file (default: $FLICBRIDGE_CONFIG)")
        return p

    p = with_config(sub.add_parser("run", help="the daemon"))
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_run)
    p = with_config(sub.add_parser("check-config", help="validate a configuration"))
    p.set_defaults(func=cmd_check_config)
    p = sub.add_parser("simulate", help="a flicd-protocol simulator with virtual buttons")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5551)
    p.add_argument("--button", action="append", metavar="ADDR[=NAME]")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_simulate)
    p = sub.add_parser("demo", help="simulator + daemon + capture sink, no hardware")
    p.add_argument("--verbose", action="store_true", help="also print the daemon's log")
    p.set_defaults(func=cmd_demo)
    p = with_config(sub.add_parser("scan", help="pair a new button through flicd"))
    p.add_argument("--timeout", type=float, default=60.0)
    p.set_defaults(func=cmd_scan)
    p = with_config(sub.add_parser("send", help="inject a signal to test the sinks"))
    p.add_argument("button")
    p.add_argument("state", metavar="On|Off")
    p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for outcomes")
    p.set_defaults(func=cmd_send)
    p = with_config(sub.add_parser("queue", help="pending and dead-lettered rows"))
    p.add_argument("action", nargs="?", default="list", choices=["list", "retry", "drop"])
    p.add_argument("id", nargs="?", type=int)
    p.add_argument("--all-dead", action="store_true", help="with retry: every dead row")
    p.set_defaults(func=cmd_queue)
    p = with_config(sub.add_parser("status", help="what the running daemon reports"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args))
    except CliError as exc:
        print(f"flicbridge: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
