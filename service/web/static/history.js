// The task page's history list: the task's last changes, newest first, as
// GET /api/tasks/{id}/history gives them. Read again whenever the page learns of a change: one read
// at a time, and changes that arrive during a read make one more read after it. Everything the
// API returns goes in with textContent, never innerHTML.

export class HistoryList {
  // list: the <ol> to fill. note: a line that says "no changes yet" or why the history is missing.
  // headers() -> extra request headers (the access token).
  constructor({ taskId, list, note, headers = () => ({}) }) {
    this.url = `/api/tasks/${encodeURIComponent(taskId)}/history`;
    this.list = list;
    this.note = note;
    this.headers = headers;
    this.reading = false;
    this.again = false;
  }

  async refresh() {
    if (this.reading) {
      this.again = true;
      return;
    }
    this.reading = true;
    try {
      const response = await fetch(this.url, {
        cache: "no-store",
        headers: { Accept: "application/json", ...this.headers() },
        signal: AbortSignal.timeout(10_000),
      });
      const body = await response.json().catch(() => null);
      if (response.ok && Array.isArray(body?.history)) this.#show(body.history);
      else this.#say(`History unavailable: ${body?.error?.message ?? `HTTP ${response.status}`}.`);
    } catch {
      this.#say("History unavailable: no answer from the server.");
    } finally {
      this.reading = false;
      if (this.again) {
        this.again = false;
        this.refresh();
      }
    }
  }

  #show(entries) {
    this.list.replaceChildren(...entries.map(entryItem));
    this.list.dataset.count = String(entries.length);
    this.#say(entries.length ? "" : "No changes yet.");
  }

  #say(text) {
    this.note.textContent = text;
    this.note.hidden = !text;
  }
}

function entryItem(entry) {
  const item = document.createElement("li");
  item.className = "history-entry";
  item.dataset.version = String(entry.version);
  item.dataset.status = entry.status;
  const time = document.createElement("time");
  time.className = "history-time";
  time.dateTime = entry.updated_at ?? "";
  time.textContent = entry.updated_at ? new Date(entry.updated_at).toLocaleString() : "";
  item.append(
    part("version", `v${entry.version}`),
    part("status", entry.status.replaceAll("_", " ")),
    part("progress", entry.progress === null ? "" : `${entry.progress}%`),
    part("message", entry.message ?? ""),
    part("subject", entry.subject ? `by ${entry.subject}` : ""),
    time,
  );
  return item;
}

function part(name, text) {
  const span = document.createElement("span");
  span.className = `history-${name}`;
  span.dataset.part = name;
  span.textContent = text;
  return span;
}
