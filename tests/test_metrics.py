"""GET /metrics: the Prometheus text a real scrape reads, parsed with prometheus_client's parser.

Every count is read before and after the behaviour it follows, on both backends: a held poll shows
in the gauge, and its answer (a change, a timeout, a client that leaves, a refusal) is counted
once under its outcome; each write under its result; each delivery in the notify delay histogram.
"""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient

from deploy.cluster import RedisServer
from service.app import create_app
from service.config import Config
from service.keys import HUB
from service.looplag import INTERVAL

from .conftest import Client, ClientFactory, put, wait_for_waiters, wait_until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(client: Client) -> Samples:
    """Every sample of one scrape, by name and labels."""
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.content_type == "text/plain"
    samples: Samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no sample {name}{labels}"
    return samples[key]


def polls(samples: Samples, outcome: str, transport: str = "longpoll") -> float:
    return value(samples, "taskstatus_polls_answered_total", transport=transport, outcome=outcome)


def writes(samples: Samples, result: str) -> float:
    return value(samples, "taskstatus_writes_total", result=result)


def held(samples: Samples, transport: str = "longpoll") -> float:
    return value(samples, "taskstatus_held_polls", transport=transport)


def delivered(samples: Samples, transport: str = "longpoll") -> float:
    return value(samples, "taskstatus_notify_delay_seconds_count", transport=transport)


async def until_scraped(client: Client, check: Any, what: str, timeout: float = 5.0) -> Samples:
    """Scrape until ``check(samples)`` holds; fail at the deadline."""
    scraped: list[Samples] = []

    async def holds() -> bool:
        scraped[:] = [await scrape(client)]
        return bool(check(scraped[0]))

    await wait_until(holds, timeout, what, interval=0.05)
    return scraped[0]


# --- polls --------------------------------------------------------------------------------------


async def test_every_transport_is_exported_at_zero_before_its_first_client(client: Client) -> None:
    samples = await scrape(client)
    for transport in ("longpoll", "watch", "dashboard", "sse", "ws"):
        assert held(samples, transport) == 0
    for transport in ("longpoll", "watch", "sse", "ws"):
        assert delivered(samples, transport) == 0


async def test_a_held_poll_shows_as_held_and_its_wake_up_counts_as_changed(client: Client) -> None:
    before = await scrape(client)
    assert held(before) == 0
    poll = asyncio.create_task(client.get("/api/tasks/m1/poll?since=0&timeout=30"))
    await wait_for_waiters(client, 1)
    assert held(await scrape(client)) == 1

    await put(client, "m1", status="in_progress")
    assert (await poll).status == 200
    after = await scrape(client)
    assert held(after) == 0
    assert polls(after, "changed") == polls(before, "changed") + 1
    assert delivered(after) == delivered(before) + 1
    assert polls(after, "timeout") == polls(before, "timeout")


async def test_a_poll_whose_hold_passes_counts_as_timeout(client: Client) -> None:
    before = await scrape(client)
    response = await client.get("/api/tasks/m2/poll?since=0&timeout=1")
    assert response.status == 204
    after = await scrape(client)
    assert polls(after, "timeout") == polls(before, "timeout") + 1
    assert polls(after, "changed") == polls(before, "changed")
    assert delivered(after) == delivered(before), "a timeout delivers nothing"


async def test_a_client_that_leaves_a_held_poll_counts_as_disconnected(client: Client) -> None:
    before = await scrape(client)
    poll = asyncio.create_task(client.get("/api/tasks/m3/poll?since=0&timeout=30"))
    await wait_for_waiters(client, 1)
    poll.cancel()  # the client closes its connection: the server cancels the handler
    with pytest.raises(asyncio.CancelledError):
        await poll
    after = await until_scraped(
        client,
        lambda s: polls(s, "disconnected") == polls(before, "disconnected") + 1,
        "the disconnect to be counted",
    )
    assert held(after) == 0


async def test_refused_polls_count_as_rejected(make_client: ClientFactory) -> None:
    client = await make_client(max_held_polls=1)
    before = await scrape(client)
    first = asyncio.create_task(client.get("/api/tasks/m4/poll?since=0&timeout=30"))
    await wait_for_waiters(client, 1)
    assert (await client.get("/api/tasks/m4/poll?since=0")).status == 503  # the cap
    assert (await client.get("/api/tasks/m4/poll?since=x")).status == 400
    await put(client, "m4", progress=1)
    assert (await first).status == 200
    after = await scrape(client)
    assert polls(after, "rejected") == polls(before, "rejected") + 2
    assert polls(after, "changed") == polls(before, "changed") + 1


