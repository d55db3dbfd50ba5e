"""Fixtures for the core service: the real app on a real port (aiohttp's test server), and the
helpers every test module shares, one per purpose (test modules never import from each other):

- ``wait_until`` waits on a condition (e.g. the hub's waiter count), never on a fixed delay;
- ``token`` mints an access token signed with ``SECRET`` (``bearer`` makes it a header);
- ``change`` builds a change as a backend publishes it.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterator
from typing import Any, Protocol

import pytest
from aiohttp import web
from aiohttp.test_utils import BaseTestServer, TestClient, TestServer
from pytest_aiohttp import AiohttpClient

from deploy.cluster import Instance, RedisServer
from service.app import create_app
from service.auth import LEEWAY_SECONDS, mint_token
from service.config import Config
from service.fastpoll import PollRunner
from service.hub import Change, Hub
from service.keys import BACKEND, HUB
from service.model import Cursor, TaskState

INSTANCE_ID = "test-instance-1"
# The one secret the tests sign tokens with: long enough for HS512 too.
SECRET = "test-secret-" + "0123456789abcdef" * 4

Client = TestClient[web.Request, web.Application]


class ClientFactory(Protocol):
    async def __call__(self, **overrides: Any) -> Client: ...


async def wait_until(
    condition: Callable[[], object | Awaitable[object]],
    timeout: float = 5.0,
    what: str | Callable[[], str] = "condition",
    *,
    interval: float = 0.01,
) -> None:
    """Check ``condition()`` (a function, or a coroutine function) until it holds, yielding to the
    loop in between; fail the test after ``timeout`` seconds, saying ``what`` (or what a function
    ``what`` tells then) was waited for."""
    deadline = time.monotonic() + timeout
    while True:
        holds = condition()
        if inspect.isawaitable(holds):
            holds = await holds
        if holds:
            return
        if time.monotonic() > deadline:
            told = what if isinstance(what, str) else what()
            pytest.fail(f"timed out after {timeout} s waiting for {told}")
        await asyncio.sleep(interval)


def token(
    *scopes: str,
    tasks: Collection[str] = (),
    subject: str | None = None,
    ttl: float = 300,
    valid_for: float | None = None,
    audience: str = "taskstatus",
    issuer: str = "",
) -> str:
    """A token signed with ``SECRET`` granting ``scopes`` (default: read), on ``tasks`` only if
    any, by the service's own minter.

    With ``valid_for``, one that the service stops accepting between ``valid_for`` and
    ``valid_for + 1`` seconds from now, whatever the fraction of the current second: its ``exp``
    is a whole second, and the service accepts it for ``LEEWAY_SECONDS`` past that.
    """
    now = None
    if valid_for is not None:
        expires = math.ceil(time.time() + valid_for) - LEEWAY_SECONDS  # accepted until +leeway
        now, ttl = expires - 1, 1
    return mint_token(
        SECRET,
        "HS256",
        scopes=scopes or ("tasks:read",),
        ttl=ttl,
        audience=audience,
        subject=subject,
        tasks=list(tasks),
        issuer=issuer,
        now=now,
    )


def bearer(raw: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {raw}"}


def change(task: str, version: int, seq: int | None = None) -> Change:
    """A change of ``task`` to ``version`` (at ``seq`` in the stream, default the version)."""
    state = TaskState(task=task, status="in_progress", version=version)
    return Change(state, Cursor("e", version if seq is None else seq))


def hub_of(client: Client) -> Hub:
    return client.app[HUB]


async def stop_redis(client: Client, redis: RedisServer) -> None:
    """Stop ``redis``, and wait until the client's instance has noticed (its subscription
    dropped): until then it answers from what it knows, as it should, and not with a 503."""
    redis.stop()
    await wait_until(
        lambda: not client.app[BACKEND].is_ready(), 15, "the instance to notice Redis is gone"
    )


async def wait_for_waiters(client: Client, count: int, timeout: float = 5.0) -> None:
    """Wait until exactly ``count`` polls and watches are held by the hub, each parked: a
    request counts as held from the moment it registers, before it has read the store, and a
    change published in between reaches it another way than the one a test may check."""
    hub = hub_of(client)
    await wait_until(
        lambda: hub.waiting_total == count == hub.parked(),
        timeout,
        f"{count} held and parked requests (now {hub.waiting_total}, {hub.parked()} parked)",
    )


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session; each test gets its own key prefix in it."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


class ServiceTestServer(TestServer):
    """aiohttp's test server on the runner the service runs on (``fastpoll.PollRunner``), so the
    tests see the long polls' fast path as the processes serve it."""

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        return PollRunner(self.app, **kwargs)


@pytest.fixture
def aiohttp_client(aiohttp_client: AiohttpClient) -> AiohttpClient:
    """pytest-aiohttp's ``aiohttp_client``, serving an app with ``ServiceTestServer``."""

    async def serve(
        app: web.Application | BaseTestServer,
        *,
        server_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        if isinstance(app, web.Application):
            app = ServiceTestServer(app, **(server_kwargs or {}))
        return await aiohttp_client(app, **kwargs)

    return serve  # type: ignore[return-value]


@pytest.fixture(params=["memory", "redis"])
def backend_settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Every API test runs on both backends: the behaviour must not depend on the store."""
    if request.param == "memory":
        return {}
    server: RedisServer = request.getfixturevalue("redis_server")
    return {"redis_url": server.url, "redis_prefix": f"test-{uuid.uuid4().hex}:"}


@pytest.fixture
def make_client(aiohttp_client: AiohttpClient, backend_settings: dict[str, Any]) -> ClientFactory:
    """Start the service on 127.0.0.1 with ``Config(**overrides)``; torn down after the test."""

    async def make(**overrides: Any) -> Client:
        config = Config(**{"instance_id": INSTANCE_ID, **backend_settings, **overrides})
        return await aiohttp_client(create_app(config))

    return make


@pytest.fixture
async def client(make_client: ClientFactory) -> Client:
    return await make_client()


async def put(client: Client, task: str, **body: Any) -> dict[str, Any]:
    """Write ``body`` to ``task`` and return the new state; the write must succeed."""
    response = await client.put(f"/api/tasks/{task}", json=body)
    assert response.status == 200, await response.text()
    state: dict[str, Any] = await response.json()
    return state


async def get_state(client: Client, task: str = "default") -> dict[str, Any]:
    response = await client.get(f"/api/tasks/{task}")
    assert response.status == 200, await response.text()
    state: dict[str, Any] = await response.json()
    return state


async def metric(client: Client, name: str) -> float:
    """One sample of the instance's /metrics, e.g. ``taskstatus_held_polls{transport="sse"}``."""
    text = await (await client.get("/metrics")).text()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name)]
    assert len(values) == 1, (name, values)
    return values[0]


async def exits_cleanly(instance: Instance, timeout: float = 5.0) -> None:
    """A signalled service process exits within ``timeout`` with code 0 and no traceback logged."""
    await wait_until(lambda: not instance.running, timeout, "the process to exit", interval=0.05)
    assert instance.stop() == 0
    assert "Traceback" not in instance.log_text()
