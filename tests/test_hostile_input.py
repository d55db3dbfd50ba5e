"""A corpus of hostile input, on each backend: each gets a clear 4xx and changes nothing.

It adds to the bad bodies, ids, parameters and content types of ``test_api.py``: numbers at and past
the limits, negative and float versions, Unicode lookalikes, NUL bytes, deep nesting, duplicate and
misspelt query keys, wrong content types and encodings. Broken HTTP framing goes over a raw socket:
aiohttp's parser refuses it with a plain-text 400 before the app sees it (so no JSON there), and a
body cut short by a client that hangs up changes nothing while the server keeps serving.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from yarl import URL

from service.model import MAX_COUNTER

from .conftest import Client, put, wait_until

JSON: Mapping[str, str] = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Hostile:
    """One hostile request: the status and error code it must get."""

    name: str
    method: str
    path: str  # percent-encoded, sent as is
    status: int
    code: str
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=lambda: JSON)


def update(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def nested(opening: bytes, closing: bytes, depth: int, core: bytes = b"1") -> bytes:
    return opening * depth + core + closing * depth


POLL = "/api/tasks/t/poll"
BEYOND = str(MAX_COUNTER + 1)  # 2**53: no longer exact in JavaScript
NUMBERS = [
    Hostile("since at 2**53", "GET", f"{POLL}?since={BEYOND}&timeout=0", 400, "invalid_parameter"),
    Hostile("since minus zero", "GET", f"{POLL}?since=-0&timeout=0", 400, "invalid_parameter"),
    Hostile("since 0.0", "GET", f"{POLL}?since=0.0&timeout=0", 400, "invalid_parameter"),
    Hostile("since with a sign", "GET", f"{POLL}?since=%2B0&timeout=0", 400, "invalid_parameter"),
    Hostile("last_version at 2**53", "GET", f"/api/poll-status?last_version={BEYOND}", 400,
            "invalid_parameter"),
    Hostile("timeout float", "GET", f"{POLL}?since=0&timeout=0.5", 400, "invalid_parameter"),
    Hostile("cursor at 2**53", "GET", f"/api/watch?since=abc-{BEYOND}", 400, "invalid_parameter"),
    Hostile("cursor negative", "GET", "/api/watch?since=abc--1", 400, "invalid_cursor"),
    Hostile("cursor float", "GET", "/api/watch?since=abc-1.5", 400, "invalid_parameter"),
    Hostile("cursor uppercase epoch", "GET", "/api/watch?since=ABC-1", 400, "invalid_cursor"),
    Hostile("cursor epoch of 33", "GET", f"/api/watch?since={'a' * 33}-1", 400, "invalid_cursor"),
    Hostile("expected_version 2**53", "PUT", "/api/tasks/t", 400, "invalid_expected_version",
            update(progress=1, expected_version=MAX_COUNTER + 1)),
    Hostile("expected_version -2**63", "PUT", "/api/tasks/t", 400, "invalid_expected_version",
            update(progress=1, expected_version=-(2**63))),
    Hostile("expected_version -0.0", "PUT", "/api/tasks/t", 400, "invalid_expected_version",
            b'{"progress": 1, "expected_version": -0.0}'),
    Hostile("expected_version 1e2", "PUT", "/api/tasks/t", 400, "invalid_expected_version",
            b'{"progress": 1, "expected_version": 1e2}'),
    Hostile("progress 1e308", "PUT", "/api/tasks/t", 400, "invalid_progress",
            b'{"progress": 1e308}'),
    Hostile("progress -0.0", "PUT", "/api/tasks/t", 400, "invalid_progress",
            b'{"progress": -0.0}'),
]  # fmt: skip

# Digits and letters that are not ASCII: str.isdigit() and \w say yes to several of them.
UNICODE_DIGITS = ["%D9%A1", "%EF%BC%91", "%C2%B2", "%E2%91%A0"]  # Arabic-Indic 1, fullwidth 1, ², ①
UNICODE_IDS = [
    "%D0%B0",  # Cyrillic a
    "%EF%BD%81",  # fullwidth a
    "a%0A",  # a trailing newline (a regex `$` would let it through)
    "%D9%A1",  # Arabic-Indic digit one
    "a%E2%80%8B",  # zero-width space
    "a%C2%A0",  # no-break space
    "e%CC%81",  # e + combining acute accent
    "%F0%9F%9A%80",  # an emoji
    "%EF%BC%A1" * 64,  # 64 fullwidth letters: 64 characters, 192 bytes
]
UNICODE = [
    *(
        Hostile(f"since {digit}", "GET", f"{POLL}?since={digit}&timeout=0", 400,
                "invalid_parameter")
        for digit in UNICODE_DIGITS
    ),
    *(
        Hostile(f"{method} {template} with id {task_id}", method, template.format(task_id), 400,
                "invalid_task_id", update(progress=1) if method == "PUT" else None)
        for task_id in UNICODE_IDS
        for method, template in (
            ("GET", "/api/tasks/{}"),
            ("PUT", "/api/tasks/{}"),
            ("GET", "/api/tasks/{}/poll?since=0&timeout=0"),
            ("GET", "/api/watch?tasks=a,{}&timeout=0"),
            ("GET", "/tasks/{}"),
        )
    ),
    Hostile("status with a Cyrillic a", "PUT", "/api/tasks/t", 400, "invalid_status",
            update(status="f\u0430iled")),
    Hostile("status with a trailing space", "PUT", "/api/tasks/t", 400, "invalid_status",
            update(status="failed ")),
    Hostile("message of 501 emoji", "PUT", "/api/tasks/t", 400, "invalid_message",
            update(message="\U0001f680" * 501)),
    Hostile("message with a right-to-left override and a NUL", "PUT", "/api/tasks/t", 400,
            "invalid_message", update(message="\u202ea\u0000")),
]  # fmt: skip

NUL = [
    Hostile("since with a NUL", "GET", f"{POLL}?since=1%00&timeout=0", 400, "invalid_parameter"),
    Hostile("cursor with a NUL", "GET", "/api/watch?since=abc-1%00", 400, "invalid_parameter"),
    Hostile("cursor epoch of a NUL", "GET", "/api/watch?since=%00-1", 400, "invalid_cursor"),
    Hostile("watched id with a NUL", "GET", "/api/watch?tasks=a%00", 400, "invalid_task_id"),
    Hostile("page id with a NUL", "GET", "/tasks/a%00b", 400, "invalid_task_id"),
    Hostile("raw NUL inside a JSON string", "PUT", "/api/tasks/t", 400, "invalid_json",
            b'{"message": "a\x00b"}'),
    Hostile("raw newline inside a JSON string", "PUT", "/api/tasks/t", 400, "invalid_json",
            b'{"message": "a\nb"}'),
    Hostile("NUL after the JSON", "PUT", "/api/tasks/t", 400, "invalid_json",
            b'{"status": "failed"}\x00'),
    Hostile("status with a NUL", "PUT", "/api/tasks/t", 400, "invalid_status",
            update(status="failed\u0000")),
]  # fmt: skip

NESTING = [
    Hostile("3000 nested objects", "PUT", "/api/tasks/t", 400, "invalid_json",
            nested(b'{"":', b"}", 3000)),
    Hostile("500 nested arrays as the message", "PUT", "/api/tasks/t", 400, "invalid_message",
            b'{"message": ' + nested(b"[", b"]", 500, b"") + b"}"),
    Hostile("200 nested objects as the progress", "PUT", "/api/tasks/t", 400, "invalid_progress",
            b'{"progress": ' + nested(b'{"a":', b"}", 200) + b"}"),
    Hostile("nested update in an update", "POST", "/api/update-status", 400, "unknown_field",
            b'{"status": "failed", "update": {"status": "failed"}}'),
]  # fmt: skip

QUERY_KEYS = [
    Hostile("timeout twice in a poll", "GET", f"{POLL}?since=0&timeout=0&timeout=0", 400,
            "duplicate_parameter"),
    Hostile("timeout twice in a watch", "GET", "/api/watch?timeout=0&timeout=1", 400,
            "duplicate_parameter"),
    Hostile("empty since twice", "GET", "/api/watch?since=&since=", 400, "duplicate_parameter"),
    Hostile("tasks twice, once empty", "GET", "/api/watch?tasks=a&tasks=", 400,
            "duplicate_parameter"),
    Hostile("since spelt Since", "GET", "/api/tasks/t/poll?Since=0&timeout=0", 400,
            "missing_parameter"),
    Hostile("since as an array", "GET", "/api/tasks/t/poll?since[]=0&timeout=0", 400,
            "missing_parameter"),
    Hostile("an empty id among the watched", "GET", "/api/watch?tasks=a,,b", 400,
            "invalid_task_id"),
    Hostile("an empty tasks", "GET", "/api/watch?tasks=", 400, "invalid_task_id"),
    Hostile("101 watched ids", "GET",
            "/api/watch?tasks=" + ",".join(f"t{n}" for n in range(101)), 400, "too_many_tasks"),
]  # fmt: skip

STATUS = {"status": "failed"}
CONTENT = [
    *(
        Hostile(f"content type {ctype!r}", "PUT", "/api/tasks/t", 415, "unsupported_media_type",
                update(**STATUS), {"Content-Type": ctype})
        for ctype in ("", "text/json", "application/merge-patch+json", "*/*",
                      "application/json, text/plain", "application/x-json")
    ),
    Hostile("JSON with a byte order mark", "PUT", "/api/tasks/t", 400, "invalid_json",
            b"\xef\xbb\xbf" + update(**STATUS)),
    Hostile("JSON in UTF-16", "PUT", "/api/tasks/t", 400, "invalid_json",
            json.dumps(STATUS).encode("utf-16")),
    Hostile("charset=utf-16 on a UTF-16 body", "PUT", "/api/tasks/t", 400, "invalid_json",
            json.dumps(STATUS).encode("utf-16"),
            {"Content-Type": "application/json; charset=utf-16"}),
    Hostile("gzip that is not gzip", "PUT", "/api/tasks/t", 400, "invalid_body_encoding",
            update(**STATUS), {**JSON, "Content-Encoding": "gzip"}),
    Hostile("deflate that is not deflate", "POST", "/api/update-status", 400,
            "invalid_body_encoding", b"\x00\x01garbage", {**JSON, "Content-Encoding": "deflate"}),
    Hostile("gzip bomb: 1 KiB that inflates to 1 MiB", "PUT", "/api/tasks/t", 413,
            "body_too_large",
            gzip.compress(b'{"message": "' + b" " * 2**20 + b'"}'),
            {**JSON, "Content-Encoding": "gzip"}),
]  # fmt: skip

CORPUS = [*NUMBERS, *UNICODE, *NUL, *NESTING, *QUERY_KEYS, *CONTENT]


async def everything(client: Client) -> list[Any]:
    """Every observable state: the tasks, the default task, and a watch snapshot's tasks."""
    seen = []
    for path in ("/api/tasks", "/api/status", "/api/watch"):
        response = await client.get(path)
        assert response.status == 200
        body = await response.json()
        seen.append(body.get("tasks", body))
    return seen


