// One long poll per browser, not per tab.
//
// Tabs of one browser that show the same thing (the board, or one task's page) with the same
// credentials share ONE long-lived request. The tab that holds a Web Lock named after what they
// show is the leader: it runs the LongPoll of watch.js exactly as a lone tab would, and sends each
// answer, connection state and "served by" over a BroadcastChannel of the same name. The other
// tabs follow: they apply what the leader sends as if their own poll had answered. When the leader
// tab closes (or navigates away), the browser releases its lock and grants it to the next tab
// waiting for it, which starts its own poll at once, from a fresh snapshot.
//
// A tab that opens asks the leader for a fresh snapshot ("hello"), and so does a tab that becomes
// visible again or comes back online ("resync"): the leader answers "lead" and starts its request
// over. A leader that does not answer within ANSWER_MS (a tab the browser froze or that hangs) has
// its lock stolen by the asking tab; when the old leader runs again, its lock request fails with an
// AbortError and it becomes a follower ("abdicate").
//
// Each leadership has a term: the time it began (or one more than the newest term the tab has seen,
// if later), so a later leadership has a higher term even when its tab saw none before. Every
// message of a leader carries it; followers follow the highest term and take news only from its
// leader, so what a deposed leader still sends before it learns it was deposed is ignored.
//
// Without Web Locks, BroadcastChannel or crypto.subtle (Web Locks need a secure context: https, or
// http on localhost), every tab polls on its own, as before.

import { LongPoll } from "./watch.js";

const PREFIX = "taskstatus.poll";
// How long a tab waits for the leader to answer "hello" or "resync" before taking the lead.
const ANSWER_MS = 2000;

export function canShare() {
  return (
    typeof BroadcastChannel === "function" &&
    typeof navigator.locks?.request === "function" &&
    typeof globalThis.crypto?.subtle?.digest === "function"
  );
}

// Tabs with different credentials never share answers: the lock and channel names carry a digest
// of the request headers (the token), never the headers themselves.
async function digest(headers) {
  const data = new TextEncoder().encode(JSON.stringify(headers));
  const bytes = new Uint8Array(await crypto.subtle.digest("SHA-256", data));
  return Array.from(bytes.slice(0, 12), (b) => b.toString(16).padStart(2, "0")).join("");
}

function randomId() {
  return globalThis.crypto?.randomUUID?.() ?? `${Date.now()}-${Math.random().toString(36).slice(2)}`;
}

// The same interface as LongPoll (start, restart, stop) and the same options, plus:
// group: what the poll fetches ("board", "task:<id>"); tabs share a request only within a group.
// onRole(role): "leader" (this tab holds the request), "follower" or "alone" (no sharing here).
export class SharedPoll {
  constructor({ group, onRole = () => {}, ...options }) {
    this.group = group;
    this.onRole = onRole;
    this.options = options; // source, holdSeconds, onState, onServedBy, headers, onRefused
    this.id = randomId();
    this.name = null; // the lock and channel name of the group joined
    this.channel = null;
    this.poll = null; // the LongPoll, while this tab leads (or polls alone)
    this.held = null; // the ticket of the lock request that holds the lock, while leading
    this.waiting = null; // the ticket of the lock request queued, while following
    this.leaderId = null;
    this.term = 0; // the highest leadership term seen in the group
    this.answerTimer = null;
    this.queue = Promise.resolve(); // joins and resyncs, one at a time
    this.alone = false;
    this.stopped = false;
  }

  start() {
    if (canShare()) this.#sync(false);
    else this.#pollAlone();
  }

  // Start over from a fresh snapshot (the tab is visible again, the network is back, the token
  // changed). A new token means another group: leave this one and join that one.
  restart() {
    if (this.alone) this.poll.restart();
    else this.#sync(true);
  }

  stop() {
    this.stopped = true;
    this.#leave();
    this.poll?.stop();
  }

