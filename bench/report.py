"""The report of one run: Markdown tables (printed, and ``table.md``), ratios to each peer, issue
16's targets with their measured ratio and verdict (counted at the top), a PNG chart of fan-out
time-to-last vs N, and the transport comparison (long polling, SSE, WebSocket)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

Record = dict[str, Any]
Table = dict[tuple[str, int], Record]
Row = list[str]
# Target 7's reference figures (nothing else gets worse): see bench/README.md.
BASELINE = Path(__file__).resolve().parent / "baseline.json"
TRANSPORTS = ("longpoll", "sse", "ws", "ws-deflate")
SERVICE = ("service-1", "service-3")
PEERS = ("nchan-1", "nchan-2", "seed")
ORDER = ("service-1", "service-1-nogc", "service-3", "seed", "nchan-1", "nchan-2")
TITLES = {
    "service-1": "service, 1 instance",
    "service-1-nogc": "service, 1 instance, GC off",
    "service-3": "service, 3 inst. + nginx",
    "seed": "seed (Flask, thread/poll)",
    "nchan-1": "Nchan, 1 nginx",
    "nchan-2": "Nchan, 2 + balancer",
}


def _f(value: float | None, digits: int = 0) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def _title(key: str) -> str:
    return TITLES.get(key, key)


def _by(records: Iterable[Record], scenario: str, field: str = "n") -> Table:
    """``scenario``'s records by target and ``field`` (poll count; writers for throughput)."""
    return {(r["target"], r.get(field, 0)): r for r in records if r["scenario"] == scenario}


def _one_each(records: Iterable[Record], scenario: str) -> dict[str, Record]:
    return {r["target"]: r for r in records if r["scenario"] == scenario}


def _order(key: str) -> int:
    return ORDER.index(key) if key in ORDER else len(ORDER)


def _sorted(table: Table) -> list[tuple[str, int]]:
    return sorted(table, key=lambda k: (_order(k[0]), k[1]))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _node_kib(hold: Record | None, prefixes: tuple[str, ...]) -> float | None:
    """The worst per-poll memory among the nodes (instances, Nchan servers, the seed)."""
    if hold is None:
        return None
    values = [v for k, v in hold["kib_per_waiter"].items() if k.startswith(prefixes)]
    return max(values) if values else None


def _cores(r: Record) -> float | None:
    """CPU the target's processes used during the writes, in cores (2 = the whole machine)."""
    seconds = r.get("seconds")
    return sum(r["server_cpu"].values()) / seconds if seconds else None


def _lag(r: Record | None) -> tuple[Record | None, float | None]:
    """The instance with the largest event-loop lag in ``r``'s window (``loop_lag`` of a service
    target's record), and the largest since any instance started; None for a peer (no such
    figure) or a record from before the bench read it."""
    lags = list(((r or {}).get("loop_lag") or {}).values())
    if not lags:
        return None, None
    worst = max(lags, key=lambda lag: lag["max_ms"])
    return worst, max(lag["since_start_ms"] for lag in lags)


def _lag_ms(lag: Record) -> str:
    """The largest lag of a window: exact, or "<=" an upper bound (see ``scenarios.loop_lag``)."""
    return ("" if lag["max_exact"] else "<= ") + _f(lag["max_ms"], 1)


def _lag_cell(r: Record) -> str:
    worst, since_start = _lag(r)
    return "-" if worst is None else f"{_lag_ms(worst)} / {_f(since_start, 1)}"


def header(run: Record, records: list[Record], jsonl: Path) -> list[str]:
    m, lc = run["machine"], run["load_client"]
    elapsed = next((r["seconds"] for r in records if r["scenario"] == "elapsed"), None)
    soft, hard = lc["nofile_workers"][0]
    load = ", ".join(f"{x:.2f}" for x in m["load_average_at_start"])
    took = f" The run took {elapsed / 60:.1f} min." if elapsed else ""
    return [
        f"# Long-poll benchmark ({run['mode']} run)",
        "",
        f"{m['date']} - {m['nproc']} cores ({m['cpu']}), {m['memory_gib']} GiB - Linux"
        f" {m['kernel']} - Python {m['python']} - {m['nginx']} - Nchan {m['nchan']} -"
        f" {m['redis']}",
        "",
        f"Load client: {lc['poll_workers']} poll processes + 1 writer ({lc.get('loop', 'asyncio')},"
        f" raw HTTP/1.1 connections), RLIMIT_NOFILE raised to {soft} (hard limit {hard}) in each.",
        f"Note: {run['note']}; load average at start {load}. *Other load* below is the CPU the"
        f" rest of the machine used meanwhile, in cores.{took} Raw results: `{jsonl.name}`.",
    ]


