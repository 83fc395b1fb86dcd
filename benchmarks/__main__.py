"""``python -m benchmarks [NAME|all] [--quick] [--json FILE] [--python PATH]``; NAME:
latency, burst, idle, growth, fairness, pi-disk."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from benchmarks import pacing, scenarios
from flicbridge import logs

BENCHMARKS: dict[str, Callable[[bool], Awaitable[dict[str, Any]]]] = {
    "latency": scenarios.latency,
    "burst": scenarios.burst,
    "idle": scenarios.idle,
    "growth": scenarios.growth,
    "fairness": pacing.fairness,
    "pi-disk": pacing.pi_disk,
}

Row = tuple[str, str, str, str, str]


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def rows_for(name: str, r: dict[str, Any]) -> list[Row]:
    """(metric, measured, baseline, ratio, target met?) lines of one benchmark's result."""
    if name == "latency":
        d, b = r["daemon_ms"], r["baseline_ms"]
        return [
            (
                f"press→sink p50 ({r['presses']} presses)",
                f"{d['p50_ms']} ms",
                f"{b['p50_ms']} ms",
                f"{r['ratio_p50']}x",
                "",
            ),
            ("press→sink p95", f"{d['p95_ms']} ms", f"{b['p95_ms']} ms", "", ""),
            (
                "press→sink p99",
                f"{d['p99_ms']} ms",
                f"{b['p99_ms']} ms",
                f"{r['ratio_p99']}x",
                f"≤2x and <10 ms: {_yes(r['met'])}",
            ),
        ]
    if name == "burst":
        c = r["baseline_commits"]
        rss = r["rss_mb_at_backlog_0_25_50_75_100pct"]
        return [
            (
                f"accept {r['presses']} presses",
                f"{r['accept_presses_per_s']}/s ({r['accept_s']} s)",
                f"{c['rows_per_s_one_per_commit']}/s one commit per row",
                f"{r['accept_ratio_to_one_commit_per_row']}x",
                f"≥2000/s: {_yes(r['met_accept'])}",
            ),
            (
                "drain after sink is back",
                f"{r['drain_deliveries_per_s']}/s ({r['drain_s_from_sink_up']} s)",
                f"{r['baseline_posts_per_s']}/s bare POSTs",
                f"{r['drain_ratio_to_bare_posts']}x",
                "",
            ),
            (
                "RSS at backlog 0/25/50/75/100 %",
                " / ".join(f"{v}" for v in rss) + " MB",
                f"{rss[0]} MB idle",
                f"peak +{r['rss_growth_mb']} MB",
                f"flat: {_yes(rss[-1] - rss[0] < 5)}",
            ),
        ]
    if name == "idle":
        d, b = r["daemon"], r["baseline_bare_aiohttp_process"]
        return [
            (
                f"RSS, {r['buttons']} buttons + {r['sinks']} sinks",
                f"{d['rss_mb']} MB",
                f"{b['rss_mb']} MB",
                f"{r['ratio_rss']}x",
                f"≤60 MB: {_yes(r['met_rss'])}",
            ),
            (
                f"CPU idle over {r['cpu_window_s']:g} s",
                f"{d['cpu_pct_of_core']} % of a core",
                f"{b['cpu_pct_of_core']} %",
                "",
                f"≤0.5 %: {_yes(r['met_cpu'])}",
            ),
            (
                "spawn → READY=1 (median / max)",
                f"{d['ready_s_median']} / {d['ready_s_max']} s",
                f"{b['ready_s_median']} / {b['ready_s_max']} s",
                f"{r['ratio_ready']}x",
                f"≤1 s: {_yes(r['met_ready'])}",
            ),
        ]
    if name == "growth":
        out: list[Row] = []
        for p in r["points"]:
            lat = p["latency_ms"]
            out.append(
                (
                    f"{p['buttons']} buttons, {p['pending_rows']} pending",
                    f"p50 {lat['p50_ms']} / p99 {lat['p99_ms']} ms, {p['rss_mb']} MB",
                    "",
                    "",
                    f"ready {p['ready_s']} s, "
                    f"backlog loaded +{p['backlog_loaded_after_ready_s']} s, "
                    f"first press {p['first_press_after_start_ms']} ms",
                )
            )
        out.append(("p99 100 vs 1 button", "", "", f"{r['p99_ratio_100_to_1_buttons']}x", ""))
        out.append(("p99 100k vs 0 pending", "", "", f"{r['p99_ratio_100k_to_0_pending']}x", ""))
        return out
    if name == "fairness":
        out = []
        for t in r["types"]:
            alone, behind = t["panic_ms_no_backlog"], t["panic_ms_behind_backlog"]
            out.append(
                (
                    f"{t['type']} ({t['rate_per_s']:g}/s): panic press max, behind 200 rows",
                    f"{behind['max_ms']} ms (p50 {behind['p50_ms']})",
                    f"{alone['max_ms']} ms no backlog",
                    f"{t['panic_max_ratio_backlog_to_none']}x",
                    f"≤ next token ({round(1000 / t['rate_per_s'] + 100)} ms): "
                    f"{_yes(behind['max_ms'] <= 1000 / t['rate_per_s'] + 100)}",
                )
            )
            out.append(
                (
                    f"{t['type']}: busiest {t['window_s']:g} s window",
                    f"{t['busiest_window_requests']} requests",
                    f"limit {t['window_limit']:g}",
                    "",
                    f"within: {_yes(t['busiest_window_requests'] <= t['window_limit'])}",
                )
            )
        return out
    if name == "pi-disk":
        if "skipped" in r:
            return [("pi-disk", "skipped", r["skipped"], "", "")]
        slow, plain, d = r["burst_slow_disk"], r["burst_plain_disk"], r["drain_2000_slow_disk"]
        floor = r["one_full_commit_ms"]
        return [
            (
                f"{slow['presses']}-press burst, fsync +20 ms: all delivered",
                f"{slow['delivered_s']} s",
                f"{plain['delivered_s']} s plain disk",
                f"{r['burst_ratio_slow_to_plain']}x",
                f"≤1.5 s: {_yes(slow['delivered_s'] <= 1.5)}",
            ),
            (
                "the same burst, all opens (marks share an fsync)",
                f"{r['burst_one_action_slow_disk']['delivered_s']} s",
                f"{slow['delivered_s']} s open/close alternating",
                "",
                "",
            ),
            (
                "panic press inside the burst",
                f"{slow['panic_ms']} ms",
                f"{plain['panic_ms']} ms plain; one commit {floor['slow_disk']} ms",
                "",
                f"≤60 ms: {_yes(slow['panic_ms'] <= 60)}",
            ),
            (
                "/healthz during the burst (p99 / max)",
                f"{slow['healthz_ms']['p99']} / {slow['healthz_ms']['max']} ms",
                f"{plain['healthz_ms']['p99']} / {plain['healthz_ms']['max']} ms plain",
                "",
                f"≤20 ms: {_yes(slow['healthz_ms']['max'] <= 20)}",
            ),
            (
                "RSS after a 2,000-row drain",
                f"{d['rss_mb_after_drain']} MB (peak {d['peak_rss_mb']})",
                f"{d['rss_mb_idle']} MB idle",
                "",
                f"≤60 MB: {_yes(d['rss_mb_after_drain'] <= 60)}",
            ),
        ]
    return []


