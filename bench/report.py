"""The report of one run: Markdown tables (printed, and ``table.md``), ratios to each peer, the
issue's six targets with their measured ratio, a PNG chart of fan-out time-to-last vs N, and the
transport comparison (long polling, SSE, WebSocket)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

Record = dict[str, Any]
Table = dict[tuple[str, int], Record]
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
        " notifications, the re-polls they cause included."
        " *Client busy*: CPU of the busiest load process / time-to-last.",
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
                str(r["missing"]),
            ]
        )
    head = ["target", "N", "held", "time-to-last ms", "p50 ms", "p99 ms",
            "write ack p50 / max ms", "other writes p99 ms", "server CPU ms / 1k", "client busy",
            "other load", "missed"]  # fmt: skip
    return lines + _table(head, rows)


def hold_section(hold: Table) -> list[str]:
    lines = [
        "## Hold: memory per held poll",
        "",
        "PSS growth of each process group from before the polls were opened until all were held,"
        " divided by the polls it holds (instances and Nchan servers: their own count; nginx and"
        " the seed: all).",
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
                ", ".join(f"{k} {v:.1f}" for k, v in kib.items()),
            ]
        )
    head = ["target", "N", "held", "open s", "KiB / poll, worst node", "nginx KiB / poll", "all"]
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


def targets_section(fan: Table, tput: Table, hold: Table) -> list[str]:
    sizes = sorted({n for _, n in fan})
    big = 10_000 if 10_000 in sizes else (sizes[-1] if sizes else 0)
    mid = 5_000 if 5_000 in sizes else big
    small = 1_000 if 1_000 in sizes else (sizes[0] if sizes else 0)
    rows: list[list[str]] = []

    def row(name: str, measured: str, ratio: float | None, limit: float, at_most: bool) -> None:
        verdict = "-"
        if ratio is not None:
            verdict = "met" if (ratio <= limit if at_most else ratio >= limit) else "**not met**"
        rows.append([name, measured, _f(ratio, 2), verdict])

    def ttl(target: str, n: int) -> float | None:
        r = fan.get((target, n))
        return r["time_to_last_ms"]["median"] if r else None

    for ours, peer in (("service-3", "nchan-2"), ("service-1", "nchan-1")):
        a, b = ttl(ours, big), ttl(peer, big)
        name = f"1. time-to-last N={big:,}, {_title(ours)} / {_title(peer)} (<= 1)"
        row(name, f"{_f(a)} ms vs {_f(b)} ms", _ratio(a, b), 1.0, True)
    for ours in SERVICE:
        r = fan.get((ours, big))
        p99 = r["write_during_fanout_ms"]["p99_ms"] if r else None
        ack = r["fanout_write_ack_ms"]["max_ms"] if r else None
        name = f"2. write p99 during fan-out N={big:,}, {_title(ours)} / 20 ms (<= 1)"
        measured = f"{_f(p99, 1)} ms (the fan-out write's own ack: max {_f(ack, 1)} ms)"
        row(name, measured, _ratio(p99, 20.0), 1.0, True)
    nchan = _node_kib(hold.get(("nchan-1", big)), ("nchan",))
    for ours in SERVICE:
        kib = _node_kib(hold.get((ours, big)), ("instance",))
        name = f"3. memory per held poll N={big:,}, {_title(ours)} / 12 KiB (<= 1)"
        row(name, f"{_f(kib, 1)} KiB (Nchan: {_f(nchan, 1)} KiB)", _ratio(kib, 12.0), 1.0, True)
    for ours in SERVICE:
        # the most writers run is the one that shows how many updates the target accepts
        runs = sorted((w, r) for (t, w), r in tput.items() if t == ours)
        measured, rate = "-", None
        if runs:
            most, t = runs[-1]
            rate = t["accepted_per_s"]
            fewer = "".join(f", {_f(r['accepted_per_s'])}/s with {w}" for w, r in runs[:-1])
            measured = (
                f"{_f(rate)}/s with {most} writers{fewer}; lag p99"
                f" {t['lag_versions_p99']} versions, all got the last: {t['converged']}"
            )
        name = f"4. accepted updates/s, 1,000 polls, {_title(ours)} / 2,000 (>= 1)"
        row(name, measured, _ratio(rate, 2000.0), 1.0, False)
    for ours in SERVICE:
        at_big, at_small = fan.get((ours, big)), fan.get((ours, small))
        ca = at_big["server_cpu_ms_per_1k"] if at_big else None
        cb = at_small["server_cpu_ms_per_1k"] if at_small else None
        name = f"5. server CPU per notification, {_title(ours)}: N={big:,} / N={small:,} (<= 1.25)"
        ratio = _ratio(ca, cb) if big != small else None
        row(name, f"{_f(ca)} vs {_f(cb)} ms per 1,000", ratio, 1.25, True)
    for ours in SERVICE:
        a, b = ttl("seed", mid), ttl(ours, mid)
        name = f"6. time-to-last N={mid:,}, seed / {_title(ours)} (>= 30)"
        row(name, f"{_f(a)} ms vs {_f(b)} ms", _ratio(a, b), 30.0, False)
    return ["## The issue's targets", "", *_table(["target", "measured", "ratio", ""], rows)]


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


def write_report(records: list[Record], out: Path, jsonl: Path) -> str:
    run = next(r for r in records if r["scenario"] == "run")
    fan, hold = _by(records, "fanout"), _by(records, "hold")
    tput, many = _by(records, "throughput", "writers"), _one_each(records, "many_tasks")
    transports = [r for r in records if r["scenario"] == "transport"]
    lines = header(run, records, jsonl)
    if fan or hold:
        lines += ["", *fanout_section(fan, run["settings"]), "", *hold_section(hold)]
    if tput:
        lines += ["", *throughput_section(tput)]
    if many:
        lines += ["", *many_section(many)]
    if fan or tput or hold:
        lines += ["", *ratios_section(fan, tput, hold), "", *targets_section(fan, tput, hold)]
    if transports:
        lines += ["", *transports_section(transports, run["transport_settings"])]
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
