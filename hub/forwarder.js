// flicbridge forwarder for the Flic Hub SDK: turns button gestures into
// POST /api/v1/ingest/flic requests and retries them while the bridge is down.
//
// Invariants:
// - One request at a time, in press order: a later press (of any button, so
//   of the same button too) is never sent before an earlier one has been
//   answered 2xx or dropped.
// - A press leaves the queue only when the bridge answered 2xx, when it
//   answered a permanent 4xx (not 408/429), or when the full queue evicts it
//   (the oldest press that is not being sent right now), always with a log line.
// - Memory only: a hub reboot or a module restart loses what is queued.
//
// Written in ES5 (var, function expressions) because the Hub SDK runs an
// ES5-era engine. Everything the hub provides (http, timers, clock, log) is
// passed in as deps so the module can be tested under Node.

var INGEST_PATH = "/api/v1/ingest/flic";

var GESTURES = ["single", "double", "hold"];

var GESTURE_TEXT = { single: "single click", double: "double click", hold: "hold" };

// The bridge's own default: single click and hold open, double click closes.
var DEFAULT_GESTURE_STATES = { single: "On", double: "Off", hold: "On" };

var DEFAULTS = {
  maxQueue: 100,
  backoffInitialMs: 1000,
  backoffMaxMs: 60000,
  // Longer than the bridge's own 30 s wait for its commit, so its 503 comes first.
  requestTimeoutMs: 40000,
  // A press sent this long after it was made says so in its info text.
  lateAfterMs: 2000
};

function gestureOf(event) {
  if (event.isSingleClick) {
    return "single";
  }
  if (event.isDoubleClick) {
    return "double";
  }
  if (event.isHold) {
    return "hold";
  }
  return null;
}

// "ok": delivered; "drop": the bridge refused it for good; "retry": try again later.
function verdictOf(error, result) {
  if (error || !result || typeof result.statusCode !== "number") {
    return "retry";
  }
  var status = result.statusCode;
  if (status >= 200 && status < 300) {
    return "ok";
  }
  if (status === 408 || status === 429) {
    return "retry";
  }
  if (status >= 400 && status < 500) {
    return "drop";
  }
  // 5xx, and anything the bridge never sends (1xx, 3xx): not delivered.
  return "retry";
}

function describeError(error) {
  if (error && error.message) {
    return String(error.message);
  }
  try {
    return JSON.stringify(error);
  } catch (e) {
    return String(error);
  }
}

function shorten(text, max) {
  text = String(text === undefined || text === null ? "" : text);
  return text.length > max ? text.substring(0, max) + "..." : text;
}

// Gesture -> "On" | "Off" | null (null: do not send), starting from base.
function checkGestureStates(states, base, where) {
  var result = {};
  var i;
  for (i = 0; i < GESTURES.length; i++) {
    result[GESTURES[i]] = base[GESTURES[i]];
  }
  var keys = states ? Object.keys(states) : [];
  for (i = 0; i < keys.length; i++) {
    var value = states[keys[i]];
    if (GESTURES.indexOf(keys[i]) < 0) {
      throw new Error(where + ": unknown gesture " + JSON.stringify(keys[i]) + " (use single, double, hold)");
    }
    if (value !== "On" && value !== "Off" && value !== null) {
      throw new Error(where + "." + keys[i] + ": must be \"On\", \"Off\" or null, not " + JSON.stringify(value));
    }
    result[keys[i]] = value;
  }
  return result;
}

function positiveNumber(value, fallback, name) {
  if (value === undefined) {
    return fallback;
  }
  if (typeof value !== "number" || !(value > 0)) {
    throw new Error(name + ": must be a positive number, not " + JSON.stringify(value));
  }
  return value;
}

