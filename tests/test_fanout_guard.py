"""Regression guard for the fan-out's cost, counted rather than timed (speed lives in bench/).

One update to a task held by 2,000 waiters on one instance must cost one serialization of the
new state and no Redis command beyond the write itself, and every waiter gets the same bytes.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import aiohttp
from pytest_aiohttp import AiohttpClient
from redis.asyncio import Redis

from deploy.cluster import RedisServer
from service.app import create_app
from service.config import Config
from service.keys import HUB

from .conftest import wait_until

WAITERS = 2000


async def command_calls(redis: Redis) -> Counter[str]:
    stats = await redis.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()})


async def test_one_update_to_2000_waiters_costs_one_serialization_and_no_redis_reads(
    aiohttp_client: AiohttpClient, redis_server: RedisServer
) -> None:
    # No dashboard records (STATS_INTERVAL=0) and no retention sweeps (SWEEP_INTERVAL=0): their
    # once-a-second scripts would show in the counts.
    config = Config(
        redis_url=redis_server.url,
        redis_prefix=f"guard-{uuid.uuid4().hex}:",
        stats_interval=0,
        sweep_interval=0,
    )
    client = await aiohttp_client(create_app(config))
    hub = client.app[HUB]
    url = client.make_url("/api/tasks/fanout/poll?since=1&timeout=30")
    redis = Redis.from_url(redis_server.url)
    connector = aiohttp.TCPConnector(limit=0)
    try:
        # What an update of an existing task to a terminal status costs in Redis with nobody
        # waiting (after a first write that creates it and loads the script).
        for _ in range(2):
            start = await command_calls(redis)
            answer = await client.put("/api/tasks/alone", json={"status": "completed"})
            assert answer.status == 200
            alone = await command_calls(redis) - start
        alone.pop("info", None)
        created = await client.put("/api/tasks/fanout", json={"status": "in_progress"})
        assert (await created.json())["version"] == 1
        before_polls = await command_calls(redis)

        async with aiohttp.ClientSession(connector=connector) as session:

            async def poll() -> tuple[int, bytes]:
                async with session.get(url) as response:
                    return response.status, await response.read()

            polls: list[asyncio.Task[tuple[int, bytes]]] = []
            while len(polls) < WAITERS:  # in batches: the listen backlog is 128 connections
                polls += [asyncio.create_task(poll()) for _ in range(100)]
                held = len(polls)
                await wait_until(lambda: hub.waiting_total == held, 10, "held polls")  # noqa: B023
            # The instance saw the task's version 1 go by on its subscription: polls at that
            # version wait without reading Redis.
            before = await command_calls(redis)
            registering = before - before_polls
            registering.pop("info", None)
            registering.pop("ping", None)
            assert registering == Counter(), f"polls at the known version read Redis: {registering}"
            serialized = hub.serializations

            written = await client.put("/api/tasks/fanout", json={"status": "failed"})
            answers = await asyncio.gather(*polls)
            after = await command_calls(redis)
    finally:
        await redis.aclose()

    assert written.status == 200
    assert {status for status, _ in answers} == {200}
    bodies = {body for _, body in answers}
    assert len(bodies) == 1, "every waiter must receive the same bytes"
    assert bodies.pop() == await written.read()
    assert hub.serializations - serialized == 1
    spent = after - before
    spent.pop("info", None)  # our own INFO calls
    spent.pop("ping", None)  # the subscriber's health check, if it fell in between
    alone.pop("ping", None)
    assert spent == alone, "the fan-out itself must not touch Redis: only the write does"
    assert spent["evalsha"] == 1
