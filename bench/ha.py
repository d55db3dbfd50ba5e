"""``python -m bench.ha``: what high availability costs and how quickly it recovers.

- **The price of the guarantee.** One instance per setting on one topology (a primary, two
  replicas, three Sentinels): write latency with ``REDIS_MIN_REPLICAS`` 0 (acknowledged when the
  primary has the write) and 1 (once a replica has it too: the script and a ``WAIT`` in one
  pipeline). One writer at a time, then 16 at once; p50, p99 and max, and the ratio.
- **Failover.** A fresh cluster per round (three instances behind nginx); a writer puts every
  20 ms through nginx; the primary is SIGKILLed. Time from the kill to the first write answered
  200 that was sent after it, and to every instance ready again; median and max over the rounds.

Everything runs on 127.0.0.1 and stops by itself: bounded writes, bounded rounds, deadlines.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from deploy.cluster import (
    SENTINEL_DOWN_AFTER_MS,
    Instance,
    http_status,
    running_ha_cluster,
    sentinel_args,
)

WRITE_DEADLINE = 60.0  # seconds any latency run may take
FAILOVER_DEADLINE = 30.0  # seconds a round waits for the first write after the kill


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def write_latencies(url: str, writes: int, writers: int) -> list[float]:
    """Milliseconds per write (PUT, each to its writer's own task), ``writers`` at once."""
    latencies: list[float] = []
    deadline = time.monotonic() + WRITE_DEADLINE
    connector = aiohttp.TCPConnector(limit=writers)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def writer(n: int) -> None:
            for k in range(writes // writers):
                if time.monotonic() > deadline:
                    return
                started = time.perf_counter()
                body = {"status": "in_progress", "progress": k % 101}
                async with session.put(f"{url}/api/tasks/bench-{n}", json=body) as response:
                    await response.read()
                    assert response.status == 200, response.status
                latencies.append((time.perf_counter() - started) * 1000)

        await asyncio.gather(*(writer(n) for n in range(writers)))
    return latencies


def price_of_the_guarantee(workdir: Path, writes: int) -> None:
    with running_ha_cluster(workdir, instances=1) as ha:
        # The cluster's instance acknowledges after one replica (the default with Sentinel);
        # a second one, on the same primary, as soon as the primary has the write.
        unreplicated = Instance(
            workdir / "apps",
            "min-replicas-0",
            extra_args=[*sentinel_args(ha.sentinels), "--redis-min-replicas", "0"],
        )
        unreplicated.start()
        apps = {0: unreplicated, 1: ha.instances[0]}
        try:
            print("write latency, ms (one instance, straight to it; primary + 2 replicas)")
            print("  REDIS_MIN_REPLICAS  writers      p50      p99      max")
            for writers in (1, 16):
                p50 = {}
                for replicas, app in apps.items():
                    asyncio.run(write_latencies(app.url, writes // 10, writers))  # warm up
                    found = asyncio.run(write_latencies(app.url, writes, writers))
                    p50[replicas] = percentile(found, 0.5)
                    print(
                        f"  {replicas:>18}  {writers:>7}  {p50[replicas]:7.2f}"
                        f"  {percentile(found, 0.99):7.2f}  {max(found):7.2f}"
                    )
                print(f"  ratio p50 (1 / 0), {writers} writer(s): {p50[1] / p50[0]:.2f}")
        finally:
            unreplicated.stop()


async def one_failover(base: str, kill: object) -> tuple[float, float]:
    """Seconds from the kill to the first write sent after it and answered 200; and the kill's
    own time, for the readiness measure."""
    assert callable(kill)
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for n in range(50):  # the cluster writes before the kill
            async with session.put(f"{base}/api/tasks/failover", json={"progress": n}) as r:
                assert r.status == 200, r.status
        killed = time.monotonic()
        await asyncio.to_thread(kill)
        n = 0
        while time.monotonic() - killed < FAILOVER_DEADLINE:
            n += 1
            try:
                async with session.put(
                    f"{base}/api/tasks/failover", json={"progress": n % 101}
                ) as response:
                    await response.read()
                    if response.status == 200:
                        return time.monotonic() - killed, killed
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.02)
    raise TimeoutError("no write acknowledged after the failover")


def failovers(workdir: Path, rounds: int) -> None:
    to_write, to_ready = [], []
    for n in range(rounds):
        with running_ha_cluster(workdir / f"round-{n}") as ha:
            took, killed = asyncio.run(one_failover(ha.url, ha.redis.kill))
            to_write.append(took)
            deadline = time.monotonic() + FAILOVER_DEADLINE
            while not all(http_status(app.port, "/readyz") == 200 for app in ha.instances):
                assert time.monotonic() < deadline, "instances not ready after the failover"
                time.sleep(0.02)
            to_ready.append(time.monotonic() - killed)
        print(f"  round {n + 1}: first write acknowledged {took:.2f} s, ready {to_ready[-1]:.2f} s")
    print(
        f"failover ({rounds} rounds, Sentinel down-after-milliseconds {SENTINEL_DOWN_AFTER_MS}),"
        " primary SIGKILLed ->"
        f"\n  first acknowledged write through nginx: median {statistics.median(to_write):.2f} s,"
        f" max {max(to_write):.2f} s"
        f"\n  every instance ready: median {statistics.median(to_ready):.2f} s,"
        f" max {max(to_ready):.2f} s"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ha", description=__doc__)
    parser.add_argument("--writes", type=int, default=2000, help="writes per latency run")
    parser.add_argument("--rounds", type=int, default=5, help="failover rounds")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="taskstatus-bench-ha-") as tmp:
        price_of_the_guarantee(Path(tmp) / "price", args.writes)
        failovers(Path(tmp) / "failover", args.rounds)


if __name__ == "__main__":
    main()
