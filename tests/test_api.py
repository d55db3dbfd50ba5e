"""The JSON API over real HTTP: reads, writes, versions, optimistic concurrency, and bad input.

Bad input must never answer 500 and never change state: each rejection is followed by a check
that every task still reads exactly as before.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import ClientResponse
from yarl import URL

from .conftest import INSTANCE_ID, Client, get_state, put

ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
JSON = {"Content-Type": "application/json"}
NEVER_WRITTEN = {
    "task": "default",
    "status": "pending",
    "version": 0,
    "updated_at": None,
    "progress": None,
    "message": None,
}


async def assert_error(response: ClientResponse, status: int, code: str | None = None) -> None:
    """An API error: the status, the JSON error shape, and the headers every API answer has."""
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) >= {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Served-By"] == INSTANCE_ID


async def everything(client: Client) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every observable state: the default task and the list of all tasks."""
    listing = await client.get("/api/tasks")
    assert listing.status == 200
    return await get_state(client), (await listing.json())["tasks"]


@pytest.fixture
async def seeded(client: Client) -> AsyncIterator[Client]:
    """A server holding two written tasks, checked unchanged after the test."""
    await client.post(
        "/api/update-status", json={"status": "in_progress", "progress": 30, "message": "warm"}
    )
    await put(client, "t", status="completed", progress=100)
    before = await everything(client)
    yield client
    assert await everything(client) == before, "a rejected request changed state"


# --- reads ------------------------------------------------------------------------------------


async def test_status_of_a_never_written_task_is_pending_at_version_zero(client: Client) -> None:
    response = await client.get("/api/status")
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.json() == NEVER_WRITTEN
    assert response.headers["ETag"] == '"0"'


async def test_reading_a_task_does_not_create_it(client: Client) -> None:
    response = await client.get("/api/tasks/ghost")
    assert response.status == 200
    assert await response.json() == {**NEVER_WRITTEN, "task": "ghost"}
    listing = await client.get("/api/tasks")
    assert await listing.json() == {"tasks": []}


async def test_status_endpoints_and_task_endpoints_share_the_default_task(client: Client) -> None:
    await put(client, "default", status="failed")
    status = await (await client.get("/api/status")).json()
    assert status["status"] == "failed"
    posted = await client.post("/api/update-status", json={"progress": 5})
    assert (await posted.json())["version"] == 2
    assert (await get_state(client, "default"))["progress"] == 5


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/api/status", None),
        ("GET", "/api/tasks", None),
        ("GET", "/api/tasks/x", None),
        ("GET", "/api/poll-status?last_version=5", None),
        ("GET", "/api/poll-status?last_version=0&timeout=0", None),
        ("GET", "/api/tasks/x/poll?since=0&timeout=0", None),
        ("GET", "/api/watch", None),
        ("PUT", "/api/tasks/x", {"status": "failed"}),
        ("POST", "/api/update-status", {"progress": 1}),
        ("POST", "/api/update-status", {"progress": 101}),
        ("GET", "/api/tasks/-x", None),
        ("GET", "/api/nowhere", None),
        ("DELETE", "/api/status", None),
    ],
)
async def test_every_api_response_is_no_store_and_names_the_instance(
    client: Client, method: str, path: str, body: dict[str, Any] | None
) -> None:
    response = await client.request(method, path, json=body)
    assert response.status in (200, 204, 400, 404, 405)
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Served-By"] == INSTANCE_ID


async def test_pages_and_probes_also_name_the_instance(client: Client) -> None:
    for path in ("/healthz", "/readyz", "/"):
        response = await client.get(path)
        assert response.status == 200, path
        assert response.headers["X-Served-By"] == INSTANCE_ID


async def test_get_task_carries_its_version_as_etag(client: Client) -> None:
    for expected in range(1, 4):
        await put(client, "etag", progress=expected)
        response = await client.get("/api/tasks/etag")
        assert response.headers["ETag"] == f'"{expected}"'
        assert (await response.json())["version"] == expected


