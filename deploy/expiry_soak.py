"""`make soak-expiry`: the store stops growing. A bounded run, not in make test.

Starts the local cluster (redis-server, three instances, nginx; deploy/cluster.py) with
``FINISHED_TASK_TTL`` of a few seconds (``--ttl``, 3), ``TOMBSTONE_TTL`` 10 s and
``POLL_TIMEOUT_MAX`` 5 s, holds ``--waiters`` long polls (1,000, ten on each of 100 tasks that
live on: their loops are deploy/soak.py's), then, through nginx:

1. creates ``--tasks`` tasks (100,000) as ``in_progress``: nothing is due yet;
2. finishes each (``completed``): each is due ``--ttl`` seconds later, so the instances' sweeps
   expire them while the later ones are still being finished;
3. waits until every one has expired and every tombstone is purged.

A probe writes to the held tasks all along (``--probe-rate``, 50/s) and records each write's
latency: its p50/p99 while idle, while creating (bulk writes, nothing to sweep), while finishing
(bulk writes and the sweep expiring as many tasks) and in the tail when only the sweep works.
Redis ``used_memory`` and each instance's RSS are sampled every second: printed at start (waiters
held, before the tasks), peak and end (every task and tombstone gone); the run fails if the end is
more than 10 % above the start. Last, the cost of the sweep itself: ``--cost-tasks`` (20,000)
finished tasks under another prefix, swept by this process in batches of ``SWEEP_BATCH`` through
the Redis backend, timed per batch.

    python -m deploy.expiry_soak [--tasks 100000] [--ttl 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from service.backend.base import Retention
from service.backend.redis import RedisBackend
from service.history import DEFAULT_HISTORY_LENGTH as HISTORY
from service.model import DEFAULT_STATUSES, TaskUpdate
from service.retention import SWEEP_BATCH

from .cluster import Cluster, running_cluster
from .soak import HOLD, Soak, mib, outcome, rss_kib, workdir

PER_TASK = 10  # held polls per long-lived task
CONCURRENCY = 32  # bulk writes in flight
DEADLINE = 1800.0  # seconds: no phase runs longer
SETTLE_MAX = 360.0  # seconds memory may take to come back: a full collection is due every 300


def redis_memory(cluster: Cluster) -> tuple[int, int]:
    """Redis' used_memory and used_memory_dataset (its keys' share), in bytes."""
    info = dict(
        line.split(":", 1)
        for line in cluster.redis.command("INFO", "memory").decode().splitlines()
        if ":" in line
    )
    return int(info["used_memory"]), int(info["used_memory_dataset"])


def script_time(cluster: Cluster) -> tuple[int, int]:
    """Calls of EVALSHA and the microseconds Redis spent in them (INFO commandstats)."""
    for line in cluster.redis.command("INFO", "commandstats").decode().splitlines():
        if line.startswith("cmdstat_evalsha:"):
            fields = dict(part.split("=") for part in line.split(":", 1)[1].split(","))
            return int(fields["calls"]), int(fields["usec"])
    return 0, 0


def quantiles(latencies: list[float]) -> str:
    if len(latencies) < 2:
        return "n/a"
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return f"p50 {cuts[49] * 1000:.1f} ms, p99 {cuts[98] * 1000:.1f} ms ({len(latencies)} writes)"


class Meter:
    """Samples memory every second; the probe's write latencies by phase."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.phase = "idle"
        self.latencies: dict[str, list[float]] = {}
        self.redis: list[int] = []
        self.dataset: list[int] = []
        self.rss: dict[str, list[int]] = {app.name: [] for app in cluster.instances}

    def sample(self) -> None:
        used, dataset = redis_memory(self.cluster)
        self.redis.append(used)
        self.dataset.append(dataset)
        for app in self.cluster.instances:
            self.rss[app.name].append(rss_kib(app))

    async def sample_every_second(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.to_thread(self.sample)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await stop.wait()

    async def probe(
        self, session: aiohttp.ClientSession, tasks: list[str], rate: float, stop: asyncio.Event
    ) -> None:
        started = time.monotonic()
        for n in range(int(rate * DEADLINE)):
            if stop.is_set():
                return
            await asyncio.sleep(max(0.0, started + n / rate - time.monotonic()))
            url = f"{self.cluster.url}/api/tasks/{tasks[n % len(tasks)]}"
            sent = time.perf_counter()
            async with session.put(url, json={"progress": n % 101}) as response:
                await response.read()
                if response.status == 200:
                    phase = self.phase
                    self.latencies.setdefault(phase, []).append(time.perf_counter() - sent)


async def bulk(
    session: aiohttp.ClientSession, base: str, ids: list[str], status: str
) -> tuple[int, float]:
    """Write ``status`` to every id, CONCURRENCY at a time; (failures, seconds)."""
    started, failures = time.monotonic(), 0
    queue = iter(ids)

    async def worker() -> None:
        nonlocal failures
        for task in queue:
            async with session.put(f"{base}/api/tasks/{task}", json={"status": status}) as r:
                await r.read()
                failures += r.status != 200

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return failures, time.monotonic() - started


async def until(what: str, check: Callable[[], Awaitable[bool]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.5)


async def sweep_cost(cluster: Cluster, count: int) -> str:
    """Time the sweep script alone on ``count`` finished tasks of a prefix of its own."""
    backend = RedisBackend(
        DEFAULT_STATUSES,
        count + 1,
        url=cluster.redis.url,
        prefix="sweepcost:",
        history_length=100,
        retention=Retention(finished_ttl=1, tombstone_ttl=3600),
    )

    class Sink:
        def publish(self, change: object) -> None:
            pass

        def watched_tasks(self) -> list[str]:
            return []

    await backend.start(Sink())
    try:
        finished = TaskUpdate(status="completed", progress=100)
        for first in range(0, count, 500):
            await asyncio.gather(
                *(
                    backend.write(f"cost-{n}", finished)
                    for n in range(first, min(first + 500, count))
                )
            )
        await asyncio.sleep(1.1)  # the TTL of the last one written: then all are due
        batches: list[float] = []
        expired = 0
        calls_before, usec_before = script_time(cluster)
        while expired < count and len(batches) < count:
            started = time.perf_counter()
            result = await backend.sweep(SWEEP_BATCH)
            batches.append(time.perf_counter() - started)
            expired += result.expired
            if not result.more and expired < count:
                await asyncio.sleep(0.1)
        calls_after, usec_after = script_time(cluster)
    finally:
        await backend.close()
    per_task = sum(batches) / max(expired, 1)
    # (the instances' own scripts, a sweep and a stats share a second each, count in too)
    inside = (usec_after - usec_before) / max(calls_after - calls_before, 1)
    return (
        f"sweep cost: {expired} tasks in {len(batches)} batches of {SWEEP_BATCH}: "
        f"{statistics.median(batches) * 1000:.2f} ms per batch (p50), "
        f"{max(batches) * 1000:.2f} ms at most, {per_task * 1e6:.1f} µs per task "
        f"(client round trip included); inside Redis {inside / 1000:.2f} ms per script call, "
        f"{(usec_after - usec_before) / max(expired, 1):.1f} µs per task"
    )


async def run(cluster: Cluster, args: argparse.Namespace) -> bool:
    meter = Meter(cluster)
    waiters: int = args.waiters
    held = [f"held-{n:03d}" for n in range(-(-waiters // PER_TASK))]
    owner = {w: held[w // PER_TASK] for w in range(args.waiters)}
    ids = [f"exp-{n:06d}" for n in range(args.tasks)]
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=HOLD + 30)
    probing = aiohttp.TCPConnector(force_close=True)
    stop = asyncio.Event()
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        aiohttp.ClientSession(connector=probing, timeout=aiohttp.ClientTimeout(total=10)) as probe,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as writer,
    ):
        soak = Soak(cluster, session, probe, ends=time.monotonic() + DEADLINE)
        for task in held:
            async with writer.put(f"{cluster.url}/api/tasks/{task}", json={"progress": 0}) as r:
                assert r.status == 200
        clients = [asyncio.create_task(soak.wait_on(w, owner[w])) for w in owner]

        async def all_held() -> bool:
            return sum(await soak.waiting()) >= waiters

        await until(f"{args.waiters} polls held", all_held, 60)
        # Warm up first: the instances' connection pools to Redis grow to what bulk writes need
        # (each connection a few KiB of buffers in Redis), the processes' own buffers too, and
        # the held tasks' histories (which the probe writes to) are full.
        failed, _ = await bulk(writer, cluster.url, held * (HISTORY + 10), "in_progress")
        await asyncio.to_thread(meter.sample)
        start_redis, start_rss = meter.redis[-1], {n: v[-1] for n, v in meter.rss.items()}
        print(
            f"{args.waiters} polls held; Redis used_memory {mib(start_redis // 1024)}", flush=True
        )

        sampling = asyncio.create_task(meter.sample_every_second(stop))
        probing_task = asyncio.create_task(meter.probe(writer, held, args.probe_rate, stop))
        await asyncio.sleep(10)  # the idle window of the probe
        meter.phase = "creating"
        failed_, took = await bulk(writer, cluster.url, ids, "in_progress")
        failed += failed_
        print(f"created {args.tasks} tasks in {took:.1f} s ({failed} failed)", flush=True)
        meter.phase = "finishing"
        failed2, took = await bulk(writer, cluster.url, ids, "completed")
        print(f"finished {args.tasks} tasks in {took:.1f} s ({failed2} failed)", flush=True)
        meter.phase = "sweep only"

        async def none_live() -> bool:
            async with probe.get(f"{cluster.url}/metrics") as response:
                await response.read()
            counts = []
            for app in cluster.instances:
                async with probe.get(f"{app.url}/metrics") as response:
                    for line in (await response.text()).splitlines():
                        if line.startswith("taskstatus_tasks "):
                            counts.append(int(float(line.split()[1])))
            return bool(counts) and max(counts) <= len(held)

        await until("every finished task expired", none_live, DEADLINE)
        meter.phase = "purging"

        async def purged() -> bool:
            zcard = int(cluster.redis.command("ZCARD", "taskstatus:due"))
            zindex = int(cluster.redis.command("ZCARD", "taskstatus:changes"))
            return zcard == 0 and zindex == len(held)

        await until("every tombstone purged", purged, DEADLINE)
        meter.phase = "after"
        purged_at = time.monotonic()

        def back() -> bool:
            rss = {app.name: rss_kib(app) for app in cluster.instances}
            used, _ = redis_memory(cluster)
            return used <= start_redis * 1.1 and all(
                rss[name] <= start_rss[name] * 1.1 for name in rss
            )

        async def settled() -> bool:
            # The instances collect their young objects every 10 s and everything every 5 min
            # (runtime.py): a poll held across a young collection is freed only by the next full
            # one, then free pages go back to the system. So memory may take that long to return.
            return await asyncio.to_thread(back)

        with contextlib.suppress(TimeoutError):
            await until("memory back within 10 %", settled, SETTLE_MAX)
        settle_time = time.monotonic() - purged_at
        await asyncio.sleep(5)  # the probe's last window
        stop.set()
        await asyncio.gather(sampling, probing_task)
        await asyncio.to_thread(meter.sample)
        soak.stopping.set()
        for client in clients:
            client.cancel()
        await asyncio.gather(*clients, return_exceptions=True)

    start_dataset = meter.dataset[0]
    ok = not failed and not failed2 and not soak.errors and not soak.out_of_order
    print(
        f"\nexpiry soak: {args.tasks} tasks created, finished and expired (FINISHED_TASK_TTL "
        f"{args.ttl} s), {args.waiters} polls held, sweeps of {SWEEP_BATCH} per batch"
    )
    end_redis = meter.redis[-1]
    growth = (end_redis - start_redis) / start_redis
    print(
        f"Redis used_memory: start {mib(start_redis // 1024)}, peak "
        f"{mib(max(meter.redis) // 1024)}, end {mib(end_redis // 1024)} ({growth:+.1%})"
    )
    print(
        f"Redis used_memory_dataset: start {mib(start_dataset // 1024)}, peak "
        f"{mib(max(meter.dataset) // 1024)}, end {mib(meter.dataset[-1] // 1024)}; keys at the "
        f"end: {int(cluster.redis.command('DBSIZE'))}"
    )
    ok &= growth <= 0.10
    for name, series in meter.rss.items():
        start, end = start_rss[name], series[-1]
        rss_growth = (end - start) / start
        print(
            f"{name} RSS: start {mib(start)}, peak {mib(max(series))}, end {mib(end)} "
            f"({rss_growth:+.1%})"
        )
        ok &= rss_growth <= 0.10
    print(f"memory back within 10 % of the start {settle_time:.0f} s after the last purge")
    for phase in ("idle", "creating", "finishing", "sweep only", "purging", "after"):
        print(f"probe writes while {phase}: {quantiles(meter.latencies.get(phase, []))}")
    print(
        f"poll answers {soak.answers}, out of order {soak.out_of_order}, errors "
        f"{dict(soak.errors) or 0}"
    )
    print(await sweep_cost(cluster, args.cost_tasks))
    return bool(ok)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m deploy.expiry_soak", description=__doc__)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--waiters", type=int, default=1000)
    parser.add_argument("--ttl", type=int, default=3, help="FINISHED_TASK_TTL, seconds")
    parser.add_argument("--probe-rate", type=float, default=50.0, help="probe writes per second")
    parser.add_argument("--cost-tasks", type=int, default=20_000)
    parser.add_argument("--workdir", type=Path, help="keep logs and data here (default: temp)")
    args = parser.parse_args()
    instance_args = [
        "--finished-task-ttl", str(args.ttl), "--tombstone-ttl", "10",
        "--poll-timeout-max", "5", "--poll-timeout", "5",
        "--max-tasks", str(args.tasks + args.waiters),  # room for the held polls' tasks too
    ]  # fmt: skip
    with (
        workdir(args.workdir) as folder,
        running_cluster(folder, instance_args=instance_args) as cluster,
    ):
        ok = outcome("expiry soak", run(cluster, args))
    print("expiry soak passed" if ok else "expiry soak FAILED")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
