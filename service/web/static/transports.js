// The streaming transports beside the long poll (watch.js): Server-Sent Events and WebSocket.
//
// The page picks one with ?transport=longpoll|sse|ws (long polling by default). Each class here has
// the interface of LongPoll (start, restart, stop) and its callbacks, so the page treats them
// alike: accept(body) applies a state (a task page) or a watch batch (the board), exactly as a
// long poll's answer; onState("live" | "reconnecting" | "error", detail); onServedBy(instance);
// headers() gives the access token; onRefused(status, body) on a 401 or 403.
//
// Both resume after a drop: the SSE stream with Last-Event-ID (the last version or cursor), the
// socket by subscribing again with it; the server catches them up from the store. restart() (the
// tab was hidden, the network came back, a new token) starts over from a fresh snapshot instead.
// Errors back off with full jitter, as the long poll does.

import { backoffDelay } from "./watch.js";

export const TRANSPORTS = ["longpoll", "sse", "ws"];
export const TRANSPORT_NAMES = {
  longpoll: "long polling",
  sse: "Server-Sent Events",
  ws: "WebSocket",
};

// Statuses that say "try again later" although they are 4xx.
const RETRYABLE_4XX = new Set([408, 429]);

// ?transport= of the page's address; anything else (or nothing) is long polling.
export function chosenTransport(search = window.location.search) {
  const asked = new URLSearchParams(search).get("transport");
  return TRANSPORTS.includes(asked) ? asked : "longpoll";
}

// target: { task: id } or { board: true }. Options as in the header comment, plus
// heartbeatSeconds: the server's STREAM_HEARTBEAT.
export function createStream(transport, options) {
  return transport === "ws" ? new SocketStream(options) : new EventStream(options);
}

function describeError(status, body) {
  const message = body?.error?.message;
  return `HTTP ${status}${message ? `: ${message}` : ""}`;
}

// What both transports share: the state callbacks, the backoff, and a sleep restart() ends early.
class Reconnecting {
  constructor({ target, accept, heartbeatSeconds, onState, onServedBy, headers, onRefused }) {
    this.target = target;
    this.accept = accept;
    this.heartbeatMs = heartbeatSeconds * 1000;
    // Three heartbeats without a byte: the connection is dead, even if the browser did not say so.
    this.deadAfterMs = 3 * this.heartbeatMs;
    this.onState = onState;
    this.onServedBy = onServedBy;
    this.headers = headers ?? (() => ({}));
    this.onRefused = onRefused ?? (() => {});
    this.attempt = 0;
    this.stopped = false;
    this.wake = null;
  }

  live() {
    this.attempt = 0;
    this.onState("live", "");
  }

  async retryLater(why) {
    const delay = backoffDelay(this.attempt);
    this.attempt += 1;
    this.onState("reconnecting", `${why}; retrying in ${(delay / 1000).toFixed(1)} s`);
    await this.sleep(delay);
  }

  async refused(status, body) {
    this.onRefused(status, body);
    this.onState("error", describeError(status, body));
    await new Promise((resolve) => (this.wake = resolve)); // until restart() or stop()
    this.wake = null;
  }

  async sleep(ms) {
    await new Promise((resolve) => {
      this.wake = resolve;
      setTimeout(resolve, ms);
    });
    this.wake = null;
  }

  token() {
    const header = this.headers().Authorization ?? "";
    return header.startsWith("Bearer ") ? header.slice("Bearer ".length) : null;
  }
}

// --- Server-Sent Events -----------------------------------------------------------------------

// Read with fetch rather than EventSource: fetch sends the Authorization header (EventSource sends
// no header of ours) and tells a 401 from a network error; the stream format is the same.
export class EventStream extends Reconnecting {
  constructor(options) {
    super(options);
    this.url = options.target.task
      ? `/api/tasks/${encodeURIComponent(options.target.task)}/events`
      : "/api/events";
    this.lastId = null; // the id of the last event applied: where a reconnect resumes
    this.controller = null;
  }

  start() {
    this.#run();
  }

  restart() {
    this.lastId = null; // a fresh snapshot
    this.attempt = 0;
    this.controller?.abort("restart");
    this.wake?.();
  }

  stop() {
    this.stopped = true;
    this.controller?.abort("stop");
    this.wake?.();
  }

