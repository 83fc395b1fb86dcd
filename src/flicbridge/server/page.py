"""``GET /``: the status page: one HTML document, no build step, no assets.

The page is static: its inline script polls ``/api/v1/status`` and ``/api/v1/outbox``
every 1.5 s and draws buttons (state, last press, battery, link), sinks (queue depth,
last success, last error), pending rows and dead letters with a re-queue button
(``POST /api/v1/outbox/{id}/retry``).

Authentication: opened as ``/?token=TOKEN`` the page sets the ``flicbridge_token`` cookie
(HttpOnly, SameSite=Strict, Secure over HTTPS) and its script removes the token from the
address bar, so later visits and every fetch carry the cookie; a cross-site page can
neither read it nor make the browser send it. Everything the API returns (platform error
texts included) is drawn as text, never as HTML, and a per-response CSP nonce is the only
way a script or style runs.
"""

from __future__ import annotations

import secrets

from aiohttp import web

from flicbridge.secrecy import same_secret
from flicbridge.server.http import BRIDGE, Reply, operation

COOKIE = "flicbridge_token"
POLL_MS = 1500


def add_routes(app: web.Application) -> None:
    """Register this feature's routes on the bridge's application."""
    app.router.add_get("/", status_page)


@operation(
    "Status page (HTML): buttons, alert state, battery, queue",
    tag="operations",
    replies=(Reply(200, "the page", media="text/html"),),
)
async def status_page(request: web.Request) -> web.Response:
    """The page; the auth middleware has checked the token (header, cookie or query)."""
    nonce = secrets.token_urlsafe(18)
    response = web.Response(
        text=PAGE.replace("__NONCE__", nonce).replace("__POLL_MS__", str(POLL_MS)),
        content_type="text/html",
        charset="utf-8",
        headers={
            "Content-Security-Policy": (
                f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
                "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
                "frame-ancestors 'none'"
            ),
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff",
            "X-Frame-Options": "DENY",
        },
    )
    given = request.query.get("token")
    configured = request.app[BRIDGE].config.server.token
    if given and same_secret(given, configured):
        response.set_cookie(
            COOKIE, given, path="/", httponly=True, samesite="Strict", secure=request.secure
        )
    return response


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<link rel="icon" href="data:,">
<title>flicbridge</title>
<style nonce="__NONCE__">
:root { color-scheme: light dark; --ok: #1a7f37; --bad: #c62828; --warn: #b26a00;
  --muted: #6b7280; --line: #d0d7de; --bg2: #f6f8fa; }
@media (prefers-color-scheme: dark) {
  :root { --ok: #3fb950; --bad: #f85149; --warn: #d29922; --muted: #9198a1;
    --line: #30363d; --bg2: #161b22; }
}
body { font: 15px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
  padding: 1rem 1.5rem 3rem; }
header { display: flex; flex-wrap: wrap; align-items: baseline; gap: .5rem 1rem; }
h1 { font-size: 1.4rem; margin: 0; }
h2 { font-size: 1.1rem; margin: 1.6rem 0 .5rem; }
.muted { color: var(--muted); }
.badge { display: inline-block; padding: .05rem .55rem; border-radius: 1rem; font-weight: 600;
  border: 1px solid currentColor; white-space: nowrap; }
.ok { color: var(--ok); } .bad { color: var(--bad); } .warn { color: var(--warn); }
#reasons { margin: .5rem 0 0; padding-left: 1.2rem; color: var(--bad); }
#reasons:empty, #flash:empty { display: none; }
#conn { font-size: .9rem; }
#flash { margin: .8rem 0 0; padding: .5rem .8rem; border-radius: .4rem; background: var(--bg2);
  border: 1px solid var(--line); }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; min-width: 40rem; }
