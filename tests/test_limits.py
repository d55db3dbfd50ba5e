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


async def test_holds_are_jittered_apart_and_none_exceeds_the_timeout_asked_for(
    make_client: ClientFactory,
) -> None:
    """Polls sent together for ``timeout=5`` are each held 4.5 to 4.95 s (jitter up to 10 %, at
    least the hub's tick): they come back spread out, not in one instant. Twenty holds within
    0.15 s of each other would be a chance of about 1 in 10^8 with the jitter working, and
    certain without it."""
    client = await make_client()
    asked, count = 5, 20

    async def hold() -> float:
        started = time.monotonic()
        answer = await client.get(f"/api/tasks/jitter/poll?since=0&timeout={asked}")
        assert answer.status == 204
        return time.monotonic() - started

    holds = await asyncio.gather(*(hold() for _ in range(count)))
    # A busy machine only makes a hold look longer, so the lower bound is exact; the upper one
    # leaves it half a second.
    assert min(holds) >= asked * 0.9, holds
    assert max(holds) < asked + 0.5, holds
    assert max(holds) - min(holds) > 0.15, f"holds not spread by the jitter: {sorted(holds)}"
