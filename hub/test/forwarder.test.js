"use strict";

const test = require("node:test");
const assert = require("node:assert/strict");

const { createForwarder, verdictOf } = require("../forwarder");
const { createHttp } = require("./stubs/http");

const ADDR_A = "80:e4:da:70:00:01";
const ADDR_B = "80:e4:da:70:00:02";
const RECEPTION = { bdaddr: ADDR_A, name: "Reception", serialNumber: "BG01-A11111" };
const LAB = { bdaddr: ADDR_B, name: "Lab", serialNumber: "BG01-B22222" };

const SINGLE = { isSingleClick: true, isDoubleClick: false, isHold: false };
const DOUBLE = { isSingleClick: false, isDoubleClick: true, isHold: false };
const HOLD = { isSingleClick: false, isDoubleClick: false, isHold: true };

/** A fake clock: timers run only when the test advances time. */
function createClock() {
  let now = 0;
  let nextId = 1;
  let timers = [];
  return {
    now: () => now,
    setTimeout(fn, ms) {
      const id = nextId++;
      timers.push({ id, at: now + ms, fn });
      return id;
    },
    clearTimeout(id) {
      timers = timers.filter((t) => t.id !== id);
    },
    advance(ms) {
      const until = now + ms;
      for (;;) {
        const due = timers.filter((t) => t.at <= until).sort((x, y) => x.at - y.at || x.id - y.id)[0];
        if (!due) break;
        timers = timers.filter((t) => t !== due);
        now = due.at;
        due.fn();
      }
      now = until;
    },
  };
}

/** A forwarder wired to a stub http, a fake clock and a captured log. */
function setup(options = {}) {
  const http = createHttp();
  const clock = createClock();
  const logs = [];
  const forwarder = createForwarder(
    { bridgeUrl: "http://bridge.test:8470/", token: "s3cret", ...options },
    { http, setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout, now: clock.now, log: (l) => logs.push(l) },
  );
  const press = (button, gesture) => forwarder.handleButtonEvent({ bdaddr: button.bdaddr, ...gesture }, button);
  return { http, clock, logs, forwarder, press };
}

test("single click and hold send On, double click sends Off, by default", () => {
  const { http, press } = setup();
  press(RECEPTION, SINGLE);
  http.reply({ statusCode: 202 });
  press(RECEPTION, DOUBLE);
  http.reply({ statusCode: 202 });
  press(RECEPTION, HOLD);
  http.reply({ statusCode: 202 });
  assert.deepEqual(
    http.bodies().map((b) => b.flic_state),
    ["On", "Off", "On"],
  );
});

test("the request is a POST of exactly flic_nameId, flic_state and info to the ingest path", () => {
  const { http, press } = setup();
  press(RECEPTION, SINGLE);
  const { options } = http.requests[0];
  assert.equal(options.url, "http://bridge.test:8470/api/v1/ingest/flic");
  assert.equal(options.method, "POST");
  assert.deepEqual(JSON.parse(options.content), {
    flic_nameId: "Reception",
    flic_state: "On",
    info: "hub: single click on Reception",
  });
});

test("the token goes in an Authorization: Bearer header with a JSON content type", () => {
  const { http, press } = setup();
  press(RECEPTION, HOLD);
  assert.deepEqual(http.requests[0].options.headers, {
    "Content-Type": "application/json",
    Authorization: "Bearer s3cret",
  });
});

test("info names the gesture: double click and hold", () => {
  const { http, press } = setup();
  press(LAB, DOUBLE);
  http.reply({ statusCode: 200 });
  press(LAB, HOLD);
  assert.deepEqual(
    http.bodies().map((b) => b.info),
    ["hub: double click on Lab", "hub: hold on Lab"],
  );
});

test("network error, 503 and 429 are retried after 1, 2, 4 s; the press lands when the bridge is back", () => {
  const { http, clock, logs, forwarder, press } = setup();
  press(RECEPTION, SINGLE);
  http.reply({ error: "ECONNREFUSED" });
  for (const [wait, answer] of [
    [1000, { statusCode: 503 }],
    [2000, { statusCode: 429 }],
    [4000, { statusCode: 202 }],
  ]) {
    const sent = http.requests.length;
    clock.advance(wait - 1);
    assert.equal(http.requests.length, sent, `nothing is sent before ${wait} ms`);
    clock.advance(1);
    assert.equal(http.requests.length, sent + 1, `the retry goes out at ${wait} ms`);
    http.reply(answer);
  }
  assert.equal(forwarder.queueLength(), 0);
  assert.equal(http.requests.length, 4);
  assert.ok(http.bodies().every((b) => b.flic_nameId === "Reception" && b.flic_state === "On"));
  assert.match(logs.join("\n"), /network error: .*ECONNREFUSED/);
  assert.match(logs.join("\n"), /delivered single click on Reception .*HTTP 202 after 4 attempts/);
});

