"""The measurements: hold, fan-out, throughput and many tasks, each on a freshly started target.

Every delivery is timed from the moment the coordinator sent the update (``time.monotonic()`` in
every process). Server CPU and memory come from /proc (psutil) for every process of the target:
service instances, nginx master and workers, Nchan, Redis, the seed. The event loop's lag of each
service instance comes from the instance's own ``/metrics`` (``service/looplag.py``).
"""

from __future__ import annotations

import bisect
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

from .dialects import DIALECTS
from .load import LoadClient, SyncHttp, WriteSpec
from .targets import Target, get_text, running

FAN_TASK, PROBE_TASK = "fan", "probe"
Record = dict[str, Any]
Emit = Callable[[Record], None]


@dataclass(frozen=True)
class Settings:
    sizes: tuple[int, ...]
    rounds: int  # fan-out rounds timed without other writes (time-to-last, CPU)
    probe_rounds: int  # further rounds with a stream of other writes (write latency)
    probe_interval: float
    round_timeout: float  # for one update to reach every poll
    rehold_timeout: float  # for every poll to be held again (the seed reconnects for each)
    phase_budget: float  # seconds of rounds after which probe rounds are skipped
    hold_timeout: float
    throughput_waiters: int
    throughput_seconds: float
    throughput_writers: tuple[int, ...]  # one throughput run for each count of writers
    many_tasks: int
    many_waiters: int
    many_rate: float
    many_seconds: float
    seed_max: int  # the seed (a thread per poll) runs at most this many polls
    profile: Path | None = None  # py-spy records every service instance's fan-out rounds here


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of ``values`` (q in 0..100); NaN for none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def summary_ms(values: Sequence[float]) -> dict[str, float]:
    return {
        "p50_ms": percentile(values, 50) * 1e3,
        "p99_ms": percentile(values, 99) * 1e3,
        "max_ms": (max(values) * 1e3) if values else float("nan"),
        "n": len(values),
    }


# --- what /proc tells about the target --------------------------------------------------------