@pytest.fixture
def service_errors(caplog: pytest.LogCaptureFixture) -> Iterator[list[logging.LogRecord]]:
    """Errors the service logs (an unhandled exception is one); checked empty after the test."""
    with caplog.at_level(logging.ERROR, logger="service"):
        records: list[logging.LogRecord] = []
        yield records
        records += [r for r in caplog.records if r.name.startswith("service")]
    assert not records, [r.getMessage() for r in records]


@pytest.fixture
async def seeded(client: Client, service_errors: list[logging.LogRecord]) -> AsyncIterator[Client]:
    """A server holding written tasks; after the test every state reads as before, and the
    service logged no error."""
    await client.post("/api/update-status", json={"status": "in_progress", "progress": 30})
    await put(client, "t", status="completed", progress=100, message="done")
    before = await everything(client)
    yield client
    assert await everything(client) == before, "a refused request changed state"


@pytest.mark.parametrize("case", CORPUS, ids=[case.name for case in CORPUS])
async def test_hostile_request_gets_a_clear_4xx_and_changes_nothing(
    seeded: Client, case: Hostile
) -> None:
    response = await seeded.request(
        case.method,
        URL(case.path, encoded=True),
        data=case.body,
        # A fresh connection each time: the answer to a broken body may close its connection.
        headers={**case.headers, "Connection": "close"},
    )
    text = await response.text()
    assert response.status == case.status, text
    assert response.content_type == "application/json", text
    error = (await response.json())["error"]
    assert error["code"] == case.code, error
    assert error["message"]


