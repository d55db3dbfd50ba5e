"""Long polls the hub answers itself (``service/direct.py``): the same bytes as the ordinary path,
the connection kept for the next request, and the ordinary path wherever headers depend on the
request."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from service.api import NewerThan
from service.app import release_waiters
from service.direct import encode_poll_answer
from service.fastpoll import ParkedPoll
from service.hub import ANSWER_BATCH, WAKE_BATCH, Change, Hub
from service.model import Cursor, TaskState

from .conftest import (
    SECRET,
    Client,
    ClientFactory,
    bearer,
    change,
    get_state,
    hub_of,
    metric,
    put,
    token,
    wait_for_waiters,
    wait_until,
)

ORIGIN = "https://board.example"

OPENED: list[asyncio.StreamWriter] = []  # this test's raw connections


@pytest.fixture(autouse=True)
async def close_raw_connections() -> AsyncIterator[None]:
    """Close every raw connection a test opened, when it fails halfway too (else the socket
    left open is reported in a later test, as an unraisable ResourceWarning)."""
    yield
    while OPENED:
        writer = OPENED.pop()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def open_raw(client: Client) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(client.host, client.port)
    OPENED.append(writer)
    return reader, writer


async def raw_poll(
    client: Client,
    task: str,
    since: int,
    *,
    extra: str = "",
    reader_writer: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Send a poll over a raw socket (kept open) without reading the answer."""
    if reader_writer is None:
        reader_writer = await open_raw(client)
    _, writer = reader_writer
    writer.write(
        f"GET /api/tasks/{task}/poll?since={since}&timeout=20 HTTP/1.1\r\n"
        f"Host: {client.host}\r\n{extra}\r\n".encode()
    )
    await writer.drain()
    return reader_writer


