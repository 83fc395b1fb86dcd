// Stub of the Flic Hub SDK "buttons" module for tests under Node.
//
// Like the real module it is an EventEmitter that emits button events, and
// getButton/getButtons hand out copies of Button objects (bdaddr, name,
// serialNumber, ...). Tests seed buttons with setButtons() and fire events
// with emit("buttonSingleOrDoubleClickOrHold", {bdaddr, isSingleClick, ...}).
"use strict";

const EventEmitter = require("node:events");

const buttons = new EventEmitter();
let known = [];

buttons.getButton = function (bdaddr) {
  const found = known.find((b) => b.bdaddr === bdaddr);
  return found ? { ...found } : null;
};

buttons.getButtons = function () {
  return known.map((b) => ({ ...b }));
};

/** Replace the hub's button list (test helper, not part of the SDK). */
buttons.setButtons = function (list) {
  known = list.map((b) => ({ ...b }));
};

/** Forget buttons and listeners (test helper, not part of the SDK). */
buttons.reset = function () {
  known = [];
  buttons.removeAllListeners();
};

module.exports = buttons;