  #sync(resync) {
    this.queue = this.queue
      .then(async () => {
        const name = `${PREFIX}:${this.group}:${await digest(this.options.headers?.() ?? {})}`;
        if (this.stopped) return;
        if (name !== this.name) {
          this.#leave();
          this.#join(name);
        } else if (resync) {
          this.#resync();
        }
      })
      .catch(() => {
        if (!this.alone && !this.held) this.#pollAlone(); // sharing failed here: poll alone
      });
  }

  #pollAlone() {
    this.#leave();
    this.alone = true;
    this.poll = new LongPoll(this.options);
    this.onRole("alone");
    this.poll.start();
  }

  // --- the group ------------------------------------------------------------------------------

  #join(name) {
    this.name = name;
    this.leaderId = null;
    this.term = 0;
    const channel = new BroadcastChannel(name);
    channel.onmessage = (event) => this.#receive(channel, event.data);
    this.channel = channel;
    this.onRole("follower");
    this.#requestLock(false);
    this.#post({ type: "hello" });
    this.#expectAnswer();
  }

  #leave() {
    clearTimeout(this.answerTimer);
    this.waiting?.controller?.abort();
    this.waiting = null;
    this.#stepDown();
    this.channel?.close();
    this.channel = null;
    this.name = null;
  }

  // Queue for the group's lock (or take it from a leader that does not answer: steal).
  #requestLock(steal) {
    const ticket = { name: this.name, controller: steal ? null : new AbortController() };
    this.waiting = ticket;
    const options = steal ? { steal: true } : { signal: ticket.controller.signal };
    navigator.locks
      .request(ticket.name, options, () => this.#lead(ticket))
      .catch(() => {
        // Aborted while queued (we left, or stole instead), or stolen while held: in the last
        // case this tab was the leader and now follows, queued again for the lock, and asks for a
        // snapshot (it ignored the news of the new leader while it thought it led).
        if (this.held !== ticket) return;
        this.#stepDown();
        if (!this.stopped && this.name === ticket.name) {
          this.onRole("follower");
          this.#requestLock(false);
          this.#post({ type: "hello" });
          this.#expectAnswer();
        }
      });
  }

  // The lock is ours: poll, and tell the others. The returned promise holds the lock until it
  // resolves (#stepDown), or until the tab goes away.
  #lead(ticket) {
    if (this.stopped || this.waiting !== ticket || this.name !== ticket.name) return undefined;
    clearTimeout(this.answerTimer);
    this.waiting = null;
    this.held = ticket;
    this.leaderId = this.id;
    this.term = Math.max(Date.now(), this.term + 1);
    ticket.term = this.term;
    this.onRole("leader");
    this.#post({ type: "lead" });
    const { source, onState, onServedBy, onRefused = () => {} } = this.options;
    this.poll = new LongPoll({
      ...this.options,
      source: {
        url: (resync) => source.url(resync),
        accept: (body, resync) => {
          source.accept(body, resync);
          this.#post({ type: "answer", body, resync });
        },
      },
      onState: (state, detail) => {
        onState(state, detail);
        this.#post({ type: "state", state, detail });
      },
      onServedBy: (instance) => {
        onServedBy(instance);
        this.#post({ type: "servedBy", instance });
      },
      onRefused: (status, body) => {
        onRefused(status, body);
        this.#post({ type: "refused", status, body });
      },
    });
    this.poll.start();
    return new Promise((resolve) => {
      ticket.release = resolve;
    });
  }

  #stepDown() {
    const ticket = this.held;
    if (!ticket) return;
    this.#post({ type: "abdicate" });
    this.held = null;
    this.poll?.stop();
    this.poll = null;
    ticket.release?.();
  }

  #resync() {
    if (this.held) {
      this.poll.restart();
      return;
    }
    this.#post({ type: "resync" });
    this.#expectAnswer();
  }

  // A leader answers "hello" and "resync" at once; one that does not is frozen or gone.
  #expectAnswer() {
    clearTimeout(this.answerTimer);
    const name = this.name;
    this.answerTimer = setTimeout(() => {
      if (this.stopped || this.held || this.name !== name) return;
      this.waiting?.controller?.abort();
      this.#requestLock(true);
    }, ANSWER_MS);
  }

  #post(message) {
    this.channel?.postMessage({ ...message, from: this.id, term: this.held?.term ?? 0 });
  }

  #receive(channel, message) {
    if (channel !== this.channel || this.stopped) return;
    const { type, from } = message;
    if (type === "hello" || type === "resync") {
      if (this.held) {
        this.#post({ type: "lead" });
        this.poll.restart(); // a fresh snapshot, for every tab
      }
      return;
    }
    if (type === "lead") {
      // The highest term leads; a tie counts only while nobody leads (after an "abdicate").
      const newer = message.term > this.term || (message.term === this.term && !this.leaderId);
      if (newer) {
        this.leaderId = from; // while this tab leads too, it was deposed: follow once it knows
        clearTimeout(this.answerTimer);
      }
      this.term = Math.max(this.term, message.term);
      return;
    }
    if (type === "abdicate") {
      if (from === this.leaderId && !this.held) this.leaderId = null;
      return;
    }
    // News only from the leader of the current term, and only to followers.
    if (this.held || from !== this.leaderId || message.term !== this.term) return;
    const { source, onState, onServedBy, onRefused = () => {} } = this.options;
    if (type === "answer") source.accept(message.body, message.resync);
    else if (type === "state") onState(message.state, message.detail);
    else if (type === "servedBy") onServedBy(message.instance);
    else if (type === "refused") onRefused(message.status, message.body);
  }
}