def fanout_section(fan: Table, settings: dict[str, Any]) -> list[str]:
    lines = [
        "## Fan-out: one update wakes N held polls",
        "",
        "Times from the moment the update is sent. Time-to-last: median of the rounds (min-max);"
        " p50/p99: median over the rounds. *Write ack*: the fan-out write's own answer. *Other"
        " writes*: p99 of writes to another task offered every"
        f" {settings['probe_interval'] * 1e3:.0f} ms while the fan-out is delivered. *Server CPU*:"
        " all processes of the target (instances, nginx, Nchan, Redis, the seed) per 1,000"
        " notifications, the re-polls they cause included (until the target is quiet again)."
        " *Client busy*: CPU of the busiest load process / time-to-last. *Loop lag max*: the"
        " largest event-loop lag of the target's instances over the rounds (`<=`: an upper bound,"
        " the histogram's bucket), then the largest since they started (opening the polls"
        " included); read from each instance's `/metrics`, none for the peers.",
        "",
    ]
    rows = []
    for key in _sorted(fan):
        r = fan[key]
        ttl, ack = r["time_to_last_ms"], r["fanout_write_ack_ms"]
        probes = r["write_during_fanout_ms"]
        rows.append(
            [
                _title(key[0]),
                f"{key[1]:,}",
                f"{r['held']:,}",
                f"**{_f(ttl['median'])}** ({_f(ttl['min'])}-{_f(ttl['max'])})",
                _f(r["p50_ms"]),
                _f(r["p99_ms"]),
                f"{_f(ack['p50_ms'], 1)} / {_f(ack['max_ms'], 1)}",
                f"{_f(probes['p99_ms'], 1)} (n={probes['n']})",
                _f(r["server_cpu_ms_per_1k"]),
                f"{r['client_worker_busy_max']:.0%}",
                _f(r.get("other_cpu_share"), 2),
                _lag_cell(r),
                str(r["missing"]),
            ]
        )
    head = ["target", "N", "held", "time-to-last ms", "p50 ms", "p99 ms",
            "write ack p50 / max ms", "other writes p99 ms", "server CPU ms / 1k", "client busy",
            "other load", "loop lag max ms", "missed"]  # fmt: skip
    return lines + _table(head, rows)


def hold_section(hold: Table) -> list[str]:
    lines = [
        "## Hold: memory per held poll",
        "",
        "PSS growth of each process group from before the polls were opened until all were held,"
        " divided by the polls it holds (instances and Nchan servers: their own count; nginx and"
        " the seed: all). *Loop lag max*: the largest event-loop lag of the instances while the"
        " polls were opened.",
        "",
    ]
    rows = []
    for key in _sorted(hold):
        r = hold[key]
        kib = r["kib_per_waiter"]
        rows.append(
            [
                _title(key[0]),
                f"{key[1]:,}",
                f"{r['held_server']:,}",
                f"{r['open_seconds']:.1f}",
                _f(_node_kib(r, ("instance", "nchan", "seed")), 1),
                _f(kib.get("nginx"), 1),
                "-" if (worst := _lag(r)[0]) is None else _lag_ms(worst),
                ", ".join(f"{k} {v:.1f}" for k, v in kib.items()),
            ]
        )
    head = ["target", "N", "held", "open s", "KiB / poll, worst node", "nginx KiB / poll",
            "loop lag max ms", "all"]  # fmt: skip
    return lines + _table(head, rows)


