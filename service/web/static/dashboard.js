// The cluster dashboard: one long poll on /api/cluster/watch keeps the table of instances and the
// charts of the last minutes live. Whichever instance answers, it knows the whole cluster: every
// instance shares its figures through the store each second (service/dashboard.py).
import { LongPoll } from "./watch.js";

const SVG = "http://www.w3.org/2000/svg";
const STATE_LABELS = { up: "up", not_ready: "not ready", down: "down" };

const app = document.getElementById("app");
const holdSeconds = Number(app.dataset.pollTimeout);
const windowMs = Number(app.dataset.historySeconds) * 1000;

const connection = document.getElementById("connection");
const connectionText = document.getElementById("connection-text");
const connectionDetail = document.getElementById("connection-detail");
const servedBy = document.getElementById("served-by");
const CONNECTION_LABELS = { live: "Live", reconnecting: "Reconnecting…", error: "Error" };

function showConnection(state, detail) {
  connection.dataset.state = state;
  connectionText.textContent = CONNECTION_LABELS[state] ?? state;
  connectionDetail.textContent = detail;
  connection.title = detail;
}

function milliseconds(value) {
  if (value === null || value === undefined) return "—";
  return `${value < 10 ? value.toFixed(2) : value.toFixed(0)} ms`;
}

function perSecond(value) {
  return value < 10 ? value.toFixed(1) : value.toFixed(0);
}

function lastHeard(ageMs) {
  return ageMs < 1500 ? "now" : `${Math.round(ageMs / 1000)} s ago`;
}

// --- the table ---------------------------------------------------------------------------------

class InstanceTable {
  constructor(body, countEl) {
    this.body = body;
    this.countEl = countEl;
    this.rows = new Map(); // instance id -> <tr>
  }

  show(instances, servingId) {
    const seen = new Set();
    for (const instance of instances) {
      seen.add(instance.instance);
      const row = this.rows.get(instance.instance) ?? this.#add(instance.instance);
      row.dataset.state = instance.state;
      row.classList.toggle("serving", instance.instance === servingId);
      const cells = row.cells;
      cells[1].querySelector(".state").textContent = STATE_LABELS[instance.state] ?? instance.state;
      cells[2].textContent = String(instance.held);
      cells[3].textContent = perSecond(instance.writes_per_second);
      cells[4].textContent = milliseconds(instance.notify_p50_ms);
      cells[5].textContent = milliseconds(instance.notify_p99_ms);
      cells[6].textContent = lastHeard(instance.age_ms);
      cells[7].textContent = instance.primary || "embedded";
      cells[8].textContent = String(instance.failovers);
    }
    for (const [id, row] of this.rows) {
      if (!seen.has(id)) {
        row.remove();
        this.rows.delete(id);
      }
    }
    // Rows in instance order, as the server lists them.
    for (const instance of instances) this.body.append(this.rows.get(instance.instance));
    const count = instances.length;
    this.countEl.dataset.count = String(count);
    this.countEl.textContent = `${count} instance${count === 1 ? "" : "s"}`;
  }

  #add(id) {
    const row = document.createElement("tr");
    row.dataset.instance = id;
    const name = document.createElement("th");
    name.scope = "row";
    const code = document.createElement("code");
    code.textContent = id;
    name.append(code);
    const state = document.createElement("td");
    const badge = document.createElement("span");
    badge.className = "state";
    state.append(badge);
    row.append(name, state);
    for (let i = 0; i < 5; i += 1) {
      const cell = document.createElement("td");
      cell.className = "number";
      row.append(cell);
    }
    const primary = document.createElement("td");
    primary.className = "primary";
    const failovers = document.createElement("td");
    failovers.className = "number";
    row.append(primary, failovers);
    this.rows.set(id, row);
    return row;
  }
}

// --- the charts --------------------------------------------------------------------------------

// The smallest of 1, 2, 5 times a power of ten at or above value: a round top for the scale.
function roundUp(value) {
  if (value <= 1) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) if (step * power >= value) return step * power;
  return 10 * power;
}

class Chart {
  constructor(svg, key, maxEl, nowEl, format) {
    this.key = key;
    this.maxEl = maxEl;
    this.nowEl = nowEl;
    this.format = format;
    const box = svg.viewBox.baseVal;
    this.width = box.width;
    this.height = box.height;
    this.grid = this.#path(svg, "chart-grid");
    this.area = this.#path(svg, "chart-area");
    this.line = this.#path(svg, "chart-line");
    this.svg = svg;
  }

  #path(svg, className) {
    const path = document.createElementNS(SVG, "path");
    path.setAttribute("class", className);
    svg.append(path);
    return path;
  }

  draw(samples, now) {
    const start = now - windowMs;
    const visible = samples.filter((sample) => sample.t >= start);
    const top = roundUp(Math.max(0, ...visible.map((sample) => sample[this.key])));
    const x = (t) => (((t - start) / windowMs) * this.width).toFixed(1);
    const y = (v) => (this.height - 2 - (v / top) * (this.height - 4)).toFixed(1);
    const points = visible.map((sample) => `${x(sample.t)},${y(sample[this.key])}`);
    this.line.setAttribute("d", points.length ? `M${points.join("L")}` : "");
    this.area.setAttribute(
      "d",
      points.length
        ? `M${x(visible[0].t)},${this.height}L${points.join("L")}L${x(visible.at(-1).t)},${this.height}Z`
        : "",
    );
    const mid = (this.height / 2).toFixed(1);
    this.grid.setAttribute("d", `M0,${y(top)}H${this.width}M0,${mid}H${this.width}`);
    this.svg.dataset.points = String(points.length);
    this.maxEl.textContent = `scale ${this.format(top)}`;
    this.nowEl.textContent = visible.length ? `now ${this.format(visible.at(-1)[this.key])}` : "";
  }
}

// --- the live part -----------------------------------------------------------------------------

const table = new InstanceTable(
  document.getElementById("instances"),
  document.getElementById("instance-count"),
);
const charts = [
  new Chart(
    document.getElementById("chart-held"),
    "held",
    document.getElementById("held-max"),
    document.getElementById("held-now"),
    String,
  ),
  new Chart(
    document.getElementById("chart-writes"),
    "writes_per_second",
    document.getElementById("writes-max"),
    document.getElementById("writes-now"),
    perSecond,
  ),
];
const storeNotice = document.getElementById("store-notice");

let cursor = null;
let samples = [];
let serving = servedBy.textContent;

const source = {
  url(resync) {
    const since = resync || cursor === null ? "" : `since=${cursor}&`;
    return `/api/cluster/watch?${since}timeout=${holdSeconds}`;
  },
  accept(body) {
    cursor = body.cursor;
    // A reset brings every sample the instance kept; otherwise those after our cursor, which
    // follow what we have. Either way, only the last minutes are kept.
    samples = body.reset ? body.samples : samples.concat(body.samples);
    samples = samples.filter((sample) => sample.t >= body.cursor - windowMs);
    table.show(body.instances, serving);
    storeNotice.hidden = body.store_reachable;
    for (const chart of charts) chart.draw(samples, body.cursor);
  },
};

const poll = new LongPoll({
  source,
  holdSeconds,
  onState: showConnection,
  onServedBy(instance) {
    serving = instance;
    servedBy.textContent = instance;
  },
});

// A tab that was hidden may hold a dead request: start over when it is seen again.
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible") poll.restart();
});
window.addEventListener("online", () => poll.restart());
window.addEventListener("offline", () => poll.restart());

poll.start();