th, td { text-align: left; padding: .35rem .6rem; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th { background: var(--bg2); font-weight: 600; font-size: .9rem; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.error { max-width: 32rem; overflow-wrap: anywhere; }
tr.empty td { color: var(--muted); font-style: italic; }
button { font: inherit; padding: .15rem .7rem; cursor: pointer; }
button:disabled { cursor: default; }
small { color: var(--muted); }
</style>
</head>
<body>
<header>
  <h1>flicbridge</h1>
  <span id="site" class="muted"></span>
  <span id="ready" class="badge">…</span>
  <span id="store" class="badge"></span>
  <span id="sources"></span>
  <span id="conn" class="muted">connecting…</span>
</header>
<ul id="reasons"></ul>
<div id="flash" role="status" aria-live="polite"></div>
<noscript><p class="bad">This page needs JavaScript; the same data is at
<code>/api/v1/status</code> and <code>/api/v1/outbox</code>.</p></noscript>

<h2>Buttons</h2>
<div class="scroll"><table>
<thead><tr><th>Button</th><th>Alert</th><th>Last press</th><th>Last decision</th>
<th>Battery</th><th>Connection</th><th>Sinks</th></tr></thead>
<tbody id="buttons"></tbody>
</table></div>

<h2>Sinks</h2>
<div class="scroll"><table>
<thead><tr><th>Sink</th><th>Queue</th><th>Dead</th><th>Last success</th><th>Last error</th>
</tr></thead>
<tbody id="sinks"></tbody>
</table></div>

<h2>Dead letters <button id="requeue-all" type="button" hidden>re-queue all</button></h2>
<div class="scroll"><table>
<thead><tr><th>Row</th><th>Sink</th><th>Button</th><th>Action</th><th>Attempts</th>
<th>Accepted</th><th>Last error</th><th></th></tr></thead>
<tbody id="dead"></tbody>
</table></div>

<h2>Pending</h2>
<div class="scroll"><table>
<thead><tr><th>Row</th><th>Sink</th><th>Button</th><th>Action</th><th>Attempts</th>
<th>Next attempt</th><th>Last error</th></tr></thead>
<tbody id="pending"></tbody>
</table></div>

<script nonce="__NONCE__">
"use strict";
(() => {
  const POLL_MS = __POLL_MS__;
  // A token in the address bar: keep it for this tab's fetches, then remove it from the
  // URL (history, bookmarks, screenshots). The server has set the HttpOnly cookie already.
  const query = new URLSearchParams(location.search);
  const token = query.get("token");
  if (token !== null) {
    query.delete("token");
    const rest = query.toString();
    history.replaceState(null, "", location.pathname + (rest ? "?" + rest : "") + location.hash);
  }
  const $ = (id) => document.getElementById(id);

  // Builds elements from text only: nothing the API returns is ever parsed as HTML.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function toMs(value) {
    if (value === null || value === undefined) return null;
    if (typeof value === "number") return value * 1000;
    const ms = Date.parse(value);
    return Number.isNaN(ms) ? null : ms;
  }
  function relative(ms) {
    const s = Math.round((Date.now() - ms) / 1000);
    const a = Math.abs(s);
    const text = a < 60 ? a + " s" : a < 3600 ? Math.floor(a / 60) + " min"
      : a < 86400 ? Math.floor(a / 3600) + " h" : Math.floor(a / 86400) + " d";
    return s >= 0 ? text + " ago" : "in " + text;
  }
  function when(value) {
    const ms = toMs(value);
    if (ms === null) return el("span", { class: "muted" }, "–");
    const date = new Date(ms);
    return el("time", { datetime: date.toISOString(), title: date.toLocaleString(),
      "data-ts": ms }, relative(ms));
  }
  function refreshTimes() {
    for (const node of document.querySelectorAll("time[data-ts]")) {
      node.textContent = relative(Number(node.dataset.ts));
    }
  }

  // Redraw a table body only when its data changed: a selection or a click survives polls.
  const drawn = {};
  function fill(id, items, row, empty, columns) {
    const key = JSON.stringify(items);
    if (drawn[id] === key) return;
    drawn[id] = key;
    const body = $(id);
    body.replaceChildren(...(items.length ? items.map(row)
      : [el("tr", { class: "empty" }, el("td", { colspan: columns }, empty))]));
  }

  function buttonRow(b) {
    const open = b.state === "open";
    const alert = el("td", { class: "state" },
      el("span", { class: "badge " + (open ? "bad" : "ok") }, open ? "OPEN" : "closed"),
      open && b.opened_at ? el("small", {}, " since ", when(b.opened_at)) : null,
      open && b.acknowledged_by ? el("div", { class: "ack ok" },
        "acknowledged by ", b.acknowledged_by, " ", el("small", {}, when(b.acknowledged_at)))
        : null);
    let link;
    if (b.connected === true) link = el("span", { class: "ok" }, "in range");
    else if (b.connected === false) link = el("span", { class: "bad" }, "out of range");
    else link = el("span", { class: "muted" }, b.source === "ingest" ? "HTTP only" : "unknown");
    const detail = b.link_detail && b.connected !== true ? el("small", {}, " " + b.link_detail)
      : null;
    const battery = b.battery === null || b.battery === undefined ? "?" : b.battery + " %";
    return el("tr", { "data-button": b.id },
      el("td", {}, b.name, " ", el("small", {}, b.id)),
      alert,
      el("td", { class: "last-press" }, when(b.last_press)),
      el("td", { class: "decision" }, b.last_decision || "–"),
      el("td", { class: "battery num" }, battery),
      el("td", { class: "link" }, link, detail),
      el("td", {}, (b.sinks || []).join(", ")));
  }

  function sinkRow(s) {
    return el("tr", { "data-sink": s.id },
      el("td", {}, s.id, " ", el("small", {}, s.type + " · " + (s.url || ""))),
      el("td", { class: "pending num" }, s.pending),
      el("td", { class: "dead num" + (s.dead ? " bad" : "") }, s.dead),
      el("td", { class: "last-success" }, when(s.last_success)),
      el("td", { class: "last-error error" + (s.last_error ? " bad" : "") },
        s.last_error || "–",
        s.paused_until ? el("small", {}, " paused until ", when(s.paused_until)) : null));
  }

  function action(r) {
    return r.action + " (" + r.state + ")";
  }
  function deadRow(r) {
    return el("tr", { "data-row": r.id },
      el("td", { class: "num" }, r.id), el("td", {}, r.sink), el("td", {}, r.button),
      el("td", {}, action(r)), el("td", { class: "num" }, r.attempts),
      el("td", {}, when(r.created_at)),
      el("td", { class: "error bad" }, r.last_error || "–"),
      el("td", {}, el("button", { type: "button", class: "requeue", "data-requeue": r.id },
        "re-queue")));
  }
  function pendingRow(r) {
    return el("tr", { "data-row": r.id },
      el("td", { class: "num" }, r.id), el("td", {}, r.sink), el("td", {}, r.button),
      el("td", {}, action(r)), el("td", { class: "num" }, r.attempts),
      el("td", {}, when(r.next_attempt_at)),
      el("td", { class: "error" }, r.last_error || "–"));
  }

  function drawStatus(s) {
    $("site").textContent = (s.site ? "site " + s.site + " · " : "") + "v" + s.version;
    const ready = $("ready");
    ready.textContent = s.ready ? "ready" : "NOT READY";
    ready.className = "badge " + (s.ready ? "ok" : "bad");
    $("reasons").replaceChildren(...s.reasons.map((r) => el("li", {}, r)));
    const store = $("store");
    store.textContent = s.store.ok ? "store ok" : "store FAILING";
    store.className = "badge " + (s.store.ok ? "ok" : "bad");
    store.title = s.store.path;
    $("sources").replaceChildren(...Object.entries(s.sources).map(([name, src]) =>
      el("span", { class: "badge " + (src.connected ? "ok" : "bad"), title: src.detail },
        name + (src.connected ? " connected" : " DOWN"))));
    const open = s.buttons.filter((b) => b.state === "open").length;
    document.title = (s.ready ? "" : "⚠ ") + (open ? "(" + open + " open) " : "")
      + "flicbridge" + (s.site ? " " + s.site : "");
    fill("buttons", s.buttons, buttonRow, "no buttons configured", 7);
    fill("sinks", s.sinks, sinkRow, "no sinks configured", 5);
  }
  function drawOutbox(o) {
    fill("dead", o.dead, deadRow, "no dead letters", 8);
    fill("pending", o.pending, pendingRow, "nothing pending", 7);
    $("requeue-all").hidden = o.dead.length < 2;
  }

  async function api(path, method) {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), 8000);
    try {
      const response = await fetch(path, {
        method: method || "GET",
        headers: token ? { Authorization: "Bearer " + token } : {},
        credentials: "same-origin",
        cache: "no-store",
        signal: abort.signal,
      });
      let body = null;
      try { body = await response.json(); } catch (e) { /* not JSON */ }
      if (!response.ok) {
        const detail = body && body.detail ? ": " + JSON.stringify(body.detail) : "";
        const error = new Error((body && body.error ? body.error : "HTTP " + response.status)
          + detail);
        error.status = response.status;
        throw error;
      }
      return body;
    } finally {
      clearTimeout(timer);
    }
  }

  function flash(text, ok) {
    const node = $("flash");
    node.className = ok ? "ok" : "bad";
    node.textContent = text;
  }

  let last = 0;
  async function refresh() {
    const conn = $("conn");
    try {
      const [status, outbox] = await Promise.all([api("/api/v1/status"), api("/api/v1/outbox")]);
      drawStatus(status);
      drawOutbox(outbox);
      last = Date.now();
      conn.className = "muted";
      conn.textContent = "updated " + new Date(last).toLocaleTimeString();
    } catch (error) {
      conn.className = "bad";
      conn.textContent = error.status === 401 || error.status === 403
        ? "not allowed (" + error.message + "): open this page as /?token=TOKEN"
        : "the bridge does not answer (" + error.message + ")"
          + (last ? "; last update " + new Date(last).toLocaleTimeString() : "");
    }
    refreshTimes();
  }

  async function requeue(target, button) {
    button.disabled = true;
    const label = button.textContent;
    button.textContent = "re-queuing…";
    try {
      const answer = await api("/api/v1/outbox/" + encodeURIComponent(target) + "/retry", "POST");
      flash("re-queued row " + answer.requeued.join(", ") + "; it is sent again now", true);
    } catch (error) {
      flash("re-queue of " + target + " failed: " + error.message, false);
      button.disabled = false;
      button.textContent = label;
    }
    await refresh();
  }
  $("dead").addEventListener("click", (event) => {
    const button = event.target.closest("button[data-requeue]");
    if (button && !button.disabled) requeue(button.dataset.requeue, button);
  });
  $("requeue-all").addEventListener("click", (event) => requeue("dead", event.currentTarget));

  async function loop() {
    await refresh();
    setTimeout(loop, POLL_MS);
  }
  loop();
})();
</script>
</body>
</html>
"""
