"""Clients that load a cluster through nginx the way the page and a job runner do, recording
what they were told into a History (history.py); shared by the fault tests (test_faults.py,
test_ha.py).

Clients loop like the page: a 200 moves the version on and polls again at once; a 204 polls again,
after a random part of its Retry-After if it has one; a failed request or a 5xx backs off briefly
(full jitter, at most 1 s) and polls again through nginx. Writers put at a steady pace,
round-robin over the tasks, and never retry: an attempt without a 200 is recorded as
unacknowledged (it may or may not have applied). Every load loop is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from deploy.cluster import Cluster, Instance

from .conftest import wait_until
from .history import Failure, History, Seen, Write

HOLD = 10  # seconds a poll asks to be held
MAX_HOLD = 30  # seconds a quiet poll (on a task nobody writes) asks to be held
LOAD_DEADLINE = 60.0  # seconds after which every client loop ends, whatever happens
BACKOFF_BASE, BACKOFF_CAP = 0.05, 1.0  # seconds, full jitter


def task_ids(count: int) -> list[str]:
    return [f"t{n:03d}" for n in range(count)]


async def until_held(probe: aiohttp.ClientSession, instances: list[Instance], count: int) -> None:
    async def enough() -> bool:
        return await held_polls(probe, instances) >= count

    await wait_until(
        enough, 20, f"{count} polls held on {[app.name for app in instances]}", interval=0.05
    )


async def until_ready(probe: aiohttp.ClientSession, instances: list[Instance]) -> None:
    for app in instances:

        async def up(app: Instance = app) -> bool:
            return await ready(probe, app)

        await wait_until(up, 15, f"{app.name} ready", interval=0.05)


async def held_polls(probe: aiohttp.ClientSession, instances: Iterable[Instance]) -> int:
    """Polls and watches held by the running ``instances`` now, as their /healthz tells."""
    total = 0
    for app in instances:
        if app.running:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with probe.get(f"{app.url}/healthz") as response:
                    waiting = (await response.json())["waiting"]
                    total += waiting["polls"] + waiting["watches"]
    return total


async def ready(probe: aiohttp.ClientSession, app: Instance) -> bool:
    try:
        async with probe.get(f"{app.url}/readyz") as response:
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


@dataclass(frozen=True, slots=True)
class Reply:
    """One answer to a watcher's request (a 204 with Retry-After: a draining instance)."""

    status: int
    served_by: str
    at: float
    retry_after: str


@dataclass
class Load:
    """Clients through nginx, all recording into one history; every loop bounded."""

    base: str
    session: aiohttp.ClientSession
    history: History = field(default_factory=History)
    replies: list[Reply] = field(default_factory=list)
    clients: list[asyncio.Task[None]] = field(default_factory=list)
    ends: float = field(default_factory=lambda: time.monotonic() + LOAD_DEADLINE)

    # --- watchers -------------------------------------------------------------------------------

    def poll_tasks(self, tasks: Iterable[str], per_task: int, hold: int = HOLD) -> None:
        for task in tasks:
            for n in range(per_task):
                client = f"poll-{task}-{n}"
                self.history.follow(client, {task: 0})
                self.clients.append(asyncio.create_task(self._poll_loop(client, task, hold)))

    def watch(self, client: str, tasks: list[str], only: bool) -> None:
        """A watch over ``tasks``: with ``only``, limited to them (tasks=); else unfiltered."""
        self.history.follow(client, dict.fromkeys(tasks, 0))
        query = f"&tasks={','.join(tasks)}" if only else ""
        self.clients.append(asyncio.create_task(self._watch_loop(client, query)))

    async def _poll_loop(self, client: str, task: str, hold: int) -> None:
        version = 0
        async for answer in self._requests(client):
            url = f"{self.base}/api/tasks/{task}/poll?since={version}&timeout={hold}"
            if (state := await answer(url)) is not None:
                version = state["version"]
                self._observe(client, state, answer)

    async def _watch_loop(self, client: str, query: str) -> None:
        cursor = ""
        async for answer in self._requests(client):
            since = f"&since={cursor}" if cursor else ""
            body = await answer(f"{self.base}/api/watch?timeout={HOLD}{since}{query}")
            if body is not None:
                cursor = body["cursor"]
                for state in body["tasks"]:
                    self._observe(client, state, answer, snapshot=body["reset"])

    def _observe(self, client: str, state: dict[str, Any], answer: Answer, **kw: bool) -> None:
        seen = Seen(
            client,
            state["task"],
            state["version"],
            state["message"],
            answer.asked,
            answer.at,
            answer.served_by,
            **kw,
        )
        self.history.observe(seen)

    async def _requests(self, client: str) -> AsyncIterator[Answer]:
        """One Answer per request, pausing between them as the page does; bounded."""
        attempt = 0
        for _ in range(10_000):
            if time.monotonic() > self.ends:
                return
            answer = Answer(self, client)
            yield answer
            if answer.failed:
                attempt += 1
                await asyncio.sleep(random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt)))
                continue
            attempt = 0
            if answer.retry_after:  # a draining instance: come back after a random part of it
                await asyncio.sleep(random.uniform(0, min(float(answer.retry_after), 30)))

    # --- writers --------------------------------------------------------------------------------

    async def write(self, task: str, message: str) -> Write:
        body = {"status": "in_progress", "progress": len(message) % 101, "message": message}
        started, version, outcome = time.monotonic(), None, ""
        try:
            timeout = aiohttp.ClientTimeout(total=10)
            url = f"{self.base}/api/tasks/{task}"
            async with self.session.put(url, json=body, timeout=timeout) as response:
                outcome = str(response.status)
                served_by = response.headers.get("X-Served-By", "nginx")
                if response.status == 200:
                    version = (await response.json())["version"]
                else:
                    await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            outcome, served_by = type(exc).__name__, ""
        write = Write(task, message, started, time.monotonic(), version, outcome)
        self.history.write(write)
        if version is None:
            self.history.fail(Failure(f"writer-{task}", outcome, write.ended, served_by))
        return write

    async def write_steadily(
        self, tasks: list[str], rate: float, limit: int, stop: asyncio.Event | None = None
    ) -> None:
        """``limit`` writes at ``rate`` per second, round-robin over ``tasks``, until ``stop``."""
        started = time.monotonic()
        pending: set[asyncio.Task[Write]] = set()
        for n in range(limit):
            if (stop is not None and stop.is_set()) or time.monotonic() > self.ends:
                break
            await asyncio.sleep(max(0.0, started + n / rate - time.monotonic()))
            write = asyncio.create_task(self.write(tasks[n % len(tasks)], f"w{n}"))
            pending.add(write)
            write.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending)

    # --- the end --------------------------------------------------------------------------------

    async def converge(self, probe: aiohttp.ClientSession, tasks: list[str]) -> dict[str, Any]:
        """Once writing is over: the store's final states, after every watcher has reached them."""
        final = {}
        for task in tasks:
            async with probe.get(f"{self.base}/api/tasks/{task}") as response:
                assert response.status == 200, await response.text()
                final[task] = await response.json()
        versions = {task: state["version"] for task, state in final.items()}

        await wait_until(
            lambda: not self.history.lagging(versions),
            HOLD * 2,
            lambda: f"every watcher current: {self.history.lagging(versions)[:10]}",
            interval=0.05,
        )
        await self.stop()
        return final

    async def stop(self) -> None:
        for client in self.clients:
            client.cancel()
        results = await asyncio.gather(*self.clients, return_exceptions=True)
        crashed = [r for r in results if not isinstance(r, asyncio.CancelledError | None)]
        assert not crashed, f"client loops crashed: {crashed[:3]}"


