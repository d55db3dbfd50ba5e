"""A write is applied at most once: when its reply is lost, and when a client sends it again with
the same ``Idempotency-Key``."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from pytest_aiohttp import AiohttpClient

from deploy.cluster import RedisServer
from service.app import create_app
from service.config import Config

from .conftest import INSTANCE_ID, Client, get_state, put
from .proxy import ReplyDroppingProxy

KEY = '"8e03978e-40d5-43e8-bc93-6894a57f9324"'


async def put_with_key(client: Client, task: str, key: str, **body: object) -> tuple[int, Any]:
    response = await client.put(f"/api/tasks/{task}", json=body, headers={"Idempotency-Key": key})
    return response.status, await response.json()


async def test_a_write_repeated_with_its_idempotency_key_is_applied_once_and_answered_alike(
    client: Client,
) -> None:
    first = await put_with_key(client, "job", KEY, status="in_progress", progress=10)
    again = await put_with_key(client, "job", KEY, status="in_progress", progress=10)
    assert first == again and first[0] == 200
    assert (await get_state(client, "job"))["version"] == 1
    # The key bare is the same key; another key is another write.
    assert (
        await put_with_key(client, "job", KEY.strip('"'), status="in_progress", progress=10)
    ) == first
    other = await put_with_key(client, "job", '"another"', status="in_progress", progress=10)
    assert other[0] == 200 and other[1]["version"] == 2


async def test_an_idempotency_key_reused_for_another_request_is_422_and_changes_nothing(
    client: Client,
) -> None:
    assert (await put_with_key(client, "job", KEY, progress=10))[0] == 200
    for task, body in (("job", {"progress": 11}), ("other", {"progress": 10})):
        status, answer = await put_with_key(client, task, KEY, **body)
        assert status == 422 and answer["error"]["code"] == "idempotency_key_reused"
    assert (await get_state(client, "job"))["version"] == 1
    assert (await get_state(client, "other"))["version"] == 0


@pytest.mark.parametrize("key", ['""', "é", "x" * 256, 'a"b', '"a"b"'])
async def test_a_malformed_idempotency_key_is_400_and_changes_nothing(
    client: Client, key: str
) -> None:
    response = await client.put(
        "/api/tasks/job", json={"progress": 1}, headers={"Idempotency-Key": key}
    )
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "invalid_idempotency_key"
    assert (await get_state(client, "job"))["version"] == 0


async def test_a_deletion_repeated_with_its_idempotency_key_answers_the_same_tombstone(
    client: Client,
) -> None:
    await put(client, "job", status="completed")
    headers = {"Idempotency-Key": KEY}
    first = await client.delete("/api/tasks/job", headers=headers)
    again = await client.delete("/api/tasks/job", headers=headers)
    assert first.status == again.status == 200
    assert await first.json() == await again.json()
    assert (await client.delete("/api/tasks/job")).status == 404  # without it: gone already


async def test_a_write_whose_reply_is_lost_is_applied_once_and_answered_503(
    aiohttp_client: AiohttpClient, redis_server: RedisServer
) -> None:
    """The script ran, then the connection broke before its reply: redis-py must not send the
    write again (a second run would skip a version, or answer 409 for a write that happened)."""
    async with ReplyDroppingProxy(redis_server.port).running() as proxy:
        config = Config(
            instance_id=INSTANCE_ID, redis_url=proxy.url, redis_prefix=f"t-{uuid.uuid4().hex}:"
        )
        client = await aiohttp_client(create_app(config))
        await put(client, "once", status="in_progress", progress=1)  # the script is loaded
        proxy.drop_next_script_reply()
        headers = {"Idempotency-Key": KEY}
        lost = await client.put("/api/tasks/once", json={"progress": 2}, headers=headers)
        assert proxy.dropped.is_set()
        assert lost.status == 503 and lost.headers["Retry-After"]
        state = await get_state(client, "once")
        assert (state["version"], state["progress"]) == (2, 2)  # applied, and only once
        # The job runner retries on the 503 with the same key: the write's answer, not a second.
        retried = await client.put("/api/tasks/once", json={"progress": 2}, headers=headers)
        assert retried.status == 200 and (await retried.json()) == state
        assert (await get_state(client, "once"))["version"] == 2
        await client.close()  # its connections go through the proxy: closed before it stops
