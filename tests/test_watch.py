"""``GET /api/watch``: snapshots, changes after a cursor, held watches, filters and resets."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiohttp import ClientResponse

from service.api import MAX_WATCH_TASKS
from service.keys import BACKEND
from service.model import TaskUpdate

from .conftest import INSTANCE_ID, Client, hub_of, put, wait_for_waiters


async def watch(client: Client, **params: Any) -> ClientResponse:
    return await client.get("/api/watch", params={k: str(v) for k, v in params.items()})


async def watch_json(client: Client, **params: Any) -> dict[str, Any]:
    response = await watch(client, **params)
    assert response.status == 200, await response.text()
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Served-By"] == INSTANCE_ID
    body: dict[str, Any] = await response.json()
    return body


async def cursor_now(client: Client) -> str:
    cursor: str = (await watch_json(client))["cursor"]
    return cursor


def epoch_seq(cursor: str) -> tuple[str, int]:
    epoch, _, seq = cursor.rpartition("-")
    return epoch, int(seq)


def tasks_of(batch: dict[str, Any]) -> list[tuple[str, int]]:
    return [(s["task"], s["version"]) for s in batch["tasks"]]


# --- snapshots --------------------------------------------------------------------------------


async def test_watch_without_a_cursor_answers_a_snapshot_at_once(client: Client) -> None:
    empty = await watch_json(client, timeout=30)
    assert empty["reset"] is True
    assert empty["tasks"] == []
    a = await put(client, "a", status="in_progress")
    b = await put(client, "b", status="failed", message="boom")
    snapshot = await watch_json(client, timeout=30)
    assert snapshot["reset"] is True
    assert snapshot["tasks"] == [a, b]
    assert epoch_seq(snapshot["cursor"])[0] == epoch_seq(empty["cursor"])[0]
    assert epoch_seq(snapshot["cursor"])[1] == epoch_seq(empty["cursor"])[1] + 2


@pytest.mark.parametrize("since", ["", "0"])
async def test_watch_since_empty_or_zero_is_a_snapshot(client: Client, since: str) -> None:
    a = await put(client, "a", status="in_progress")
    snapshot = await watch_json(client, since=since, timeout=30)
    assert (snapshot["reset"], snapshot["tasks"]) == (True, [a])


@pytest.mark.parametrize("since", ["zzzz-5", "zzzz-0", "0123abcd-1"])
async def test_cursor_from_another_epoch_answers_a_snapshot(client: Client, since: str) -> None:
    a = await put(client, "a", status="in_progress")
    started = time.monotonic()
    snapshot = await watch_json(client, since=since, timeout=30)
    assert time.monotonic() - started < 2
    assert (snapshot["reset"], snapshot["tasks"]) == (True, [a])
    assert snapshot["cursor"] == await cursor_now(client)


async def test_cursor_ahead_of_the_store_answers_a_snapshot(client: Client) -> None:
    a = await put(client, "a", status="in_progress")
    epoch, seq = epoch_seq(await cursor_now(client))
    snapshot = await watch_json(client, since=f"{epoch}-{seq + 5}", timeout=30)
    assert (snapshot["reset"], snapshot["tasks"]) == (True, [a])
    assert snapshot["cursor"] == f"{epoch}-{seq}"


# --- changes after a cursor -------------------------------------------------------------------


async def test_watch_behind_by_several_changes_gets_each_task_once_at_its_latest_state(
    client: Client,
) -> None:
    await put(client, "old", status="completed")
    since = await cursor_now(client)
    await put(client, "a", progress=1)
    await put(client, "b", progress=1)
    await put(client, "a", progress=2)
    await put(client, "c", progress=1)
    latest_a = await put(client, "a", progress=3, message="latest")
    batch = await watch_json(client, since=since, timeout=30)
    assert batch["reset"] is False
    assert tasks_of(batch) == [("b", 1), ("c", 1), ("a", 3)]
    assert batch["tasks"][-1] == latest_a
    assert epoch_seq(batch["cursor"])[1] == epoch_seq(since)[1] + 5
    assert batch["cursor"] == await cursor_now(client)


async def test_watch_at_the_current_cursor_holds_then_answers_the_change(client: Client) -> None:
    await put(client, "a", status="in_progress")
    since = await cursor_now(client)
    held = asyncio.create_task(watch(client, since=since, timeout=30))
    await wait_for_waiters(client, 1)
    assert hub_of(client).waiting_watches == 1
    written = await put(client, "a", progress=60)
    response = await asyncio.wait_for(held, timeout=5)
    assert response.status == 200
    batch = await response.json()
    assert batch == {
        "cursor": f"{epoch_seq(since)[0]}-{epoch_seq(since)[1] + 1}",
        "reset": False,
        "tasks": [written],
    }
    assert hub_of(client).waiting_total == 0


async def test_a_task_created_after_the_watch_started_reaches_it(client: Client) -> None:
    since = await cursor_now(client)
    held = asyncio.create_task(watch(client, since=since, timeout=30))
    await wait_for_waiters(client, 1)
    created = await put(client, "brand-new", status="in_progress")
    batch = await (await asyncio.wait_for(held, timeout=5)).json()
    assert (batch["reset"], batch["tasks"]) == (False, [created])


async def test_one_change_wakes_every_watch_with_the_same_answer(client: Client) -> None:
    since = await cursor_now(client)
    held = [asyncio.create_task(watch(client, since=since, timeout=30)) for _ in range(5)]
    await wait_for_waiters(client, 5)
    await put(client, "a", status="completed")
    responses = await asyncio.wait_for(asyncio.gather(*held), timeout=5)
    assert [r.status for r in responses] == [200] * 5
    bodies = [await r.read() for r in responses]
    assert len(set(bodies)) == 1


async def test_watch_answers_204_when_nothing_changes_before_its_timeout(client: Client) -> None:
    await put(client, "a", status="in_progress")
    since = await cursor_now(client)
    started = time.monotonic()
    response = await watch(client, since=since, timeout=1)
    assert response.status == 204
    assert 0.9 <= time.monotonic() - started < 3
    assert response.headers["Cache-Control"] == "no-store"
    assert hub_of(client).waiting_total == 0


async def test_following_the_returned_cursor_sees_every_change_exactly_once(
    client: Client,
) -> None:
    cursor = await cursor_now(client)
    seen: list[tuple[str, int]] = []
    for i in range(5):
        held = asyncio.create_task(watch(client, since=cursor, timeout=30))
        await wait_for_waiters(client, 1)
        await put(client, f"t{i % 2}", progress=i)
        batch = await (await asyncio.wait_for(held, timeout=5)).json()
        cursor = batch["cursor"]
        seen += tasks_of(batch)
    assert seen == [("t0", 1), ("t1", 1), ("t0", 2), ("t1", 2), ("t0", 3)]


# --- filters ----------------------------------------------------------------------------------


async def test_filtered_snapshot_and_changes_show_only_the_named_tasks(client: Client) -> None:
    a = await put(client, "a", status="in_progress")
    await put(client, "b", status="in_progress")
    c = await put(client, "c", status="in_progress")
    snapshot = await watch_json(client, tasks="a,c,never-written")
    assert snapshot["tasks"] == [a, c]
    since = snapshot["cursor"]
    await put(client, "b", progress=1)
    c2 = await put(client, "c", progress=1)
    batch = await watch_json(client, since=since, tasks="a,c", timeout=30)
    assert (batch["reset"], batch["tasks"]) == (False, [c2])


async def test_filtered_watch_is_not_answered_by_other_tasks(client: Client) -> None:
    since = await cursor_now(client)
    held = asyncio.create_task(watch(client, since=since, tasks="a", timeout=30))
    await wait_for_waiters(client, 1)
    for i in range(3):
        await put(client, "b", progress=i)
    assert (await client.get("/api/tasks")).status == 200  # a round trip: the server had its turn
    assert not held.done()
    written = await put(client, "a", status="completed")
    batch = await (await asyncio.wait_for(held, timeout=5)).json()
    assert batch["tasks"] == [written]
    assert batch["cursor"] == await cursor_now(client)


async def test_filtered_watch_behind_on_other_tasks_waits_for_its_own_task(
    client: Client,
) -> None:
    """The cursor is behind only by changes the filter hides: hold, and answer a's change."""
    since = await cursor_now(client)
    await put(client, "b", progress=1)  # before the watch: hidden by the filter
    held = asyncio.create_task(watch(client, since=since, tasks="a", timeout=2))
    await wait_for_waiters(client, 1)
    await put(client, "b", progress=2)  # while held: also hidden
    written = await put(client, "a", status="completed")
    response = await asyncio.wait_for(held, timeout=5)
    assert response.status == 200
    batch = await response.json()
    assert batch["tasks"] == [written], "the watch answered without the change it waits for"


