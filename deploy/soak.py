"""`make soak`: the cluster under steady load for a while; memory stays flat and nothing is lost.

Starts the local cluster (redis-server with AOF, three instances, nginx; deploy/cluster.py) in a
temporary folder and, through nginx:

- opens ``--waiters`` long polls (5,000), ``--per-task`` (10) on each task, that loop like the
  page: a 200 moves the version on and polls again, a 204 polls again, an error backs off briefly;
- writes ``--rate`` updates a second (20), round-robin over the tasks, for ``--minutes`` (10);
- every ``--every`` seconds prints the held polls, writes, errors and each instance's RSS;
- then stops writing, waits until every waiter holds its task's final version, closes the waiters
  and waits until every instance's /healthz counts 0 waiting clients.

It prints each instance's RSS (VmRSS from /proc/<pid>/status) idle, once every waiter is held
(start), when writing stops (end) and after the clients left, and exits 1 on any error: a failed
request or a 5xx, a write not acknowledged, a waiter seeing versions out of order or not ending on
the final version, a store that moved less than the writes acknowledged, waiters left behind.

    python -m deploy.soak --minutes 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from .cluster import Cluster, Instance, running_cluster

HOLD = 30  # seconds each poll asks to be held (the service's default)
BATCH = 500  # waiters opened at once while ramping up
MAX_REQUESTS = 100_000  # per waiter: every loop is bounded in count, as well as in time


def rss_kib(app: Instance) -> int:
    """The instance's resident set size (VmRSS), in KiB."""
    assert app.process is not None
    for line in Path(f"/proc/{app.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {app.name}")


@dataclass
class Soak:
    cluster: Cluster
    session: aiohttp.ClientSession
    probe: aiohttp.ClientSession
    ends: float  # no loop runs past this
    errors: Counter[str] = field(default_factory=Counter)
    versions: dict[int, int] = field(default_factory=dict)  # waiter -> newest version seen
    out_of_order: int = 0
    answers: int = 0
    acknowledged: int = 0
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    # --- the clients ----------------------------------------------------------------------------

    async def wait_on(self, waiter: int, task: str) -> None:
        """One page's poll loop on one task."""
        url = f"{self.cluster.url}/api/tasks/{task}/poll"
        self.versions[waiter] = 0
        attempt = 0
        for _ in range(MAX_REQUESTS):
            if self.stopping.is_set() or time.monotonic() > self.ends:
                return
            since, version = self.versions[waiter], 0
            try:
                async with self.session.get(url, params={"since": since, "timeout": HOLD}) as r:
                    status, retry_after = r.status, r.headers.get("Retry-After", "")
                    if status == 200:
                        version = int((await r.json())["version"])
                    else:
                        await r.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                status, retry_after = 0, ""
                self.errors[f"poll {type(exc).__name__}"] += 1
            if status == 200:
                self.answers += 1
                if version <= since:
                    self.out_of_order += 1
                self.versions[waiter] = max(since, version)
            elif status != 204:
                if status:
                    self.errors[f"poll {status}"] += 1
                attempt += 1
                await asyncio.sleep(random.uniform(0, min(1.0, 0.05 * 2**attempt)))
                continue
            attempt = 0
            if retry_after:  # a draining instance: come back after a random part of it
                await asyncio.sleep(random.uniform(0, min(float(retry_after), 30)))

    async def write(self, task: str, n: int) -> None:
        body = {"status": "in_progress", "progress": n % 101, "message": f"update {n}"}
        try:
            async with self.session.put(f"{self.cluster.url}/api/tasks/{task}", json=body) as r:
                await r.read()
                if r.status == 200:
                    self.acknowledged += 1
                else:
                    self.errors[f"write {r.status}"] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.errors[f"write {type(exc).__name__}"] += 1

    async def write_steadily(self, tasks: list[str], rate: float, seconds: float) -> None:
        started = time.monotonic()
        pending: set[asyncio.Task[None]] = set()
        for n in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, started + n / rate - time.monotonic()))
            write = asyncio.create_task(self.write(tasks[n % len(tasks)], n))
            pending.add(write)
            write.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending)

    # --- what the instances tell ----------------------------------------------------------------

    async def waiting(self) -> list[int]:
        """Each instance's waiting clients (polls and watches), from its /healthz."""
        counts = []
        for app in self.cluster.instances:
            async with self.probe.get(f"{app.url}/healthz") as response:
                waiting = (await response.json())["waiting"]
                counts.append(waiting["polls"] + waiting["watches"])
        return counts

    async def until(self, what: str, timeout: float, check: Callable[[], Awaitable[bool]]) -> None:
        deadline = time.monotonic() + timeout
        while not await check():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
            await asyncio.sleep(0.2)

    async def final_versions(self, tasks: list[str]) -> dict[str, int]:
        final = {}
        for task in tasks:
            async with self.probe.get(f"{self.cluster.url}/api/tasks/{task}") as response:
                final[task] = (await response.json())["version"]
        return final


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


