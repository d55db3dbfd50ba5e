// Page wiring: reads the config the server put in data- attributes, starts one long poll for the
// tab (or a stream: ?transport=sse|ws), and turns the user's actions (status selector, create
// form, delete button) into PUTs and DELETEs.
import { TokenPanel, authHeaders, isRefusal, refusalText, takeTokenFromAddress } from "./auth.js";
import { Board } from "./board.js";
import { HistoryList } from "./history.js";
import { SharedPoll } from "./leader.js";
import { TRANSPORT_NAMES, chosenTransport, createStream } from "./transports.js";

// Before any request: a token in the address is taken into this tab and out of the address.
takeTokenFromAddress();

const app = document.getElementById("app");
const config = {
  page: app.dataset.page, // "board" or "task"
  taskId: app.dataset.taskId ?? null,
  holdSeconds: Number(app.dataset.pollTimeout),
  defaultState: JSON.parse(app.dataset.defaultState),
  streamHeartbeat: Number(app.dataset.streamHeartbeat),
  transport: chosenTransport(), // ?transport=longpoll|sse|ws; long polling by default
};

const connection = document.getElementById("connection");
const connectionText = document.getElementById("connection-text");
const connectionDetail = document.getElementById("connection-detail");
const servedBy = document.getElementById("served-by");

const WRITE_TIMEOUT_MS = 10_000;
const CONNECTION_LABELS = { live: "Live", reconnecting: "Reconnecting…", error: "Error" };

function showConnection(state, detail) {
  connection.dataset.state = state;
  connectionText.textContent = CONNECTION_LABELS[state] ?? state;
  connectionDetail.textContent = detail;
  connection.title = detail;
}

function showServedBy(instance) {
  servedBy.textContent = instance;
}

const board = new Board({
  container: document.getElementById("board"),
  template: document.getElementById("task-template"),
  // The task page shows only its own task, so the default task is not added there.
  defaultState: config.page === "board" ? config.defaultState : null,
  countEl: document.getElementById("task-count"),
  linkTasks: config.page === "board",
  onStatusChange: changeStatus,
});

// The task page lists the task's last changes, read again whenever the task changes.
const taskHistory =
  config.page === "task"
    ? new HistoryList({
        taskId: config.taskId,
        list: document.getElementById("history"),
        note: document.getElementById("history-note"),
        headers: authHeaders,
      })
    : null;

// --- writes -----------------------------------------------------------------------------------

// PUT a change; answers { ok, status, body, retryAfter }, or throws on a network error.
function putTask(id, update) {
  return send("PUT", `/api/tasks/${encodeURIComponent(id)}`, update);
}

// DELETE a task, if it is still at `version`.
function deleteTask(id, version) {
  return send("DELETE", `/api/tasks/${encodeURIComponent(id)}?expected_version=${version}`);
}

async function send(method, url, update) {
  const response = await fetch(url, {
    method,
    headers: {
      ...(update === undefined ? {} : { "Content-Type": "application/json" }),
      Accept: "application/json",
      ...authHeaders(),
    },
    body: update === undefined ? undefined : JSON.stringify(update),
    // A write is answered at once; without a limit a hung server would leave the selector
    // disabled for good.
    signal: AbortSignal.timeout(WRITE_TIMEOUT_MS),
  });
  const instance = response.headers.get("X-Served-By");
  if (instance) showServedBy(instance);
  const body = await response.json().catch(() => null);
  return {
    ok: response.ok,
    status: response.status,
    body,
    retryAfter: response.headers.get("Retry-After"),
  };
}

// Why a write failed, in words a user can act on.
function failureText(result) {
  if (isRefusal(result.status)) {
    tokenPanel.showRefusal(result.status, result.body);
    return `Not saved. ${refusalText(result.status, result.body)}`;
  }
  if (result.status === 429) {
    const wait = result.retryAfter ? ` Try again in ${result.retryAfter} s.` : "";
    return `Not saved: too many changes in a short time.${wait}`;
  }
  if (result.status === 503) {
    const wait = result.retryAfter ? ` Try again in ${result.retryAfter} s.` : " Try again shortly.";
    return `Not saved: the service cannot reach its data store.${wait}`;
  }
  const message = result.body?.error?.message ?? `HTTP ${result.status}`;
  return `Not saved: ${message}.`;
}

async function changeStatus(id, status, version) {
  board.showError(id, "");
  board.setBusy(id, true);
  try {
    // expected_version: the user chose from what they saw; if another tab changed the task
    // meanwhile, say so instead of overwriting it blindly.
    const result = await putTask(id, { status, expected_version: version });
    if (result.ok) {
      board.merge([result.body]);
    } else if (result.status === 409 && result.body?.current) {
      board.merge([result.body.current]);
      const now = result.body.current;
      board.showError(
        id,
        `Not saved: the task was changed elsewhere (now ${now.status}, version ${now.version}).`,
      );
    } else {
      board.showError(id, failureText(result));
    }
  } catch {
    board.showError(id, "Not saved: no answer from the server.");
  } finally {
    board.setBusy(id, false);
    board.revert(id); // the selector shows the true state, whatever happened
  }
}