  async #run() {
    while (!this.stopped) {
      const controller = new AbortController();
      this.controller = controller;
      let retryMs = null;
      try {
        const headers = { Accept: "text/event-stream", ...this.headers() };
        if (this.lastId !== null) headers["Last-Event-ID"] = this.lastId;
        const response = await fetch(this.url, {
          signal: controller.signal,
          cache: "no-store",
          headers,
        });
        const instance = response.headers.get("X-Served-By");
        if (instance) this.onServedBy(instance);
        if (!response.ok) {
          const body = await response.json().catch(() => null);
          if (response.status >= 500 || RETRYABLE_4XX.has(response.status)) {
            await this.retryLater(describeError(response.status, body));
          } else {
            await this.refused(response.status, body);
          }
          continue;
        }
        this.live();
        retryMs = await this.#read(response.body, controller);
      } catch (error) {
        if (controller.signal.aborted && ["restart", "stop"].includes(controller.signal.reason)) {
          continue;
        }
        await this.retryLater(`stream lost: ${error.message ?? error}`);
        continue;
      } finally {
        this.controller = null;
      }
      // The server ended the stream (it is shutting down): come back after the pause it asked
      // for, resuming from the last event. Nothing is missed meanwhile.
      if (retryMs !== null) await this.sleep(retryMs);
      else await this.retryLater("stream ended");
    }
  }

  // Read events until the stream ends (its retry: in ms, if it sent one), or throw.
  async #read(body, controller) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let watchdog = null;
    const feed = () => {
      clearTimeout(watchdog);
      watchdog = setTimeout(() => controller.abort("dead"), this.deadAfterMs);
    };
    let buffer = "";
    let fields = {};
    let retryMs = null;
    try {
      feed();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return retryMs;
        feed();
        buffer += value;
        const lines = buffer.split(/\r\n|\r|\n/);
        buffer = lines.pop(); // an unfinished line waits for the rest
        for (const line of lines) {
          if (line === "") {
            if (fields.data !== undefined) this.#dispatch(fields);
            fields = {};
          } else if (!line.startsWith(":")) {
            const colon = line.indexOf(":");
            const name = colon < 0 ? line : line.slice(0, colon);
            const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
            if (name === "retry" && /^\d+$/.test(text)) retryMs = Number(text);
            else if (name === "data" && fields.data !== undefined) fields.data += `\n${text}`;
            else fields[name] = text;
          }
        }
      }
    } finally {
      clearTimeout(watchdog);
      reader.cancel().catch(() => {});
    }
  }

  #dispatch(fields) {
    let body;
    try {
      body = JSON.parse(fields.data);
    } catch {
      return; // not ours (a proxy's page?): the next event or reconnect puts it right
    }
    this.accept(body);
    if (fields.id !== undefined) this.lastId = fields.id;
  }
}

// --- WebSocket --------------------------------------------------------------------------------

// One socket, one subscription (the board, or the task of a task page), and a {"ping"} every
// heartbeat (answered with a pong) to see that it lives. The access token goes in
// the subprotocol list ("bearer.<token>" beside "taskstatus"): a browser cannot set headers on a
// WebSocket, and a token in the URL would end up in logs.
export class SocketStream extends Reconnecting {
  constructor(options) {
    super(options);
    this.since = null; // the version or cursor of the last message applied
    this.socket = null;
    this.restarting = false;
  }

  start() {
    this.#run();
  }

  restart() {
    this.since = null;
    this.attempt = 0;
    if (this.socket) {
      this.restarting = true;
      this.socket.close(1000, "restart");
    }
    this.wake?.();
  }

  stop() {
    this.stopped = true;
    this.socket?.close(1000, "stop");
    this.wake?.();
  }

  #subscription() {
    if (this.target.task) {
      const body = { task: this.target.task };
      if (this.since !== null) body.version = this.since;
      return { subscribe: body };
    }
    const body = { board: true };
    if (this.since !== null) body.cursor = this.since;
    return { subscribe: body };
  }

  async #run() {
    while (!this.stopped) {
      const outcome = await this.#session();
      if (this.stopped) return;
      if (outcome.refused) {
        await this.refused(outcome.status, outcome.body);
      } else if (outcome.restart) {
        continue;
      } else if (outcome.goingAway) {
        // A draining instance: come back after a short random pause, to another one.
        await this.sleep(1000 + Math.random() * 2000);
      } else {
        await this.retryLater(outcome.why);
      }
    }
  }

  // One connection, from open to close: what to do next.
  #session() {
    return new Promise((resolve) => {
      const scheme = window.location.protocol === "https:" ? "wss" : "ws";
      const token = this.token();
      const protocols = token ? ["taskstatus", `bearer.${token}`] : [];
      let socket;
      try {
        socket = new WebSocket(`${scheme}://${window.location.host}/api/ws`, protocols);
      } catch (error) {
        resolve({ why: `cannot connect: ${error.message}` });
        return;
      }
      this.socket = socket;
      let outcome = null;
      let watchdog = null;
      let pinger = null;
      const feed = () => {
        clearTimeout(watchdog);
        watchdog = setTimeout(() => {
          outcome ??= { why: "no answer in time" };
          socket.close(4000, "dead");
        }, this.deadAfterMs);
      };
      socket.addEventListener("open", () => {
        feed();
        socket.send(JSON.stringify(this.#subscription()));
        // The server's WebSocket pings are invisible here: ask for a pong now and then, so a
        // quiet board shows its connection is alive and a dead one is noticed.
        const ping = () => socket.send(JSON.stringify({ ping: Date.now() }));
        pinger = setInterval(ping, this.heartbeatMs);
      });
      socket.addEventListener("message", (event) => {
        feed();
        let message;
        try {
          message = JSON.parse(event.data);
        } catch {
          return;
        }
        if (message.hello) {
          this.onServedBy(message.hello.instance);
        } else if (message.state) {
          this.accept(message.state);
          this.since = message.state.version;
        } else if (message.board) {
          this.accept(message.board);
          this.since = message.board.cursor;
        } else if (message.subscribed) {
          this.live();
        } else if (message.error) {
          const code = message.error.code;
          const retryable = ["backend_unavailable", "too_many_waiters"].includes(code);
          outcome ??= retryable
            ? { why: message.error.message }
            : { refused: true, status: 403, body: message };
          socket.close(1000, "error");
        }
      });
      socket.addEventListener("close", (event) => {
        clearTimeout(watchdog);
        clearInterval(pinger);
        this.socket = null;
        if (this.restarting) {
          this.restarting = false;
          outcome = { restart: true };
        } else if (event.code === 1001) {
          outcome ??= { goingAway: true };
        } else if (event.code === 1008) {
          // The token it was opened with expired: a new one is needed.
          const body = { error: { code: "token_expired", message: "the token has expired" } };
          outcome ??= { refused: true, status: 401, body };
        }
        resolve(outcome ?? { why: `connection closed (${event.code})` });
      });
    });
  }
}