def cpu_seconds(pids: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds used so far by each role's processes (all their threads)."""
    return {role: sum(process_cpu(pid) for pid in group) for role, group in pids.items()}


def process_cpu(pid: int) -> float:
    """The scheduler's own count of a process's CPU time, to the nanosecond (its CPU-time clock,
    ``clock_getcpuclockid``). /proc's user and system times count 10 ms ticks, too coarse for a
    round that costs a process 20 ms; 0.0 for a process that has ended."""
    try:
        return time.clock_gettime(((~pid) << 3) | _CPUCLOCK_SCHED)
    except OSError:  # gone (or not Linux: psutil's ticks then)
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            return 0.0
        return float(t.user + t.system)


_CPUCLOCK_SCHED = 2  # Linux's clock id of a process's CPU time: (~pid << 3) | CPUCLOCK_SCHED


def memory(pids: dict[str, list[int]]) -> dict[str, dict[str, int]]:
    """RSS and PSS of each role (PSS: shared pages split among the processes that map them)."""
    out: dict[str, dict[str, int]] = {}
    for role, group in pids.items():
        rss = pss = 0
        for pid in group:
            try:
                info = psutil.Process(pid).memory_full_info()
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
            except psutil.NoSuchProcess:
                pass
        out[role] = {"rss": rss, "pss": pss}
    return out


def diff(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


# --- what the instances tell about their event loops -----------------------------------------

LAG_BUCKET = "taskstatus_event_loop_lag_seconds_bucket"
LAG_MAX = "taskstatus_event_loop_lag_max_seconds"
LagScrape = tuple[dict[float, float], float]  # cumulative count per bucket bound, the max gauge


def loop_lag_scrape(target: Target) -> dict[str, LagScrape]:
    """Each service instance's lag histogram and max lag, from its own ``/metrics``; an instance
    that does not answer (or predates the metric) is left out."""
    out: dict[str, LagScrape] = {}
    for role, port in target.instance_ports().items():
        try:
            text = get_text(port, "/metrics", timeout=10.0)
        except OSError:
            continue
        buckets: dict[float, float] = {}
        top = None
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == LAG_BUCKET:
                    buckets[float(sample.labels["le"])] = sample.value
                elif sample.name == LAG_MAX:
                    top = sample.value
        if buckets and top is not None:
            out[role] = (buckets, top)
    return out


def loop_lag(before: dict[str, LagScrape], after: dict[str, LagScrape]) -> dict[str, Record]:
    """The lag of each instance between two scrapes, in ms:

    - ``le_ms``: the highest bucket bound that gained observations (None past the largest bound);
    - ``max_ms``: the largest lag in between: the max gauge, exact (``max_exact``), when it rose
      meanwhile; else at most the lower of ``le_ms`` and the gauge before;
    - ``since_start_ms``: the max gauge at the end, the largest since the instance started."""
    out: dict[str, Record] = {}
    for role, (b1, top1) in after.items():
        if role not in before:
            continue
        b0, top0 = before[role]
        gained, below1, below0 = None, 0.0, 0.0
        for bound in sorted(b1):
            if b1[bound] - below1 > b0.get(bound, 0.0) - below0:
                gained = bound
            below1, below0 = b1[bound], b0.get(bound, 0.0)
        if gained is None:
            continue  # nothing observed: no monitor running
        exact = top1 > top0
        bound_ms = None if math.isinf(gained) else gained * 1e3
        out[role] = {
            "le_ms": bound_ms,
            "max_ms": top1 * 1e3 if exact else min(gained * 1e3, top0 * 1e3),
            "max_exact": exact,
            "since_start_ms": top1 * 1e3,
        }
    return out


# --- writes the coordinator times itself ------------------------------------------------------


class Writer:
    """Writes to one task over one keep-alive connection, knowing the version each produces."""

    def __init__(self, target: Target, task: str, version: int = 0) -> None:
        self.dialect = DIALECTS[target.dialect]
        self.http = SyncHttp("127.0.0.1", target.port)
        self.task = task
        self.version = version
        self.probe_version = 1  # the probe task's version (the fan-out's probes write it)
        self.steps = 0

    def write(self) -> tuple[int, float, float]:
        """(version produced or -1, send time, ack time)."""
        self.steps += 1
        raw = self.dialect.write_request(self.task, self.version + 1, self.steps)
        sent = time.monotonic()
        response = self.http.request(raw)
        acked = time.monotonic()
        produced = self.dialect.write_result(response.status, response.body, self.version + 1)
        if produced > self.version:
            self.version = produced
        return produced, sent, acked

    def close(self) -> None:
        self.http.close()


def writes_to(target: Target, tasks: list[str], versions: list[int], **options: Any) -> WriteSpec:
    """Writes to ``target``'s ``tasks`` (now at ``versions``), shaped by ``WriteSpec``'s
    ``options`` (concurrency, duration, rate)."""
    return WriteSpec("127.0.0.1", target.port, target.dialect, tasks, versions, **options)


def create_task(target: Target, task: str) -> int:
    """Write ``task`` once (so the first poll of each client returns it); its version."""
    writer = Writer(target, task)
    try:
        produced, _, _ = writer.write()
    finally:
        writer.close()
    if produced < 0:
        raise RuntimeError(f"{target.key}: the first write of {task} was not accepted")
    return produced


def busy_seconds() -> float:
    """CPU time the whole machine has spent busy (every process, ours or not)."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0))


# --- helpers over the load client -------------------------------------------------------------


# A round's CPU is counted until the target is done with it: until, after the re-polls are held
# again (client side), the target's processes together use under QUIET_SHARE of a core for
# QUIET_WINDOW. (A server may still be taking re-polls the client has sent: this service alone
# took ~0.15 s of CPU after that moment, as much again as before it.)
QUIET_WINDOW = 0.05
QUIET_SHARE = 0.05


def wait_quiet(pids: dict[str, list[int]], timeout: float) -> tuple[dict[str, float], float]:
    """The target's CPU (``cpu_seconds``) and the time at the start of the first quiet window
    (``QUIET_SHARE``), or at ``timeout``."""
    deadline = time.monotonic() + timeout
    cpu, at = cpu_seconds(pids), time.monotonic()
    while at < deadline:
        time.sleep(QUIET_WINDOW)
        later, now = cpu_seconds(pids), time.monotonic()
        if sum(diff(later, cpu).values()) < QUIET_SHARE * (now - at):
            break
        cpu, at = later, now
    return cpu, at


def wait_held(
    client: LoadClient, target: Target, n: int, timeout: float
) -> tuple[bool, dict[str, Any], int]:
    """Wait until ``n`` polls are out (client side) and held (the target's own count)."""
    deadline = time.monotonic() + timeout
    ok, status = client.wait(lambda s: s["waiting"] >= n, timeout)
    server = server_waiting(target)
    while server < n and time.monotonic() < deadline:
        time.sleep(0.02)
        server = server_waiting(target)
    return ok and server >= n, status, server


def server_waiting(target: Target) -> int:
    """The target's own count of held polls; -1 when it cannot answer now (too busy)."""
    try:
        return target.waiting()
    except OSError:
        return -1


def open_polls(
    client: LoadClient, target: Target, task_names: list[str], task_of: Sequence[int]
) -> dict[str, int]:
    return client.open(
        "127.0.0.1",
        target.port,
        target.dialect,
        task_names,
        task_of,
        connect_concurrency=16 if target.key == "seed" else 64,
    )


# --- hold + fan-out ---------------------------------------------------------------------------


def hold_and_fanout(
    client: LoadClient,
    key: str,
    n: int,
    settings: Settings,
    workdir: Path,
    emit: Emit,
) -> None:
    with running(key, workdir) as target:
        writer = Writer(target, FAN_TASK, create_task(target, FAN_TASK))
        writer.probe_version = create_task(target, PROBE_TASK)
        pids = target.pids()
        mem0 = memory(pids)
        lag0 = loop_lag_scrape(target)
        t_open = time.monotonic()
        opened = open_polls(client, target, [FAN_TASK], [0] * n)
        held_ok, status, server_held = wait_held(client, target, n, settings.hold_timeout)
        open_seconds = time.monotonic() - t_open
        by_role = target.waiting_by_role()
        mem1 = memory(pids)
        lag1 = loop_lag_scrape(target)
        emit(
            {
                "scenario": "hold",
                "target": key,
                "n": n,
                **opened,
                "held_client": status["waiting"],
                "held_server": server_held,
                "held_by_role": by_role,
                "all_held": held_ok,
                "open_seconds": open_seconds,
                "memory_before": mem0,
                "memory_held": mem1,
                "kib_per_waiter": per_waiter_kib(mem0, mem1, by_role, server_held),
                "loop_lag": loop_lag(lag0, lag1),  # while the polls were opened
                "errors": status["errors"],
            }
        )
        rounds: list[Record] = []
        profilers = start_profiles(target, settings.profile, f"{key}-{n}")
        lag2 = loop_lag_scrape(target)
        started = time.monotonic()
        for r in range(settings.rounds + settings.probe_rounds):
            spent = time.monotonic() - started
            probe = r >= settings.rounds
            # a target that takes minutes per round gets its clean rounds, fewer probe rounds
            if spent > settings.phase_budget * (1 if probe else 3) and (probe or r >= 3):
                break
            rounds.append(fanout_round(client, target, writer, settings, probe))
        lag3 = loop_lag_scrape(target)
        stop_profiles(profilers)
        mem2 = memory(pids)
        clean = [x for x in rounds if not x["probe"]]
        ttl = [x["time_to_last_ms"] for x in clean]
        delivered = sum(x["delivered"] for x in clean)
        server_cpu = sum(sum(x["server_cpu"].values()) for x in clean)
        probes = [lat for x in rounds for lat in x.pop("probe_latencies")]
        probes_reheld = [lat for x in rounds for lat in x.pop("probe_latencies_until_reheld")]
        final = client.status()
        emit(
            {
                "scenario": "fanout",
                "target": key,
                "n": n,
                "held": server_held,
                "rounds": rounds,
                "time_to_last_ms": {
                    "median": percentile(ttl, 50),
                    "min": min(ttl),
                    "max": max(ttl),
                },
                "p50_ms": percentile([x["p50_ms"] for x in clean], 50),
                "p99_ms": percentile([x["p99_ms"] for x in clean], 50),
                "delivered_per_round": delivered / max(1, len(clean)),
                "missing": sum(x["expected"] - x["delivered"] for x in clean),
                "fanout_write_ack_ms": summary_ms([x["ack_ms"] / 1e3 for x in rounds]),
                "write_during_fanout_ms": summary_ms(probes),
                "write_until_reheld_ms": summary_ms(probes_reheld),
                "server_cpu_ms_per_1k": 1e6 * server_cpu / max(1, delivered),
                "client_worker_busy_max": max(x["client_busy_max"] for x in clean),
                "other_cpu_share": sum(x["other_cpu"] for x in clean)
                / max(1e-9, sum(x["seconds"] for x in clean)),
                "memory_after_rounds": mem2,
                "loop_lag": loop_lag(lag2, lag3),  # over the rounds, every poll held
                "errors": final["errors"],
            }
        )
        client.close()
        writer.close()


def start_profiles(target: Target, where: Path | None, name: str) -> list[subprocess.Popen[bytes]]:
    """py-spy on every service instance (collapsed stacks, ``<name>-<instance>.txt``)."""
    if where is None:
        return []
    where.mkdir(parents=True, exist_ok=True)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out = []
    for role, pids in target.pids().items():
        if role.startswith("instance"):
            # --native: C frames too, so time in the cyclic GC (gc_collect_main) shows by name
            # (native stacks need the process paused for each sample: profile runs are slower)
            # BENCH_NATIVE=0: Python frames only (native sampling overweights system calls)
            native = ["--native"] if os.environ.get("BENCH_NATIVE", "1") == "1" else []
            argv = [spy, "record", "--pid", str(pids[0]), "--rate", "100", *native,
                    "--format", "raw",
                    "--output", str(where / f"{name}-{role}.txt")]  # fmt: skip
            out.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(0.5)  # attached
    return out


def stop_profiles(profilers: list[subprocess.Popen[bytes]]) -> None:
    for spy in profilers:
        spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
    for spy in profilers:
        try:
            spy.wait(120)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()


def per_waiter_kib(
    before: dict[str, dict[str, int]],
    after: dict[str, dict[str, int]],
    held_by_role: dict[str, int],
    held: int,
) -> dict[str, float]:
    """PSS growth per held poll: of each node for its own polls; of nginx and the rest per poll."""
    out = {}
    for role, mem in after.items():
        count = held_by_role.get(role, held)
        if role == "redis" or count <= 0:
            continue
        out[role] = (mem["pss"] - before[role]["pss"]) / count / 1024
    return out


def fanout_round(
    client: LoadClient, target: Target, writer: Writer, settings: Settings, probe: bool
) -> Record:
    """One update to all held polls; with ``probe``, a stream of other writes meanwhile."""
    expected = client.status()["polls"]
    wait_held(client, target, expected, settings.rehold_timeout)
    time.sleep(0.2)  # let the last re-polls settle in the server
    version = writer.version + 1
    client.expect(0, version)
    pids = target.pids()
    probe_spec = writes_to(
        target,
        [PROBE_TASK],
        [writer.probe_version],
        concurrency=8,
        duration=settings.round_timeout,
        rate=1 / settings.probe_interval,
    )
    if probe:
        probe_run = client.write_start(probe_spec)
        time.sleep(0.1)  # its connections are open and it is writing
    cpu0, ccpu0, all0 = cpu_seconds(pids), client.status()["cpu"], busy_seconds()
    produced, t0, t_ack = writer.write()
    reached_all, _ = client.wait(lambda s: s["reached"] >= expected, settings.round_timeout)
    t_reached = time.monotonic()
    # the cost of a notification includes the re-poll it causes: count CPU until all are held again
    rehold, _, _ = wait_held(client, target, expected, settings.rehold_timeout)
    t_reheld = time.monotonic()
    cpu_reheld, ccpu1, all1 = cpu_seconds(pids), client.status()["cpu"], busy_seconds()
    probes: list[tuple[float, float]] = []
    probe_failed = 0
    if probe:  # (stopped before the wait for quiet, which its writes would never let come)
        result = client.write_result(probe_run, probe_spec, stop=True)
        log = result["log"]
        writer.probe_version = max(result["versions"])
        probes = [
            (s, a - s) for s, a, v in zip(log.sent, log.acked, log.version, strict=True) if v >= 0
        ]
        probe_failed = result["sent"] - len(probes)
    cpu1, t_quiet = wait_quiet(pids, settings.rehold_timeout)
    tasks, versions, times = client.collect()
    latencies = [
        t - t0
        for task, v, t in zip(tasks, versions, times, strict=True)
        if task == 0 and v >= version
    ]
    ttl = max(latencies) if latencies else t_reached - t0
    busy = [(b - a) / ttl for a, b in zip(ccpu0, ccpu1, strict=True)] if ttl > 0 else [0.0]
    return {
        "probe": probe,
        "version": produced,
        "expected": expected,
        "delivered": len(latencies),
        "all_reached": reached_all,
        "reheld": rehold,
        "reheld_ms": (t_reheld - t0) * 1e3,
        "ack_ms": (t_ack - t0) * 1e3,
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "time_to_last_ms": ttl * 1e3,
        "server_cpu": diff(cpu1, cpu0),
        "client_cpu": sum(ccpu1) - sum(ccpu0),
        "client_busy_max": max(busy),
        # busy CPU of the machine outside the target and the load processes (other people's work)
        "other_cpu": (all1 - all0)
        - sum(diff(cpu_reheld, cpu0).values())
        - (sum(ccpu1) - sum(ccpu0)),
        "quiet_ms": (t_quiet - t0) * 1e3,  # the end of server_cpu's window
        "seconds": t_reheld - t0,  # (other_cpu's and client_cpu's)
        # writes sent while the fan-out was delivered, and while the re-polls came back
        "probe_latencies": [lat for sent, lat in probes if t0 <= sent <= t0 + ttl],
        "probe_latencies_until_reheld": [lat for sent, lat in probes if t0 <= sent <= t_reheld],
        "probe_failed": probe_failed,
    }


# --- throughput -------------------------------------------------------------------------------


def throughput(client: LoadClient, key: str, settings: Settings, workdir: Path, emit: Emit) -> None:
    """Writes to one task from a closed loop of writers while the polls re-poll, once for each
    count of writers: 8 measure a write's latency under load, enough writers the most a target
    accepts."""
    with running(key, workdir) as target:
        version = create_task(target, FAN_TASK)
        open_polls(client, target, [FAN_TASK], [0] * settings.throughput_waiters)
        for writers in settings.throughput_writers:
            version = throughput_run(client, target, key, writers, version, settings, emit)
        client.close()


def throughput_run(
    client: LoadClient,
    target: Target,
    key: str,
    writers: int,
    first: int,
    settings: Settings,
    emit: Emit,
) -> int:
    """One run of ``writers`` concurrent writers from version ``first``; the last version."""
    held_ok, _, held = wait_held(client, target, settings.throughput_waiters, settings.hold_timeout)
    client.collect()
    pids = target.pids()
    cpu0 = cpu_seconds(pids)
    spec = writes_to(
        target, [FAN_TASK], [first], concurrency=writers, duration=settings.throughput_seconds
    )
    profilers = start_profiles(target, settings.profile, f"{key}-throughput-{writers}")
    result = client.write(spec)
    stop_profiles(profilers)
    cpu1 = cpu_seconds(pids)
    log = result["log"]
    accepted = [(a, v) for a, v in zip(log.acked, log.version, strict=True) if v >= 0]
    final = max((v for _, v in accepted), default=first)
    final_ack = max((a for a, v in accepted if v == final), default=result["end"])
    client.expect(0, final)
    converged, _ = client.wait(lambda s: s["reached"] >= held, 15)
    _, versions, times = client.collect()
    start, end = result["start"], result["end"]
    window = [(t, v) for v, t in zip(versions, times, strict=True) if start <= t <= end]
    lags = version_lag(accepted, window)
    last_final = max((t for v, t in zip(versions, times, strict=True) if v == final), default=end)
    acks = [a - s for s, a, v in zip(log.sent, log.acked, log.version, strict=True) if v >= 0]
    seconds = end - start
    emit(
        {
            "scenario": "throughput",
            "target": key,
            "n": held,
            "all_held": held_ok,
            "writers": writers,
            "seconds": seconds,
            "writes_sent": result["sent"],
            "accepted": len(accepted),
            "accepted_per_s": len(accepted) / seconds,
            "rejected": result["sent"] - len(accepted),
            "notifications": len(window),
            "notifications_per_s": len(window) / seconds,
            "write_ack_ms": summary_ms(acks),
            "lag_versions_p50": percentile(lags, 50),
            "lag_versions_p99": percentile(lags, 99),
            "lag_versions_max": max(lags, default=0),
            "converged": converged,
            "converge_ms_after_last_ack": (last_final - final_ack) * 1e3,
            "server_cpu": diff(cpu1, cpu0),
            "writer_cpu": result["cpu"],
            "errors": {**client.status()["errors"], **result["errors"]},
        }
    )
    return final


def version_lag(
    accepted: list[tuple[float, int]], deliveries: list[tuple[float, int]]
) -> list[int]:
    """For each delivery (time, version): how many versions older than the newest acknowledged."""
    accepted = sorted(accepted)
    times = [a for a, _ in accepted]
    newest, top = [], -1
    for _, v in accepted:
        top = max(top, v)
        newest.append(top)
    lags = []
    for t, v in deliveries:
        i = bisect.bisect_right(times, t)
        lags.append(max(0, newest[i - 1] - v) if i else 0)
    return lags


# --- many tasks -------------------------------------------------------------------------------


def many_tasks(client: LoadClient, key: str, settings: Settings, workdir: Path, emit: Emit) -> None:
    n_tasks, k = settings.many_tasks, settings.many_waiters
    names = [f"t{i}" for i in range(n_tasks)]
    with running(key, workdir) as target:
        versions = [create_task(target, name) for name in names]
        open_polls(client, target, names, [i % n_tasks for i in range(n_tasks * k)])
        held_ok, _, held = wait_held(client, target, n_tasks * k, settings.hold_timeout)
        client.collect()
        pids = target.pids()
        cpu0 = cpu_seconds(pids)
        spec = writes_to(
            target,
            names,
            versions,
            concurrency=16,
            duration=settings.many_seconds,
            rate=settings.many_rate,
        )
        result = client.write(spec)
        time.sleep(1.0)  # deliveries of the last writes
        cpu1 = cpu_seconds(pids)
        log = result["log"]
        sent_at = {
            (t, v): s for t, v, s in zip(log.task, log.version, log.sent, strict=True) if v >= 0
        }
        tasks, got, times = client.collect()
        delays = [
            t - sent_at[(task, v)]
            for task, v, t in zip(tasks, got, times, strict=True)
            if (task, v) in sent_at
        ]
        accepted = len(sent_at)
        seconds = result["end"] - result["start"]
        emit(
            {
                "scenario": "many_tasks",
                "target": key,
                "n": n_tasks * k,
                "tasks": n_tasks,
                "waiters_per_task": k,
                "held": held,
                "all_held": held_ok,
                "offered_per_s": settings.many_rate,
                "seconds": seconds,
                "accepted": accepted,
                "accepted_per_s": accepted / seconds,
                "notifications": len(delays),
                "notifications_per_s": len(delays) / seconds,
                "expected_notifications": accepted * k,
                "delay": summary_ms(delays),
                "write_ack_ms": summary_ms(
                    [
                        a - s
                        for s, a, v in zip(log.sent, log.acked, log.version, strict=True)
                        if v >= 0
                    ]
                ),
                "server_cpu": diff(cpu1, cpu0),
                "errors": {**client.status()["errors"], **result["errors"]},
            }
        )
        client.close()
