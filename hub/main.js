// flicbridge Flic Hub SDK module: forwards single click / double click / hold
// from the hub's buttons to the bridge's POST /api/v1/ingest/flic.
// Upload this file and forwarder.js into one Hub SDK module (see README.md).

// ---- Configuration -------------------------------------------------------

// The bridge, as the hub reaches it (its [server] host and port).
var BRIDGE_URL = "http://192.168.1.10:8470";

// The bridge's [server] token; sent as "Authorization: Bearer <TOKEN>".
var TOKEN = "change-me";

// What each gesture means for every button: "On" opens the alert, "Off"
// closes it, null sends nothing. The bridge's own default is below.
var GESTURES = { single: "On", double: "Off", hold: "On" };

// Optional, per button, keyed by the button's bdaddr (the module logs every
// button's bdaddr when it starts):
//   nameId   - the flic_nameId to send; default: the button's name on the hub.
//              Must match the bridge's ingest_name (or id / name_id) for it.
//   gestures - overrides of GESTURES for this button only.
var BUTTONS = {
  // "80:e4:da:70:00:01": { nameId: "reception", gestures: { hold: "Off" } }
};

// Presses kept while the bridge is unreachable; when full, the oldest is dropped.
var QUEUE_LIMIT = 100;

// Retry wait: starts at 1 s, doubles after each failure, stays at most 60 s.
var BACKOFF_INITIAL_MS = 1000;
var BACKOFF_MAX_MS = 60000;

// An attempt with no answer after this long counts as failed and is retried
// (longer than the bridge's own 30 s commit wait, so its 503 arrives first).
var REQUEST_TIMEOUT_MS = 40000;

// ---- Wiring --------------------------------------------------------------

var buttons = require("buttons");
var http = require("http");
var createForwarder = require("./forwarder").createForwarder;

var forwarder = createForwarder({
  bridgeUrl: BRIDGE_URL,
  token: TOKEN,
  gestures: GESTURES,
  buttons: BUTTONS,
  maxQueue: QUEUE_LIMIT,
  backoffInitialMs: BACKOFF_INITIAL_MS,
  backoffMaxMs: BACKOFF_MAX_MS,
  requestTimeoutMs: REQUEST_TIMEOUT_MS
}, {
  http: http,
  setTimeout: function (fn, ms) { return setTimeout(fn, ms); },
  clearTimeout: function (id) { clearTimeout(id); },
  now: function () { return Date.now(); },
  log: function (line) { console.log(line); }
});

buttons.on("buttonSingleOrDoubleClickOrHold", function (event) {
  forwarder.handleButtonEvent(event, buttons.getButton(event.bdaddr));
});

console.log("flicbridge: forwarding presses to " + forwarder.url);
var known = buttons.getButtons();
for (var i = 0; i < known.length; i++) {
  console.log("flicbridge: button " + JSON.stringify(known[i].name) + " bdaddr " + known[i].bdaddr +
    " serial " + known[i].serialNumber + " -> flic_nameId " +
    JSON.stringify(forwarder.nameIdFor(known[i].bdaddr, known[i])));
}

// For the tests; the hub ignores it.
exports.forwarder = forwarder;
