"""The live dashboard: GET /api/cluster/watch on both backends, its stats records in a real Redis,
a real process's graceful stop, and the page in Chromium through nginx on a real cluster, where a
second instance appears and a killed one disappears.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, expect
from pytest_aiohttp import AiohttpClient
from redis.asyncio import Redis

from deploy.cluster import Cluster, Instance, RedisServer, running_cluster
from service.app import create_app
from service.config import Config
from service.dashboard import CLUSTER_WATCH_PATH, DASHBOARD, STALE_TICKS, TTL_TICKS
from tests.browser import browser_fixture, go_live, new_tab, screenshot  # noqa: F401

from .conftest import INSTANCE_ID, Client, ClientFactory, put, wait_for_waiters, wait_until

# The defaults, which every test here runs with.
STATS_INTERVAL = Config().stats_interval
STATS_TTL = TTL_TICKS * STATS_INTERVAL
STALE_AFTER = STALE_TICKS * STATS_INTERVAL
# How long the cluster view may take to show a change: the next tick of the instance that
# answers, plus the tick of the instance whose record changed.
VIEW_DELAY = 2 * STATS_INTERVAL + 1.0


async def view(client: Client, query: str = "") -> dict[str, Any]:
    response = await client.get(f"{CLUSTER_WATCH_PATH}{query}")
    assert response.status == 200, await response.text()
    assert response.headers["Cache-Control"] == "no-store"
    body: dict[str, Any] = await response.json()
    return body


def row(body: dict[str, Any], instance: str) -> dict[str, Any] | None:
    return next((r for r in body["instances"] if r["instance"] == instance), None)


def figures(body: dict[str, Any], instance: str) -> dict[str, Any]:
    found = row(body, instance)
    assert found is not None, f"{instance} not in {body['instances']}"
    return found


async def until_view(
    client: Client,
    check: Callable[[dict[str, Any]], object],
    what: str,
    timeout: float = VIEW_DELAY,
) -> dict[str, Any]:
    """Follow the cluster watch as the page does until ``check(view)`` holds."""
    deadline = time.monotonic() + timeout
    body = await view(client)
    while not check(body):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}; last view: {body}")
        response = await client.get(f"{CLUSTER_WATCH_PATH}?since={body['cursor']}&timeout=5")
        if response.status == 200:
            body = await response.json()
    return body


# --- the long poll -----------------------------------------------------------------------------


async def test_a_snapshot_shows_this_instance_up_with_its_samples(client: Client) -> None:
    body = await view(client)
    assert body["reset"] is True
    assert body["store_reachable"] is True
    me = row(body, INSTANCE_ID)
    assert me is not None and me["state"] == "up" and me["ready"] is True
    assert body["samples"], "at least the sample of startup"
    assert body["cursor"] == body["samples"][-1]["t"]
    assert [s["t"] for s in body["samples"]] == sorted({s["t"] for s in body["samples"]})


async def test_the_watch_is_held_until_the_next_tick_and_brings_only_newer_samples(
    client: Client,
) -> None:
    first = await view(client)
    started = time.monotonic()
    response = await client.get(f"{CLUSTER_WATCH_PATH}?since={first['cursor']}&timeout=10")
    waited = time.monotonic() - started
    assert response.status == 200
    body = await response.json()
    assert body["reset"] is False
    assert body["samples"] and all(s["t"] > first["cursor"] for s in body["samples"])
    assert body["cursor"] == body["samples"][-1]["t"] > first["cursor"]
    assert waited < STATS_INTERVAL + 0.5, f"answered after {waited:.2f} s, not at the next tick"


async def test_a_cursor_ahead_is_held_to_the_timeout_and_a_far_one_resets(client: Client) -> None:
    cursor = (await view(client))["cursor"]
    response = await client.get(f"{CLUSTER_WATCH_PATH}?since={cursor + 4000}&timeout=1")
    assert response.status == 204
    far = await view(client, f"?since={cursor + 60_000}")
    assert far["reset"] is True  # from a clock far from ours: every sample, to start afresh


async def test_malformed_parameters_are_refused(client: Client) -> None:
    for query in ("?since=x", "?since=", "?since=1&since=2", "?timeout=-1"):
        response = await client.get(f"{CLUSTER_WATCH_PATH}{query}")
        assert response.status == 400, query
        assert (await response.json())["error"]["code"] in (
            "invalid_parameter",
            "duplicate_parameter",
        )


async def test_held_polls_writes_and_notify_delay_reach_the_view(client: Client) -> None:
    polls = [
        asyncio.create_task(client.get(f"/api/tasks/v{n}/poll?since=0&timeout=30"))
        for n in range(3)
    ]
    await wait_for_waiters(client, 3)
    body = await until_view(
        client, lambda b: figures(b, INSTANCE_ID)["held"] == 3, "3 held polls in the view"
    )
    assert body["samples"][-1]["held"] == 3
    for n in range(3):
        await put(client, f"v{n}", status="completed")
    assert [(await p).status for p in polls] == [200] * 3
    body = await until_view(
        client,
        lambda b: figures(b, INSTANCE_ID)["held"] == 0 and figures(b, INSTANCE_ID)["notify_p99_ms"],
        "the deliveries in the view",
    )
    me = figures(body, INSTANCE_ID)
    assert 0 < me["notify_p50_ms"] <= me["notify_p99_ms"] < 1000
    # Three writes within the last tick or two: the rate of one of them shows them.
    rates = [s["writes_per_second"] for s in body["samples"]]
    assert max(rates) > 0


async def test_with_no_stats_interval_nothing_is_shared_and_the_view_stays(
    make_client: ClientFactory,
) -> None:
    client = await make_client(stats_interval=0)
    body = await view(client)
    assert [r["instance"] for r in body["instances"]] == [INSTANCE_ID]
    response = await client.get(f"{CLUSTER_WATCH_PATH}?since={body['cursor']}&timeout=2")
    assert response.status == 204, "no tick, no new view"
    page = await client.get("/dashboard")
    assert "STATS_INTERVAL=0" in await page.text()
    with pytest.raises(ValueError, match="STATS_INTERVAL"):
        Config(stats_interval=0.01)


async def test_the_page_and_the_cluster_watch_need_no_token(make_client: ClientFactory) -> None:
    client = await make_client(auth_secret="s" * 32)
    assert (await client.get("/api/tasks/a")).status == 401  # task data does
    assert row(await view(client), INSTANCE_ID) is not None
    page = await client.get("/dashboard")
    assert page.status == 200
    html = await page.text()
    assert '<script type="module" src="/static/dashboard.js">' in html
    assert "/static/main.js" not in html
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]


# --- several instances on one Redis ------------------------------------------------------------


@pytest.fixture
def shared_prefix(redis_server: RedisServer) -> dict[str, Any]:
    return {"redis_url": redis_server.url, "redis_prefix": f"test-{uuid.uuid4().hex}:"}


async def instance(aiohttp_client: AiohttpClient, name: str, settings: dict[str, Any]) -> Client:
    return await aiohttp_client(create_app(Config(instance_id=name, **settings)))


async def test_a_second_instance_appears_and_a_stopped_one_leaves_at_once(
    aiohttp_client: AiohttpClient, shared_prefix: dict[str, Any]
) -> None:
    first = await instance(aiohttp_client, "dash-1", shared_prefix)
    second = await instance(aiohttp_client, "dash-2", shared_prefix)
    body = await until_view(first, lambda b: row(b, "dash-2"), "dash-2 seen by dash-1")
    assert [r["instance"] for r in body["instances"]] == ["dash-1", "dash-2"]
    assert all(r["state"] == "up" for r in body["instances"])

    held = asyncio.create_task(second.get("/api/tasks/x/poll?since=0&timeout=30"))
    await wait_for_waiters(second, 1)
    body = await until_view(
        first, lambda b: figures(b, "dash-2")["held"] == 1, "dash-2's held poll"
    )
    assert body["samples"][-1]["held"] == 1  # the cluster's total
    held.cancel()

    started = time.monotonic()
    await second.close()  # a graceful stop withdraws the record
    await until_view(first, lambda b: row(b, "dash-2") is None, "dash-2 gone", timeout=3.0)
    assert time.monotonic() - started < STATS_TTL, "withdrawn, not left to expire"


async def test_an_instance_that_falls_silent_shows_down_then_disappears(
    aiohttp_client: AiohttpClient, shared_prefix: dict[str, Any], redis_server: RedisServer
) -> None:
    client = await instance(aiohttp_client, "alive", shared_prefix)
    # The one record a killed instance leaves behind: written once, never renewed.
    record = {
        "instance": "silent",
        "ready": True,
        "held": 7,
        "writes_per_second": 0.0,
        "notify_p50_ms": None,
        "notify_p99_ms": None,
    }
    prefix, ttl_ms = shared_prefix["redis_prefix"], round(STATS_TTL * 1000)
    written = time.monotonic()
    expires = round(time.time() * 1000) + ttl_ms
    redis_server.command("SET", f"{prefix}instance:silent", json.dumps(record), "PX", str(ttl_ms))
    redis_server.command("ZADD", f"{prefix}instances", str(expires), "silent")
    body = await until_view(client, lambda b: row(b, "silent"), "the silent instance")
    assert figures(body, "silent")["state"] == "up"
    assert figures(body, "silent")["held"] == 7
    # Silent for STALE_AFTER: its record has at most a tick to live. A tick then shows it down.
    # The instance's own ticks may all fall outside that one last second on a busy machine, so
    # the test runs one itself once the store says the record is there.
    store = Redis.from_url(redis_server.url)
    key = f"{prefix}instance:silent"
    try:
        stale_ms = round((STATS_TTL - STALE_AFTER) * 1000)
        await wait_until(
            lambda: _remaining_at_most(store, key, stale_ms), STALE_AFTER + 1, "a stale record"
        )
        await client.app[DASHBOARD].tick()
    finally:
        await store.aclose()
    body = await view(client)
    assert figures(body, "silent")["state"] == "down", body
    assert time.monotonic() - written >= STALE_AFTER - 0.2
    assert body["samples"][-1]["held"] == 0, "a down instance's figures are not counted"
    assert figures(body, "alive")["state"] == "up"
    await until_view(
        client, lambda b: row(b, "silent") is None, "the silent instance gone", timeout=STATS_TTL
    )
    assert time.monotonic() - written >= STATS_TTL - 0.2, "gone only once its record expired"
    assert row(await view(client), "alive") is not None


async def _equals(value: Awaitable[float], expected: float) -> bool:
    return await value == expected


async def _remaining_at_most(store: Redis, key: str, ms: int) -> bool:
    remaining = await store.pttl(key)
    assert remaining != -2, "the record expired before the test saw it stale"
    return bool(0 <= remaining <= ms)


# --- a real process ------------------------------------------------------------------------------


async def held_dashboards(http: aiohttp.ClientSession, url: str) -> float:
    async with http.get(f"{url}/metrics") as response:
        text = await response.text()
    line = 'taskstatus_held_polls{transport="dashboard"} '
    return next(float(ln.removeprefix(line)) for ln in text.splitlines() if ln.startswith(line))


async def test_sigterm_answers_a_held_dashboard_at_once(tmp_path: Path) -> None:
    service = Instance(tmp_path, "dash-stop")
    service.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{service.url}{CLUSTER_WATCH_PATH}") as first:
                cursor = (await first.json())["cursor"]
            ahead = f"{service.url}{CLUSTER_WATCH_PATH}?since={cursor + 4000}&timeout=50"
            held = asyncio.create_task(http.get(ahead))
            await wait_until(
                lambda: _equals(held_dashboards(http, service.url), 1), 5, "the dashboard poll held"
            )
            started = time.monotonic()
            service.send(signal.SIGTERM)
            response = await asyncio.wait_for(held, 10)
            assert response.status == 204
            assert response.headers["Connection"].lower() == "close"
            assert time.monotonic() - started < 5
        assert await asyncio.to_thread(service.process.wait, 10) == 0  # type: ignore[union-attr]
    finally:
        service.stop()


# --- the page, on a cluster, in Chromium ---------------------------------------------------------

PREFIX = "dashboard:"


@pytest.fixture
def one_instance(tmp_path: Path) -> Iterator[Cluster]:
    with running_cluster(tmp_path / "cluster", instances=1, prefix=PREFIX) as cluster:
        yield cluster


def rows(page: Page) -> Any:
    return page.locator("#instances tr[data-instance]")


async def test_dashboard_shows_a_second_instance_appearing_and_a_killed_one_disappearing(
    browser: Browser, one_instance: Cluster, tmp_path: Path
) -> None:
    page = await new_tab(browser)
    problems: list[str] = []
    page.on("console", lambda m: _note_problem(m, problems))
    page.on("pageerror", lambda error: problems.append(str(error)))
    await go_live(page, f"{one_instance.url}/dashboard")
    await expect(rows(page)).to_have_count(1)
    first = page.locator('#instances tr[data-instance="instance-1"]')
    await expect(first).to_have_attribute("data-state", "up")
    await expect(page.locator("#instance-count")).to_have_attribute("data-count", "1")

    second = Instance(
        tmp_path / "second",
        "instance-2",
        redis_url=one_instance.redis.url,
        extra_args=["--redis-prefix", PREFIX],
    )
    second.start()
    try:
        # Not behind nginx: the page hears of it through the store, via the instance it polls.
        added = page.locator('#instances tr[data-instance="instance-2"]')
        await expect(added).to_have_attribute("data-state", "up", timeout=5_000)
        await expect(rows(page)).to_have_count(2)
        await expect(page.locator("#instance-count")).to_have_attribute("data-count", "2")
        await _write_through(one_instance.url, "dash-page", 3)
        writes_chart = page.locator("#chart-writes")
        await expect(writes_chart).not_to_have_attribute("data-points", "0")
        await expect(page.locator("#chart-held path.chart-line")).to_have_attribute(
            "d", _non_empty_path()
        )
        await screenshot(page, "dashboard-two-instances")

        second.kill()  # no graceful stop: its record is left to expire
        await expect(added).to_have_count(0, timeout=round((STATS_TTL + VIEW_DELAY) * 1000))
        await expect(rows(page)).to_have_count(1)
        await expect(first).to_have_attribute("data-state", "up")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        await screenshot(page, "dashboard-instance-killed")
    finally:
        second.stop()
    assert not problems, problems


def _note_problem(message: ConsoleMessage, problems: list[str]) -> None:
    if message.type == "error":  # a CSP violation or a script error shows here
        problems.append(message.text)


def _non_empty_path() -> re.Pattern[str]:
    return re.compile(r"^M[0-9.]+,[0-9.]+")


async def _write_through(base_url: str, task: str, count: int) -> None:
    def write(n: int) -> None:
        request = urllib.request.Request(
            f"{base_url}/api/tasks/{task}",
            data=json.dumps({"progress": n}).encode(),
            headers={"Content-Type": "application/json"},
            method="PUT",
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200

    for n in range(count):
        await asyncio.to_thread(write, n)