function setUpCreateForm() {
  const form = document.getElementById("create-form");
  if (!form) return;
  const idInput = document.getElementById("create-id");
  const statusSelect = document.getElementById("create-status");
  const error = document.getElementById("create-error");
  const button = form.querySelector("button");

  function showCreateError(text) {
    error.textContent = text;
    error.hidden = !text;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const id = idInput.value.trim();
    if (!id) return;
    showCreateError("");
    button.disabled = true;
    try {
      // expected_version 0: create only; an existing task is reported, not overwritten.
      let result = await putTask(id, { status: statusSelect.value, expected_version: 0 });
      const current = result.body?.current;
      if (result.status === 409 && current?.deleted) {
        // A deleted task is created anew from its tombstone's version: versions never go back.
        result = await putTask(id, { status: statusSelect.value, expected_version: current.version });
      }
      if (result.ok) {
        board.merge([result.body]);
        board.highlight(id);
        form.reset();
      } else if (result.status === 409) {
        showCreateError(`A task named “${id}” already exists.`);
      } else {
        showCreateError(failureText(result));
      }
    } catch {
      showCreateError("Not created: no answer from the server.");
    } finally {
      button.disabled = false;
      idInput.focus();
    }
  });
}

// --- the live part ----------------------------------------------------------------------------

// The board follows every task with one watch; a task page follows its task with the per-task
// poll. Either way: one request in flight per tab.
function boardSource() {
  let cursor = "";
  return {
    url(resync) {
      const since = resync ? "" : cursor;
      return `/api/watch?since=${encodeURIComponent(since)}&timeout=${config.holdSeconds}`;
    },
    accept(body) {
      cursor = body.cursor;
      if (body.reset) board.replaceAll(body.tasks);
      else board.merge(body.tasks);
    },
  };
}

function taskSource(id) {
  const base = `/api/tasks/${encodeURIComponent(id)}`;
  let version = null;
  return {
    // A resync reads the task as it is; then each poll is held until its version moves.
    url(resync) {
      return resync || version === null
        ? base
        : `${base}/poll?since=${version}&timeout=${config.holdSeconds}`;
    },
    accept(state) {
      // Taken as is, even if older: the version moves back only when the store was reset (or a
      // deleted task's tombstone was purged).
      version = state.version;
      showTask(state);
    },
  };
}

// The task page: its card, or the note that it was deleted; the delete button while it exists.
function showTask(state) {
  board.replaceAll([state]);
  taskHistory?.refresh();
  document.getElementById("task-deleted").hidden = !state.deleted;
  document.getElementById("delete-task").disabled = Boolean(state.deleted) || state.version === 0;
}

function setUpDeleteButton() {
  const button = document.getElementById("delete-task");
  if (!button) return;
  const error = document.getElementById("delete-error");
  const id = config.taskId;

  function showDeleteError(text) {
    error.textContent = text;
    error.hidden = !text;
  }

  button.addEventListener("click", async () => {
    const state = board.state(id);
    if (!state || state.deleted) return;
    const question = `Delete the task “${id}”? Every page that shows it will see it go.`;
    if (!window.confirm(question)) return;
    showDeleteError("");
    button.disabled = true;
    try {
      // expected_version: delete what the user saw, not a change made meanwhile elsewhere.
      const result = await deleteTask(id, state.version);
      if (result.ok) {
        showTask(result.body);
      } else if (result.status === 409 && result.body?.current) {
        showTask(result.body.current);
        showDeleteError("Not deleted: the task was changed elsewhere meanwhile; look again.");
      } else if (result.status === 404) {
        showDeleteError("Not deleted: the task does not exist (any more).");
      } else {
        showDeleteError(failureText(result).replace("Not saved", "Not deleted"));
      }
    } catch {
      showDeleteError("Not deleted: no answer from the server.");
    } finally {
      button.disabled = Boolean(board.state(id)?.deleted);
    }
  });
}

// Tabs of this browser that show the same thing share one request: one tab polls, the others
// follow it (leader.js).
const source = config.page === "task" ? taskSource(config.taskId) : boardSource();
const callbacks = {
  onState: showConnection,
  onServedBy: showServedBy,
  headers: authHeaders,
  onRefused(status, body) {
    if (isRefusal(status)) tokenPanel.showRefusal(status, body);
  },
};
// With ?transport=sse or ws the tab follows over a stream of its own (transports.js), whose
// messages are the long poll's answers; the interface (start, restart, stop) is the same.
const poll =
  config.transport === "longpoll"
    ? new SharedPoll({
        group: config.page === "task" ? `task:${config.taskId}` : "board",
        onRole(role) {
          connection.dataset.poll = role;
        },
        source,
        holdSeconds: config.holdSeconds,
        ...callbacks,
      })
    : createStream(config.transport, {
        target: config.page === "task" ? { task: config.taskId } : { board: true },
        accept: (body) => source.accept(body),
        heartbeatSeconds: config.streamHeartbeat,
        ...callbacks,
      });
const transportShown = document.getElementById("transport");
transportShown.dataset.transport = config.transport;
transportShown.textContent = TRANSPORT_NAMES[config.transport];
transportShown.parentElement.hidden = false;

// A new token (typed, forgotten, or brought by the address): ask again with it, from a snapshot.
const tokenPanel = new TokenPanel({ onChange: () => poll.restart() });
window.addEventListener("hashchange", () => {
  if (takeTokenFromAddress()) tokenPanel.tokenChanged();
});

// A hidden tab may be throttled or frozen and its request dead without an error; when it is seen
// again, drop that request and resync. Same when the network comes back or the page is restored
// from the back/forward cache.
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible") poll.restart();
});
window.addEventListener("online", () => poll.restart());
// The browser knows the network is gone: the request it holds will not be answered, so show that
// now (the retries fail until "online") rather than "Live" until the hold ends.
window.addEventListener("offline", () => poll.restart());
window.addEventListener("pageshow", (event) => {
  if (event.persisted) poll.restart();
});

setUpCreateForm();
setUpDeleteButton();
poll.start();
