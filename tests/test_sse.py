"""Server-Sent Events over real HTTP: streams read line by line with aiohttp's client, as a load
client or curl would, on both backends; then a real process on SIGTERM, and a cluster through
nginx where a resumed stream may land on another instance.

"Held" is observed through the hub's waiter count; every read has a deadline.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pytest_aiohttp import AiohttpClient

from deploy.cluster import Cluster, Instance, RedisServer, running_cluster
from service.app import create_app
from service.config import Config
from service.keys import BACKEND

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

READ_DEADLINE = 5.0


@dataclass
class Block:
    """One block of a stream (up to a blank line): its fields, and its comment lines."""

    fields: dict[str, str] = field(default_factory=dict)
    comments: list[str] = field(default_factory=list)

    @property
    def is_event(self) -> bool:
        return "data" in self.fields

    @property
    def id(self) -> str:
        return self.fields["id"]

    @property
    def data(self) -> Any:
        return json.loads(self.fields["data"])


class EventReader:
    """Reads an SSE response block by block, as the EventSource algorithm splits it."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def block(self, timeout: float = READ_DEADLINE) -> Block:
        block = Block()
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.response.content.readline()
                if not raw:
                    raise EOFError("the stream ended")
                line = raw.decode().rstrip("\r\n")
                if not line:
                    if block.fields or block.comments:
                        return block
                    continue
                if line.startswith(":"):
                    block.comments.append(line[1:].strip())
                    continue
                name, _, value = line.partition(":")
                block.fields[name] = value.removeprefix(" ")

    async def event(self, timeout: float = READ_DEADLINE) -> Block:
        """The next block with data, skipping heartbeats."""
        deadline = time.monotonic() + timeout
        while True:
            block = await self.block(max(0.0, deadline - time.monotonic()))
            if block.is_event:
                return block

    async def rest(self, timeout: float = READ_DEADLINE) -> list[Block]:
        """Every block up to the end of the stream."""
        blocks = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                blocks.append(await self.block(max(0.0, deadline - time.monotonic())))
            except EOFError:
                return blocks


@asynccontextmanager
async def stream(
    client: Client, path: str, headers: dict[str, str] | None = None
) -> AsyncIterator[EventReader]:
    response = await client.get(path, headers=headers)
    try:
        assert response.status == 200, await response.text()
        yield EventReader(response)
    finally:
        response.close()  # drop the connection, as a network fault would


def versions(blocks: list[Block]) -> list[int]:
    return [block.data["version"] for block in blocks]


# --- a task's stream --------------------------------------------------------------------------


async def test_task_stream_resumed_with_last_event_id_misses_no_version(client: Client) -> None:
    received: list[Block] = []
    written = [await put(client, "job", status="pending")]
    async with stream(client, "/api/tasks/job/events") as events:
        received.append(await events.event())  # the state now
        for progress in (10, 20):
            written.append(await put(client, "job", status="in_progress", progress=progress))
            received.append(await events.event())
    await wait_for_waiters(client, 0)  # the server saw the connection go

    written.append(await put(client, "job", progress=30))  # while the client is away
    last = received[-1].id
    async with stream(client, "/api/tasks/job/events", {"Last-Event-ID": last}) as events:
        received.append(await events.event())  # caught up from the store, at once
        for progress in (40, 50):
            written.append(await put(client, "job", progress=progress))
            received.append(await events.event())

    assert versions(received) == [1, 2, 3, 4, 5, 6]
    assert [block.id for block in received] == ["1", "2", "3", "4", "5", "6"]
    assert [block.data for block in received] == written  # every state exactly as written


async def test_task_stream_resumed_after_several_writes_starts_with_the_current_state(
    client: Client,
) -> None:
    for progress in range(1, 5):
        latest = await put(client, "busy", progress=progress)
    async with stream(client, "/api/tasks/busy/events", {"Last-Event-ID": "1"}) as events:
        first = await events.event()
        assert (first.id, first.data) == ("4", latest)
        newer = await put(client, "busy", progress=90)
        assert (await events.event()).data == newer


async def test_task_stream_at_the_current_version_starts_quiet_and_sends_the_next_change(
    client: Client,
) -> None:
    await put(client, "quiet", status="in_progress")
    async with stream(client, "/api/tasks/quiet/events?since=1") as events:
        opening = await events.block()  # sent at once, so the client knows it is connected
        assert not opening.is_event and opening.comments == ["heartbeat"]
        await wait_for_waiters(client, 1)
        newer = await put(client, "quiet", status="completed")
        block = await events.event()
        assert (block.id, block.data) == ("2", newer)