def throughput_section(tput: Table) -> list[str]:
    lines = [
        "## Throughput: writes to one task while 1,000 polls re-poll",
        "",
        "A closed loop of writers. *Lag*: how many versions each delivery was behind the newest"
        " acknowledged one (0: the newest state). 8 writers show a write's latency under the"
        " load; 64, how many writes a target accepts when it is kept busy. *Last version*:"
        " whether every poll got the last write within 15 s (and when the last one did, after"
        " its ack). *Server cores*: CPU the target's processes got during the writes, in cores"
        " (2 = the whole machine).",
        "",
    ]
    rows = []
    for key, writers in _sorted(tput):
        r = tput[key, writers]
        ack = r["write_ack_ms"]
        last = "yes" if r["converged"] else "NO"
        rows.append(
            [
                _title(key),
                f"{r['n']:,}",
                str(r["writers"]),
                f"**{_f(r['accepted_per_s'])}**",
                _f(r["notifications_per_s"]),
                f"{_f(ack['p50_ms'], 1)} / {_f(ack['p99_ms'], 1)}",
                f"{_f(r['lag_versions_p50'])} / {_f(r['lag_versions_p99'])}",
                f"{last} ({_f(r['converge_ms_after_last_ack'])} ms)",
                _f(_cores(r), 2),
            ]
        )
    head = ["target", "polls", "writers", "accepted updates/s", "notifications/s",
            "write ack p50 / p99 ms", "lag p50 / p99 versions", "last version",
            "server cores"]  # fmt: skip
    return lines + _table(head, rows)


def many_section(many: dict[str, Record]) -> list[str]:
    lines = ["## Many tasks: random writes at a fixed offered rate", ""]
    rows = []
    for key in sorted(many, key=_order):
        r = many[key]
        d = r["delay"]
        rows.append(
            [
                _title(key),
                f"{r['tasks']:,} x {r['waiters_per_task']}",
                f"{r['held']:,}",
                f"{_f(r['offered_per_s'])} / {_f(r['accepted_per_s'])}",
                _f(r["notifications_per_s"]),
                f"{r['notifications']:,} / {r['expected_notifications']:,}",
                f"{_f(d['p50_ms'], 1)} / {_f(d['p99_ms'], 1)} / {_f(d['max_ms'], 1)}",
                _f(_cores(r), 2),
            ]
        )
    head = ["target", "tasks x polls", "held", "writes/s offered / accepted", "notifications/s",
            "delivered / writes x polls", "delay p50 / p99 / max ms", "server cores"]  # fmt: skip
    return lines + _table(head, rows)


def ratios_section(fan: Table, tput: Table, hold: Table) -> list[str]:
    lines = [
        "## Ratios to each peer",
        "",
        "Time-to-last and memory: service / peer (below 1: the service is faster or smaller)."
        " Updates/s: service / peer (above 1: the service accepts more).",
        "",
    ]
    sizes = sorted({n for _, n in fan})
    writer_counts = sorted({w for _, w in tput})
    rows = []
    for ours in SERVICE:
        for peer in PEERS:
            cells = []
            for n in sizes:
                a, b = fan.get((ours, n)), fan.get((peer, n))
                ta = a["time_to_last_ms"]["median"] if a else None
                tb = b["time_to_last_ms"]["median"] if b else None
                cells.append(_f(_ratio(ta, tb), 2))
            big = sizes[-1] if sizes else 0
            kib = _ratio(
                _node_kib(hold.get((ours, big)), ("instance",)),
                _node_kib(hold.get((peer, big)), ("nchan", "seed")),
            )
            rates = [
                _ratio(_accepted(tput.get((ours, w))), _accepted(tput.get((peer, w))))
                for w in writer_counts
            ]
            if any(c != "-" for c in cells) or any(r is not None for r in rates):
                rows.append(
                    [_title(ours), _title(peer), *cells, _f(kib, 2), *(_f(r, 2) for r in rates)]
                )
    head = ["service", "peer", *(f"time-to-last N={n:,}" for n in sizes),
            f"KiB/poll N={sizes[-1] if sizes else 0:,}",
            *(f"updates/s, {w} writers" for w in writer_counts)]  # fmt: skip
    return lines + _table(head, rows)


def _accepted(r: Record | None) -> float | None:
    return r["accepted_per_s"] if r else None


N_TARGET = 10_000  # the poll count of issue 16's targets
LAG_LIMIT_MS = 50.0  # target 5: no pause longer than this (and the fan-out write's max ack)


def _get(record: Record | None, *fields: str) -> Any:
    """``record[f1][f2]...``, or None where a record or field is missing (an older record)."""
    value: Any = record
    for field in fields:
        value = None if value is None else value.get(field)
    return value


