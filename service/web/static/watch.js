// The long-poll client loop. One request is in flight per tab at any time, whatever the number of
// tasks shown: the server holds it until something changes (200) or its hold ends (204), and we ask
// again at once. The loop never dies on its own: network errors and 5xx back off and retry; only a
// 4xx (our request is wrong, so retrying cannot help) stops it until the next restart().

const BACKOFF_BASE_MS = 500;
const BACKOFF_CAP_MS = 15_000;
// How long past the server's hold we wait before calling the connection dead: a proxy or a
// sleeping laptop can drop a request without the browser ever noticing.
const DEAD_AFTER_HOLD_MS = 10_000;
// Statuses that say "try again later" although they are 4xx.
const RETRYABLE_4XX = new Set([408, 429]);

// Abort reasons that are not failures: we cancelled the request ourselves.
const RESTART = Symbol("restart");
const STOP = Symbol("stop");

// Full jitter: each retry waits a random time up to an exponentially growing ceiling, so the tabs
// that lost one server do not come back in lockstep and knock it over again.
export function backoffDelay(attempt) {
  return Math.random() * Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** attempt);
}

export class LongPoll {
  // source.url(resync) -> the URL of the next request; resync asks for the whole truth (after
  //   start, an error, or a restart) rather than the changes since the last answer.
  // source.accept(body, resync) -> applies a 200 answer.
  // onState(state, detail): "live" | "reconnecting" | "error".
  // onServedBy(instanceId): the X-Served-By of every answer, errors included.
  // headers() -> extra request headers, asked for each request (the access token may change).
  // onRefused(status, body): a 4xx that stops the loop until restart() (e.g. 401: no token).
  constructor({
    source,
    holdSeconds,
    onState,
    onServedBy,
    headers = () => ({}),
    onRefused = () => {},
  }) {
    this.source = source;
    this.holdMs = holdSeconds * 1000;
    this.onState = onState;
    this.onServedBy = onServedBy;
    this.headers = headers;
    this.onRefused = onRefused;
    this.resync = true;
    this.attempt = 0;
    this.controller = null;
    this.wake = null; // ends a backoff sleep or a stop after a 4xx early
    this.stopped = false;
  }

  start() {
    this.#run();
  }

  // Drop the request in flight and start over from a fresh snapshot, now: a tab that was hidden
  // may have been frozen and its request silently dead, so we resync rather than trust it.
  restart() {
    this.resync = true;
    this.attempt = 0;
    this.controller?.abort(RESTART);
    this.wake?.();
  }

  stop() {
    this.stopped = true;
    this.controller?.abort(STOP);
    this.wake?.();
  }

  async #run() {
    while (!this.stopped) {
      const resync = this.resync;
      const controller = new AbortController();
      this.controller = controller;
      const deadline = setTimeout(
        () => controller.abort(new DOMException("no answer in time", "TimeoutError")),
        this.holdMs + DEAD_AFTER_HOLD_MS,
      );
      let response;
      let body = null;
      try {
        response = await fetch(this.source.url(resync), {
          signal: controller.signal,
          cache: "no-store",
          headers: { Accept: "application/json", ...this.headers() },
        });
        this.#noteServedBy(response);
        // Read the body under the same signal, so a restart() or the deadline also ends a slow body.
        if (response.status !== 204) body = parseJson(await response.text());
      } catch (error) {
        const reason = controller.signal.reason;
        if (reason === RESTART || reason === STOP) continue; // restart() already set resync
        await this.#retryLater(`network error: ${error.message}`);
        continue;
      } finally {
        clearTimeout(deadline);
        this.controller = null;
      }

      if (response.status === 200 && body !== null) {
        this.source.accept(body, resync);
        this.resync = false;
        this.#live();
      } else if (response.status === 204) {
        this.#live(); // nothing changed during the hold: keep the cursor and ask again
        // A draining instance (rolling restart) adds Retry-After: pause a random part of it, so
        // its clients spread over the other instances instead of all arriving at once.
        const pause = Number(response.headers.get("Retry-After"));
        if (pause > 0) await this.#sleep(Math.random() * Math.min(pause, 30) * 1000);
      } else if (response.status >= 500 || RETRYABLE_4XX.has(response.status) || response.ok) {
        await this.#retryLater(describe(response, body));
      } else {
        this.onRefused(response.status, body);
        this.onState("error", describe(response, body));
        await new Promise((resolve) => (this.wake = resolve)); // until restart() or stop()
        this.wake = null;
      }
    }
  }

  #live() {
    this.attempt = 0;
    this.onState("live", "");
  }

  async #retryLater(why) {
    const delay = backoffDelay(this.attempt);
    this.attempt += 1;
    this.resync = true; // we may have missed changes: take a snapshot when we are back
    this.onState("reconnecting", `${why}; retrying in ${(delay / 1000).toFixed(1)} s`);
    await this.#sleep(delay);
  }

  // A pause that restart() or stop() ends early.
  async #sleep(ms) {
    await new Promise((resolve) => {
      this.wake = resolve;
      setTimeout(resolve, ms);
    });
    this.wake = null;
  }

  #noteServedBy(response) {
    const instance = response.headers.get("X-Served-By");
    if (instance) this.onServedBy(instance);
  }
}

function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return null; // e.g. a proxy's HTML error page
  }
}

function describe(response, body) {
  const message = body?.error?.message;
  return `HTTP ${response.status}${message ? `: ${message}` : ""}`;
}