# --- over a raw socket ------------------------------------------------------------------------


def message(head: str, body: bytes = b"") -> bytes:
    """An HTTP/1.1 request: ``head`` is the request line and headers, one per line."""
    return "\r\n".join([*head.strip().splitlines(), "Host: x", "", ""]).encode() + body


PUT_JSON = "PUT /api/tasks/t HTTP/1.1\nContent-Type: application/json"
CHUNKED = f"{PUT_JSON}\nTransfer-Encoding: chunked"
VALID = b'{"status": "failed"}'

# Refused by aiohttp's HTTP parser, before any handler: 400 in plain text, connection closed.
BROKEN_FRAMING = {
    "invalid chunk size": message(CHUNKED, b"zz\r\n" + VALID + b"\r\n0\r\n\r\n"),
    "invalid chunk size after a chunk": message(CHUNKED, b"5\r\n{\"sta\r\nQQ\r\n"),
    "chunk size over 2**64": message(CHUNKED, b"1" + b"0" * 17 + b"\r\n" + VALID),
    "Content-Length with chunked": message(f"{CHUNKED}\nContent-Length: 20",
                                           b"14\r\n" + VALID + b"\r\n0\r\n\r\n"),
    "two Content-Lengths": message(f"{PUT_JSON}\nContent-Length: 20\nContent-Length: 21", VALID),
    "negative Content-Length": message(f"{PUT_JSON}\nContent-Length: -20", VALID),
    "Content-Length over 2**64": message(f"{PUT_JSON}\nContent-Length: {'9' * 25}", VALID),
    "two Content-Types": message(
        "PUT /api/tasks/t HTTP/1.1\nContent-Type: application/json\nContent-Type: text/plain"
        "\nContent-Length: 20", VALID),
    "raw UTF-8 in the path": message("GET /api/tasks/t\u00e2che HTTP/1.1"),
    "NUL in the path": message("GET /api/tasks/a\x00b HTTP/1.1"),
    "NUL in a header": message("GET /api/tasks/a HTTP/1.1\nX-Note: a\x00b"),
    "folded header line": message(f"{PUT_JSON}\n continued\nContent-Length: 20", VALID),
    "NUL in the method": message("PU\x00 /api/tasks/t HTTP/1.1\nContent-Length: 20", VALID),
}  # fmt: skip