def _vs(a: float | None, b: float | None, unit: str, digits: int = 0) -> str:
    """ "a unit vs b unit", or "-" when neither was measured."""
    if a is None and b is None:
        return "-"
    return f"{_f(a, digits)} {unit} vs {_f(b, digits)} {unit}"


def _unit(a: float | None, unit: str, digits: int = 0) -> str:
    return "-" if a is None else f"{_f(a, digits)} {unit}"


def _row(name: str, measured: str, ratio: float | None, limit: float, at_most: bool) -> Row:
    """A target's row: met when ``ratio`` is at most ``limit`` (``at_most``) or at least it;
    "-" when not measured."""
    verdict = "-"
    if ratio is not None:
        verdict = "met" if (ratio <= limit if at_most else ratio >= limit) else "**not met**"
    return [name, measured, _f(ratio, 2), verdict]


def target_rows(
    fan: Table,
    tput: Table,
    hold: Table,
    many: dict[str, Record],
    transports: list[Record],
    run: Record,
    baseline: Record,
) -> list[Row]:
    """Issue 16's targets, a row each: name, measured, ratio, verdict ("met", "**not met**", or
    "-" when this run did not measure it)."""
    n = N_TARGET
    rows: list[Row] = []

    def at(target: str, *fields: str) -> float | None:
        value: float | None = _get(fan.get((target, n)), *fields)
        return value

    for ours, peer, limit in (("service-3", "nchan-2", 1.0), ("service-1", "nchan-1", 0.9)):
        a, b = at(ours, "time_to_last_ms", "median"), at(peer, "time_to_last_ms", "median")
        number = 1 if ours == "service-3" else 2
        name = f"{number}. time-to-last N={n:,}, {_title(ours)} / {_title(peer)} (<= {limit:g})"
        rows.append(_row(name, _vs(a, b, "ms"), _ratio(a, b), limit, True))
    # server CPU in ms per 1,000 notifications is µs per notification
    a, b = at("service-3", "server_cpu_ms_per_1k"), at("nchan-2", "server_cpu_ms_per_1k")
    name = f"3. server CPU per notification N={n:,}, {_title('service-3')} / {_title('nchan-2')}"
    rows.append(_row(f"{name} (<= 1)", _vs(a, b, "µs"), _ratio(a, b), 1.0, True))
    a = at("service-1", "server_cpu_ms_per_1k")
    name = f"3. server CPU per notification N={n:,}, {_title('service-1')} / 25 µs (<= 1)"
    rows.append(_row(name, _unit(a, "µs"), _ratio(a, 25.0), 1.0, True))
    a = at("service-3", "write_during_fanout_ms", "p99_ms")
    b = at("nchan-2", "write_during_fanout_ms", "p99_ms")
    pair = f"{_title('service-3')} / {_title('nchan-2')}"
    name = f"4. other writes p99 during the fan-out N={n:,}, {pair} (<= 1)"
    rows.append(_row(name, _vs(a, b, "ms", 1), _ratio(a, b), 1.0, True))
    for ours in SERVICE:
        worst, since_start = _lag(fan.get((ours, n)))
        measured, lag = "-", None
        if worst is not None:
            lag = worst["max_ms"]
            measured = f"{_lag_ms(worst)} ms over the rounds; {_f(since_start, 1)} ms since start"
        name = f"5. event-loop lag max, {n:,} polls held, {_title(ours)} / {LAG_LIMIT_MS:.0f} ms"
        rows.append(_row(f"{name} (<= 1)", measured, _ratio(lag, LAG_LIMIT_MS), 1.0, True))
    for ours in SERVICE:
        ack = at(ours, "fanout_write_ack_ms", "max_ms")
        name = f"5. fan-out write's max ack N={n:,}, {_title(ours)} / {LAG_LIMIT_MS:.0f} ms (<= 1)"
        rows.append(_row(name, _unit(ack, "ms", 1), _ratio(ack, LAG_LIMIT_MS), 1.0, True))
    for ours in SERVICE:
        kib = _node_kib(hold.get((ours, n)), ("instance",))
        name = f"6. KiB per held poll N={n:,}, worst instance, {_title(ours)} / 10 KiB (<= 1)"
        rows.append(_row(name, _unit(kib, "KiB", 1), _ratio(kib, 10.0), 1.0, True))
    return rows + baseline_rows(tput, many, transports, run, baseline)


