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

from deploy.cluster import HOST, Instance, RedisServer
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


# --- Redis down when the instance starts ----------------------------------------------------------


async def test_instance_started_while_redis_is_down_serves_503_not_ready_then_ready_once_it_is_up(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    redis = RedisServer(tmp_path / "redis")  # its port chosen, nothing listening on it yet
    app = instance_on(redis, tmp_path, "early")
    try:
        app.start(ready=False)  # it serves (after waiting a while for the subscription)
        assert await not_ready(http, app)
        status, retry, body, _ = await timed(http.get(f"{app.url}/api/tasks/t"))
        assert (status, retry, body["error"]["code"]) == (
            503,
            RETRY_AFTER_SECONDS,
            "backend_unavailable",
        )
        assert "subscription not live yet" in app.log_text()

        redis.start()
        await wait_until(partial(ready, http, app), 15, "the instance ready", interval=0.1)
        written = await put(http, app, "t", status="completed")
        async with http.get(f"{app.url}/api/tasks/t") as response:
            assert response.status == 200 and await response.json() == written
        assert tracebacks(app) == []
    finally:
        app.stop()
        redis.stop()


# --- a bug while answering ------------------------------------------------------------------------


@pytest.fixture
def redis_and_instance(tmp_path: Path) -> Iterator[tuple[RedisServer, Instance]]:
    redis = RedisServer(tmp_path / "redis")
    app = instance_on(redis, tmp_path, "buggy")
    try:
        redis.start()
        app.start()
        yield redis, app
    finally:
        app.stop()
        redis.stop()


async def test_a_bug_while_answering_is_a_json_500_logged_with_its_traceback_and_the_rest_serves(
    redis_and_instance: tuple[RedisServer, Instance], http: aiohttp.ClientSession
) -> None:
    """A state in the store that is not JSON (another program's bug, a hand edit) is no client
    mistake and no outage: the instance answers 500 in the API's error shape, logs the
    traceback for whoever fixes it, and goes on serving every other task."""
    redis, app = redis_and_instance
    redis.command("HSET", f"{PREFIX}task:broken", "state", "{not json", "version", "1")
    status, retry, body, _ = await timed(http.get(f"{app.url}/api/tasks/broken"))
    assert (status, retry) == (500, "")
    assert body == {"error": {"code": "internal_error", "message": "internal server error"}}
    log = app.log_text()
    assert "unhandled error on GET /api/tasks/broken" in log
    assert "Traceback" in log and "JSONDecodeError" in log
    written = await put(http, app, "fine", status="completed")
    async with http.get(f"{app.url}/api/tasks/fine") as response:
        assert await response.json() == written
    assert await ready(http, app)


# --- malformed HTTP -------------------------------------------------------------------------------

# Requests aiohttp's parser refuses before any handler runs (it answers 400 and closes).
MALFORMED = [
    b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"PUT /api/tasks/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"PUT /api/tasks/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked, x\r\n\r\n",
    b"G\x00ET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /\x7f HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70_000 + b"\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)),  # TLS to a plain port
    b"GET / HTTP/1.1\r\n\x01\x02\x03: y\r\n\r\n",
    b"GET / HTTP/1.1\r\n Host: folded\r\n\r\n",
]


async def send_raw(port: int, data: bytes) -> bytes:
    """Send ``data`` on a connection of its own; what comes back until the server closes."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(data)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        try:
            return await asyncio.wait_for(reader.read(), 10)
        except ConnectionError:
            return b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
async def test_a_flood_of_malformed_http_is_refused_and_logs_no_traceback(
    tmp_path: Path, http: aiohttp.ClientSession, level: str
) -> None:
    """aiohttp logs each request its parser refuses at ERROR with a traceback; the service's log
    filter makes it one DEBUG line (shown only at --log-level DEBUG), so no client can flood the
    log, and the instance goes on serving."""
    app = Instance(tmp_path, f"flooded-{level.lower()}", extra_args=["--log-level", level])
    app.start()
    try:
        rounds = 20
        answers = []
        for _ in range(rounds):
            answers += await asyncio.gather(*(send_raw(app.port, data) for data in MALFORMED))
        # Each refused with a 400 (or, for the oversized header, maybe cut off while sending).
        firsts = {answer.split(b"\r\n", 1)[0] for answer in answers}
        assert firsts <= {b"HTTP/1.0 400 Bad Request", b""}, firsts
        assert len([answer for answer in answers if answer]) >= (len(MALFORMED) - 1) * rounds
        assert await ready(http, app)
        await put(http, app, "after", status="completed")
        app.stop()
        log = app.log_text()
        assert "Traceback" not in log, log[-3000:]
        assert " ERROR " not in log, log[-3000:]
        quiet = log.count("bad request from a client")  # one line each, shown at DEBUG only
        assert quiet == (len(answers) if level == "DEBUG" else 0)
    finally:
        app.stop()