class Answer:
    """One request of a watcher's loop: call it with the URL; the JSON body of a 200, else None."""

    def __init__(self, load: Load, client: str) -> None:
        self.load, self.client = load, client
        self.asked = self.at = 0.0
        self.served_by = self.retry_after = ""
        self.failed = False

    async def __call__(self, url: str) -> Any:
        self.asked = time.monotonic()
        try:
            timeout = aiohttp.ClientTimeout(total=MAX_HOLD + 10)
            async with self.load.session.get(url, timeout=timeout) as response:
                self.served_by = response.headers.get("X-Served-By", "nginx")
                body = await response.json() if response.status == 200 else await response.read()
                status = response.status
                self.retry_after = response.headers.get("Retry-After", "")
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.at, self.failed = time.monotonic(), True
            self.load.history.fail(Failure(self.client, type(exc).__name__, self.at))
            return None
        self.at = time.monotonic()
        self.load.replies.append(Reply(status, self.served_by, self.at, self.retry_after))
        if status == 200:
            return body
        if status == 204:
            return None
        self.failed, self.retry_after = True, ""
        self.load.history.fail(Failure(self.client, str(status), self.at, self.served_by))
        return None


@contextlib.asynccontextmanager
async def load_on(cluster: Cluster, *, keep_alive: bool = True) -> AsyncIterator[Load]:
    """A Load through nginx on one session: keep-alive (as a browser keeps its connections), or
    one connection per request where nginx is reloaded.

    A reload closes the old workers' idle keep-alive connections. A client that sends a request on
    one just as it closes sees the connection drop before any answer; HTTP clients send such a
    request again on another connection (RFC 9112, 9.3.1; aiohttp does it once, browsers too).
    Under load aiohttp can pick a second pooled connection closed by the same reload, and the
    request fails (7 polls of some 2,000 in one run of the reload test): a property of idle
    keep-alive connections, not of the service or its nginx config. With one connection per
    request, a failure there would be nginx's or the service's.
    """
    connector = aiohttp.TCPConnector(limit=0, force_close=not keep_alive)
    async with aiohttp.ClientSession(connector=connector) as session:
        load = Load(cluster.url, session)
        try:
            yield load
        finally:
            await load.stop()


def errors_logged(cluster: Cluster) -> list[str]:
    """Tracebacks and errors in the instances' logs (warnings, such as a lost subscription, are
    how they report a fault they handle)."""
    lines = "\n".join(app.log_text() for app in cluster.instances).splitlines()
    return [line for line in lines if "Traceback" in line or " ERROR " in line]


def nginx_upstream_errors(cluster: Cluster) -> list[str]:
    """nginx's log lines about an instance failing a request (refused, reset, cut short)."""
    return [line for line in cluster.nginx.log_text().splitlines() if "upstream" in line]


@contextlib.asynccontextmanager
async def probe_session() -> AsyncIterator[aiohttp.ClientSession]:
    """For a test's own questions (health, final states): one connection per request."""
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        yield session