async def test_a_watch_counts_under_its_own_transport(client: Client) -> None:
    cursor = (await (await client.get("/api/watch")).json())["cursor"]
    before = await scrape(client)
    watch = asyncio.create_task(client.get(f"/api/watch?since={cursor}&timeout=30"))
    await wait_for_waiters(client, 1)
    assert held(await scrape(client), "watch") == 1
    await put(client, "m5", status="completed")
    assert (await watch).status == 200
    after = await scrape(client)
    assert polls(after, "changed", "watch") == polls(before, "changed", "watch") + 1
    assert delivered(after, "watch") == delivered(before, "watch") + 1
    assert delivered(after) == delivered(before), "no task poll was woken"
    assert held(after, "watch") == 0


async def test_a_conditional_get_that_waits_is_a_long_poll(client: Client) -> None:
    before = await scrape(client)
    headers = {"If-None-Match": '"0"', "Prefer": "wait=1"}
    assert (await client.get("/api/tasks/m6", headers=headers)).status == 304
    assert (await client.get("/api/tasks/m6")).status == 200  # a plain read is no poll
    after = await scrape(client)
    assert polls(after, "timeout") == polls(before, "timeout") + 1
    assert sum(polls(after, o) for o in ("changed", "rejected", "disconnected")) == sum(
        polls(before, o) for o in ("changed", "rejected", "disconnected")
    )


# --- writes -------------------------------------------------------------------------------------


async def test_each_write_is_counted_under_its_result(make_client: ClientFactory) -> None:
    client = await make_client(max_tasks=1)
    before = await scrape(client)
    await put(client, "w1", status="in_progress")
    conflict = await client.put("/api/tasks/w1", json={"progress": 1, "expected_version": 0})
    invalid = await client.put("/api/tasks/w1", json={"status": "no-such-status"})
    limit = await client.put("/api/tasks/w2", json={"progress": 1})
    default = await client.post("/api/update-status", json={"progress": 2})
    assert (conflict.status, invalid.status, limit.status) == (409, 400, 507)
    assert default.status == 507  # "default" would be a second task
    after = await scrape(client)
    growth = {r: writes(after, r) - writes(before, r) for r in ("ok", "conflict", "invalid")}
    assert growth == {"ok": 1, "conflict": 1, "invalid": 1}
    assert writes(after, "limit") == writes(before, "limit") + 2
    assert writes(after, "unavailable") == writes(before, "unavailable")


async def test_a_rate_limited_write_counts_as_limit(make_client: ClientFactory) -> None:
    client = await make_client(write_rate_limit=0.001, write_rate_burst=1)
    before = await scrape(client)
    await put(client, "w3", progress=1)
    assert (await client.put("/api/tasks/w3", json={"progress": 2})).status == 429
    after = await scrape(client)
    assert writes(after, "ok") == writes(before, "ok") + 1
    assert writes(after, "limit") == writes(before, "limit") + 1


# --- delay, store, process ----------------------------------------------------------------------


async def test_notify_delay_is_at_most_the_time_from_the_write_to_the_answer(
    client: Client,
) -> None:
    before = await scrape(client)
    poll = asyncio.create_task(client.get("/api/tasks/d1/poll?since=0&timeout=30"))
    await wait_for_waiters(client, 1)
    started = time.time()
    await put(client, "d1", status="in_progress")
    assert (await poll).status == 200
    elapsed = time.time() - started
    after = await scrape(client)
    assert delivered(after) == delivered(before) + 1
    name = "taskstatus_notify_delay_seconds_sum"
    delay = value(after, name, transport="longpoll") - value(before, name, transport="longpoll")
    # The publish time is updated_at, to the millisecond: at most 1 ms before the write began.
    assert 0 <= delay <= elapsed + 0.001
    buckets = "taskstatus_notify_delay_seconds_bucket"
    one_second = value(after, buckets, transport="longpoll", le="1.0")
    assert one_second == delivered(after), "a delivery on one instance takes well under 1 s"


def lag_count(samples: Samples, at_most: str = "+Inf") -> float:
    """Lags observed so far (of at most ``at_most`` seconds: a bucket's bound)."""
    return value(samples, "taskstatus_event_loop_lag_seconds_bucket", le=at_most)


async def test_a_blocked_event_loop_shows_as_lag_and_as_the_max_lag(client: Client) -> None:
    """The server runs in the test's loop: blocking the test blocks it, as a GC pause would."""
    before = await until_scraped(client, lambda s: lag_count(s) > 0, "a first lag observation")
    time.sleep(0.2)  # noqa: ASYNC251 - the pause under test
    after = await until_scraped(
        client,
        lambda s: lag_count(s) - lag_count(s, "0.1") > lag_count(before) - lag_count(before, "0.1"),
        "a lag over 0.1 s to be observed",
    )
    # The monitor's sleep under way when the pause began had at most INTERVAL of it left.
    assert value(after, "taskstatus_event_loop_lag_max_seconds") >= 0.2 - INTERVAL
    assert value(before, "taskstatus_event_loop_lag_max_seconds") < 0.2 - INTERVAL
    assert value(after, "taskstatus_event_loop_lag_seconds_sum") >= value(
        before, "taskstatus_event_loop_lag_seconds_sum"
    ) + (0.2 - INTERVAL)