def baseline_rows(
    tput: Table, many: dict[str, Record], transports: list[Record], run: Record, base: Record
) -> list[Row]:
    """Target 7, nothing else gets worse: each figure of ``baseline.json`` against this run's,
    compared only when this run measured it the same way (as many polls, tasks x polls, clients);
    met when at least as good: a rate at least the baseline, a delay or a CPU cost at most."""
    rows: list[Row] = []

    def row(name: str, measured: float | None, was: float, unit: str, higher: bool) -> None:
        figures = "-" if measured is None else f"{_f(measured, 1)} vs {_f(was, 1)} {unit}"
        name = f"7. {name} ({'>=' if higher else '<='} baseline)"
        rows.append(_row(name, figures, _ratio(measured, was), 1.0, not higher))

    settings = run.get("settings", {})
    t, m, c = base["throughput"], base["many_tasks"], base["transports"]
    if settings.get("throughput_waiters") != t["polls"]:
        tput = {}
    if (settings.get("many_tasks"), settings.get("many_waiters")) != (
        m["tasks"],
        m["waiters_per_task"],
    ):
        many = {}
    if _get(run, "transport_settings", "clients") != c["clients"]:
        transports = []
    for ours, by_writers in t["accepted_per_s"].items():
        for writers, was in by_writers.items():
            name = f"accepted updates/s, {t['polls']:,} polls, {writers} writers, {_title(ours)}"
            row(name, _get(tput.get((ours, int(writers))), "accepted_per_s"), was, "/s", True)
    shape = f"many tasks {m['tasks']:,} x {m['waiters_per_task']}"
    for ours, was in m["delay_p99_ms"].items():
        name = f"{shape}, delay p99, {_title(ours)}"
        row(name, _get(many.get(ours), "delay", "p99_ms"), was, "ms", False)
    for ours, was in m["accepted_per_s"].items():
        name = f"{shape}, accepted writes/s, {_title(ours)}"
        row(name, _get(many.get(ours), "accepted_per_s"), was, "/s", True)
    by = {(r["target"], r["transport"]): r for r in transports}
    for ours, by_transport in c["cpu_us_per_notification"].items():
        for transport, was in by_transport.items():
            what = TRANSPORT_TITLES.get(transport, transport)
            name = f"{what}, server CPU / notification, {c['clients']:,} clients, {_title(ours)}"
            row(name, _get(by.get((ours, transport)), "cpu_us_per_notification"), was, "µs", False)
    return rows


def count_line(rows: list[Row]) -> str:
    met = sum(r[3] == "met" for r in rows)
    missed = sum(r[3] == "**not met**" for r in rows)
    return (
        f"**{met} of issue 16's {len(rows)} target rows met**, {missed} not met,"
        f" {len(rows) - met - missed} not measured in this run (the table at the end)."
    )


def targets_section(rows: list[Row], baseline: Record) -> list[str]:
    return [
        "## The issue's targets (issue 16)",
        "",
        "Ratios against the peers in this run and the issue's bounds; target 7 against"
        f" `bench/{BASELINE.name}` ({baseline.get('run', '?')}). `-`: not measured in this run"
        " (a target, size or scenario left out, another number of polls or clients, or a record"
        " from before the figure was read).",
        "",
        *_table(["target", "measured", "ratio", ""], rows),
    ]


TRANSPORT_TITLES = {
    "longpoll": "long polling",
    "sse": "SSE",
    "ws": "WebSocket",
    "ws-deflate": "WebSocket, deflate offered",
}


def _kib_cell(r: Record) -> str:
    nginx = r["kib_per_waiter"].get("nginx")
    return _f(r["kib_per_client"], 1) + ("" if nginx is None else f" + nginx {_f(nginx, 1)}")


