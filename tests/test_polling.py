"""Long polls: immediate answers, shared wake-ups, timeouts, no lost wake-up, no leaked waiter.

"Held" is observed through the hub's waiter count, never assumed after a sleep.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import aiohttp
import pytest

from .conftest import INSTANCE_ID, Client, ClientFactory, hub_of, put, wait_for_waiters, wait_until


async def poll(client: Client, last_version: int, timeout: int = 10) -> aiohttp.ClientResponse:
    return await client.get(
        "/api/poll-status", params={"last_version": last_version, "timeout": timeout}
    )


async def poll_task(client: Client, task: str, since: int, timeout: int = 10) -> Any:
    return await client.get(f"/api/tasks/{task}/poll", params={"since": since, "timeout": timeout})


async def still_held(client: Client, *polls: asyncio.Task[Any]) -> bool:
    """True if none of ``polls`` answered, after a full round trip to the server.

    A round trip gives the server's loop every chance to have answered a poll woken before it.
    """
    assert (await client.get("/api/tasks")).status == 200
    return not any(p.done() for p in polls)


# --- immediate answers ------------------------------------------------------------------------


async def test_poll_answers_at_once_when_the_client_is_behind(client: Client) -> None:
    await client.post("/api/update-status", json={"status": "in_progress"})
    latest = await (await client.post("/api/update-status", json={"progress": 50})).json()
    started = time.monotonic()
    for last_version in (0, 1):
        response = await poll(client, last_version, timeout=30)
        assert response.status == 200
        assert await response.json() == latest
        assert response.headers["ETag"] == '"2"'
    assert time.monotonic() - started < 2
    assert hub_of(client).waiting_total == 0


async def test_poll_answers_at_once_when_the_client_is_ahead(client: Client) -> None:
    latest = await (await client.post("/api/update-status", json={"status": "failed"})).json()
    response = await poll(client, 7, timeout=30)
    assert response.status == 200
    assert await response.json() == latest


async def test_task_poll_answers_a_never_written_task_at_once_to_a_client_ahead(
    client: Client,
) -> None:
    response = await poll_task(client, "fresh", 3, timeout=30)
    assert response.status == 200
    assert (await response.json())["version"] == 0


async def test_poll_with_timeout_zero_answers_204_at_once_when_current(client: Client) -> None:
    started = time.monotonic()
    response = await poll(client, 0, timeout=0)
    assert response.status == 204
    assert time.monotonic() - started < 1


# --- held polls -------------------------------------------------------------------------------


async def test_poll_wakes_all_five_waiters_on_one_update(client: Client) -> None:
    polls = [asyncio.create_task(poll(client, 0, timeout=30)) for _ in range(5)]
    await wait_for_waiters(client, 5)
    written = await (await client.post("/api/update-status", json={"status": "completed"})).json()
    responses = await asyncio.wait_for(asyncio.gather(*polls), timeout=5)
    assert [r.status for r in responses] == [200] * 5
    bodies = [await r.json() for r in responses]
    assert bodies == [written] * 5
    assert written["version"] == 1
    for response in responses:
        assert response.headers["ETag"] == '"1"'
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["X-Served-By"] == INSTANCE_ID
    assert hub_of(client).waiting_total == 0


async def test_poll_answers_204_with_an_empty_body_when_its_timeout_passes(client: Client) -> None:
    await client.post("/api/update-status", json={"status": "in_progress"})
    started = time.monotonic()
    status_poll = asyncio.create_task(poll(client, 1, timeout=1))
    task_poll = asyncio.create_task(poll_task(client, "quiet", 0, timeout=1))
    responses = await asyncio.gather(status_poll, task_poll)
    elapsed = time.monotonic() - started
    assert [r.status for r in responses] == [204, 204]
    assert 0.9 <= elapsed < 3
    for response in responses:
        assert await response.read() == b""
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["X-Served-By"] == INSTANCE_ID
    assert hub_of(client).waiting_total == 0


async def test_poll_without_timeout_holds_for_the_configured_default(
    make_client: ClientFactory,
) -> None:
    client = await make_client(poll_timeout=1)
    started = time.monotonic()
    response = await client.get("/api/poll-status", params={"last_version": 0})
    assert response.status == 204
    assert 0.9 <= time.monotonic() - started < 3


async def test_task_poll_wakes_on_its_own_task_only(client: Client) -> None:
    await put(client, "mine", status="in_progress")
    held = asyncio.create_task(poll_task(client, "mine", 1, timeout=30))
    await wait_for_waiters(client, 1)
    await put(client, "other", status="completed")
    await client.post("/api/update-status", json={"status": "completed"})
    assert await still_held(client, held)
    written = await put(client, "mine", progress=90)
    response = await asyncio.wait_for(held, timeout=5)
    assert response.status == 200
    assert await response.json() == written
    assert written["version"] == 2


async def test_poll_wakes_a_waiter_that_started_after_an_earlier_wake(client: Client) -> None:
    """A wake-up is shared, then re-armed: the next round of waiters gets the next change."""
    for version in range(3):
        polls = [asyncio.create_task(poll(client, version)) for _ in range(3)]
        await wait_for_waiters(client, 3)
        await client.post("/api/update-status", json={"progress": version})
        responses = await asyncio.wait_for(asyncio.gather(*polls), timeout=5)
        assert [(await r.json())["version"] for r in responses] == [version + 1] * 3


async def test_no_wake_up_is_lost_with_fifty_pollers_and_five_writers(client: Client) -> None:
    writers, writes_each, pollers = 5, 20, 50
    final = writers * writes_each
    hold = 5  # longer than the whole test should take: a lost wake-up shows up as a 204

    async def poller() -> tuple[list[int], int]:
        seen: list[int] = []
        timeouts = 0
        last = 0
        while last < final:
            response = await poll(client, last, timeout=hold)
            if response.status == 204:
                timeouts += 1
                continue
            assert response.status == 200
            last = (await response.json())["version"]
            seen.append(last)
        return seen, timeouts

    async def writer(n: int) -> list[int]:
        versions = []
        for i in range(writes_each):
            response = await client.post(
                "/api/update-status", json={"progress": i, "message": f"writer {n}"}
            )
            assert response.status == 200
            versions.append((await response.json())["version"])
        return versions

    tasks = [asyncio.create_task(poller()) for _ in range(pollers)]
    await wait_for_waiters(client, pollers)  # every poller holds at version 0 before any write
    started = time.monotonic()
    written = await asyncio.gather(*(writer(n) for n in range(writers)))
    results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=hold * 2)
    elapsed = time.monotonic() - started

    assert sorted(v for versions in written for v in versions) == list(range(1, final + 1))
    for seen, timeouts in results:
        assert seen[-1] == final
        assert all(a < b for a, b in itertools.pairwise(seen)), seen
        assert timeouts == 0, "a poll stayed held although the task had moved past its version"
    assert elapsed < hold
    assert hub_of(client).waiting_total == 0


async def test_healthz_reports_the_held_polls_and_watches(client: Client) -> None:
    held = [
        asyncio.create_task(poll(client, 0)),
        asyncio.create_task(poll_task(client, "t", 0)),
        asyncio.create_task(
            client.get("/api/watch", params={"since": await current_cursor(client)})
        ),
    ]
    await wait_for_waiters(client, 3)
    health = await (await client.get("/healthz")).json()
    assert health["waiting"] == {"polls": 2, "watches": 1}
    assert health["instance"] == INSTANCE_ID
    await client.post("/api/update-status", json={"progress": 1})
    await put(client, "t", progress=1)
    assert [r.status for r in await asyncio.wait_for(asyncio.gather(*held), 5)] == [200] * 3
    health = await (await client.get("/healthz")).json()
    assert health["waiting"] == {"polls": 0, "watches": 0}


# --- disconnects ------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["cancel the requests", "close the session"])
async def test_waiters_return_to_zero_after_clients_disconnect_mid_poll(
    client: Client, how: str
) -> None:
    hub = hub_of(client)
    await put(client, "t", status="in_progress")
    session = aiohttp.ClientSession()
    try:
        paths = (
            ["/api/poll-status?last_version=0&timeout=30"] * 4
            + ["/api/tasks/t/poll?since=1&timeout=30"] * 3
            + [f"/api/watch?since={await current_cursor(client)}&timeout=30"] * 3
        )
        requests = [asyncio.create_task(session.get(client.make_url(path))) for path in paths]
        await wait_for_waiters(client, len(paths))
        assert (hub.waiting_polls, hub.waiting_watches) == (7, 3)
        if how == "cancel the requests":
            for request in requests:
                request.cancel()
        else:
            await session.close()
        outcomes = await asyncio.gather(*requests, return_exceptions=True)
        assert all(isinstance(o, BaseException) for o in outcomes), outcomes
    finally:
        await session.close()
    await wait_until(lambda: hub.waiting_total == 0, what="waiters released after disconnect")
    assert hub.take_disconnected() == len(paths)
    assert hub.watched_tasks() == []
    # The service carries on: a new poll is held and woken as usual.
    held = asyncio.create_task(poll_task(client, "t", 1))
    await wait_for_waiters(client, 1)
    written = await put(client, "t", progress=1)
    assert await (await asyncio.wait_for(held, timeout=5)).json() == written


async def current_cursor(client: Client) -> str:
    cursor: str = (await (await client.get("/api/watch")).json())["cursor"]
    return cursor