async def test_task_stream_of_a_task_never_written_starts_at_version_0_and_sees_its_creation(
    client: Client,
) -> None:
    async with stream(client, "/api/tasks/fresh/events") as events:
        first = await events.event()
        assert first.id == "0" and first.data["version"] == 0 and first.data["updated_at"] is None
        created = await put(client, "fresh", status="in_progress")
        assert (await events.event()).data == created


async def test_last_event_id_wins_over_since_and_a_client_ahead_gets_the_current_state(
    client: Client,
) -> None:
    for progress in (1, 2, 3):
        latest = await put(client, "ahead", progress=progress)
    # A reconnect keeps the URL of the first connection: the header says where the client is now.
    headers = {"Last-Event-ID": "3"}
    async with stream(client, "/api/tasks/ahead/events?since=1", headers) as events:
        assert not (await events.block()).is_event
    # A client ahead of the store (it was reset) takes the state as it is now.
    async with stream(client, "/api/tasks/ahead/events", {"Last-Event-ID": "9"}) as events:
        assert (await events.event()).data == latest


async def test_one_change_reaches_every_stream_with_one_serialization(client: Client) -> None:
    hub = hub_of(client)
    async with (
        stream(client, "/api/tasks/shared/events?since=0") as first,
        stream(client, "/api/tasks/shared/events?since=0") as second,
        stream(client, "/api/events?tasks=shared") as board,
    ):
        await board.event()  # its snapshot
        await wait_for_waiters(client, 3)
        before = hub.serializations
        state = await put(client, "shared", status="failed")
        assert (await first.event()).data == state
        assert (await second.event()).data == state
        assert (await board.event()).data["tasks"] == [state]
        assert hub.serializations - before == 2  # one task body, one watch body


async def test_open_streams_and_their_deliveries_show_in_the_metrics(client: Client) -> None:
    held, delays = 'taskstatus_held_polls{transport="sse"}', "taskstatus_notify_delay_seconds"
    async with (
        stream(client, "/api/tasks/m/events?since=0") as task_events,
        stream(client, "/api/events") as board_events,
    ):
        await board_events.event()
        await wait_for_waiters(client, 2)
        assert await metric(client, held) == 2
        await put(client, "m", status="completed")
        await task_events.event()
        await board_events.event()
        # Two deliveries of one change (the catch-ups were no deliveries).
        assert await metric(client, f'{delays}_count{{transport="sse"}}') == 2
    await wait_for_waiters(client, 0)
    assert await metric(client, held) == 0


# --- a board's stream -------------------------------------------------------------------------


async def test_board_stream_resumes_from_its_cursor_after_a_dropped_connection(
    client: Client,
) -> None:
    before = await put(client, "b-one", status="pending")
    async with stream(client, "/api/events") as events:
        snapshot = await events.event()
        assert snapshot.data["reset"] is True and snapshot.data["tasks"] == [before]
        assert snapshot.id == snapshot.data["cursor"]
        one = await put(client, "b-one", status="in_progress")
        two = await put(client, "b-two", status="pending")
        changes = [await events.event(), await events.event()]
    assert [c.data for c in changes] == [
        {"cursor": changes[0].id, "reset": False, "tasks": [one]},
        {"cursor": changes[1].id, "reset": False, "tasks": [two]},
    ]
    await wait_for_waiters(client, 0)

    await put(client, "b-one", progress=50)
    missed_one = await put(client, "b-one", progress=60)
    missed_three = await put(client, "b-three", status="failed")
    headers = {"Last-Event-ID": changes[-1].id}
    async with stream(client, "/api/events", headers) as events:
        catch_up = await events.event()
        assert catch_up.data["reset"] is False
        assert catch_up.data["tasks"] == [missed_one, missed_three]  # each once, latest state
        live = await put(client, "b-two", status="completed")
        following = await events.event()
        assert following.data["tasks"] == [live]
    epoch, seq = catch_up.id.rsplit("-", 1)
    assert following.id == f"{epoch}-{int(seq) + 1}"


async def test_board_stream_with_tasks_shows_only_those_and_resumes_past_the_others(
    client: Client,
) -> None:
    async with stream(client, "/api/events?tasks=mine,also-mine") as events:
        snapshot = await events.event()
        assert snapshot.data["tasks"] == []
        await put(client, "not-mine", status="failed")
        mine = await put(client, "mine", status="in_progress")
        block = await events.event()
        assert block.data["tasks"] == [mine]
    await wait_for_waiters(client, 0)
    await put(client, "not-mine", progress=5)
    headers = {"Last-Event-ID": block.id}
    async with stream(client, "/api/events?tasks=mine,also-mine", headers) as events:
        assert not (await events.block()).is_event  # nothing it shows changed: quiet
        await wait_for_waiters(client, 1)
        await put(client, "not-mine", progress=6)
        also = await put(client, "also-mine", status="pending")
        assert (await events.event()).data["tasks"] == [also]