async def test_list_tasks_shows_written_tasks_oldest_change_first(client: Client) -> None:
    for task in ("a", "b", "c"):
        await put(client, task, status="in_progress")
    await put(client, "a", progress=1)
    listing = await (await client.get("/api/tasks")).json()
    assert [(s["task"], s["version"]) for s in listing["tasks"]] == [("b", 1), ("c", 1), ("a", 2)]


# --- writes -----------------------------------------------------------------------------------


async def test_update_status_answers_the_new_state_and_status_reads_it(client: Client) -> None:
    response = await client.post(
        "/api/update-status", json={"status": "in_progress", "progress": 40, "message": "half"}
    )
    assert response.status == 200
    state = await response.json()
    assert ISO_UTC.fullmatch(state.pop("updated_at"))
    assert state == {
        "task": "default",
        "status": "in_progress",
        "version": 1,
        "progress": 40,
        "message": "half",
    }
    assert response.headers["ETag"] == '"1"'
    assert (await (await client.get("/api/status")).json())["message"] == "half"


async def test_put_creates_a_task_on_first_write(client: Client) -> None:
    state = await put(client, "job-1.a_b", status="completed", message="done")
    assert state["task"] == "job-1.a_b"
    assert state["version"] == 1
    assert (state["status"], state["progress"], state["message"]) == ("completed", None, "done")
    listing = await (await client.get("/api/tasks")).json()
    assert listing == {"tasks": [state]}


async def test_update_keeps_left_out_fields_and_null_clears_them(client: Client) -> None:
    await put(client, "t", status="in_progress", progress=10, message="start")
    kept = await put(client, "t", progress=20)
    assert (kept["status"], kept["progress"], kept["message"]) == ("in_progress", 20, "start")
    kept = await put(client, "t", message="later")
    assert (kept["status"], kept["progress"], kept["message"]) == ("in_progress", 20, "later")
    cleared = await put(client, "t", progress=None, message=None)
    assert (cleared["status"], cleared["progress"], cleared["message"]) == (
        "in_progress",
        None,
        None,
    )
    assert await get_state(client, "t") == cleared


async def test_every_accepted_write_increments_the_version_by_exactly_one(client: Client) -> None:
    bodies: list[dict[str, Any]] = [
        {"status": "in_progress"},
        {"status": "in_progress"},  # no visible change still counts as a write
        {"progress": 0},
        {"message": None},
        {"status": "completed", "progress": 100, "message": "ok", "expected_version": 4},
    ]
    for expected, body in enumerate(bodies, start=1):
        assert (await put(client, "v", **body))["version"] == expected
    assert (await get_state(client, "v"))["version"] == len(bodies)


async def test_versions_of_different_tasks_are_independent(client: Client) -> None:
    await put(client, "a", progress=1)
    await put(client, "a", progress=2)
    assert (await put(client, "b", progress=1))["version"] == 1


async def test_fifty_concurrent_writers_get_versions_1_to_50_each_once(client: Client) -> None:
    responses = await asyncio.gather(
        *(
            client.put("/api/tasks/busy", json={"progress": i, "message": f"w{i}"})
            for i in range(50)
        )
    )
    assert [r.status for r in responses] == [200] * 50
    states = [await r.json() for r in responses]
    assert sorted(s["version"] for s in states) == list(range(1, 51))
    final = await get_state(client, "busy")
    assert final["version"] == 50
    assert final == next(s for s in states if s["version"] == 50)


async def test_message_keeps_unicode_tabs_and_newlines(client: Client) -> None:
    message = "ünïcødé ✓ 🚀\tcol\r\nline " + "x" * 470
    assert len(message) <= 500
    state = await put(client, "u", message=message)
    assert state["message"] == message
    assert (await get_state(client, "u"))["message"] == message


# --- optimistic concurrency -------------------------------------------------------------------


