"""Task history: ``GET /api/tasks/{id}/history``, the last HISTORY_LENGTH changes, newest first.

Every test runs on both backends; the Redis ones also look at the list the write script keeps, to
see it trimmed in the store and not only in the answer.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from deploy.cluster import RedisServer
from service.app import create_app
from service.config import Config, load_config

from .conftest import INSTANCE_ID, SECRET, Client, ClientFactory, bearer, put, token


async def history(client: Client, task: str, **headers: str) -> list[dict[str, Any]]:
    response = await client.get(f"/api/tasks/{task}/history", headers=headers)
    assert response.status == 200, await response.text()
    assert response.headers["Cache-Control"] == "no-store"
    body = await response.json()
    assert body["task"] == task
    entries: list[dict[str, Any]] = body["history"]
    return entries


def entry_of(state: dict[str, Any], subject: str | None = None) -> dict[str, Any]:
    """The history entry a write that answered ``state`` leaves."""
    fields = ("version", "status", "progress", "message", "updated_at")
    return {**{name: state[name] for name in fields}, "subject": subject}


async def test_history_lists_every_change_newest_first(client: Client) -> None:
    written = [
        await put(client, "build", status="in_progress", progress=10, message="compiling"),
        await put(client, "build", progress=60, message="linking"),
        await put(client, "build", status="completed", progress=None, message=None),
    ]
    assert await history(client, "build") == [entry_of(state) for state in reversed(written)]


async def test_history_of_a_task_never_written_is_empty(client: Client) -> None:
    assert await history(client, "never-written") == []
    await put(client, "other", status="failed")
    assert await history(client, "never-written") == []


async def test_history_keeps_only_the_last_history_length_changes(
    make_client: ClientFactory,
) -> None:
    client = await make_client(history_length=3)
    written = [await put(client, "long", progress=n) for n in range(7)]
    assert await history(client, "long") == [entry_of(state) for state in written[:-4:-1]]
    assert [entry["progress"] for entry in await history(client, "long")] == [6, 5, 4]


async def test_history_length_zero_keeps_no_history(make_client: ClientFactory) -> None:
    client = await make_client(history_length=0)
    await put(client, "quiet", status="in_progress")
    assert await history(client, "quiet") == []


async def test_refused_writes_leave_no_entry(make_client: ClientFactory) -> None:
    client = await make_client(max_tasks=1)
    first = await put(client, "only", status="in_progress")
    conflict = await client.put("/api/tasks/only", json={"progress": 5, "expected_version": 0})
    assert conflict.status == 409
    invalid = await client.put("/api/tasks/only", json={"progress": 500})
    assert invalid.status == 400
    over_the_cap = await client.put("/api/tasks/second", json={"status": "failed"})
    assert over_the_cap.status == 507
    assert await history(client, "only") == [entry_of(first)]
    assert await history(client, "second") == []


async def test_history_and_state_agree_after_fifty_concurrent_writers(client: Client) -> None:
    answers = await asyncio.gather(*(put(client, "busy", progress=n) for n in range(50)))
    entries = await history(client, "busy")
    assert [entry["version"] for entry in entries] == list(range(50, 0, -1))
    by_version = {state["version"]: state for state in answers}
    assert entries == [entry_of(by_version[entry["version"]]) for entry in entries]
    current = await (await client.get("/api/tasks/busy")).json()
    assert entries[0] == entry_of(current)


async def test_history_names_the_subject_of_each_writers_token(
    make_client: ClientFactory,
) -> None:
    client = await make_client(auth_secret=SECRET)

    def as_who(subject: str | None, *scopes: str) -> dict[str, str]:
        return bearer(token(*scopes, subject=subject))

    written: list[dict[str, Any]] = []
    for subject in ("ci-runner", "alice", None):
        response = await client.put(
            "/api/tasks/audited",
            json={"progress": len(written)},
            headers=as_who(subject, "tasks:write"),
        )
        assert response.status == 200
        written.append(await response.json())

    entries = await history(client, "audited", **as_who("reader", "tasks:read"))
    assert [entry["subject"] for entry in entries] == [None, "alice", "ci-runner"]
    assert entries == [
        entry_of(state, subject)
        for state, subject in zip(reversed(written), (None, "alice", "ci-runner"), strict=True)
    ]
    # History is a read like any other: a token needs the read scope, and the task.
    assert (await client.get("/api/tasks/audited/history")).status == 401
    refused = await client.get(
        "/api/tasks/audited/history", headers=as_who("ci-runner", "tasks:write")
    )
    assert refused.status == 403


# --- in Redis: the write script keeps the list -------------------------------------------------


@pytest.fixture
async def redis_store(redis_server: RedisServer) -> AsyncIterator[tuple[Redis, str]]:
    redis = Redis.from_url(redis_server.url)
    yield redis, f"test-{uuid.uuid4().hex}:"
    await redis.aclose()


async def test_redis_list_is_trimmed_by_the_write_itself(
    aiohttp_client: Any, redis_server: RedisServer, redis_store: tuple[Redis, str]
) -> None:
    redis, prefix = redis_store
    config = Config(
        instance_id=INSTANCE_ID, redis_url=redis_server.url, redis_prefix=prefix, history_length=4
    )
    client: Client = await aiohttp_client(create_app(config))
    for n in range(10):
        await put(client, "trimmed", progress=n)
        assert await redis.llen(f"{prefix}history:trimmed") == min(n + 1, 4)
    assert [entry["progress"] for entry in await history(client, "trimmed")] == [9, 8, 7, 6]


async def test_a_shorter_history_length_on_another_instance_reads_fewer_entries(
    aiohttp_client: Any, redis_server: RedisServer, redis_store: tuple[Redis, str]
) -> None:
    _, prefix = redis_store
    settings: dict[str, Any] = {
        "instance_id": INSTANCE_ID,
        "redis_url": redis_server.url,
        "redis_prefix": prefix,
    }
    long: Client = await aiohttp_client(create_app(Config(**settings, history_length=10)))
    short: Client = await aiohttp_client(create_app(Config(**settings, history_length=2)))
    for n in range(5):
        await put(long, "shared", progress=n)
    assert [entry["progress"] for entry in await history(long, "shared")] == [4, 3, 2, 1, 0]
    assert [entry["progress"] for entry in await history(short, "shared")] == [4, 3]


# --- configuration -----------------------------------------------------------------------------


def test_history_length_comes_from_the_environment_or_the_flag() -> None:
    assert load_config([], env={}).history_length == 100
    assert load_config([], env={"HISTORY_LENGTH": "7"}).history_length == 7
    assert load_config(["--history-length", "0"], env={}).history_length == 0
    for bad in ("-1", "10001"):
        with pytest.raises(SystemExit):
            load_config(["--history-length", bad], env={})