async def test_board_stream_from_a_cursor_of_another_epoch_starts_with_a_snapshot(
    client: Client,
) -> None:
    state = await put(client, "epoch-task", status="pending")
    async with stream(client, "/api/events", {"Last-Event-ID": "zzzz0000-5"}) as events:
        block = await events.event()
        assert block.data["reset"] is True and state in block.data["tasks"]


# --- the stream itself ------------------------------------------------------------------------


async def test_stream_headers_say_event_stream_unbuffered_and_uncached(client: Client) -> None:
    for path in ("/api/tasks/h/events", "/api/events"):
        async with stream(client, path) as events:
            headers = events.response.headers
            assert headers["Content-Type"] == "text/event-stream"
            assert headers["X-Accel-Buffering"] == "no"
            assert headers["Cache-Control"] == "no-store"
            assert headers["X-Served-By"]


async def test_quiet_stream_sends_heartbeat_comments(make_client: ClientFactory) -> None:
    client = await make_client(stream_heartbeat=0.2)
    started = time.monotonic()
    async with stream(client, "/api/tasks/hb/events?since=0") as events:
        beats = [await events.block(timeout=2) for _ in range(4)]
    assert all(not b.is_event and b.comments == ["heartbeat"] for b in beats)
    assert time.monotonic() - started >= 0.5  # the opening one, then one per interval


@pytest.mark.parametrize(
    ("path", "headers", "code"),
    [
        ("/api/tasks/-bad/events", {}, "invalid_task_id"),
        ("/api/tasks/x/events?since=-1", {}, "invalid_parameter"),
        ("/api/tasks/x/events", {"Last-Event-ID": "seven"}, "invalid_parameter"),
        ("/api/events?since=nope", {}, "invalid_cursor"),
        ("/api/events", {"Last-Event-ID": "not a cursor"}, "invalid_cursor"),
        ("/api/events?tasks=a,,b", {}, "invalid_task_id"),
    ],
)
async def test_malformed_stream_requests_get_a_json_400_and_hold_nothing(
    client: Client, path: str, headers: dict[str, str], code: str
) -> None:
    response = await client.get(path, headers=headers)
    assert response.status == 400
    assert (await response.json())["error"]["code"] == code
    assert hub_of(client).waiting_total == 0


async def test_streams_count_against_the_held_poll_cap(make_client: ClientFactory) -> None:
    client = await make_client(max_held_polls=2)
    async with (
        stream(client, "/api/tasks/cap/events") as task_events,
        stream(client, "/api/events") as board_events,
    ):
        await task_events.event()
        await board_events.event()
        await wait_for_waiters(client, 2)
        for path in ("/api/tasks/cap/events", "/api/events", "/api/tasks/cap/poll?since=0"):
            refused = await client.get(path)
            assert refused.status == 503
            assert (await refused.json())["error"]["code"] == "too_many_waiters"
            assert refused.headers["Retry-After"] in {"1", "2", "3"}
        state = await put(client, "cap", status="completed")  # the held ones are untouched
        assert (await task_events.event()).data == state
    await wait_for_waiters(client, 0)
    assert (await client.get("/api/tasks/cap/poll?since=0")).status == 200


async def test_dropped_streams_release_their_waiters(client: Client) -> None:
    for _ in range(3):
        async with stream(client, "/api/events") as events, stream(client, "/api/tasks/d/events"):
            await events.event()
            await wait_for_waiters(client, 2)
        await wait_for_waiters(client, 0)
    assert hub_of(client).take_disconnected() == 6  # each one cleaned up as a disconnection


# --- auth: a stream is a read, limited to the token's tasks ---------------------------------


async def test_streams_need_a_read_token_and_stay_within_its_tasks(
    make_client: ClientFactory,
) -> None:
    client = await make_client(auth_secret=SECRET)
    assert (await client.get("/api/tasks/x/events")).status == 401
    assert (await client.get("/api/events")).status == 401
    writer = bearer(token("tasks:write"))
    assert (await client.get("/api/tasks/x/events", headers=writer)).status == 403
    limited = bearer(token(tasks=["job-*"]))
    for path in ("/api/tasks/other/events", "/api/events", "/api/events?tasks=job-1,other"):
        refused = await client.get(path, headers=limited)
        assert refused.status == 403
        assert (await refused.json())["error"]["code"] == "task_not_allowed"
    assert hub_of(client).waiting_total == 0
    async with (
        stream(client, "/api/tasks/job-1/events", limited) as task_events,
        stream(client, "/api/events?tasks=job-1,job-2", limited) as board_events,
    ):
        assert (await task_events.event()).data["task"] == "job-1"
        assert (await board_events.event()).data["reset"] is True