async def test_write_with_the_current_expected_version_is_accepted(client: Client) -> None:
    assert (await put(client, "occ", status="in_progress", expected_version=0))["version"] == 1
    assert (await put(client, "occ", progress=5, expected_version=1))["version"] == 2


@pytest.mark.parametrize("expected_version", [0, 1, 3, 2**53 - 1])
async def test_stale_expected_version_is_409_with_the_current_state_and_changes_nothing(
    client: Client, expected_version: int
) -> None:
    await put(client, "occ", status="in_progress", progress=10)
    current = await put(client, "occ", progress=20)
    response = await client.put(
        "/api/tasks/occ", json={"status": "failed", "expected_version": expected_version}
    )
    await assert_error(response, 409, "version_conflict")
    assert (await response.json())["current"] == current
    assert await get_state(client, "occ") == current


async def test_expected_version_zero_on_a_written_task_conflicts(client: Client) -> None:
    first = await put(client, "once", status="in_progress", expected_version=0)
    response = await client.put("/api/tasks/once", json={"status": "failed", "expected_version": 0})
    await assert_error(response, 409, "version_conflict")
    assert (await response.json())["current"] == first


async def test_concurrent_writers_with_one_expected_version_let_exactly_one_win(
    client: Client,
) -> None:
    responses = await asyncio.gather(
        *(
            client.put("/api/tasks/race", json={"progress": i, "expected_version": 0})
            for i in range(20)
        )
    )
    assert sorted(r.status for r in responses) == [200] + [409] * 19
    winner = next(r for r in responses if r.status == 200)
    assert await get_state(client, "race") == await winner.json()


# --- bad bodies -------------------------------------------------------------------------------

BAD_BODIES: list[tuple[str, bytes, str]] = [
    ("malformed", b'{"status": "completed"', "invalid_json"),
    ("empty body", b"", "invalid_json"),
    ("not utf-8", b'{"message": "\xff\xfe"}', "invalid_json"),
    ("raw surrogate bytes", b'{"message": "\xed\xa0\x80"}', "invalid_json"),
    ("NaN", b'{"progress": NaN}', "invalid_json"),
    ("Infinity", b'{"progress": Infinity}', "invalid_json"),
    ("duplicate keys", b'{"status": "completed", "status": "failed"}', "invalid_json"),
    ("deep nesting", b"[" * 16_000, "invalid_json"),
    ("deep nesting in a field", b'{"message": ' + b"[" * 16_000, "invalid_json"),
    ("deep nesting closed", b"[" * 8000 + b"]" * 8000, "invalid_json"),
    ("5000-digit integer", b'{"progress": ' + b"7" * 5000 + b"}", "invalid_json"),
    ("array", b'[{"status": "completed"}]', "invalid_body"),
    ("string", b'"completed"', "invalid_body"),
    ("empty object", b"{}", "empty_update"),
    ("only expected_version", b'{"expected_version": 1}', "empty_update"),
    ("unknown field", b'{"status": "completed", "owner": "me"}', "unknown_field"),
    ("unknown status", b'{"status": "done"}', "invalid_status"),
    ("status case", b'{"status": "COMPLETED"}', "invalid_status"),
    ("null status", b'{"status": null}', "invalid_status"),
    ("progress negative", b'{"progress": -1}', "invalid_progress"),
    ("progress over 100", b'{"progress": 101}', "invalid_progress"),
    ("progress float", b'{"progress": 50.5}', "invalid_progress"),
    ("progress integral float", b'{"progress": 50.0}', "invalid_progress"),
    ("progress bool", b'{"progress": true}', "invalid_progress"),
    ("progress string", b'{"progress": "50"}', "invalid_progress"),
    ("progress huge", b'{"progress": 100000000000000000000000000000}', "invalid_progress"),
    ("progress overflowing float", b'{"progress": 1e400}', "invalid_progress"),
    ("message number", b'{"message": 7}', "invalid_message"),
    ("message over 500", b'{"message": "' + b"m" * 501 + b'"}', "invalid_message"),
    ("message NUL", b'{"message": "a\\u0000b"}', "invalid_message"),
    ("message escape char", b'{"message": "\\u001b[31mred"}', "invalid_message"),
    ("message DEL", b'{"message": "a\\u007f"}', "invalid_message"),
    ("message lone surrogate", b'{"message": "\\ud800"}', "invalid_message"),
    ("version negative", b'{"progress": 1, "expected_version": -1}', "invalid_expected_version"),
    ("version float", b'{"progress": 1, "expected_version": 1.5}', "invalid_expected_version"),
    ("version string", b'{"progress": 1, "expected_version": "1"}', "invalid_expected_version"),
    ("version bool", b'{"progress": 1, "expected_version": false}', "invalid_expected_version"),
    (
        "version huge",
        b'{"progress": 1, "expected_version": 1' + b"0" * 20 + b"}",
        "invalid_expected_version",
    ),
]


