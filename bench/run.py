"""``python -m bench [--quick]``: every scenario against every target, then the report.

Full: hold and fan-out at 1,000 / 5,000 / 10,000 polls, throughput, many tasks, against this
service (1 instance; 3 instances + nginx), the seed design and Nchan (1 nginx; 2 + balancer); and
the transport comparison (long polling, SSE, WebSocket: 1,000 clients each) on this service.
Quick (``--quick``, under 2 minutes): 1,000 polls, fewer rounds, this service (1 instance) and
the seed; the transports with 200 clients.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Any

from .load import LoadClient, raise_nofile_limit
from .report import write_report
from .scenarios import Emit, Record, Settings, hold_and_fanout, many_tasks, throughput
from .targets import TARGETS
from .transports import TARGETS as TRANSPORT_TARGETS
from .transports import TRANSPORTS, TransportClient, TransportSettings, measure

RESULTS = Path(__file__).resolve().parent / "results"

FULL = Settings(
    sizes=(1_000, 5_000, 10_000),
    rounds=5,
    probe_rounds=3,
    probe_interval=0.005,
    round_timeout=60.0,
    rehold_timeout=30.0,
    phase_budget=90.0,
    hold_timeout=90.0,
    throughput_waiters=1_000,
    throughput_seconds=5.0,
    throughput_writers=(8, 64),
    many_tasks=1_000,
    many_waiters=10,
    many_rate=500.0,
    many_seconds=5.0,
    seed_max=5_000,
)
QUICK = Settings(
    sizes=(1_000,),
    rounds=3,
    probe_rounds=2,
    probe_interval=0.005,
    round_timeout=20.0,
    rehold_timeout=15.0,
    phase_budget=20.0,
    hold_timeout=30.0,
    throughput_waiters=1_000,
    throughput_seconds=3.0,
    throughput_writers=(8, 64),
    many_tasks=100,
    many_waiters=10,
    many_rate=200.0,
    many_seconds=3.0,
    seed_max=1_000,
)
FULL_TRANSPORTS = TransportSettings(clients=1_000, updates=20, interval=0.2)
QUICK_TRANSPORTS = TransportSettings(clients=200, updates=10, interval=0.2)
FULL_TARGETS = ("service-1", "service-3", "seed", "nchan-1", "nchan-2")
QUICK_TARGETS = ("service-1", "seed")


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def machine() -> dict[str, Any]:
    model = "?"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as meminfo:
        mem_kib = int(meminfo.readline().split()[1])
    nchan = _version(["dpkg-query", "-W", "-f", "${Version}", "libnginx-mod-nchan"])
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": _version([shutil.which("nginx") or "/usr/sbin/nginx", "-v"]),
        "nchan": nchan,
        "redis": _version(["redis-server", "--version"]),
        "load_average_at_start": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="N=1,000 only, fewer rounds and targets"
    )
    parser.add_argument("--targets", help=f"comma-separated, of {', '.join(TARGETS)}")
    parser.add_argument("--sizes", help="comma-separated poll counts for hold and fan-out")
    parser.add_argument("--rounds", type=int, help="fan-out rounds (without probe writes)")
    parser.add_argument(
        "--scenarios",
        default="fanout,throughput,many,transports",
        help="of fanout, throughput, many, transports",
    )
    parser.add_argument(
        "--transport-clients", type=int, help="clients per transport in the transport comparison"
    )
    parser.add_argument("--workers", type=int, default=4, help="poll worker processes")
    parser.add_argument(
        "--writers", help="comma-separated counts of concurrent writes for throughput (8,64)"
    )
    parser.add_argument(
        "--loop", choices=("uvloop", "asyncio"), default="uvloop", help="the load client's loop"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--profile", type=Path, help="record each service instance with py-spy during fan-out"
    )
    args = parser.parse_args(argv)

    settings = QUICK if args.quick else FULL
    if args.sizes:
        settings = _replace(settings, sizes=tuple(int(s) for s in args.sizes.split(",")))
    if args.rounds:
        settings = _replace(settings, rounds=args.rounds)
    if args.writers:
        writers = tuple(int(w) for w in args.writers.split(","))
        settings = _replace(settings, throughput_writers=writers)
    if args.profile:
        settings = _replace(settings, profile=args.profile.resolve())
    transport_settings = QUICK_TRANSPORTS if args.quick else FULL_TRANSPORTS
    if args.transport_clients:
        transport_settings = TransportSettings(
            **{**transport_settings.__dict__, "clients": args.transport_clients}
        )
    targets = (
        args.targets.split(",")
        if args.targets
        else list(QUICK_TARGETS if args.quick else FULL_TARGETS)
    )
    scenarios = set(args.scenarios.split(","))
    for key in targets:
        if key not in TARGETS:
            parser.error(f"unknown target {key}")

    # SIGTERM unwinds like Ctrl-C: every target started so far is stopped on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    nofile = raise_nofile_limit()  # children (instances, the seed, nginx) inherit it
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    mode = "quick" if args.quick else "full"
    jsonl = args.out / f"results-{mode}-{stamp}.jsonl"
    records: list[dict[str, Any]] = []

    def emit(record: Record) -> None:
        record.setdefault("loadavg", os.getloadavg())
        records.append(record)
        with jsonl.open("a") as out:
            out.write(json.dumps(record, default=_plain) + "\n")
        print(_one_line(record), flush=True)

    started = time.monotonic()
    client = LoadClient(args.workers, args.loop)
    transport_client = TransportClient(2, args.loop) if "transports" in scenarios else None
    try:
        limits = client.limits()
        emit(
            {
                "scenario": "run",
                "mode": mode,
                "machine": machine(),
                "settings": settings.__dict__,
                "transport_settings": transport_settings.__dict__,
                "targets": targets,
                "load_client": {
                    "poll_workers": args.workers,
                    "loop": args.loop,
                    "writer_processes": 1,
                    "nofile_coordinator": nofile,
                    "nofile_workers": [lim["nofile"] for lim in limits],
                },
                "note": "2 shared cores: the load client, every target and other people's test "
                "runs share them",
            }
        )
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            steps = plan(client, targets, settings, scenarios, Path(tmp), emit)
            if transport_client is not None:
                steps += plan_transports(
                    transport_client, targets, transport_settings, Path(tmp), emit
                )
            for key, n, step in steps:
                run_step(client, key, n, step, settings, emit)
    finally:
        client.shutdown()
        if transport_client is not None:
            transport_client.shutdown()
    records.append({"scenario": "elapsed", "seconds": time.monotonic() - started})
    table = write_report(records, args.out, jsonl)
    print(table)
    print(f"\nresults: {jsonl}\ntable: {args.out / 'table.md'}\nchart: {args.out / 'fanout.png'}")


def plan(
    client: LoadClient,
    targets: list[str],
    settings: Settings,
    scenarios: set[str],
    work: Path,
    emit: Emit,
) -> list[tuple[str, int, partial[None]]]:
    """(target, polls, step) in the order they run: each size and scenario against every
    target in turn, so a change in the machine's other load falls on every target alike."""
    steps: list[tuple[str, int, partial[None]]] = []
    if "fanout" in scenarios:
        for n in settings.sizes:
            for key in targets:
                step = partial(hold_and_fanout, client, key, n, settings, work / f"{key}-{n}", emit)
                steps.append((key, n, step))
    if "throughput" in scenarios:
        for key in targets:
            step = partial(throughput, client, key, settings, work / f"{key}-tp", emit)
            steps.append((key, settings.throughput_waiters, step))
    if "many" in scenarios:
        for key in targets:
            step = partial(many_tasks, client, key, settings, work / f"{key}-many", emit)
            steps.append((key, settings.many_tasks * settings.many_waiters, step))
    return steps