# Bodies cut short, then the client hangs up: nothing may be written.
HUNG_UP = {
    "Content-Length beyond the body": message(f"{PUT_JSON}\nContent-Length: 100", VALID),
    "a whole body short of its Content-Length by one": message(
        f"{PUT_JSON}\nContent-Length: 21", VALID
    ),
    "chunked body without its last chunk": message(CHUNKED, b"14\r\n" + VALID + b"\r\n"),
    "chunked body cut inside a chunk": message(CHUNKED, b"14\r\n" + VALID[:10]),
}


def server_of(client: Client) -> web.Server:
    runner = client.server.runner
    assert runner is not None and runner.server is not None
    server: web.Server = runner.server
    return server


async def exchange(client: Client, raw: bytes) -> bytes:
    """Send ``raw`` on a new connection and read until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout=5)
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize("raw", BROKEN_FRAMING.values(), ids=BROKEN_FRAMING)
async def test_broken_framing_is_refused_with_400_and_changes_nothing(
    seeded: Client, raw: bytes
) -> None:
    answer = await exchange(seeded, raw)
    status_line = answer.split(b"\r\n", 1)[0]
    assert status_line.split()[1:2] == [b"400"], answer[:300]


@pytest.mark.parametrize("raw", HUNG_UP.values(), ids=HUNG_UP)
async def test_a_body_cut_short_by_a_client_that_hangs_up_changes_nothing(
    seeded: Client, raw: bytes
) -> None:
    server = server_of(seeded)
    before = len(server.connections)
    _, writer = await asyncio.open_connection("127.0.0.1", seeded.server.port)
    writer.write(raw)
    await writer.drain()
    await wait_until(lambda: len(server.connections) > before, what="the server to take it")
    writer.close()
    await writer.wait_closed()
    await wait_until(lambda: len(server.connections) == before, what="the server to drop it")
    assert (await seeded.get("/api/tasks/t")).status == 200  # still serving


async def test_an_invalid_chunk_after_the_handler_started_reading_changes_nothing(
    seeded: Client,
) -> None:
    """``Expect: 100-continue`` holds the body until the handler reads it, so the broken chunk
    arrives while the handler waits for the body; the client then hangs up."""
    server = server_of(seeded)
    before = len(server.connections)
    reader, writer = await asyncio.open_connection("127.0.0.1", seeded.server.port)
    writer.write(message(f"{CHUNKED}\nExpect: 100-continue"))
    await writer.drain()
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b'5\r\n{"sta\r\nQQ\r\n')
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    await wait_until(lambda: len(server.connections) == before, what="the server to drop it")
    assert (await seeded.get("/api/tasks/t")).status == 200