async def test_filtered_watch_gets_a_change_arriving_in_the_same_burst_as_a_hidden_one(
    client: Client,
) -> None:
    """Two changes delivered in one loop step (concurrent writers, a burst from Redis).

    The writes go straight through the app's own backend so both land before the watch runs.
    """
    since = await cursor_now(client)
    held = asyncio.create_task(watch(client, since=since, tasks="a", timeout=2))
    await wait_for_waiters(client, 1)
    backend = client.app[BACKEND]
    await backend.write("b", TaskUpdate(progress=1))  # hidden by the filter
    written = (await backend.write("a", TaskUpdate(status="completed"))).state
    response = await asyncio.wait_for(held, timeout=5)
    assert response.status == 200, "the change to a was lost: the watch timed out"
    assert (await response.json())["tasks"] == [written.to_dict()]


# --- bad parameters ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "since", ["5", "-5", "ZZZZ-1", "abc-", "abc-x", "abc--1", "abc-1.5", "a" * 33 + "-1", "a_b-1"]
)
async def test_malformed_cursor_is_400(client: Client, since: str) -> None:
    response = await watch(client, since=since)
    assert response.status == 400
    assert (await response.json())["error"]["code"] in ("invalid_cursor", "invalid_parameter")


@pytest.mark.parametrize("tasks", ["", "a,", ",a", "a,,b", "-x", "a b", "x" * 65, "a,tâche"])
async def test_malformed_task_filter_is_400(client: Client, tasks: str) -> None:
    response = await watch(client, tasks=tasks)
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "invalid_task_id"


async def test_filter_of_more_than_the_maximum_number_of_tasks_is_400(client: Client) -> None:
    ok = await watch(client, tasks=",".join(f"t{i}" for i in range(MAX_WATCH_TASKS)))
    assert ok.status == 200
    response = await watch(client, tasks=",".join(f"t{i}" for i in range(MAX_WATCH_TASKS + 1)))
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "too_many_tasks"


async def test_filter_of_the_maximum_number_of_longest_ids_gets_a_json_answer(
    client: Client,
) -> None:
    """Every filter the API accepts must fit the server's request line (8190 bytes in aiohttp)."""
    longest = [f"{i:064d}" for i in range(MAX_WATCH_TASKS)]
    await put(client, longest[-1], status="completed")
    response = await watch(client, tasks=",".join(longest))
    assert response.status == 200, await response.text()
    assert response.headers["X-Served-By"] == INSTANCE_ID
    assert [s["task"] for s in (await response.json())["tasks"]] == [longest[-1]]
