"""Caps that keep one instance and the store within bounds: held polls, tasks, hold jitter."""

from __future__ import annotations

import asyncio
import time

from .conftest import ClientFactory, get_state, put, wait_for_waiters


async def test_polls_past_the_held_cap_get_503_and_the_held_ones_are_untouched(
    make_client: ClientFactory,
) -> None:
    client = await make_client(max_held_polls=3)
    held = [
        asyncio.create_task(client.get(f"/api/tasks/capped/poll?since=0&timeout={10 + n}"))
        for n in range(3)
    ]
    await wait_for_waiters(client, 3)

    refused = await client.get("/api/tasks/capped/poll?since=0&timeout=10")
    refused_watch = await client.get("/api/watch?since=zz-0&timeout=10")
    assert refused.status == 503 and refused_watch.status == 503
    assert (await refused.json())["error"]["code"] == "too_many_waiters"
    assert refused.headers["Retry-After"] in {"1", "2", "3"}

    written = await put(client, "capped", status="completed")
    answers = await asyncio.gather(*held)
    assert [answer.status for answer in answers] == [200] * 3
    assert [await answer.json() for answer in answers] == [written] * 3
    await wait_for_waiters(client, 0)
    again = await client.get("/api/tasks/capped/poll?since=0&timeout=1")
    assert again.status == 200


async def test_a_write_creating_a_task_past_the_cap_gets_507_and_changes_nothing(
    make_client: ClientFactory,
) -> None:
    client = await make_client(max_tasks=2)
    await put(client, "one", status="in_progress")
    await put(client, "two", status="in_progress")

    refused = await client.put("/api/tasks/three", json={"status": "completed"})
    assert refused.status == 507
    assert (await refused.json())["error"]["code"] == "task_limit_reached"
    assert (await get_state(client, "three"))["version"] == 0
    listed = await (await client.get("/api/tasks")).json()
    assert [state["task"] for state in listed["tasks"]] == ["one", "two"]
    # Existing tasks can still be written.
    assert (await put(client, "one", status="completed"))["version"] == 2


async def test_hold_is_jittered_below_the_timeout_asked_for(make_client: ClientFactory) -> None:
    client = await make_client()
    started = time.monotonic()
    answer = await client.get("/api/tasks/jitter/poll?since=0&timeout=2")
    held = time.monotonic() - started
    assert answer.status == 204
    assert 1.75 <= held <= 2.1, f"held {held:.2f} s for timeout=2 (jitter is at most 10 %)"