@pytest.mark.parametrize("path", ["/api/update-status", "/api/tasks/t", "/api/tasks/fresh"])
@pytest.mark.parametrize(
    ("raw", "code"), [c[1:] for c in BAD_BODIES], ids=[c[0] for c in BAD_BODIES]
)
async def test_bad_body_is_400_and_changes_nothing(
    seeded: Client, path: str, raw: bytes, code: str
) -> None:
    method = "POST" if path == "/api/update-status" else "PUT"
    response = await seeded.request(method, path, data=raw, headers=JSON)
    await assert_error(response, 400, code)


async def test_json_content_type_with_charset_is_accepted(client: Client) -> None:
    response = await client.put(
        "/api/tasks/cs",
        data=b'{"status": "failed"}',
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert response.status == 200


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "application/jsonx", "multipart/form-data"],
)
async def test_non_json_content_type_is_415_and_changes_nothing(
    seeded: Client, content_type: str
) -> None:
    for method, path in (("POST", "/api/update-status"), ("PUT", "/api/tasks/t")):
        response = await seeded.request(
            method, path, data=b'{"status": "failed"}', headers={"Content-Type": content_type}
        )
        await assert_error(response, 415, "unsupported_media_type")


async def test_missing_content_type_is_415_and_changes_nothing(seeded: Client) -> None:
    for method, path in (("POST", "/api/update-status"), ("PUT", "/api/tasks/t")):
        response = await seeded.request(
            method, path, data=b'{"status": "failed"}', skip_auto_headers=["Content-Type"]
        )
        assert "Content-Type" not in response.request_info.headers
        await assert_error(response, 415, "unsupported_media_type")


def padded_body(size: int) -> bytes:
    """A valid update padded with spaces to exactly ``size`` bytes."""
    core = b'{"status": "failed"}'
    return core[:-1] + b" " * (size - len(core)) + b"}"


async def test_body_of_exactly_16_kib_is_accepted(client: Client) -> None:
    response = await client.put("/api/tasks/big", data=padded_body(16 * 1024), headers=JSON)
    assert response.status == 200, await response.text()


async def test_body_over_16_kib_with_content_length_is_413_and_changes_nothing(
    seeded: Client,
) -> None:
    for path in ("/api/tasks/t", "/api/tasks/fresh"):
        response = await seeded.put(path, data=padded_body(16 * 1024 + 1), headers=JSON)
        await assert_error(response, 413, "body_too_large")
    response = await seeded.post("/api/update-status", data=b"[" * 100_000, headers=JSON)
    await assert_error(response, 413, "body_too_large")


async def test_chunked_body_over_16_kib_is_413_and_changes_nothing(seeded: Client) -> None:
    body = padded_body(16 * 1024 + 1)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    for path in ("/api/tasks/t", "/api/tasks/fresh"):
        response = await seeded.put(path, data=chunks(), headers=JSON)
        assert response.request_info.headers.get("Transfer-Encoding") == "chunked"
        await assert_error(response, 413, "body_too_large")


