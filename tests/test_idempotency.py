"""A write is applied at most once: when its reply is lost, and when a client sends it again with
the same ``Idempotency-Key``."""

from __future__ import annotations

import uuid

from pytest_aiohttp import AiohttpClient

from deploy.cluster import RedisServer
from service.app import create_app
from service.config import Config

from .conftest import INSTANCE_ID, get_state, put
from .proxy import ReplyDroppingProxy


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
        lost = await client.put("/api/tasks/once", json={"progress": 2})
        assert proxy.dropped.is_set()
        assert lost.status == 503 and lost.headers["Retry-After"]
        state = await get_state(client, "once")
        assert (state["version"], state["progress"]) == (2, 2)  # applied, and only once
        await client.close()  # its connections go through the proxy: closed before it stops
