"""WebSocket over real HTTP: aiohttp's client subscribes and unsubscribes, is caught up after it
was away, gets a JSON error for every bad message (and the connection stays up), is pinged and
dropped when silent; on both backends. Then a real process on SIGTERM.

Every receive has a deadline; "subscribed" is the server's word that no change can be missed.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pytest_aiohttp import AiohttpClient

from deploy.cluster import Cluster, Instance, RedisServer, running_cluster
from service.app import create_app
from service.config import Config
from service.keys import BACKEND
from service.ws import MAX_SUBSCRIPTIONS

from .conftest import (
    INSTANCE_ID,
    SECRET,
    Client,
    ClientFactory,
    bearer,
    exits_cleanly,
    hub_of,
    metric,
    put,
    stop_redis,
    token,
    wait_for_waiters,
    wait_until,
)

RECEIVE_DEADLINE = 5.0
Socket = aiohttp.ClientWebSocketResponse


@asynccontextmanager
async def socket(
    client: Client, headers: dict[str, str] | None = None, protocols: tuple[str, ...] = ()
) -> AsyncIterator[Socket]:
    """A connected socket, past the server's hello (which names the instance)."""
    ws = await client.ws_connect("/api/ws", headers=headers, protocols=protocols)
    try:
        assert await receive(ws) == {"hello": {"instance": INSTANCE_ID}}
        yield ws
    finally:
        await ws.close()


async def receive(ws: Socket, timeout: float = RECEIVE_DEADLINE) -> dict[str, Any]:
    message = await ws.receive(timeout=timeout)
    assert message.type is aiohttp.WSMsgType.TEXT, message
    data: dict[str, Any] = json.loads(message.data)
    return data


async def send(ws: Socket, message: Any) -> None:
    await ws.send_str(json.dumps(message))


async def subscribe(ws: Socket, **body: Any) -> list[dict[str, Any]]:
    """Subscribe; the catch-up, if any, and the server's "subscribed" after it."""
    await send(ws, {"subscribe": body})
    received = [await receive(ws)]
    while "subscribed" not in received[-1]:
        received.append(await receive(ws))
    return received


async def expect_quiet(client: Client, ws: Socket) -> None:
    """Nothing arrives: a change to another task, sent to a subscription made last, comes first."""
    probe = f"probe-{time.monotonic_ns()}"
    await subscribe(ws, task=probe, version=0)
    state = await put(client, probe, status="completed")
    assert await receive(ws) == {"state": state}
    await send(ws, {"unsubscribe": {"task": probe}})
    assert await receive(ws) == {"unsubscribed": {"task": probe}}


# --- subscriptions ----------------------------------------------------------------------------


async def test_subscribe_at_the_current_version_then_each_change_arrives_in_order(
    client: Client,
) -> None:
    await put(client, "job", status="pending")
    async with socket(client) as ws:
        assert await subscribe(ws, task="job", version=1) == [{"subscribed": {"task": "job"}}]
        written = [await put(client, "job", progress=p) for p in (10, 20, 30)]
        assert [await receive(ws) for _ in written] == [{"state": s} for s in written]


async def test_subscribe_without_a_version_or_behind_gets_the_current_state_at_once(
    client: Client,
) -> None:
    for progress in (1, 2, 3):
        latest = await put(client, "behind", progress=progress)
    async with socket(client) as ws:
        for version in (None, 1, 7):  # none, behind, ahead (the store was reset)
            body = {"task": "behind"} if version is None else {"task": "behind", "version": version}
            assert await subscribe(ws, **body) == [
                {"state": latest},
                {"subscribed": {"task": "behind"}},
            ]
        await wait_for_waiters(client, 1)  # subscribing again replaced the subscription
        newer = await put(client, "behind", status="completed")
        assert await receive(ws) == {"state": newer}
        await expect_quiet(client, ws)  # once: no earlier subscription sends it again


