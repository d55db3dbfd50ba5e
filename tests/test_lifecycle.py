"""A task's life through the API, on both backends: deletion, tombstones, recreation, retention.

A deletion is a write: the version goes up by one, the answer is the tombstone, and every watcher
(poll, watch, SSE, WebSocket) gets it as a change. Retention runs with short TTLs here
(``FINISHED_TASK_TTL`` of a few seconds, sweeps every 50 ms); waits are on the API's own answers.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from .conftest import (
    Client,
    ClientFactory,
    get_state,
    put,
    wait_for_waiters,
)

FAST_SWEEPS = {"sweep_interval": 0.05}


def is_tombstone(state: dict[str, Any], version: int) -> bool:
    return state == {
        "task": state["task"],
        "status": None,
        "version": version,
        "updated_at": state["updated_at"],
        "progress": None,
        "message": None,
        "deleted": True,
    } and isinstance(state["updated_at"], str)


async def delete(client: Client, task: str, query: str = "") -> tuple[int, dict[str, Any]]:
    response = await client.delete(f"/api/tasks/{task}{query}")
    body: dict[str, Any] = await response.json()
    return response.status, body


async def listed(client: Client) -> list[str]:
    body = await (await client.get("/api/tasks")).json()
    return [state["task"] for state in body["tasks"]]


async def until_deleted(client: Client, task: str, timeout: float = 10.0) -> dict[str, Any]:
    """Hold polls on ``task`` until it reads as deleted; its tombstone."""
    deadline = time.monotonic() + timeout
    state = await get_state(client, task)
    while not state.get("deleted"):
        assert time.monotonic() < deadline, f"{task} was not deleted in {timeout} s: {state}"
        response = await client.get(f"/api/tasks/{task}/poll?since={state['version']}&timeout=5")
        if response.status == 200:
            state = await response.json()
    return state


# --- deletion ---------------------------------------------------------------------------------


async def test_delete_answers_the_tombstone_at_the_next_version_and_get_reads_it(
    client: Client,
) -> None:
    await put(client, "t", status="in_progress", progress=40, message="half")
    await put(client, "t", progress=50)
    status, tombstone = await delete(client, "t")
    assert status == 200
    assert is_tombstone(tombstone, 3)
    response = await client.get("/api/tasks/t")
    assert response.headers["ETag"] == '"3"'
    assert await response.json() == tombstone
    assert await (await client.get("/api/tasks/t/history")).json() == {"task": "t", "history": []}


async def test_deleted_tasks_leave_the_listing_and_watch_snapshots_but_not_the_changes(
    client: Client,
) -> None:
    await put(client, "stay", status="pending")
    await put(client, "go", status="completed")
    snapshot = await (await client.get("/api/watch")).json()
    _, tombstone = await delete(client, "go")
    assert await listed(client) == ["stay"]
    fresh = await (await client.get("/api/watch")).json()
    assert [state["task"] for state in fresh["tasks"]] == ["stay"] and fresh["reset"]
    changes = await (await client.get(f"/api/watch?since={snapshot['cursor']}")).json()
    assert changes["tasks"] == [tombstone] and not changes["reset"]


async def test_deleting_a_task_never_written_or_already_deleted_is_404_and_changes_nothing(
    client: Client,
) -> None:
    status, body = await delete(client, "ghost")
    assert (status, body["error"]["code"]) == (404, "task_not_found")
    assert (await get_state(client, "ghost"))["version"] == 0
    await put(client, "t", status="completed")
    _, tombstone = await delete(client, "t")
    status, body = await delete(client, "t")
    assert (status, body["error"]["code"]) == (404, "task_not_found")
    assert await get_state(client, "t") == tombstone


async def test_delete_with_expected_version_deletes_only_that_version(client: Client) -> None:
    await put(client, "t", status="in_progress")
    current = await put(client, "t", progress=10)
    status, body = await delete(client, "t", "?expected_version=1")
    assert status == 409
    assert body["error"]["code"] == "version_conflict" and body["current"] == current
    assert await get_state(client, "t") == current
    for bad in (
        "?expected_version=x",
        "?expected_version=-1",
        "?expected_version=1&expected_version=2",
    ):
        status, body = await delete(client, "t", bad)
        assert status == 400, body
    assert await get_state(client, "t") == current
    status, tombstone = await delete(client, "t", "?expected_version=2")
    assert status == 200 and tombstone["version"] == 3


async def test_a_task_written_after_its_deletion_continues_at_v_plus_2_from_a_fresh_state(
    client: Client,
) -> None:
    await put(client, "t", status="failed", progress=70, message="boom")
    await delete(client, "t")
    response = await client.put("/api/tasks/t", json={"message": "again", "expected_version": 0})
    assert response.status == 409  # the tombstone's version is the current one
    reborn = await put(client, "t", message="again", expected_version=2)
    assert (reborn["version"], reborn["status"], reborn["progress"]) == (3, "pending", None)
    assert "deleted" not in reborn
    history = await (await client.get("/api/tasks/t/history")).json()
    assert [entry["version"] for entry in history["history"]] == [3]
    assert await listed(client) == ["t"]


async def test_the_seed_endpoint_recreates_the_deleted_default_task(client: Client) -> None:
    await client.post("/api/update-status", json={"status": "in_progress"})
    _, tombstone = await delete(client, "default")
    assert await (await client.get("/api/status")).json() == tombstone
    response = await client.post("/api/update-status", json={"status": "completed"})
    assert response.status == 200
    assert (await response.json())["version"] == 3


async def test_max_tasks_counts_live_tasks_so_a_deletion_frees_room(
    make_client: ClientFactory,
) -> None:
    client = await make_client(max_tasks=2)
    await put(client, "a", status="completed")
    await put(client, "b", status="completed")
    response = await client.put("/api/tasks/c", json={"status": "pending"})
    assert response.status == 507
    await delete(client, "a")
    assert (await put(client, "c", status="pending"))["version"] == 1
    response = await client.put("/api/tasks/a", json={"status": "pending"})  # recreating counts
    assert response.status == 507
    await delete(client, "b")
    assert (await put(client, "a", status="pending"))["version"] == 3


# --- every watcher sees it --------------------------------------------------------------------


async def test_held_polls_get_the_tombstone_and_older_ones_get_it_at_once(client: Client) -> None:
    await put(client, "t", status="in_progress")
    held = [asyncio.create_task(client.get("/api/tasks/t/poll?since=1&timeout=20"))]
    held.append(
        asyncio.create_task(
            client.get("/api/tasks/t", headers={"If-None-Match": '"1"', "Prefer": "wait=20"})
        )
    )
    await wait_for_waiters(client, 2)
    _, tombstone = await delete(client, "t")
    for response in await asyncio.gather(*held):
        assert response.status == 200
        assert await response.json() == tombstone
    behind = await client.get("/api/tasks/t/poll?since=1&timeout=20")
    assert await behind.json() == tombstone


async def test_a_poll_at_the_tombstones_version_is_held_until_the_task_is_written_again(
    client: Client,
) -> None:
    await put(client, "t", status="completed")
    await delete(client, "t")
    quiet = await client.get("/api/tasks/t/poll?since=2&timeout=1")
    assert quiet.status == 204
    held = asyncio.create_task(client.get("/api/tasks/t/poll?since=2&timeout=20"))
    await wait_for_waiters(client, 1)
    reborn = await put(client, "t", status="in_progress")
    assert await (await held).json() == reborn


async def test_a_watch_held_on_the_board_gets_the_tombstone_in_its_batch(client: Client) -> None:
    await put(client, "t", status="completed")
    cursor = (await (await client.get("/api/watch")).json())["cursor"]
    held = asyncio.create_task(client.get(f"/api/watch?since={cursor}&timeout=20"))
    await wait_for_waiters(client, 1)
    _, tombstone = await delete(client, "t")
    batch = await (await held).json()
    assert batch["tasks"] == [tombstone] and not batch["reset"]


async def sse_events(client: Client, path: str, count: int) -> list[Any]:
    """The data of the first ``count`` events of an SSE stream."""
    events: list[Any] = []
    async with client.get(path) as response:
        assert response.status == 200
        async with asyncio.timeout(10):
            while len(events) < count:
                line = (await response.content.readline()).decode()
                if line.startswith("data: "):
                    events.append(json.loads(line.removeprefix("data: ")))
    return events


async def test_sse_streams_of_the_task_and_the_board_deliver_the_tombstone(client: Client) -> None:
    await put(client, "t", status="completed")
    task_stream = asyncio.create_task(sse_events(client, "/api/tasks/t/events?since=1", 2))
    board_stream = asyncio.create_task(sse_events(client, "/api/events", 2))
    await wait_for_waiters(client, 2)
    _, tombstone = await delete(client, "t")
    reborn = await put(client, "t", status="pending")
    assert await task_stream == [tombstone, reborn]
    snapshot, change = await board_stream
    assert [state["task"] for state in snapshot["tasks"]] == ["t"]
    assert change["tasks"] == [tombstone]


async def test_websocket_subscriptions_deliver_the_tombstone(client: Client) -> None:
    await put(client, "t", status="completed")
    async with client.ws_connect("/api/ws") as ws:
        await ws.receive_json(timeout=5)  # hello
        await ws.send_json({"subscribe": {"task": "t", "version": 1}})
        assert await ws.receive_json(timeout=5) == {"subscribed": {"task": "t"}}
        _, tombstone = await delete(client, "t")
        assert await ws.receive_json(timeout=5) == {"state": tombstone}


# --- retention --------------------------------------------------------------------------------


async def test_a_finished_task_expires_as_a_deletion_watchers_see_and_a_running_one_stays(
    make_client: ClientFactory,
) -> None:
    client = await make_client(finished_task_ttl=1, **FAST_SWEEPS)
    await put(client, "running", status="in_progress")
    await put(client, "done", status="in_progress")
    cursor = (await (await client.get("/api/watch")).json())["cursor"]
    finished = await put(client, "done", status="completed")
    tombstone = await until_deleted(client, "done")
    assert is_tombstone(tombstone, finished["version"] + 1)
    batch = await (await client.get(f"/api/watch?since={cursor}")).json()
    assert batch["tasks"] == [tombstone]  # (a watch gets each task's last change)
    assert await listed(client) == ["running"]
    assert (await get_state(client, "running"))["version"] == 1
    metrics = await (await client.get("/metrics")).text()
    assert "taskstatus_tasks_expired_total 1.0" in metrics


async def test_a_finished_task_written_again_is_not_expired_at_its_old_time(
    make_client: ClientFactory,
) -> None:
    client = await make_client(finished_task_ttl=3, **FAST_SWEEPS)
    await put(client, "again", status="completed")
    await put(client, "marker", status="completed")  # due with "again"'s first time
    # The server's clock: a held poll on a task nobody writes answers 204 after about a second.
    assert (await client.get("/api/tasks/quiet/poll?since=0&timeout=2")).status == 204
    rewritten = await put(client, "again", message="still wanted")
    await until_deleted(client, "marker")
    assert await get_state(client, "again") == rewritten
    tombstone = await until_deleted(client, "again")
    assert tombstone["version"] == rewritten["version"] + 1


async def test_tombstones_go_after_tombstone_ttl_and_the_task_reads_as_never_written(
    make_client: ClientFactory,
) -> None:
    client = await make_client(poll_timeout=1, poll_timeout_max=1, tombstone_ttl=2, **FAST_SWEEPS)
    await put(client, "t", status="completed")
    _, tombstone = await delete(client, "t")
    metric = "taskstatus_tombstones_purged_total 1.0"

    async def purged() -> bool:
        return metric in await (await client.get("/metrics")).text()

    deadline = time.monotonic() + 10
    while not await purged():
        assert time.monotonic() < deadline, "the tombstone was not purged"
        await client.get("/api/tasks/quiet/poll?since=0&timeout=1")  # the server's second
    assert (await get_state(client, "t"))["version"] == 0
    # A poll still at the tombstone's version learns at once that the task is gone.
    response = await client.get(f"/api/tasks/t/poll?since={tombstone['version']}&timeout=1")
    assert (await response.json())["version"] == 0
    assert (await put(client, "t", status="pending"))["version"] == 1


async def test_with_finished_task_ttl_0_finished_tasks_are_kept(
    make_client: ClientFactory,
) -> None:
    client = await make_client(finished_task_ttl=0, **FAST_SWEEPS)
    await put(client, "kept", status="completed")
    # Sweeps run every 50 ms: let a second of them go by, on the server's clock.
    assert (await client.get("/api/tasks/quiet/poll?since=0&timeout=1")).status == 204
    assert (await get_state(client, "kept"))["version"] == 1


async def test_the_metrics_count_deletions_and_live_tasks(make_client: ClientFactory) -> None:
    client = await make_client(stats_interval=0.1)
    await put(client, "a", status="completed")
    await put(client, "b", status="completed")
    await delete(client, "a")

    async def text() -> str:
        return await (await client.get("/metrics")).text()

    deadline = time.monotonic() + 5
    while "taskstatus_tasks 1.0" not in (page := await text()):
        assert time.monotonic() < deadline, page
        await asyncio.sleep(0.05)
    assert "taskstatus_tasks_deleted_total 1.0" in page
    assert 'taskstatus_writes_total{result="ok"} 3.0' in page
