"use strict";

const test = require("node:test");
const assert = require("node:assert/strict");
const Module = require("node:module");
const path = require("node:path");

const MAIN = path.resolve(__dirname, "..", "main.js");
const STUBS = {
  buttons: path.resolve(__dirname, "stubs", "buttons.js"),
  http: path.resolve(__dirname, "stubs", "http.js"),
};

/** Load hub/main.js with require("buttons") / require("http") resolved to the stubs, as on the hub. */
function loadMain() {
  const original = Module._resolveFilename;
  Module._resolveFilename = function (request, parent, ...rest) {
    if (parent && parent.filename === MAIN && Object.hasOwn(STUBS, request)) {
      return STUBS[request];
    }
    return original.call(this, request, parent, ...rest);
  };
  try {
    delete require.cache[MAIN];
    return require(MAIN);
  } finally {
    Module._resolveFilename = original;
  }
}

test("main.js loads against the Hub SDK stubs and forwards a press to BRIDGE_URL with TOKEN", (t) => {
  const buttons = require("./stubs/buttons");
  const http = require("./stubs/http");
  buttons.reset();
  http.reset();
  buttons.setButtons([{ bdaddr: "80:e4:da:70:00:01", name: "Reception", serialNumber: "BG01-A11111" }]);
  const log = t.mock.method(console, "log", () => {});

  const main = loadMain();

  const lines = log.mock.calls.map((c) => c.arguments[0]).join("\n");
  assert.match(lines, /forwarding presses to http:\/\/192\.168\.1\.10:8470\/api\/v1\/ingest\/flic/);
  assert.match(lines, /button "Reception" bdaddr 80:e4:da:70:00:01 serial BG01-A11111 -> flic_nameId "Reception"/);
  assert.equal(buttons.listenerCount("buttonSingleOrDoubleClickOrHold"), 1);

  buttons.emit("buttonSingleOrDoubleClickOrHold", {
    bdaddr: "80:e4:da:70:00:01", isSingleClick: false, isDoubleClick: true, isHold: false,
  });
  assert.equal(http.requests.length, 1);
  const { options } = http.requests[0];
  assert.equal(options.url, "http://192.168.1.10:8470/api/v1/ingest/flic");
  assert.equal(options.headers.Authorization, "Bearer change-me");
  assert.deepEqual(JSON.parse(options.content), {
    flic_nameId: "Reception", flic_state: "Off", info: "hub: double click on Reception",
  });
  http.reply({ statusCode: 202 });
  assert.equal(main.forwarder.queueLength(), 0);
  buttons.reset();
});