async def run(cluster: Cluster, args: argparse.Namespace) -> bool:
    tasks = [f"soak-{n:04d}" for n in range(-(-args.waiters // args.per_task))]
    owner = {w: tasks[w // args.per_task] for w in range(args.waiters)}
    seconds = args.minutes * 60
    rss: dict[str, list[int]] = {app.name: [rss_kib(app)] for app in cluster.instances}
    series: dict[str, list[int]] = {app.name: [] for app in cluster.instances}  # each report
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=HOLD + 30)
    probing = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        aiohttp.ClientSession(connector=probing, timeout=aiohttp.ClientTimeout(total=10)) as probe,
    ):
        soak = Soak(cluster, session, probe, ends=time.monotonic() + seconds + 600)
        clients: list[asyncio.Task[None]] = []
        for first in range(0, args.waiters, BATCH):
            for w in range(first, min(first + BATCH, args.waiters)):
                clients.append(asyncio.create_task(soak.wait_on(w, owner[w])))

            async def ramped(count: int = len(clients)) -> bool:
                return sum(await soak.waiting()) >= count

            await soak.until(f"{len(clients)} waiters held", 60, ramped)
        for app in cluster.instances:
            rss[app.name].append(rss_kib(app))
        print(f"{args.waiters} waiters held on {await soak.waiting()}; writing {args.rate}/s")

        started = time.monotonic()
        writing = asyncio.create_task(soak.write_steadily(tasks, args.rate, seconds))
        while not writing.done():
            await asyncio.wait([writing], timeout=args.every)
            now = {app.name: rss_kib(app) for app in cluster.instances}
            for name, kib in now.items():
                series[name].append(kib)
            line = "  ".join(f"{name} {mib(kib)}" for name, kib in now.items())
            print(
                f"{time.monotonic() - started:6.0f} s: held {await soak.waiting()}, "
                f"{soak.acknowledged} writes, {soak.answers} answers, "
                f"{sum(soak.errors.values())} errors; RSS {line}",
                flush=True,
            )
        for app in cluster.instances:
            rss[app.name].append(rss_kib(app))

        final = await soak.final_versions(tasks)

        async def converged() -> bool:
            return all(soak.versions[w] == final[owner[w]] for w in owner)

        await soak.until("every waiter on its task's final version", HOLD * 2, converged)
        soak.stopping.set()
        for client in clients:
            client.cancel()
        await asyncio.gather(*clients, return_exceptions=True)

        async def left() -> bool:
            return sum(await soak.waiting()) == 0

        await soak.until("0 waiting clients on every instance", 30, left)
        after = await soak.waiting()
        for app in cluster.instances:
            rss[app.name].append(rss_kib(app))

    print(f"\nsoak: {args.waiters} waiters, {args.rate} writes/s, {args.minutes:g} min")
    print("RSS per instance: idle -> start (waiters held) -> end (writes stop) -> clients left")
    for name, (idle, start, end, gone) in rss.items():
        growth = end - start
        print(
            f"  {name}: {mib(idle)} -> {mib(start)} -> {mib(end)} -> {mib(gone)}"
            f"   end - start: {growth / 1024:+.1f} MiB ({growth / start:+.1%})"
        )
        if len(series[name]) > 1:  # the first writes warm the process up; then, the drift
            drift = series[name][-1] - series[name][0]
            print(f"    at each report: {' '.join(mib(k) for k in series[name])}")
            print(f"    since the first report: {drift / 1024:+.1f} MiB")
    moved = sum(final.values())
    print(f"writes acknowledged: {soak.acknowledged}; versions in the store: {moved}")
    print(f"answers to waiters: {soak.answers}; out of order: {soak.out_of_order}")
    print(f"waiting clients after they left: {after}")
    print(f"errors: {sum(soak.errors.values())} {dict(soak.errors) or ''}")
    return not soak.errors and not soak.out_of_order and moved == soak.acknowledged


@contextlib.contextmanager
def workdir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="taskstatus-soak-") as temporary:
        yield Path(temporary)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m deploy.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to write")
    parser.add_argument("--waiters", type=int, default=5000)
    parser.add_argument("--per-task", type=int, default=10, help="waiters on each task")
    parser.add_argument("--rate", type=float, default=20.0, help="writes per second")
    parser.add_argument("--every", type=float, default=60.0, help="seconds between reports")
    parser.add_argument("--workdir", type=Path, help="keep logs and data here (default: temp)")
    args = parser.parse_args()
    with workdir(args.workdir) as folder, running_cluster(folder, durable_redis=True) as cluster:
        ok = outcome("soak", run(cluster, args))
    print("soak passed" if ok else "soak FAILED")
    raise SystemExit(0 if ok else 1)


def outcome(name: str, soak: Coroutine[None, None, bool]) -> bool:
    """Run ``soak``; False, said, if it timed out waiting for something."""
    try:
        return asyncio.run(soak)
    except TimeoutError as exc:
        print(f"{name}: {exc}")
        return False


if __name__ == "__main__":
    main()