def plan_transports(
    client: TransportClient,
    targets: list[str],
    settings: TransportSettings,
    work: Path,
    emit: Emit,
) -> list[tuple[str, int, partial[None]]]:
    """Each transport against each target of this service that is in the run (the seed and
    Nchan speak long polling only)."""
    return [
        (
            key,
            settings.clients,
            partial(measure, client, key, transport, settings, work / f"{key}-{transport}", emit),
        )
        for transport in TRANSPORTS
        for key in targets
        if key in TRANSPORT_TARGETS
    ]


def run_step(
    client: LoadClient, key: str, n: int, step: partial[None], settings: Settings, emit: Emit
) -> None:
    """One scenario against one target; a failure is recorded and the run goes on."""
    if key == "seed" and n > settings.seed_max:
        why = f"{step.func.__name__}: a thread per poll, runs up to {settings.seed_max:,} polls"
        emit({"scenario": "skipped", "target": key, "n": n, "why": why})
        return
    try:
        step()
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        where = traceback.format_exc(limit=-3)
        emit({"scenario": "failed", "target": key, "n": n, "error": error, "where": where})
        client.close()  # whatever the step left open


def _replace(settings: Settings, **changes: Any) -> Settings:
    return Settings(**{**settings.__dict__, **changes})


def _plain(value: object) -> object:
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _lag_text(record: Record) -> str:
    """Each instance's largest event-loop lag in the record's window ("<=": an upper bound)."""
    lags = record.get("loop_lag") or {}
    each = ", ".join(
        f"{role} {'' if lag['max_exact'] else '<='}{lag['max_ms']:.1f}"
        for role, lag in lags.items()
    )
    return f"; loop lag max ms {each}" if each else ""