def transports_section(records: list[Record], settings: dict[str, Any]) -> list[str]:
    lines = [
        "## Transports: long polling vs SSE vs WebSocket",
        "",
        f"The same target started afresh for each transport; N clients follow one task, which is"
        f" written {settings['updates']} times, {settings['interval'] * 1e3:.0f} ms apart."
        " *CPU*: every process of the target (instances, nginx, Redis) from the first write until"
        " every client has the last version (long polls: and has asked again), per delivered"
        " notification; in brackets, less the target's own idle CPU over the same time."
        " *Bytes*: TCP payload at the client sockets per delivered update, received + sent"
        " (long polling: the response head and body, and the next poll's request; SSE: the"
        " chunk-framed `id:`/`data:` event; WebSocket: the frame, deflated when the client"
        " offers permessage-deflate, as browsers do); no TCP/IP headers. The clients send only"
        " the headers the protocol needs (a browser adds its own to every poll)."
        " *Delay*: from the moment the write was sent to each client's receipt."
        " *KiB/client*: PSS growth of the instances from before the clients connected until all"
        " were followed, per client (and nginx's, for a cluster).",
        "",
    ]
    rows = []
    for r in sorted(records, key=lambda r: (_order(r["target"]), TRANSPORTS.index(r["transport"]))):
        d = r["delay"]
        wire_in, wire_out = r["bytes_in_per_update"], r["bytes_out_per_update"]
        errors = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "0"
        rows.append(
            [
                _title(r["target"]),
                TRANSPORT_TITLES.get(r["transport"]) or str(r["transport"]),
                f"{r['following']:,}",
                f"**{_f(r['cpu_us_per_notification'])}**"
                f" ({_f(r['cpu_us_per_notification_less_idle'])})",
                f"**{_f(wire_in + wire_out)}** ({_f(wire_in)} + {_f(wire_out)})",
                f"{_f(d['p50_ms'], 1)} / {_f(d['p99_ms'], 1)}",
                _kib_cell(r),
                f"{r['delivered']:,} / {r['expected']:,}",
                _f(r["client_cpu_us_per_notification"]),
                _f(r["other_cpu_share"], 2),
                errors,
            ]
        )
    head = ["target", "transport", "clients", "server CPU µs / notification",
            "bytes / update (in + out)", "delay p50 / p99 ms", "KiB / client",
            "delivered / updates x clients", "client CPU µs / notification", "other load",
            "errors"]  # fmt: skip
    return lines + _table(head, rows)


def write_report(records: list[Record], out: Path, jsonl: Path, baseline: Path = BASELINE) -> str:
    run = next(r for r in records if r["scenario"] == "run")
    fan, hold = _by(records, "fanout"), _by(records, "hold")
    tput, many = _by(records, "throughput", "writers"), _one_each(records, "many_tasks")
    transports = [r for r in records if r["scenario"] == "transport"]
    base = json.loads(baseline.read_text())
    targets = target_rows(fan, tput, hold, many, transports, run, base)
    lines = [*header(run, records, jsonl), "", count_line(targets)]
    if fan or hold:
        lines += ["", *fanout_section(fan, run["settings"]), "", *hold_section(hold)]
    if tput:
        lines += ["", *throughput_section(tput)]
    if many:
        lines += ["", *many_section(many)]
    if fan or tput or hold:
        lines += ["", *ratios_section(fan, tput, hold)]
    if transports:
        lines += ["", *transports_section(transports, run["transport_settings"])]
    lines += ["", *targets_section(targets, base)]
    other = [r for r in records if r["scenario"] in ("failed", "skipped")]
    if other:
        lines += ["", "## Not measured", ""]
        lines += [
            f"- {r['target']} N={r.get('n')}: {r.get('error') or r.get('why')}" for r in other
        ]
    if fan:
        chart(fan, out / "fanout.png", run["machine"])
        lines += ["", "![fan-out time-to-last vs N](fanout.png)"]
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    return text


def chart(fan: Table, path: Path, machine: dict[str, Any]) -> None:
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for target in sorted({t for t, _ in fan}, key=_order):
        points = sorted((n, r["time_to_last_ms"]) for (t, n), r in fan.items() if t == target)
        xs = [n for n, _ in points]
        ys = [v["median"] for _, v in points]
        spread = [
            [v["median"] - v["min"] for _, v in points],
            [v["max"] - v["median"] for _, v in points],
        ]
        ax.errorbar(xs, ys, yerr=spread, marker="o", capsize=3, label=_title(target))
    ax.set_xticks(sorted({n for _, n in fan}))
    ax.set_xlabel("held polls N")
    ax.set_ylabel("time-to-last, ms (median of rounds, min-max)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    when = f"{machine['date']}, {machine['nproc']} cores ({machine['cpu']}), shared"
    ax.set_title(f"Fan-out of one update to N long polls\n{when}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
