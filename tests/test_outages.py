"""Failure paths of a real ``python -m service`` process that no load test reaches: Redis hung
(SIGSTOP, not killed: its port still accepts connections, nothing answers), an instance started
while Redis is down, a bug while answering (500), and a flood of malformed HTTP.

Every process is started by ``deploy/cluster.py``; every wait is on a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from deploy.cluster import Instance, RedisServer
from service.backend.redis import COMMAND_TIMEOUT, HEALTH_CHECK_INTERVAL, SOCKET_TIMEOUT
from service.middleware import RETRY_AFTER_SECONDS

from .conftest import wait_until

PREFIX = "outage:"
# Slack for two busy cores on top of a bound the service sets itself (a process may not be
# scheduled for a while, and the test's own clock starts before the request is sent).
MARGIN = 3.0
# When a hung Redis must be noticed: the silence before the subscriber PINGs, then the time the
# answer may take, each checked once a second (the subscriber waits a second for a message).
NOTICED_WITHIN = HEALTH_CHECK_INTERVAL + 1 + SOCKET_TIMEOUT + 1 + MARGIN


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """One connection per request, each with a deadline far past any bound the tests check."""
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    timeout = aiohttp.ClientTimeout(total=COMMAND_TIMEOUT + 30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        yield session


def instance_on(redis: RedisServer, workdir: Path, name: str, *args: str) -> Instance:
    return Instance(
        workdir, name, redis_url=redis.url, extra_args=["--redis-prefix", PREFIX, *args]
    )


async def status_of(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url) as response:
        await response.read()
        return response.status


async def ready(http: aiohttp.ClientSession, app: Instance) -> bool:
    return await status_of(http, f"{app.url}/readyz") == 200


async def not_ready(http: aiohttp.ClientSession, app: Instance) -> bool:
    return await status_of(http, f"{app.url}/readyz") == 503


async def put(http: aiohttp.ClientSession, app: Instance, task: str, **body: Any) -> Any:
    async with http.put(f"{app.url}/api/tasks/{task}", json=body) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def timed(request: Any) -> tuple[int, str, Any, float]:
    """Status, Retry-After, JSON body and seconds taken of one request (a context manager)."""
    started = time.monotonic()
    async with request as response:
        body = await response.json()
        return (
            response.status,
            response.headers.get("Retry-After", ""),
            body,
            (time.monotonic() - started),
        )


async def _held(http: aiohttp.ClientSession, app: Instance, count: int) -> bool:
    async with http.get(f"{app.url}/healthz") as response:
        return bool((await response.json())["waiting"]["polls"] == count)


def tracebacks(*apps: Instance) -> list[str]:
    lines = "\n".join(app.log_text() for app in apps).splitlines()
    return [line for line in lines if "Traceback" in line or " ERROR " in line]


# --- Redis hung ---------------------------------------------------------------------------------


@pytest.fixture
def hung_redis_cluster(tmp_path: Path) -> Iterator[tuple[RedisServer, Instance, Instance]]:
    """Redis and two instances of its own (the test stops and continues this Redis)."""
    redis = RedisServer(tmp_path / "redis")
    first = instance_on(redis, tmp_path, "hung-1")
    second = instance_on(redis, tmp_path, "hung-2")
    try:
        redis.start()
        first.start()
        second.start()
        yield redis, first, second
    finally:
        redis.send(signal.SIGCONT)  # a stopped process does not act on SIGTERM
        for child in (second, first, redis):
            with contextlib.suppress(Exception):
                child.stop()


async def test_hung_redis_answers_503_in_time_is_noticed_by_the_ping_and_loses_nothing(
    hung_redis_cluster: tuple[RedisServer, Instance, Instance], http: aiohttp.ClientSession
) -> None:
    redis, first, second = hung_redis_cluster
    written = await put(http, first, "t", status="in_progress")
    held = asyncio.create_task(
        timed(http.get(f"{first.url}/api/tasks/t/poll?since={written['version']}&timeout=120"))
    )
    await wait_until(lambda: _held(http, first, 1), 10, "the poll held on hung-1", interval=0.05)

    stopped_at = time.monotonic()
    redis.send(signal.SIGSTOP)
    # Every command meets the timeout: writes, and reads of tasks the instance does not know,
    # more at once than the instance has connections to Redis. Each gets a 503 the page
    # retries after, never a request that hangs.
    requests = [http.put(f"{second.url}/api/tasks/t", json={"progress": 50})]
    requests += [http.get(f"{first.url}/api/tasks/unknown-{n}") for n in range(80)]
    answers = await asyncio.gather(*(timed(request) for request in requests))
    assert {(status, retry) for status, retry, _, _ in answers} == {(503, RETRY_AFTER_SECONDS)}
    assert {body["error"]["code"] for _, _, body, _ in answers} == {"backend_unavailable"}
    slowest = max(took for *_, took in answers)
    assert slowest < COMMAND_TIMEOUT + MARGIN, f"a request took {slowest:.1f} s"

    # The subscription's connection is open but dead: no message, no error. The health
    # check's PING finds it out, and each instance says it is not ready.
    for app in (first, second):
        await wait_until(
            partial(not_ready, http, app),
            NOTICED_WITHIN - (time.monotonic() - stopped_at),
            f"{app.name} to notice the hung Redis",
            interval=0.1,
        )
    assert not held.done(), "a held poll stays held while Redis is away"

    redis.send(signal.SIGCONT)
    for app in (first, second):
        await wait_until(partial(ready, http, app), 15, f"{app.name} ready", interval=0.1)
    # The 503'd write may have been applied once Redis ran again (its command was in Redis'
    # socket): the store says. Either way the held poll gets the store's state, through the
    # subscription or the resync after it, with nothing written since.
    async with http.get(f"{second.url}/api/tasks/t") as response:
        store = await response.json()
    if store["version"] == written["version"]:
        store = await put(http, second, "t", status="completed")
    status, _, body, _ = await asyncio.wait_for(held, 10)
    assert status == 200 and body == store
    after = await put(http, first, "t", progress=100)
    assert (after["version"], after["progress"]) == (store["version"] + 1, 100)
    assert tracebacks(first, second) == []