async def test_tasks_in_the_store_are_counted(client: Client) -> None:
    for task in ("t1", "t2", "t3"):
        await put(client, task, progress=1)
    await until_scraped(  # refreshed by the stats tick, once a second
        client,
        lambda s: s.get(("taskstatus_tasks", frozenset())) == 3,
        "taskstatus_tasks to be 3",
    )


async def test_process_memory_and_open_files_are_exported(client: Client) -> None:
    samples = await scrape(client)
    assert value(samples, "process_resident_memory_bytes") > 10 * 2**20
    assert value(samples, "process_open_fds") >= 3
    assert any(name == "python_info" for name, _ in samples)


async def test_the_collectors_runs_are_counted_by_generation(client: Client) -> None:
    """The scheduled collections show (``runtime.scheduled_gc`` runs them on its clock)."""
    before = value(await scrape(client), "python_gc_collections_total", generation="0")
    gc.collect(0)
    assert value(await scrape(client), "python_gc_collections_total", generation="0") > before


async def test_two_apps_in_one_process_count_apart(make_client: ClientFactory) -> None:
    first, second = await make_client(), await make_client()
    await put(first, "apart", progress=1)
    assert writes(await scrape(first), "ok") == 1
    assert writes(await scrape(second), "ok") == 0


async def test_metrics_need_no_token_and_hold_no_task_id(make_client: ClientFactory) -> None:
    client = await make_client(auth_secret="s" * 32)
    response = await client.get("/metrics")
    assert response.status == 200
    text = await response.text()
    assert "taskstatus_writes_total" in text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert "task" not in sample.labels and "task_id" not in sample.labels


# --- the Redis connection -----------------------------------------------------------------------


@pytest.fixture
async def redis_client(
    aiohttp_client: AiohttpClient, redis_server: RedisServer
) -> AsyncIterator[Client]:
    config = Config(
        instance_id="metrics-redis",
        redis_url=redis_server.url,
        redis_prefix=f"test-{uuid.uuid4().hex}:",
    )
    yield await aiohttp_client(create_app(config))


async def test_a_dropped_subscription_counts_a_reconnect_and_a_redis_error(
    redis_client: Client, redis_server: RedisServer
) -> None:
    before = await scrape(redis_client)
    redis_server.command("CLIENT", "KILL", "TYPE", "pubsub")
    after = await until_scraped(
        redis_client,
        lambda s: (
            value(s, "taskstatus_pubsub_reconnects_total")
            == value(before, "taskstatus_pubsub_reconnects_total") + 1
        ),
        "the reconnect to be counted",
    )
    assert value(after, "taskstatus_redis_errors_total") >= (
        value(before, "taskstatus_redis_errors_total") + 1
    )
    # And the subscription works again: a poll held now is woken by a write.
    poll = asyncio.create_task(redis_client.get("/api/tasks/r1/poll?since=0&timeout=30"))
    await wait_until(lambda: redis_client.app[HUB].waiting_total == 1, what="the held poll")
    await put(redis_client, "r1", progress=5)
    assert (await poll).status == 200


async def test_an_unreachable_redis_counts_errors_and_unavailable_writes(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    config = Config(instance_id="metrics-down", redis_url=redis.url, redis_prefix="down:")
    client = await aiohttp_client(create_app(config))
    try:
        before = await scrape(client)
        redis.kill()
        response = await client.put("/api/tasks/x", json={"progress": 1})
        assert response.status == 503
        after = await scrape(client)
        assert writes(after, "unavailable") == writes(before, "unavailable") + 1
        assert value(after, "taskstatus_redis_errors_total") > value(
            before, "taskstatus_redis_errors_total"
        )
    finally:
        redis.stop()


async def test_metrics_scrape_over_real_http(client: Client) -> None:
    """The same text through a plain HTTP client, as Prometheus fetches it."""
    async with ClientSession() as http, http.get(client.make_url("/metrics")) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        names = {f.name for f in text_string_to_metric_families(await response.text())}
    assert {
        "taskstatus_held_polls",
        "taskstatus_polls_answered",
        "taskstatus_writes",
        "taskstatus_notify_delay_seconds",
        "taskstatus_event_loop_lag_seconds",
        "taskstatus_event_loop_lag_max_seconds",
        "taskstatus_pubsub_reconnects",
        "taskstatus_redis_errors",
        "process_resident_memory_bytes",
        "process_open_fds",
    } <= names
