// Stub of the Flic Hub SDK "http" module for tests under Node.
//
// makeRequest(options, callback) only records the request; the test plays the
// bridge by answering the oldest unanswered request with reply():
//   reply({ statusCode: 202, content: "{}" })   -> callback(null, result)
//   reply({ error: "connection refused" })       -> callback(error, undefined)
// so the callback always comes later than makeRequest returns, as on the hub.
"use strict";

function createHttp() {
  const requests = [];

  function makeRequest(options, callback) {
    requests.push({ options, callback, answered: false });
  }

  function outstanding() {
    return requests.filter((r) => !r.answered);
  }

  function reply(answer) {
    const request = outstanding()[0];
    if (!request) {
      throw new Error("stub http: no request waiting for an answer");
    }
    request.answered = true;
    if (answer.error !== undefined) {
      request.callback(answer.error, undefined);
    } else {
      request.callback(null, {
        statusCode: answer.statusCode,
        statusMessage: answer.statusMessage || "",
        headers: answer.headers || {},
        content: answer.content === undefined ? "" : answer.content,
      });
    }
    return request;
  }

  /** The request bodies sent so far, parsed, in order. */
  function bodies() {
    return requests.map((r) => JSON.parse(r.options.content));
  }

  function reset() {
    requests.length = 0;
  }

  return { makeRequest, reply, outstanding, bodies, requests, reset };
}

// The module itself is one instance (what main.js gets from require("http"));
// createHttp() gives tests a fresh one each.
module.exports = createHttp();
module.exports.createHttp = createHttp;