async def test_unsubscribe_stops_the_changes_of_that_task_only(client: Client) -> None:
    async with socket(client) as ws:
        await subscribe(ws, task="kept", version=0)
        await subscribe(ws, task="dropped", version=0)
        await wait_for_waiters(client, 2)
        await send(ws, {"unsubscribe": {"task": "dropped"}})
        assert await receive(ws) == {"unsubscribed": {"task": "dropped"}}
        await wait_for_waiters(client, 1)
        await put(client, "dropped", status="failed")
        kept = await put(client, "kept", status="completed")
        assert await receive(ws) == {"state": kept}  # and nothing of "dropped" before it
        await send(ws, {"unsubscribe": {"task": "never-subscribed"}})  # harmless
        assert await receive(ws) == {"unsubscribed": {"task": "never-subscribed"}}


async def test_board_subscription_sends_a_snapshot_then_each_change(client: Client) -> None:
    first = await put(client, "board-a", status="pending")
    async with socket(client) as ws:
        snapshot, ack = await subscribe(ws, board=True)
        assert ack == {"subscribed": {"board": True}}
        assert snapshot["board"]["reset"] is True and first in snapshot["board"]["tasks"]
        one = await put(client, "board-b", status="in_progress")
        two = await put(client, "board-a", status="completed")
        batches = [(await receive(ws))["board"] for _ in range(2)]
        assert [b["tasks"] for b in batches] == [[one], [two]]
        assert all(b["reset"] is False for b in batches)
        await send(ws, {"unsubscribe": {"board": True}})
        assert await receive(ws) == {"unsubscribed": {"board": True}}
        await wait_for_waiters(client, 0)


async def test_client_that_was_away_is_caught_up_on_its_tasks_and_its_board(
    client: Client,
) -> None:
    async with socket(client) as ws:
        await subscribe(ws, task="away", version=0)
        await subscribe(ws, board=True, tasks=["away", "away-2"])
        state = await put(client, "away", status="in_progress")
        assert await receive(ws) == {"state": state}
        cursor = (await receive(ws))["board"]["cursor"]
    await wait_for_waiters(client, 0)

    await put(client, "away", progress=40)
    latest = await put(client, "away", progress=80)
    other = await put(client, "away-2", status="failed")
    await put(client, "not-on-the-board", status="failed")
    async with socket(client) as ws:
        assert await subscribe(ws, task="away", version=state["version"]) == [
            {"state": latest},
            {"subscribed": {"task": "away"}},
        ]
        catch_up, _ = await subscribe(ws, board=True, cursor=cursor, tasks=["away", "away-2"])
        assert catch_up["board"]["reset"] is False
        assert catch_up["board"]["tasks"] == [latest, other]
        # ... and then it follows: one write, one message per subscription.
        newest = await put(client, "away", status="completed")
        got = [await receive(ws), await receive(ws)]
        assert {"state": newest} in got
        assert any("board" in m and m["board"]["tasks"] == [newest] for m in got)


async def test_board_subscription_at_the_current_cursor_is_quiet_until_a_change(
    client: Client,
) -> None:
    await put(client, "cur", status="pending")
    async with socket(client) as ws:
        snapshot, _ = await subscribe(ws, board=True)
        cursor = snapshot["board"]["cursor"]
        await send(ws, {"unsubscribe": {"board": True}})
        await receive(ws)
        assert await subscribe(ws, board=True, cursor=cursor) == [{"subscribed": {"board": True}}]
        state = await put(client, "cur", status="completed")
        assert (await receive(ws))["board"]["tasks"] == [state]


async def test_one_change_is_serialized_once_for_every_socket_it_reaches(client: Client) -> None:
    hub = hub_of(client)
    async with socket(client) as one, socket(client) as two:
        for ws in (one, two):
            await subscribe(ws, task="fan", version=0)
            await subscribe(ws, board=True, tasks=["fan"])
        before = hub.serializations
        state = await put(client, "fan", status="in_progress")
        for ws in (one, two):
            got = [await receive(ws), await receive(ws)]
            assert [m["state"] for m in got if "state" in m] == [state]
            assert [m["board"]["tasks"] for m in got if "board" in m] == [[state]]
        assert hub.serializations - before == 2