async def test_chunked_body_within_the_limit_is_accepted(client: Client) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"status": '
        yield b'"failed"}'

    response = await client.put("/api/tasks/chunky", data=chunks(), headers=JSON)
    assert response.status == 200
    assert (await response.json())["status"] == "failed"


# --- bad URLs and methods ---------------------------------------------------------------------

BAD_TASK_IDS = ["-x", ".x", "x" * 65, "a%20b", "t%C3%A2che", "%E2%9C%93", "a%00b", "*"]


@pytest.mark.parametrize("task_id", BAD_TASK_IDS)
async def test_malformed_task_id_is_400_everywhere_and_changes_nothing(
    seeded: Client, task_id: str
) -> None:
    for method, path in (
        ("GET", f"/api/tasks/{task_id}"),
        ("PUT", f"/api/tasks/{task_id}"),
        ("GET", f"/api/tasks/{task_id}/poll?since=0&timeout=0"),
    ):
        response = await seeded.request(method, URL(path, encoded=True), json={"status": "failed"})
        await assert_error(response, 400, "invalid_task_id")


async def test_task_id_of_64_chars_is_accepted(client: Client) -> None:
    assert (await put(client, "x" * 64, status="failed"))["task"] == "x" * 64


BAD_COUNTERS = ["-1", "1.5", "abc", "", "99999999999999999999", "1e3", "+1", "0x1", "%201"]


@pytest.mark.parametrize("value", BAD_COUNTERS)
@pytest.mark.parametrize(
    "template",
    [
        "/api/poll-status?last_version={}",
        "/api/poll-status?last_version=0&timeout={}",
        "/api/tasks/t/poll?since={}",
        "/api/tasks/t/poll?since=0&timeout={}",
        "/api/watch?timeout={}",
    ],
)
async def test_bad_counter_in_query_is_400(seeded: Client, template: str, value: str) -> None:
    response = await seeded.get(URL(template.format(value), encoded=True))
    await assert_error(response, 400, "invalid_parameter")


@pytest.mark.parametrize(
    "path",
    [
        "/api/poll-status?last_version=0&last_version=1",
        "/api/poll-status?last_version=1&timeout=0&timeout=1",
        "/api/tasks/t/poll?since=1&since=1",
        "/api/watch?since=0&since=0",
        "/api/watch?tasks=a&tasks=b",
    ],
)
async def test_duplicate_query_keys_are_400(seeded: Client, path: str) -> None:
    response = await seeded.get(path)
    await assert_error(response, 400, "duplicate_parameter")


@pytest.mark.parametrize(
    "path", ["/api/poll-status", "/api/poll-status?timeout=0", "/api/tasks/t/poll"]
)
async def test_missing_version_in_a_poll_is_400(seeded: Client, path: str) -> None:
    await assert_error(await seeded.get(path), 400, "missing_parameter")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("POST", "/api/status", "GET"),
        ("PUT", "/api/status", "GET"),
        ("HEAD", "/api/status", "GET"),
        ("GET", "/api/update-status", "POST"),
        ("DELETE", "/api/tasks", "GET"),
        ("POST", "/api/tasks/t", "GET"),
        ("POST", "/api/tasks", "GET"),
        ("POST", "/api/poll-status?last_version=0", "GET"),
        ("PUT", "/api/watch", "GET"),
    ],
)
async def test_wrong_method_is_405_with_a_json_error(
    seeded: Client, method: str, path: str, allowed: str
) -> None:
    response = await seeded.request(method, path, json={"status": "failed"})
    assert response.status == 405
    assert allowed in response.headers["Allow"]
    if method != "HEAD":
        await assert_error(response, 405, "method_not_allowed")


async def test_unknown_api_path_is_a_json_404(client: Client) -> None:
    await assert_error(await client.get("/api/statuses"), 404, "not_found")