async def test_stream_ends_when_its_token_expires_and_the_reconnect_gets_a_401(
    make_client: ClientFactory,
) -> None:
    client = await make_client(auth_secret=SECRET)
    # Accepted for 2 to 3 s more (whatever the fraction of the current second): time enough to
    # open the stream on a busy machine, and the stream must end by itself soon after.
    expiring = bearer(token(valid_for=2))
    async with stream(client, "/api/tasks/exp/events", expiring) as events:
        await events.event()
        blocks = await events.rest(timeout=3 + READ_DEADLINE)
        assert blocks[-1].comments == ["token expired"]
    await wait_for_waiters(client, 0)
    again = await client.get("/api/tasks/exp/events", headers=expiring)
    assert again.status == 401
    assert (await again.json())["error"]["code"] == "token_expired"


# --- the store away ---------------------------------------------------------------------------


async def test_stream_opened_while_redis_is_away_gets_a_503_and_works_once_it_is_back(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    try:
        config = Config(instance_id=INSTANCE_ID, redis_url=redis.url, redis_prefix="away:")
        client = await aiohttp_client(create_app(config))
        state = await put(client, "away", status="in_progress")
        await stop_redis(client, redis)
        for path in ("/api/tasks/away/events", "/api/events"):
            refused = await client.get(path)
            assert refused.status == 503, await refused.text()
            assert (await refused.json())["error"]["code"] == "backend_unavailable"
            assert refused.headers["Retry-After"]
        assert hub_of(client).waiting_total == 0
        redis.start()  # same port, empty: the epoch is new, a resumed board gets a snapshot
        await wait_until(lambda: client.app[BACKEND].is_ready(), 15, "the backend to be ready")
        async with stream(client, "/api/tasks/away/events", {"Last-Event-ID": "1"}) as events:
            first = await events.event()  # the store lost it: the state as it is now
            assert first.data["version"] == 0 and state["version"] == 1
    finally:
        redis.stop()


# --- a real process: SIGTERM ------------------------------------------------------------------


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[Instance]:
    running = Instance(tmp_path, "sse-sigterm", extra_args=["--stream-heartbeat", "30"])
    running.start()
    yield running
    running.stop()


async def test_sigterm_ends_open_streams_at_once_with_a_retry_hint_and_the_process_exits(
    instance: Instance,
) -> None:
    async with aiohttp.ClientSession(instance.url) as session:
        responses = [
            await session.get("/api/tasks/t/events"),
            await session.get("/api/events"),
        ]
        readers = [EventReader(response) for response in responses]
        for reader in readers:
            await reader.event()
        sent = time.monotonic()
        instance.send(signal.SIGTERM)
        endings = await asyncio.gather(*(reader.rest() for reader in readers))
        assert time.monotonic() - sent < 2
        for blocks in endings:
            assert blocks[-1].fields.keys() == {"retry"}
            assert 1000 <= int(blocks[-1].fields["retry"]) <= 3000
    await exits_cleanly(instance)


# --- through nginx, in front of three instances on Redis --------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("sse-cluster")) as running:
        yield running


async def test_streams_through_nginx_arrive_unbuffered_and_resume_on_any_instance(
    cluster: Cluster,
) -> None:
    task_id = f"n-{uuid.uuid4().hex[:8]}"
    path = f"/api/tasks/{task_id}/events"
    received: list[Block] = []
    served: set[str] = set()
    last = "0"
    async with aiohttp.ClientSession(cluster.url) as session:

        async def write(**update: Any) -> dict[str, Any]:
            async with session.put(f"/api/tasks/{task_id}", json=update) as response:
                assert response.status == 200
                state: dict[str, Any] = await response.json()
                return state

        written = []
        # Each round: a connection of its own (nginx may pick any instance), one write while
        # away, one while connected; each event must come at once, never held in a buffer.
        for round_ in range(6):
            written.append(await write(progress=round_ * 2))
            response = await session.get(path, headers={"Last-Event-ID": last})
            assert response.status == 200
            served.add(response.headers["X-Served-By"])
            events = EventReader(response)
            received.append(await events.event(timeout=2))
            written.append(await write(progress=round_ * 2 + 1))
            received.append(await events.event(timeout=2))
            last = received[-1].id
            response.close()
    assert versions(received) == list(range(1, 13))
    assert [block.data for block in received] == written
    assert len(served) > 1, f"every stream served by {served}"
