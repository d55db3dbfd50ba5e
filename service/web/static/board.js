// Renders task states as cards cloned from the page's <template id="task-template">.
// Everything a user or another client wrote (ids, messages) goes in with textContent, never
// innerHTML, so a message like "<script>…" is shown as text and never parsed.

const byId = new Intl.Collator(undefined, { numeric: true });
// Tombstones remembered per board, so a change older than a deletion never brings a card back.
const GONE_KEPT = 1000;

// Whether a change to `state` is news to a board that has `known`: a higher version, or, after a
// tombstone, the task written anew once the tombstone was purged (its versions start again at 1,
// but it was written later). The service's rule too (TaskState.supersedes).
export function supersedes(state, known) {
  if (state.version > known.version) return true;
  return Boolean(known.deleted && !state.deleted && (state.updated_at ?? "") > (known.updated_at ?? ""));
}

export class Board {
  // container: where cards go. defaultState: the state of the default task when it was never
  // written (the server renders it), shown first on the board. countEl: optional "N tasks" label.
  // linkTasks: whether a card's id links to its own page. onStatusChange(id, status, version):
  // the user picked a status in a card's selector.
  constructor({ container, template, defaultState, countEl, linkTasks, onStatusChange }) {
    this.container = container;
    this.template = template;
    this.defaultState = defaultState;
    this.countEl = countEl;
    this.linkTasks = linkTasks;
    this.onStatusChange = onStatusChange;
    this.states = new Map();
    this.cards = new Map();
    this.gone = new Map(); // id -> tombstone of a task deleted while this board showed it
  }

  // A snapshot: it replaces the whole board (tasks it lacks are gone, e.g. after a store reset or
  // a deletion). The default task is shown when it was never written, not when it was deleted.
  replaceAll(states) {
    const incoming = new Map(states.map((state) => [state.task, state]));
    const defaultId = this.defaultState?.task;
    const defaultGone = this.gone.get(defaultId);
    this.gone.clear();
    if (defaultGone && !incoming.has(defaultId)) this.gone.set(defaultId, defaultGone);
    if (this.defaultState && !incoming.has(defaultId) && !defaultGone) {
      incoming.set(defaultId, this.defaultState);
    }
    for (const id of [...this.cards.keys()]) {
      if (!incoming.has(id)) this.#remove(id);
    }
    for (const state of incoming.values()) this.#show(state, { force: true });
    this.#updateCount();
  }

  // Changes: a state older than the one shown is ignored, so answers that cross (a PUT's answer
  // and the watch reporting the same write) never move a task back in time.
  merge(states) {
    for (const state of states) this.#show(state, { force: false });
    this.#updateCount();
  }

  state(id) {
    return this.states.get(id) ?? this.gone.get(id);
  }

  // Put the selector back to the state we know is true (after a failed write).
  revert(id) {
    const state = this.states.get(id);
    if (state) this.#fill(this.cards.get(id), state);
  }

  setBusy(id, busy) {
    const card = this.cards.get(id);
    if (!card) return;
    card.toggleAttribute("data-busy", busy);
    field(card, "status").disabled = busy;
  }

  showError(id, text) {
    const card = this.cards.get(id);
    if (!card) return;
    const error = field(card, "error");
    error.textContent = text;
    error.hidden = !text;
  }

  highlight(id) {
    const card = this.cards.get(id);
    card?.scrollIntoView({ block: "nearest", behavior: "smooth" });
    if (card) flash(card);
  }

  #show(state, { force }) {
    const known = this.states.get(state.task) ?? this.gone.get(state.task);
    if (known && !force && !supersedes(state, known)) return;
    if (state.deleted) {
      this.#remove(state.task);
      this.gone.set(state.task, state);
      if (this.gone.size > GONE_KEPT) this.gone.delete(this.gone.keys().next().value);
      return;
    }
    this.gone.delete(state.task);
    const card = this.cards.get(state.task) ?? this.#create(state.task);
    this.states.set(state.task, state);
    this.#fill(card, state);
    if (known && known.version !== state.version) flash(card);
  }

  #remove(id) {
    this.cards.get(id)?.remove();
    this.cards.delete(id);
    this.states.delete(id);
  }

  #create(id) {
    const card = this.template.content.firstElementChild.cloneNode(true);
    card.dataset.task = id;
    const link = field(card, "id");
    link.textContent = id;
    if (this.linkTasks) link.href = `/tasks/${encodeURIComponent(id)}`;
    field(card, "status").addEventListener("change", (event) => {
      this.onStatusChange(id, event.target.value, this.states.get(id).version);
    });
    this.container.insertBefore(card, this.#cardAfter(id));
    this.cards.set(id, card);
    return card;
  }

  // Cards stay in one order in every tab and across snapshots: the default task first, then by id
  // ("task-2" before "task-10").
  #cardAfter(id) {
    for (const card of this.container.children) {
      if (this.#compare(id, card.dataset.task) < 0) return card;
    }
    return null;
  }

  #compare(a, b) {
    const defaultId = this.defaultState?.task;
    if (a === defaultId || b === defaultId) return (b === defaultId) - (a === defaultId);
    return byId.compare(a, b);
  }

  #fill(card, state) {
    card.dataset.status = state.status;

    const select = field(card, "status");
    if (![...select.options].some((option) => option.value === state.status)) {
      // A status this page was not rendered with (instances configured differently): show it.
      select.add(new Option(state.status, state.status));
    }
    select.value = state.status;

    const progress = field(card, "progress");
    const value = state.progress;
    progress.querySelector(".progress-fill").style.width = `${value ?? 0}%`;
    progress.querySelector(".progress-label").textContent = value === null ? "–" : `${value}%`;
    progress.dataset.value = value ?? "";
    if (value === null) progress.removeAttribute("aria-valuenow");
    else progress.setAttribute("aria-valuenow", String(value));

    field(card, "message").textContent = state.message ?? "";
    field(card, "version").textContent = String(state.version);

    const updated = field(card, "updated");
    updated.dateTime = state.updated_at ?? "";
    updated.textContent = state.updated_at
      ? `updated ${new Date(state.updated_at).toLocaleString()}`
      : "never updated";
  }

  #updateCount() {
    if (!this.countEl) return;
    const count = this.cards.size;
    this.countEl.dataset.count = String(count);
    this.countEl.textContent = `${count} ${count === 1 ? "task" : "tasks"}`;
  }
}

function field(card, name) {
  return card.querySelector(`[data-field="${name}"]`);
}

// A short glow on a card that just changed, so an update from another tab catches the eye.
function flash(card) {
  card.classList.remove("flash");
  void card.offsetWidth; // restart the CSS animation even if it is still running
  card.classList.add("flash");
}