def _one_line(record: Record) -> str:
    kind = record["scenario"]
    head = f"[{kind}] {record.get('target', '')} n={record.get('n', '')}"
    if kind == "fanout":
        ttl = record["time_to_last_ms"]
        ack = record["fanout_write_ack_ms"]["p50_ms"]
        probes = record["write_during_fanout_ms"]["p99_ms"]
        return (
            f"{head}: time-to-last {ttl['median']:.0f} ms ({ttl['min']:.0f}-{ttl['max']:.0f}),"
            f" p50 {record['p50_ms']:.0f} ms, write ack p50 {ack:.1f} ms, other writes p99"
            f" {probes:.1f} ms, missed {record['missing']},"
            f" client busy {record['client_worker_busy_max']:.0%}{_lag_text(record)}"
        )
    if kind == "hold":
        kib = ", ".join(f"{k} {v:.1f}" for k, v in record["kib_per_waiter"].items())
        held, seconds = record["held_server"], record["open_seconds"]
        return f"{head}: held {held} in {seconds:.1f} s; KiB/poll {kib}{_lag_text(record)}"
    if kind == "throughput":
        return (
            f"{head}, {record['writers']} writers: {record['accepted_per_s']:.0f} updates/s,"
            f" {record['notifications_per_s']:.0f} notifications/s,"
            f" lag p99 {record['lag_versions_p99']} versions"
        )
    if kind == "many_tasks":
        delay = record["delay"]
        return (
            f"{head}: {record['notifications_per_s']:.0f} notifications/s,"
            f" delay p50 {delay['p50_ms']:.1f} ms p99 {delay['p99_ms']:.1f} ms"
        )
    if kind == "transport":
        delay = record["delay"]
        wire = record["bytes_in_per_update"] + record["bytes_out_per_update"]
        return (
            f"{head} {record['transport']}: {record['cpu_us_per_notification']:.0f} µs CPU"
            f" per notification, {wire:.0f} bytes per update,"
            f" delay p50 {delay['p50_ms']:.1f} ms p99 {delay['p99_ms']:.1f} ms,"
            f" {record['kib_per_client']:.1f} KiB per client,"
            f" delivered {record['delivered']}/{record['expected']}"
        )
    return f"{head}: {json.dumps(record, default=_plain)[:300]}"