def table(rows: list[tuple[str, list[Row]]]) -> str:
    header: Row = ("metric", "measured", "baseline (same run)", "ratio", "target")
    flat = [header] + [row for _, group in rows for row in group]
    widths = [max(len(row[i]) for row in flat) for i in range(5)]
    lines = []
    for name, group in [("", [header]), *rows]:
        if name:
            lines.append(f"-- {name}")
        for row in group:
            lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "daemon_python": sys.executable,
    }


async def run(names: list[str], quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine(), "quick": quick}
    for name in names:
        print(f"running {name}{' (quick)' if quick else ''}…", file=sys.stderr, flush=True)
        results[name] = await BENCHMARKS[name](quick)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("which", nargs="?", default="all", choices=[*BENCHMARKS, "all"])
    parser.add_argument("--quick", action="store_true", help="fewer presses, shorter windows")
    parser.add_argument("--json", metavar="FILE", help="also write the JSON there")
    parser.add_argument(
        "--python",
        metavar="PATH",
        help="start the daemon and the bare baseline process with this interpreter, e.g. a "
        "venv with only the runtime install (no dev extras), to measure what a user runs",
    )
    args = parser.parse_args(argv)
    if args.python:
        # Every process a scenario spawns is started as sys.executable.
        sys.executable = os.path.abspath(args.python)
    names = list(BENCHMARKS) if args.which == "all" else [args.which]
    logs.setup("warning")  # the simulator's debug lines are not results
    results = asyncio.run(run(names, args.quick))
    m = results["machine"]
    print(f"machine: {m['nproc']} CPU, {m['arch']}, Python {m['python']}, Linux {m['kernel']}")
    print(table([(name, rows_for(name, results[name])) for name in names]))
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