// options: bridgeUrl, token, gestures, buttons, maxQueue, backoffInitialMs,
//          backoffMaxMs, requestTimeoutMs (see main.js for what each means)
// deps:    http (makeRequest), setTimeout, clearTimeout, now, log
function createForwarder(options, deps) {
  var bridgeUrl = String(options.bridgeUrl || "");
  if (bridgeUrl.indexOf("http://") !== 0 && bridgeUrl.indexOf("https://") !== 0) {
    throw new Error("bridgeUrl: must start with http:// or https://, not " + JSON.stringify(options.bridgeUrl));
  }
  while (bridgeUrl.charAt(bridgeUrl.length - 1) === "/") {
    bridgeUrl = bridgeUrl.substring(0, bridgeUrl.length - 1);
  }
  var url = bridgeUrl + INGEST_PATH;
  var token = options.token ? String(options.token) : "";
  var maxQueue = positiveNumber(options.maxQueue, DEFAULTS.maxQueue, "maxQueue");
  if (maxQueue < 2 || Math.floor(maxQueue) !== maxQueue) {
    throw new Error("maxQueue: must be a whole number of at least 2, not " + maxQueue);
  }
  var backoffInitialMs = positiveNumber(options.backoffInitialMs, DEFAULTS.backoffInitialMs, "backoffInitialMs");
  var backoffMaxMs = positiveNumber(options.backoffMaxMs, DEFAULTS.backoffMaxMs, "backoffMaxMs");
  var requestTimeoutMs = positiveNumber(options.requestTimeoutMs, DEFAULTS.requestTimeoutMs, "requestTimeoutMs");
  var defaultStates = checkGestureStates(options.gestures, DEFAULT_GESTURE_STATES, "gestures");

  // Per-button settings, keyed by lower-case bdaddr.
  var perButton = {};
  var configured = options.buttons || {};
  var addrs = Object.keys(configured);
  for (var a = 0; a < addrs.length; a++) {
    var entry = configured[addrs[a]] || {};
    perButton[addrs[a].toLowerCase()] = {
      nameId: entry.nameId ? String(entry.nameId) : "",
      states: checkGestureStates(entry.gestures, defaultStates, "buttons[\"" + addrs[a] + "\"].gestures")
    };
  }

  var http = deps.http;
  var setTimer = deps.setTimeout;
  var clearTimer = deps.clearTimeout || function () {};
  var now = deps.now || function () { return new Date().getTime(); };
  var log = deps.log;

  var headers = { "Content-Type": "application/json" };
  if (token) {
    headers.Authorization = "Bearer " + token;
  } else {
    log("flicbridge: WARNING no TOKEN set; the bridge answers 403 and every press will be dropped");
  }

  var queue = []; // presses in order; queue[0] is the one being sent or waiting to be retried
  var sending = false; // a request for queue[0] is outstanding
  var retryTimer = null; // pending backoff timer, if any
  var backoffMs = backoffInitialMs; // wait before the next retry
  var nextSeq = 1;

  function settingsFor(bdaddr) {
    return perButton[String(bdaddr || "").toLowerCase()] || null;
  }

  // flic_nameId: the explicit name from options.buttons, else the hub button's name.
  function nameIdFor(bdaddr, button) {
    var settings = settingsFor(bdaddr);
    if (settings && settings.nameId) {
      return settings.nameId;
    }
    if (button && button.name) {
      return String(button.name);
    }
    if (button && button.serialNumber) {
      return String(button.serialNumber);
    }
    return String(bdaddr);
  }

  function label(press) {
    return GESTURE_TEXT[press.gesture] + " on " + press.buttonName + " (#" + press.seq +
      ", flic_nameId " + JSON.stringify(press.nameId) + ", " + press.state + ")";
  }

  function infoFor(press) {
    var info = "hub: " + GESTURE_TEXT[press.gesture] + " on " + press.buttonName;
    var late = now() - press.pressedAt;
    if (late >= DEFAULTS.lateAfterMs) {
      info += " (sent " + Math.round(late / 1000) + " s after the press)";
    }
    return info;
  }

  function handleButtonEvent(event, button) {
    var bdaddr = event && event.bdaddr;
    var gesture = event ? gestureOf(event) : null;
    if (!gesture) {
      log("flicbridge: ignored an event with no single/double/hold flag from " + bdaddr);
      return null;
    }
    var settings = settingsFor(bdaddr);
    var state = (settings ? settings.states : defaultStates)[gesture];
    var buttonName = button && button.name ? String(button.name) : String(bdaddr);
    if (state === null) {
      log("flicbridge: " + GESTURE_TEXT[gesture] + " on " + buttonName + " is not mapped; not sent");
      return null;
    }
    if ((!button || !button.name) && !(settings && settings.nameId)) {
      log("flicbridge: WARNING button " + bdaddr + " has no name on the hub; using " +
        JSON.stringify(nameIdFor(bdaddr, button)) + " as flic_nameId");
    }
    var press = {
      seq: nextSeq++,
      bdaddr: bdaddr,
      buttonName: buttonName,
      nameId: nameIdFor(bdaddr, button),
      gesture: gesture,
      state: state,
      pressedAt: now(),
      attempts: 0
    };
    if (queue.length >= maxQueue) {
      // Never evict the press being sent: its answer is still to come.
      var evicted = queue.splice(sending ? 1 : 0, 1)[0];
      log("flicbridge: WARNING queue full (" + maxQueue + " presses); dropped the oldest: " + label(evicted) +
        ", pressed " + Math.round((now() - evicted.pressedAt) / 1000) + " s ago");
    }
    queue.push(press);
    pump();
    return press;
  }

  function pump() {
    if (sending || retryTimer !== null || queue.length === 0) {
      return;
    }
    send(queue[0]);
  }

  function send(press) {
    sending = true;
    press.attempts += 1;
    var answered = false;
    var body = JSON.stringify({ flic_nameId: press.nameId, flic_state: press.state, info: infoFor(press) });

    // If the hub never calls back, the queue would stall for good: give up on
    // the attempt after requestTimeoutMs and retry (the bridge may then see
    // this press twice; a repeated On is "appended" there, a repeated Off ignored).
    var guard = setTimer(function () {
      finish(new Error("no answer within " + Math.round(requestTimeoutMs / 1000) + " s"), null, true);
    }, requestTimeoutMs);

    function finish(error, result, timedOut) {
      if (answered) {
        if (!timedOut) {
          log("flicbridge: late answer for " + label(press) + " ignored (already timed out)");
        }
        return;
      }
      answered = true;
      if (!timedOut) {
        clearTimer(guard);
      }
      sending = false;
      settle(press, error, result);
    }

    try {
      http.makeRequest({ url: url, method: "POST", headers: headers, content: body }, function (error, result) {
        finish(error, result, false);
      });
    } catch (e) {
      finish(e, null, false);
    }
  }

  function settle(press, error, result) {
    var verdict = verdictOf(error, result);
    if (verdict === "retry") {
      var why = error ? "network error: " + describeError(error)
        : result && typeof result.statusCode === "number" ? "HTTP " + result.statusCode
        : "no response";
      var wait = backoffMs;
      backoffMs = Math.min(backoffMs * 2, backoffMaxMs);
      log("flicbridge: bridge did not take " + label(press) + " (" + why + ", attempt " + press.attempts +
        "); retrying in " + Math.round(wait / 1000) + " s, " + queue.length + " queued");
      retryTimer = setTimer(function () {
        retryTimer = null;
        pump();
      }, wait);
      return;
    }
    queue.shift();
    backoffMs = backoffInitialMs;
    if (verdict === "ok") {
      log("flicbridge: delivered " + label(press) + ": HTTP " + result.statusCode +
        (press.attempts > 1 ? " after " + press.attempts + " attempts" : ""));
    } else {
      log("flicbridge: ERROR bridge refused " + label(press) + ": HTTP " + result.statusCode + " " +
        shorten(result.content, 200) + "; dropped, not retried");
    }
    pump();
  }

  return {
    handleButtonEvent: handleButtonEvent,
    nameIdFor: nameIdFor,
    queueLength: function () { return queue.length; },
    url: url
  };
}

exports.createForwarder = createForwarder;
exports.verdictOf = verdictOf;
exports.INGEST_PATH = INGEST_PATH;