test("408 and every 5xx are retried; other 4xx are permanent; 2xx is delivered", () => {
  for (const status of [200, 201, 202, 204]) assert.equal(verdictOf(null, { statusCode: status }), "ok", status);
  for (const status of [400, 401, 403, 404, 409, 413, 422]) assert.equal(verdictOf(null, { statusCode: status }), "drop", status);
  for (const status of [408, 429, 500, 502, 503, 504]) assert.equal(verdictOf(null, { statusCode: status }), "retry", status);
  assert.equal(verdictOf("timeout", undefined), "retry");
  assert.equal(verdictOf(null, undefined), "retry");
  assert.equal(verdictOf(null, { statusCode: 302 }), "retry");
});

test("the backoff doubles up to 60 s and starts again at 1 s after a success", () => {
  const { http, clock, press } = setup();
  press(RECEPTION, SINGLE);
  const waits = [];
  let last = clock.now();
  http.reply({ statusCode: 503 });
  while (waits.length < 9) {
    const sent = http.requests.length;
    while (http.requests.length === sent) clock.advance(100);
    waits.push(clock.now() - last);
    last = clock.now();
    http.reply({ statusCode: 503 });
  }
  assert.deepEqual(waits, [1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000, 60000]);

  clock.advance(60000);
  http.reply({ statusCode: 202 });
  press(RECEPTION, DOUBLE);
  http.reply({ error: "unreachable" });
  const sent = http.requests.length;
  clock.advance(1000);
  assert.equal(http.requests.length, sent + 1, "after a success the next failure waits 1 s");
});

test("presses of a button are sent one at a time and never out of order", () => {
  const { http, clock, forwarder, press } = setup();
  press(RECEPTION, SINGLE);
  press(RECEPTION, DOUBLE);
  press(LAB, HOLD);
  press(RECEPTION, HOLD);
  assert.equal(http.outstanding().length, 1, "one request at a time");
  http.reply({ error: "unreachable" });
  clock.advance(1000);
  assert.equal(http.outstanding().length, 1);
  http.reply({ statusCode: 502 });
  clock.advance(2000);
  while (http.outstanding().length > 0) {
    assert.equal(http.outstanding().length, 1);
    http.reply({ statusCode: 202 });
  }
  assert.equal(forwarder.queueLength(), 0);
  assert.deepEqual(
    http.bodies().map((b) => `${b.flic_nameId}:${b.flic_state}`),
    ["Reception:On", "Reception:On", "Reception:On", "Reception:Off", "Lab:On", "Reception:On"],
  );
});

test("404 is dropped with a log line, not retried, and the next press goes out at once", () => {
  const { http, clock, logs, forwarder, press } = setup();
  press(RECEPTION, SINGLE);
  press(LAB, SINGLE);
  http.reply({ statusCode: 404, content: '{"error": "unknown flic_nameId", "detail": "Reception"}' });
  assert.equal(http.requests.length, 2, "the next press is sent right away");
  assert.equal(http.bodies()[1].flic_nameId, "Lab");
  http.reply({ statusCode: 202 });
  clock.advance(3600 * 1000);
  assert.equal(http.requests.length, 2, "the refused press is never sent again");
  assert.equal(forwarder.queueLength(), 0);
  assert.match(logs.join("\n"), /refused single click on Reception .*HTTP 404 .*unknown flic_nameId.*dropped, not retried/);
});