async def held_polls(
    client: Client, task: str, since: int, count: int
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``count`` raw polls, each on a connection of its own, once the hub holds them all."""
    connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for _ in range(count // 100 + 1):  # in steps: the listen backlog is finite
        connections += [
            await raw_poll(client, task, since) for _ in range(min(100, count - len(connections)))
        ]
        await wait_for_waiters(client, len(connections), 10)
    return connections


async def put_seen(client: Client, task: str, **body: Any) -> None:
    """Write ``task``, then read it back through the instance, so that the instance knows its
    state before the next request: with Redis, the write's own change comes back through
    pub/sub, and on a loaded machine polls sent meanwhile would read the store on aiohttp's
    ordinary path instead of being parked."""
    await put(client, task, **body)
    await get_state(client, task)


async def one_held_poll(
    make_client: ClientFactory, **overrides: Any
) -> tuple[Client, asyncio.StreamReader, asyncio.StreamWriter]:
    """A client, and one raw poll of task "t" (at version 1), held."""
    client = await make_client(**overrides)
    await put_seen(client, "t", status="in_progress")
    reader, writer = await raw_poll(client, "t", 1)
    await wait_for_waiters(client, 1)
    return client, reader, writer


async def read_answer(reader: asyncio.StreamReader) -> tuple[str, list[tuple[str, str]], bytes]:
    """Status line, headers in order, body."""
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode()
    status, *lines = head.rstrip("\r\n").split("\r\n")
    headers = [(name, value) for name, _, value in (line.partition(": ") for line in lines)]
    length = int(dict(headers).get("Content-Length", "0"))  # none on a 204
    return status, headers, await reader.readexactly(length)


def comparable(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Headers that must match between the two paths: all but the clock and the connection's."""
    return [(name, value) for name, value in headers if name not in ("Date", "Connection")]


async def test_a_direct_answer_is_byte_for_byte_the_ordinary_one_and_keeps_the_connection(
    make_client: ClientFactory,
) -> None:
    client = await make_client()
    hub = hub_of(client)
    await put(client, "t", status="in_progress")
    direct = await raw_poll(client, "t", 1)
    ordinary = await raw_poll(client, "t", 1, extra="Connection: close\r\n")  # not answerable
    await wait_for_waiters(client, 2)
    await put(client, "t", status="completed")
    status, direct_headers, direct_body = await read_answer(direct[0])
    ordinary_status, ordinary_headers, ordinary_body = await read_answer(ordinary[0])
    assert hub.direct_answers == 1
    assert status == ordinary_status == "HTTP/1.1 200 OK"
    assert direct_body == ordinary_body
    assert comparable(direct_headers) == comparable(ordinary_headers)
    assert dict(direct_headers)["ETag"] == '"2"'
    ordinary[1].close()

    # The same connection carries the next poll, and the next answer.
    await raw_poll(client, "t", 2, reader_writer=direct)
    await wait_for_waiters(client, 1)
    await put(client, "t", status="failed", message="disk full")
    _, headers, body = await read_answer(direct[0])
    assert b'"version": 3' in body and b'"disk full"' in body
    assert dict(headers)["ETag"] == '"3"'
    assert hub.direct_answers == 2
    direct[1].close()


async def test_a_tombstone_is_answered_directly_byte_for_byte_as_the_ordinary_path_does(
    make_client: ClientFactory,
) -> None:
    client = await make_client()
    await put(client, "t", status="completed")
    direct = await raw_poll(client, "t", 1)
    ordinary = await raw_poll(client, "t", 1, extra="Connection: close\r\n")
    await wait_for_waiters(client, 2)
    deleted = await client.delete("/api/tasks/t")
    status, direct_headers, direct_body = await read_answer(direct[0])
    ordinary_status, ordinary_headers, ordinary_body = await read_answer(ordinary[0])
    assert hub_of(client).direct_answers == 1
    assert status == ordinary_status == "HTTP/1.1 200 OK"
    assert direct_body == ordinary_body == await deleted.read()
    assert comparable(direct_headers) == comparable(ordinary_headers)
    assert json.loads(direct_body)["deleted"] is True
    direct[1].close()
    ordinary[1].close()


async def test_a_burst_of_writes_answers_a_poll_once_with_the_first_change_above_it(
    make_client: ClientFactory,
) -> None:
    client, reader, writer = await one_held_poll(make_client)
    await put(client, "t", progress=10)
    await put(client, "t", progress=20)
    _, headers, _ = await read_answer(reader)
    assert dict(headers)["ETag"] == '"2"'
    # Nothing else arrives on the connection: the second change is for the next poll.
    await raw_poll(client, "t", 2, reader_writer=(reader, writer))
    _, headers, _ = await read_answer(reader)
    assert dict(headers)["ETag"] == '"3"'  # answered at once: the client was behind
    writer.close()


async def test_a_cross_origin_poll_is_answered_the_ordinary_way_with_its_cors_headers(
    make_client: ClientFactory,
) -> None:
    client = await make_client(cors_origins=(ORIGIN,))
    hub = hub_of(client)
    await put(client, "t", status="in_progress")
    reader, writer = await raw_poll(client, "t", 1, extra=f"Origin: {ORIGIN}\r\n")
    same_origin = await raw_poll(client, "t", 1)
    await wait_for_waiters(client, 2)
    await put(client, "t", status="completed")
    _, headers, _ = await read_answer(reader)
    assert dict(headers)["Access-Control-Allow-Origin"] == ORIGIN
    _, plain, _ = await read_answer(same_origin[0])
    assert "Access-Control-Allow-Origin" not in dict(plain)
    assert hub.direct_answers == 1  # the same-origin poll only
    writer.close()
    same_origin[1].close()


async def test_an_http_1_0_poll_is_answered_the_ordinary_way(make_client: ClientFactory) -> None:
    client = await make_client()
    hub = hub_of(client)
    await put(client, "t", status="in_progress")
    reader, writer = await open_raw(client)
    writer.write(b"GET /api/tasks/t/poll?since=1&timeout=20 HTTP/1.0\r\n\r\n")
    await wait_for_waiters(client, 1)
    await put(client, "t", status="completed")
    answer = await asyncio.wait_for(reader.read(), 10)  # 1.0: the server closes after it
    assert answer.startswith(b"HTTP/1.0 200 OK\r\n")
    assert hub.direct_answers == 0
    writer.close()


async def more_than_a_batch_held(
    make_client: ClientFactory, **overrides: Any
) -> tuple[Client, list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]:
    """A client, and 76 more polls of task "t" (at version 1) than one batch of direct answers,
    all held."""
    client = await make_client(**overrides)
    await put_seen(client, "t", status="in_progress")
    return client, await held_polls(client, "t", 1, ANSWER_BATCH + 76)


@pytest.mark.parametrize("fast_poll", [True, False])
async def test_a_large_fan_out_is_written_in_batches_and_a_burst_coalesces_to_the_newest(
    make_client: ClientFactory, fast_poll: bool
) -> None:
    """More polls than one batch: the first ANSWER_BATCH are answered in the publish call, the
    rest on later turns of the loop; a second change published before a poll's turn comes is the
    one it gets. No answered poll is released (its connection read again) before the last
    answer is written. Every connection gets exactly one answer."""
    client, connections = await more_than_a_batch_held(make_client, fast_poll=fast_poll)
    hub, count = hub_of(client), len(connections)
    second = Change(TaskState(task="t", status="completed", version=2), Cursor("e", 2))
    third = Change(TaskState(task="t", status="failed", version=3), Cursor("e", 3))
    hub.publish(second)
    assert hub.direct_answers == ANSWER_BATCH  # this turn's batch; the rest are due
    hub.publish(third)  # before the next turn
    for _ in range(count):  # the next turns of the loop write the rest of the answers
        if hub.direct_answers == count:
            break
        await asyncio.sleep(0)
    assert hub.direct_answers == count
    # ...and no answered poll was released before the last one was written: the turn that wrote
    # the last answers released the first batch (a parked poll ends when released; a handler's
    # waiter when its handler runs, later), no more
    assert hub.waiting_total == (count - WAKE_BATCH if fast_poll else count)
    answers = await asyncio.gather(*(read_answer(reader) for reader, _ in connections))
    etags = Counter(dict(headers)["ETag"] for _, headers, _ in answers)
    assert etags == {'"2"': ANSWER_BATCH, '"3"': 76}
    assert hub.direct_answers == count
    await wait_for_waiters(client, 0, 10)
    # Nothing else was written on any connection: the next answer on each is the next request's
    # (the store is still at version 1, so a poll "since 3" is ahead and answered at once).
    for connection in connections:
        await raw_poll(client, "t", 3, reader_writer=connection)
    after = await asyncio.gather(*(read_answer(reader) for reader, _ in connections))
    assert {(status, dict(headers)["ETag"]) for status, headers, _ in after} == {
        ("HTTP/1.1 200 OK", '"1"')
    }
    for _, writer in connections:
        writer.close()


async def test_a_sleeping_waiter_is_woken_in_the_first_turn_of_a_fan_out_not_after_its_answers(
    make_client: ClientFactory,
) -> None:
    """A stream, a watch or a cross-origin poll of the task does not wait for the hub to write
    every direct answer of a big fan-out: it is woken in the turn the change is published in;
    only the re-reads of the answered connections wait for the last answer."""
    client, connections = await more_than_a_batch_held(make_client)
    hub, count = hub_of(client), len(connections)
    second = Change(TaskState(task="t", status="completed", version=2), Cursor("e", 2))
    with hub.waiting("t") as sleeper:  # registered last: after every direct poll
        woken = asyncio.create_task(sleeper.wait(NewerThan(1), 20))
        await asyncio.sleep(0)  # asleep
        hub.publish(second)
        assert await woken is second
        assert hub.direct_answers < count  # answers were still due when it woke
    answers = await asyncio.gather(*(read_answer(reader) for reader, _ in connections))
    assert {dict(headers)["ETag"] for _, headers, _ in answers} == {'"2"'}
    for _, writer in connections:
        writer.close()


async def test_a_poll_that_is_behind_gets_the_prebuilt_answer_and_its_connection_is_read_again(
    make_client: ClientFactory,
) -> None:
    client = await make_client()
    hub = hub_of(client)
    await put(client, "t", status="in_progress")
    held = await raw_poll(client, "t", 1)
    await wait_for_waiters(client, 1)
    await put(client, "t", status="completed")  # answered directly: the hub keeps the change
    await read_answer(held[0])
    answered = hub.direct_answers
    behind = await raw_poll(client, "t", 0)
    ordinary = await raw_poll(client, "t", 0, extra="Connection: close\r\n")
    status, headers, body = await read_answer(behind[0])
    ordinary_status, ordinary_headers, ordinary_body = await read_answer(ordinary[0])
    assert hub.direct_answers == answered + 1
    assert status == ordinary_status == "HTTP/1.1 200 OK"
    assert (body, comparable(headers)) == (ordinary_body, comparable(ordinary_headers))
    assert dict(headers)["ETag"] == '"2"'
    # Its connection is read again in its turn: the next poll on it is held, then answered.
    await raw_poll(client, "t", 2, reader_writer=behind)
    await wait_for_waiters(client, 1)
    await put(client, "t", progress=100)
    _, headers, _ = await read_answer(behind[0])
    assert dict(headers)["ETag"] == '"3"'
    for _, writer in (held, behind, ordinary):
        writer.close()


async def test_a_change_nobody_waited_for_still_answers_the_polls_that_are_behind(
    make_client: ClientFactory,
) -> None:
    """Else a stream of writes meeting no held poll (all re-polling at that instant) would leave
    every later poll on the ordinary, unthrottled path."""
    client = await make_client()
    hub = hub_of(client)
    await put(client, "t", status="in_progress")
    await put(client, "t", status="completed")  # no waiter for either
    behind = await raw_poll(client, "t", 1)
    _, headers, _ = await read_answer(behind[0])
    assert dict(headers)["ETag"] == '"2"'
    assert hub.direct_answers == 1
    behind[1].close()


# --- races inside a fan-out larger than one batch ---------------------------------------------


def leave_at_once(writer: asyncio.StreamWriter) -> None:
    """The client closes its side now: the FIN is on its way before the loop runs again (the
    asyncio transport would close the socket a turn of the loop later)."""
    writer.get_extra_info("socket").shutdown(socket.SHUT_RDWR)


def troubles(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Errors logged, and anything asyncio or aiohttp had to say (a write to a closed socket)."""
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno >= logging.ERROR or record.name.startswith(("asyncio", "aiohttp"))
    ]


async def answered_once_then_next_request(
    client: Client, connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
) -> list[tuple[str, list[tuple[str, str]], bytes]]:
    """Each connection's one answer, after which the next thing it carries is the answer to the
    next request (a poll "since 3" is ahead of the store's version 1: answered at once, ETag 1),
    not a second answer to the first."""
    answers = await asyncio.gather(*(read_answer(reader) for reader, _ in connections))
    for connection in connections:
        await raw_poll(client, "t", 3, reader_writer=connection)
    after = await asyncio.gather(*(read_answer(reader) for reader, _ in connections))
    assert {(status, dict(headers)["ETag"]) for status, headers, _ in after} == {
        ("HTTP/1.1 200 OK", '"1"')
    }
    return answers


async def test_a_client_that_leaves_before_its_turn_in_a_fan_out_is_not_answered_nor_leaked(
    make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Four batches of polls; the clients of the last two close just before the change is
    published. The loop reads their FINs after the second batch is written, so their answers are
    due on connections already closing: the hub does not count them as answered (it hands the
    change back to the waiter, whose handler is cancelled as its client left), every other
    connection gets exactly one answer, and no waiter is left behind."""
    client = await make_client()
    await put(client, "t", status="in_progress")
    connections = await held_polls(client, "t", 1, 4 * ANSWER_BATCH)
    hub = hub_of(client)
    staying, leaving = connections[: 2 * ANSWER_BATCH], connections[2 * ANSWER_BATCH :]
    for _, writer in leaving:
        leave_at_once(writer)
    hub.publish(change("t", 2))  # the first batch is written in this call, the rest on later turns
    await wait_for_waiters(client, 0, 10)
    assert hub.direct_answers == len(staying), "an answer written to a closing connection"
    await wait_until(lambda: not hub.busy, 5, "the fan-out to end")
    answers = await answered_once_then_next_request(client, staying)
    assert {dict(headers)["ETag"] for _, headers, _ in answers} == {'"2"'}
    assert hub.waiting_total == 0
    assert troubles(caplog) == []


@pytest.mark.parametrize("fast_poll", [True, False])
async def test_shutdown_during_a_fan_out_answers_every_poll_once_with_the_change_it_was_due(
    make_client: ClientFactory, caplog: pytest.LogCaptureFixture, fast_poll: bool
) -> None:
    """SIGTERM's release of the waiters (``release_waiters``) comes after the first batch of a
    fan-out is written: the polls whose answers were still due get the change, not a 204 (a
    handler's takes it and answers it the ordinary way; the hub writes a parked poll's); none
    gets a second answer."""
    client = await make_client(fast_poll=fast_poll)
    await put(client, "t", status="in_progress")
    connections = await held_polls(client, "t", 1, 4 * ANSWER_BATCH)
    hub = hub_of(client)
    hub.publish(change("t", 2))
    assert hub.direct_answers == ANSWER_BATCH
    await release_waiters(client.app)  # what on_shutdown does on SIGTERM
    answers = await asyncio.gather(*(read_answer(reader) for reader, _ in connections))
    assert Counter((status, dict(headers).get("ETag")) for status, headers, _ in answers) == {
        ("HTTP/1.1 200 OK", '"2"'): len(connections)
    }
    if fast_poll:
        assert hub.direct_answers == len(connections)  # no handler: the hub writes every one
    else:
        assert ANSWER_BATCH <= hub.direct_answers < len(connections)  # the rest: the ordinary way
    await wait_for_waiters(client, 0, 10)
    await wait_until(lambda: not hub.busy, 5, "the fan-out to end")
    for _, writer in connections:  # nothing more arrives on any of them (a second answer)
        writer.write_eof()
    rest = await asyncio.gather(*(asyncio.wait_for(reader.read(), 10) for reader, _ in connections))
    assert set(rest) == {b""}
    assert troubles(caplog) == []


@pytest.mark.parametrize("fast_poll", [True, False])
async def test_a_poll_that_is_behind_on_a_connection_already_closing_is_not_answered_directly(
    make_client: ClientFactory, caplog: pytest.LogCaptureFixture, fast_poll: bool
) -> None:
    """A client sends a poll that is behind and closes at once: the loop reads the request, then
    the FIN (closing the connection), then runs the handler. ``answer_now`` must see the
    connection closing and leave the poll to the ordinary path, which has nowhere to write. (The
    fast path answers as it reads the request, before the FIN: the client, which only closed
    its sending side, reads the answer.)"""
    client = await make_client(fast_poll=fast_poll)
    hub = hub_of(client)
    await put(client, "t", status="in_progress")
    await put(client, "t", status="completed")
    await wait_until(lambda: (hub.latest("t") or change("t", 0)).state.version == 2, 5, "v2")
    reader, writer = await open_raw(client)
    writer.write(f"GET /api/tasks/t/poll?since=0 HTTP/1.1\r\nHost: {client.host}\r\n\r\n".encode())
    writer.get_extra_info("socket").shutdown(socket.SHUT_WR)
    if fast_poll:
        status, headers, _ = await read_answer(reader)
        assert (status, dict(headers)["ETag"]) == ("HTTP/1.1 200 OK", '"2"')
        assert hub.direct_answers == 1
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, nothing (more) written
    assert hub.direct_answers == fast_poll
    await wait_for_waiters(client, 0)
    await wait_until(lambda: not hub.busy, 5, "the fan-out to end")
    # The connection was not queued to be read again: the hub's next answers are unaffected.
    behind = await raw_poll(client, "t", 1)
    _, headers, _ = await read_answer(behind[0])
    assert dict(headers)["ETag"] == '"2"'
    assert hub.direct_answers == 1 + fast_poll
    assert troubles(caplog) == []


async def socket_pair() -> tuple[asyncio.StreamReader, asyncio.Transport]:
    """A client's reader, and the server side's transport of the same connection."""
    client_side, server_side = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=client_side)
    _, server = await asyncio.open_connection(sock=server_side)
    OPENED.extend((writer, server))
    transport = server.transport
    assert isinstance(transport, asyncio.Transport)
    return reader, transport


async def test_a_change_pending_at_the_version_the_poll_has_still_lets_the_hub_answer_it() -> None:
    """On Redis a poll can read version 1 from the store while the change to version 1 is still
    on its way to the instance: that change arrives before the poll parks, and must not send it
    (and the answer to the next change) the ordinary way."""
    reader, transport = await socket_pair()
    hub = Hub(answer=encode_poll_answer("i1"))
    with hub.waiting("t") as waiter:
        hub.publish(change("t", 1))  # while the poll was reading the store
        waiter.answer_directly(transport, 1)
        hub.publish(change("t", 2))
        assert await waiter.wait(NewerThan(1), 5) is waiter.delivered is not None
    assert hub.direct_answers == 1
    _, headers, _ = await read_answer(reader)
    assert dict(headers)["ETag"] == '"2"'


async def test_a_change_pending_above_the_version_the_poll_has_is_answered_the_ordinary_way() -> (
    None
):
    _, transport = await socket_pair()
    hub = Hub(answer=encode_poll_answer("i1"))
    with hub.waiting("t") as waiter:
        newer = change("t", 2)
        hub.publish(newer)
        waiter.answer_directly(transport, 1)
        assert await waiter.wait(NewerThan(1), 5) is newer
        assert waiter.delivered is None
    assert hub.direct_answers == 0


# --- the fast path (service/fastpoll.py): polls taken at the connection, held with no handler ---


def parked_polls(client: Client, task: str) -> int:
    """Polls of ``task`` held with no handler (the hub's own waiters of the fast path)."""
    return sum(isinstance(w, ParkedPoll) for w in hub_of(client)._waiters.get(task, ()))


@pytest.mark.parametrize("fast_poll", [True, False])
async def test_the_first_poll_of_a_connection_is_held_without_a_handler_unless_turned_off(
    make_client: ClientFactory, fast_poll: bool
) -> None:
    client, reader, _ = await one_held_poll(make_client, fast_poll=fast_poll)
    assert parked_polls(client, "t") == fast_poll
    await put(client, "t", status="completed")
    status, headers, _ = await read_answer(reader)
    assert (status, dict(headers)["ETag"]) == ("HTTP/1.1 200 OK", '"2"')


async def test_a_poll_pipelined_behind_an_ordinary_request_is_answered_after_it(
    make_client: ClientFactory,
) -> None:
    """The list is answered by aiohttp's handler; the poll behind it, which the fast path could
    answer at once (it is behind), must not overtake it."""
    client = await make_client()
    await put(client, "t", status="in_progress")
    reader, writer = await open_raw(client)
    writer.write(
        b"GET /api/tasks HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /api/tasks/t/poll?since=0&timeout=20 HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    _, _, first = await read_answer(reader)
    _, headers, second = await read_answer(reader)
    assert "tasks" in json.loads(first)
    assert dict(headers)["ETag"] == '"1"' and json.loads(second)["task"] == "t"


def stashed(client: Client) -> bool:
    """Whether a parked poll's connection holds bytes of a request behind it."""
    return any(
        isinstance(w, ParkedPoll) and w._conn._stash
        for ws in hub_of(client)._waiters.values()
        for w in ws
    )


async def test_a_request_pipelined_behind_a_parked_poll_is_answered_after_the_poll(
    make_client: ClientFactory,
) -> None:
    client, reader, writer = await one_held_poll(make_client)
    assert parked_polls(client, "t") == 1
    writer.write(b"GET /api/tasks HTTP/1.1\r\nHost: x\r\n\r\n")  # read, and kept
    await writer.drain()
    await wait_until(lambda: stashed(client), 5, "the request behind the poll to be read")
    await put(client, "t", status="completed")
    _, headers, first = await read_answer(reader)
    _, _, second = await read_answer(reader)
    assert dict(headers)["ETag"] == '"2"' and json.loads(first)["status"] == "completed"
    assert [task["version"] for task in json.loads(second)["tasks"]] == [2]
    # ...and the connection goes on serving polls on the fast path.
    await raw_poll(client, "t", 2, reader_writer=(reader, writer))
    await wait_for_waiters(client, 1)
    assert parked_polls(client, "t") == 1


async def test_more_bytes_behind_a_parked_poll_stop_its_connection_being_read_until_it_ends(
    make_client: ClientFactory,
) -> None:
    """The first read behind a parked poll is kept as it comes (a fan-out's re-poll); a client
    that goes on sending is not read any further, and so not kept without bound, until the
    poll has its answer; then every request is answered, in order, and reading goes on."""
    client, reader, writer = await one_held_poll(make_client)
    (poll,) = hub_of(client)._waiters["t"]
    assert isinstance(poll, ParkedPoll)
    transport = poll._conn.transport
    assert transport is not None
    request = b"GET /api/tasks HTTP/1.1\r\nHost: x\r\n\r\n"
    writer.write(request)
    await writer.drain()
    await wait_until(lambda: stashed(client), 5, "the first request behind the poll to be read")
    assert transport.is_reading()
    writer.write(request)
    await writer.drain()
    await wait_until(lambda: not transport.is_reading(), 5, "the connection to stop being read")
    assert poll._conn._stash == request * 2
    await put(client, "t", status="completed")
    _, headers, _ = await read_answer(reader)
    assert dict(headers)["ETag"] == '"2"'
    for _ in range(2):
        status, _, body = await read_answer(reader)
        assert status == "HTTP/1.1 200 OK" and json.loads(body)["tasks"][0]["version"] == 2
    assert transport.is_reading()


def connection_of(
    poll: ParkedPoll, connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The raw connection (client side) a parked poll came on."""
    assert poll._conn.transport is not None
    peer = poll._conn.transport.get_extra_info("peername")
    return next(c for c in connections if c[1].get_extra_info("sockname") == peer)


async def test_a_write_on_a_connection_answered_in_a_fan_out_is_served_before_the_fan_out_ends(
    make_client: ClientFactory,
) -> None:
    """nginx hands a write to the upstream connection freed last: often one whose poll was just
    answered while the fan-out goes on. The write must not wait for the poll's release (the
    fan-out's end); a re-poll on such a connection still waits for it, as in every batch."""
    client, connections = await more_than_a_batch_held(make_client)
    hub = hub_of(client)
    hub.publish(Change(TaskState(task="t", status="completed", version=2), Cursor("e", 2)))
    answered = [
        w for w in hub._waiters["t"] if isinstance(w, ParkedPoll) and w.delivered is not None
    ]
    assert len(answered) == ANSWER_BATCH  # written in this turn, released once all are written
    writes, repolls = answered[0], answered[1]
    body = b'{"status": "in_progress"}'
    # (the bytes handed to the connection as its socket would, within this turn of the loop)
    writes._conn.data_received(
        b"PUT /api/tasks/other HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    repolls._conn.data_received(b"GET /api/tasks/t/poll?since=2 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert writes._conn._poll is None and writes._conn.ordinary == 1  # ended; the PUT is handled
    assert repolls._conn._poll is repolls and repolls._conn._stash  # kept for its turn
    assert sum(w.delivered is not None for w in hub._waiters["t"]) == ANSWER_BATCH - 1
    reader, _ = connection_of(writes, connections)
    _, headers, _ = await read_answer(reader)
    status, _, written = await read_answer(reader)
    assert dict(headers)["ETag"] == '"2"'
    assert (status, json.loads(written)["version"]) == ("HTTP/1.1 200 OK", 1)
    reader, _ = connection_of(repolls, connections)
    _, headers, _ = await read_answer(reader)
    assert dict(headers)["ETag"] == '"2"'
    # (the store is still at version 1: the re-poll, served once released, is ahead of it)
    status, headers, _ = await read_answer(reader)
    assert (status, dict(headers)["ETag"]) == ("HTTP/1.1 200 OK", '"1"')


async def test_a_parked_poll_counts_in_the_metrics_as_a_held_one_and_by_its_outcome(
    make_client: ClientFactory,
) -> None:
    client = await make_client()
    held = 'taskstatus_held_polls{transport="longpoll"}'

    def answered(outcome: str) -> str:
        return f'taskstatus_polls_answered_total{{outcome="{outcome}",transport="longpoll"}}'

    await put_seen(client, "t", status="in_progress")
    changed = await raw_poll(client, "t", 1)
    left = await raw_poll(client, "t", 1)
    await wait_for_waiters(client, 2)
    assert parked_polls(client, "t") == 2
    assert await metric(client, held) == 2
    left[1].close()
    await wait_for_waiters(client, 1)
    assert await metric(client, answered("disconnected")) == 1
    await put(client, "t", status="completed")
    await read_answer(changed[0])
    assert await metric(client, answered("changed")) == 1
    assert await metric(client, held) == 0
    count = await metric(client, 'taskstatus_notify_delay_seconds_count{transport="longpoll"}')
    assert count == 1


async def test_a_parked_poll_outlives_the_keep_alive_timeout_and_ends_with_a_204(
    make_client: ClientFactory,
) -> None:
    """aiohttp closes a connection idle for KEEPALIVE_TIMEOUT; a poll held longer on it is not
    idle: it gets its 204 when its hold passes, byte for byte the ordinary path's."""
    client = await make_client(keepalive_timeout=1.0)
    hub = hub_of(client)
    await put_seen(client, "t", status="in_progress")
    fast = await open_raw(client)
    fast[1].write(b"GET /api/tasks/t/poll?since=1&timeout=3 HTTP/1.1\r\nHost: x\r\n\r\n")
    ordinary = await open_raw(client)
    ordinary[1].write(
        b"GET /api/tasks/t/poll?since=1&timeout=3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    await wait_for_waiters(client, 2)
    assert parked_polls(client, "t") == 1
    started = hub.loop().time()
    status, headers, body = await read_answer(fast[0])
    ordinary_status, ordinary_headers, ordinary_body = await read_answer(ordinary[0])
    assert hub.loop().time() - started > 2  # (a hold of 3 s, less its jitter)
    assert status == ordinary_status == "HTTP/1.1 204 No Content"
    assert body == ordinary_body == b""
    assert comparable(headers) == comparable(ordinary_headers)
    # The connection is still open for the next poll.
    await raw_poll(client, "t", 0, reader_writer=fast)
    assert (await read_answer(fast[0]))[0] == "HTTP/1.1 200 OK"


async def test_a_token_verified_once_grants_only_what_it_grants_on_the_fast_path(
    make_client: ClientFactory,
) -> None:
    client = await make_client(auth_secret=SECRET)
    writer_token = bearer(token("tasks:read", "tasks:write"))
    await client.put("/api/tasks/a", json={"status": "pending"}, headers=writer_token)
    await client.put("/api/tasks/b", json={"status": "pending"}, headers=writer_token)
    only_a = token("tasks:read", tasks=["a"])
    connection = await open_raw(client)
    for _ in range(2):  # verified by the middleware, then from the verified tokens
        await raw_poll(
            client, "a", 0, extra=f"Authorization: Bearer {only_a}\r\n", reader_writer=connection
        )
        assert (await read_answer(connection[0]))[0] == "HTTP/1.1 200 OK"
    await raw_poll(
        client, "b", 0, extra=f"Authorization: Bearer {only_a}\r\n", reader_writer=connection
    )
    status, _, body = await read_answer(connection[0])
    assert status == "HTTP/1.1 403 Forbidden"
    assert json.loads(body)["error"]["code"] == "task_not_allowed"
    await raw_poll(
        client, "a", 1, extra=f"Authorization: Bearer {only_a}\r\n", reader_writer=connection
    )
    await wait_for_waiters(client, 1)
    assert parked_polls(client, "a") == 1
    invalid = await raw_poll(client, "a", 1, extra="Authorization: Bearer x.y.z\r\n")
    status, _, body = await read_answer(invalid[0])
    assert status == "HTTP/1.1 401 Unauthorized"
    assert json.loads(body)["error"]["code"] == "invalid_token"