async def test_subscriptions_and_their_deliveries_show_in_the_metrics(client: Client) -> None:
    held = 'taskstatus_held_polls{transport="ws"}'
    delivered = 'taskstatus_notify_delay_seconds_count{transport="ws"}'
    async with socket(client) as ws:
        await subscribe(ws, task="m", version=0)
        await subscribe(ws, board=True)
        assert await metric(client, held) == 2
        state = await put(client, "m", status="completed")
        got = [await receive(ws), await receive(ws)]
        assert {"state": state} in got
        assert await metric(client, delivered) == 2
    await wait_for_waiters(client, 0)
    assert await metric(client, held) == 0


async def test_subscription_while_redis_is_away_gets_an_error_and_works_once_it_is_back(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    try:
        config = Config(instance_id=INSTANCE_ID, redis_url=redis.url, redis_prefix="away:")
        client = await aiohttp_client(create_app(config))
        async with socket(client) as ws:
            await stop_redis(client, redis)
            await send(ws, {"subscribe": {"task": "away"}})
            error = await receive(ws)
            assert error["error"]["code"] == "backend_unavailable" and error["task"] == "away"
            assert hub_of(client).waiting_total == 0
            redis.start()
            await wait_until(lambda: client.app[BACKEND].is_ready(), 15, "the backend ready")
            state = await put(client, "away", status="completed")
            assert await subscribe(ws, task="away") == [
                {"state": state},
                {"subscribed": {"task": "away"}},
            ]
    finally:
        redis.stop()


# --- bad messages -----------------------------------------------------------------------------

BAD_MESSAGES: list[tuple[str, str]] = [
    ("not json", "invalid_json"),
    ("[1, 2]", "invalid_message"),
    ('{"subscribe": {"task": "a"}, "unsubscribe": {"task": "a"}}', "invalid_message"),
    ('{"publish": {"task": "a"}}', "unknown_action"),
    ('{"subscribe": "a"}', "invalid_message"),
    ('{"subscribe": {}}', "invalid_message"),
    ('{"subscribe": {"task": "a", "board": true}}', "invalid_message"),
    ('{"subscribe": {"board": 1}}', "invalid_message"),
    ('{"subscribe": {"task": 7}}', "invalid_task_id"),
    ('{"subscribe": {"task": "-a"}}', "invalid_task_id"),
    ('{"subscribe": {"task": "a", "version": -1}}', "invalid_version"),
    ('{"subscribe": {"task": "a", "version": "3"}}', "invalid_version"),
    ('{"subscribe": {"task": "a", "version": true}}', "invalid_version"),
    ('{"subscribe": {"task": "a", "version": 9007199254740992}}', "invalid_version"),
    ('{"subscribe": {"task": "a", "since": 1}}', "unknown_field"),
    ('{"subscribe": {"board": true, "cursor": 5}}', "invalid_cursor"),
    ('{"subscribe": {"board": true, "cursor": "nope"}}', "invalid_cursor"),
    ('{"subscribe": {"board": true, "tasks": "a,b"}}', "invalid_tasks"),
    ('{"subscribe": {"board": true, "tasks": ["a", "-b"]}}', "invalid_task_id"),
    ("[" * 100_000 + "]" * 100_000, "invalid_json"),
]


async def test_every_bad_message_gets_a_json_error_and_the_connection_stays_up(
    client: Client,
) -> None:
    async with socket(client) as ws:
        for text, code in BAD_MESSAGES:
            if len(text) > 16 * 1024:
                continue  # over the message limit: see the next test
            await ws.send_str(text)
            error = await receive(ws)
            assert error["error"]["code"] == code, (text, error)
            assert error["error"]["message"]
        await ws.send_bytes(b'{"subscribe": {"task": "a"}}')
        assert (await receive(ws))["error"]["code"] == "text_only"
        assert hub_of(client).waiting_total == 0  # nothing was subscribed
        state = await put(client, "still-up", status="pending")
        assert await subscribe(ws, task="still-up") == [
            {"state": state},
            {"subscribed": {"task": "still-up"}},
        ]


async def test_error_about_a_subscription_names_it(client: Client) -> None:
    async with socket(client) as ws:
        await send(ws, {"subscribe": {"task": "named", "version": "x"}})
        error = await receive(ws)
        assert error["task"] == "named" and error["error"]["code"] == "invalid_version"


async def test_message_over_the_size_limit_closes_only_that_connection(client: Client) -> None:
    async with socket(client) as ws:
        await ws.send_str(BAD_MESSAGES[-1][0])
        message = await ws.receive(timeout=RECEIVE_DEADLINE)
        assert message.type is aiohttp.WSMsgType.CLOSE
        assert ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    async with socket(client) as ws:  # the server serves on
        assert await subscribe(ws, task="after", version=0) == [{"subscribed": {"task": "after"}}]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Upgrade": "websocket"},
        {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13"},
        {
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Version": "99",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        },
    ],
)
async def test_get_that_is_not_a_websocket_handshake_is_a_json_400(
    client: Client, headers: dict[str, str]
) -> None:
    response = await client.get("/api/ws", headers=headers)
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "websocket_required"
    assert hub_of(client).waiting_total == 0


# --- limits -----------------------------------------------------------------------------------


async def test_subscriptions_count_against_the_held_poll_cap(make_client: ClientFactory) -> None:
    client = await make_client(max_held_polls=2)
    async with socket(client) as ws:
        await subscribe(ws, task="one", version=0)
        await subscribe(ws, task="two", version=0)
        await send(ws, {"subscribe": {"task": "three"}})
        error = await receive(ws)
        assert error == {
            "error": {"code": "too_many_waiters", "message": error["error"]["message"]},
            "task": "three",
        }
        refused = await client.get("/api/tasks/one/poll?since=0")
        assert refused.status == 503
        # At the cap a new socket is refused before the upgrade.
        with pytest.raises(aiohttp.WSServerHandshakeError) as handshake:
            await client.ws_connect("/api/ws")
        assert handshake.value.status == 503
        # Subscribing again to a task it follows replaces it: no new place needed.
        assert await subscribe(ws, task="one", version=0) == [{"subscribed": {"task": "one"}}]
        await wait_for_waiters(client, 2)
        state = await put(client, "one", status="completed")
        assert await receive(ws) == {"state": state}
        await send(ws, {"unsubscribe": {"task": "two"}})
        assert await receive(ws) == {"unsubscribed": {"task": "two"}}  # no second "one"


async def test_a_connection_follows_at_most_its_maximum_of_subscriptions(client: Client) -> None:
    async with socket(client) as ws:
        for n in range(MAX_SUBSCRIPTIONS):
            await subscribe(ws, task=f"many-{n}", version=0)
        await send(ws, {"subscribe": {"board": True}})
        error = await receive(ws)
        assert error["error"]["code"] == "too_many_subscriptions"
        await wait_for_waiters(client, MAX_SUBSCRIPTIONS)
    await wait_for_waiters(client, 0)  # closing the socket ends every subscription


async def test_permessage_deflate_offered_by_a_client_is_declined(client: Client) -> None:
    """Browsers offer compression; a zlib context per socket costs ~100 KiB for messages of
    ~150 bytes (bench transports), so the server answers without the extension."""
    ws = await client.ws_connect("/api/ws", compress=15)
    try:
        assert ws.compress == 0
        assert await receive(ws) == {"hello": {"instance": INSTANCE_ID}}
    finally:
        await ws.close()


# --- keep-alive -------------------------------------------------------------------------------


async def test_server_pings_and_drops_a_client_that_never_answers(
    make_client: ClientFactory,
) -> None:
    client = await make_client(stream_heartbeat=0.2)
    ws = await client.ws_connect("/api/ws", autoping=False)
    try:
        await send(ws, {"subscribe": {"task": "silent", "version": 0}})
        await wait_for_waiters(client, 1)
        kinds: list[aiohttp.WSMsgType] = []
        while not kinds or kinds[-1] is aiohttp.WSMsgType.TEXT:
            kinds.append((await ws.receive(timeout=2)).type)
        assert kinds[-1] is aiohttp.WSMsgType.PING
        await wait_for_waiters(client, 0, timeout=3)  # no pong: the server gave up on it
        assert (await ws.receive(timeout=2)).type in (
            aiohttp.WSMsgType.CLOSE,
            aiohttp.WSMsgType.CLOSED,
        )
    finally:
        await ws.close()


async def test_a_client_that_answers_pings_stays_connected(make_client: ClientFactory) -> None:
    client = await make_client(stream_heartbeat=0.2)
    ws = await client.ws_connect("/api/ws", autoping=False)
    try:
        await send(ws, {"subscribe": {"task": "chatty", "version": 0}})
        pings = 0
        while pings < 4:  # about a second of pings, each answered at once
            message = await ws.receive(timeout=2)
            if message.type is aiohttp.WSMsgType.PING:
                await ws.pong(message.data)
                pings += 1
            else:
                assert next(iter(json.loads(message.data))) in ("hello", "subscribed")
        assert hub_of(client).waiting_total == 1
        state = await put(client, "chatty", status="completed")
        message = await ws.receive(timeout=2)
        while message.type is aiohttp.WSMsgType.PING:
            await ws.pong(message.data)
            message = await ws.receive(timeout=2)
        assert json.loads(message.data) == {"state": state}
    finally:
        await ws.close()


# --- auth: the socket needs tasks:read; each subscription stays within the token's tasks ----


async def test_socket_needs_a_read_token_and_subscriptions_stay_within_its_tasks(
    make_client: ClientFactory,
) -> None:
    client = await make_client(auth_secret=SECRET)
    for headers, status in (({}, 401), (bearer(token("tasks:write")), 403)):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect("/api/ws", headers=headers)
        assert refused.value.status == status
    async with socket(client, bearer(token(tasks=["job-*"]))) as ws:
        for body in ({"task": "other"}, {"board": True}, {"board": True, "tasks": ["job-1", "x"]}):
            await send(ws, {"subscribe": body})
            error = await receive(ws)
            assert error["error"]["code"] == "task_not_allowed", (body, error)
        assert hub_of(client).waiting_total == 0
        assert (await subscribe(ws, task="job-1"))[-1] == {"subscribed": {"task": "job-1"}}
        snapshot, _ = await subscribe(ws, board=True, tasks=["job-1", "job-2"])
        assert snapshot["board"]["reset"] is True


async def test_browser_offers_its_token_as_a_subprotocol_and_gets_taskstatus_back(
    make_client: ClientFactory,
) -> None:
    client = await make_client(auth_secret=SECRET)
    offered = ("taskstatus", f"bearer.{token(tasks=['job-*'])}")
    async with socket(client, protocols=offered) as ws:
        assert ws.protocol == "taskstatus"
        assert (await subscribe(ws, task="job-1"))[-1] == {"subscribed": {"task": "job-1"}}
        await send(ws, {"subscribe": {"task": "other"}})
        assert (await receive(ws))["error"]["code"] == "task_not_allowed"
    for protocols, status in (
        (("taskstatus",), 401),
        (("taskstatus", "bearer.not-a-jwt"), 401),
        (("taskstatus", f"bearer.{token('tasks:write')}"), 403),
    ):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect("/api/ws", protocols=protocols)
        assert refused.value.status == status
    # Only a WebSocket handshake takes its token from there.
    headers = {"Sec-WebSocket-Protocol": f"taskstatus, bearer.{token()}"}
    assert (await client.get("/api/tasks/job-1", headers=headers)).status == 401


async def test_socket_closes_with_1008_when_its_token_expires(make_client: ClientFactory) -> None:
    client = await make_client(auth_secret=SECRET)
    # Accepted for 2 to 3 s more (whatever the fraction of the current second): time enough to
    # subscribe on a busy machine, and the socket must close by itself soon after.
    expiring = bearer(token(valid_for=2))
    async with socket(client, expiring) as ws:
        await subscribe(ws, task="t", version=0)
        closing = await ws.receive(timeout=3 + RECEIVE_DEADLINE)
        assert closing.type is aiohttp.WSMsgType.CLOSE
        assert ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
        assert closing.extra == "token expired"
    await wait_for_waiters(client, 0)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/api/ws", headers=expiring)
    assert refused.value.status == 401


# --- a real process: SIGTERM ------------------------------------------------------------------


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[Instance]:
    running = Instance(tmp_path, "ws-sigterm")
    running.start()
    yield running
    running.stop()


async def test_sigterm_closes_sockets_with_going_away_at_once_and_the_process_exits(
    instance: Instance,
) -> None:
    async with aiohttp.ClientSession(instance.url) as session:
        sockets = [await session.ws_connect("/api/ws") for _ in range(3)]
        for ws in sockets:
            await subscribe(ws, task="t", version=0)
            await subscribe(ws, board=True)
        sent = time.monotonic()
        instance.send(signal.SIGTERM)
        for ws in sockets:
            message = await ws.receive(timeout=RECEIVE_DEADLINE)
            assert message.type is aiohttp.WSMsgType.CLOSE
            assert ws.close_code == aiohttp.WSCloseCode.GOING_AWAY
        assert time.monotonic() - sent < 2
    await exits_cleanly(instance)


# --- through nginx, in front of three instances on Redis --------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("ws-cluster")) as running:
        yield running


async def test_sockets_through_nginx_follow_writes_made_on_any_instance(cluster: Cluster) -> None:
    task_id = f"n-{uuid.uuid4().hex[:8]}"
    async with aiohttp.ClientSession() as session:
        sockets = [await session.ws_connect(f"{cluster.url}/api/ws") for _ in range(3)]
        try:
            served = {(await receive(ws))["hello"]["instance"] for ws in sockets}
            assert served <= {app.instance_id for app in cluster.instances}
            assert len(served) > 1, f"every socket served by {served}"
            for ws in sockets:
                assert await subscribe(ws, task=task_id, version=0) == [
                    {"subscribed": {"task": task_id}}
                ]
            held = [await held_polls(session, app.url) for app in cluster.instances]
            assert sum(held) == 3, held
            for progress in (10, 20, 30):
                # A plain request beside the upgraded ones, on a kept-alive upstream connection.
                url = f"{cluster.url}/api/tasks/{task_id}"
                async with session.put(url, json={"progress": progress}) as response:
                    assert response.status == 200
                    state = await response.json()
                for ws in sockets:
                    assert await receive(ws, timeout=2) == {"state": state}
        finally:
            for ws in sockets:
                await ws.close()


async def held_polls(session: aiohttp.ClientSession, instance_url: str) -> int:
    async with session.get(f"{instance_url}/healthz") as response:
        polls: int = (await response.json())["waiting"]["polls"]
        return polls


async def test_ping_is_answered_with_its_pong(client: Client) -> None:
    async with socket(client) as ws:
        for payload in (17, "x", {"at": [1, 2]}, None):
            await send(ws, {"ping": payload})
            assert await receive(ws) == {"pong": payload}