test("a full queue drops the oldest press that is not being sent, with a log line", () => {
  const { http, clock, logs, forwarder, press } = setup({ maxQueue: 3 });
  press(RECEPTION, SINGLE); // #1, in flight
  press(RECEPTION, DOUBLE); // #2
  press(LAB, SINGLE); // #3
  press(LAB, DOUBLE); // #4: the queue is full, #2 goes
  assert.equal(forwarder.queueLength(), 3);
  assert.match(logs.join("\n"), /queue full \(3 presses\); dropped the oldest: double click on Reception \(#2/);

  http.reply({ error: "unreachable" }); // #1 now waits for its retry, nothing in flight
  press(RECEPTION, HOLD); // #5: the queue is full, #1 goes
  assert.match(logs.join("\n"), /dropped the oldest: single click on Reception \(#1/);

  clock.advance(1000);
  while (http.outstanding().length > 0) http.reply({ statusCode: 202 });
  assert.deepEqual(
    http.bodies().map((b) => `${b.flic_nameId}:${b.flic_state}`),
    ["Reception:On", "Lab:On", "Lab:Off", "Reception:On"],
  );
});

test("a press sent late says how late in its info", () => {
  const { http, clock, press } = setup();
  press(RECEPTION, HOLD);
  http.reply({ error: "unreachable" });
  clock.advance(1000);
  http.reply({ error: "unreachable" });
  clock.advance(2000);
  assert.equal(http.bodies()[2].info, "hub: hold on Reception (sent 3 s after the press)");
});

test("an attempt with no answer times out and is retried; its late answer is ignored", () => {
  const { http, clock, logs, forwarder, press } = setup({ requestTimeoutMs: 5000 });
  press(RECEPTION, SINGLE);
  clock.advance(5000);
  assert.match(logs.join("\n"), /no answer within 5 s/);
  clock.advance(1000);
  assert.equal(http.requests.length, 2);
  http.reply({ statusCode: 202 }); // the first, timed-out attempt answers late
  assert.equal(forwarder.queueLength(), 1, "a late answer does not settle the press");
  assert.match(logs.join("\n"), /late answer for single click on Reception/);
  http.reply({ statusCode: 202 });
  assert.equal(forwarder.queueLength(), 0);
});

test("makeRequest throwing counts as a network error and is retried", () => {
  const http = createHttp();
  const clock = createClock();
  let calls = 0;
  const flaky = {
    makeRequest(options, callback) {
      calls += 1;
      if (calls === 1) throw new Error("socket limit");
      http.makeRequest(options, callback);
    },
  };
  const forwarder = createForwarder(
    { bridgeUrl: "http://bridge.test:8470", token: "s3cret" },
    { http: flaky, setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout, now: clock.now, log: () => {} },
  );
  forwarder.handleButtonEvent({ bdaddr: ADDR_A, ...SINGLE }, RECEPTION);
  clock.advance(1000);
  http.reply({ statusCode: 202 });
  assert.equal(calls, 2);
  assert.equal(forwarder.queueLength(), 0);
});

test("per-button settings: explicit flic_nameId, gesture overrides, null gestures not sent", () => {
  const { http, logs, press } = setup({
    gestures: { single: "On", double: "Off", hold: null },
    buttons: { "80:E4:DA:70:00:01": { nameId: "reception", gestures: { hold: "Off" } } },
  });
  press(RECEPTION, HOLD);
  http.reply({ statusCode: 202 });
  press(LAB, HOLD);
  press(LAB, SINGLE);
  assert.deepEqual(http.bodies(), [
    { flic_nameId: "reception", flic_state: "Off", info: "hub: hold on Reception" },
    { flic_nameId: "Lab", flic_state: "On", info: "hub: single click on Lab" },
  ]);
  assert.match(logs.join("\n"), /hold on Lab is not mapped; not sent/);
});

test("a button with no name on the hub is sent under its serial number, with a warning", () => {
  const { http, logs, press } = setup();
  press({ bdaddr: ADDR_B, name: "", serialNumber: "BG01-B22222" }, SINGLE);
  assert.equal(http.bodies()[0].flic_nameId, "BG01-B22222");
  assert.match(logs.join("\n"), /has no name on the hub; using "BG01-B22222"/);
});

test("bad configuration fails at start with the key in the message", () => {
  const deps = { http: createHttp(), setTimeout, clearTimeout, now: Date.now, log: () => {} };
  assert.throws(() => createForwarder({ bridgeUrl: "192.168.1.10:8470", token: "t" }, deps), /bridgeUrl/);
  assert.throws(() => createForwarder({ bridgeUrl: "http://b", token: "t", gestures: { single: "on" } }, deps), /gestures\.single/);
  assert.throws(() => createForwarder({ bridgeUrl: "http://b", token: "t", gestures: { triple: "On" } }, deps), /unknown gesture/);
  assert.throws(() => createForwarder({ bridgeUrl: "http://b", token: "t", maxQueue: 1 }, deps), /maxQueue/);
});

test("without a token no Authorization header is sent and a warning is logged", () => {
  const { http, logs, press } = setup({ token: "" });
  press(RECEPTION, SINGLE);
  assert.equal(http.requests[0].options.headers.Authorization, undefined);
  assert.match(logs[0], /WARNING no TOKEN/);
});
