"""Standard HTTP long polling: ``GET /api/tasks/{id}`` with ``If-None-Match`` and ``Prefer: wait``.

A conditional GET answers 304 at once while the client's ETag is the current one; with
``Prefer: wait=N`` it is held like a poll and answers 200 on the next change or 304 when the wait
passes, saying the wait it honoured in ``Preference-Applied``. Anything malformed is read leniently,
never as a server error. Every test runs on both backends; "held" is observed through the hub.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.conditional import EntityTags, parse_if_none_match, parse_prefer_wait
from service.model import MAX_COUNTER

from .conftest import Client, ClientFactory, hub_of, put, wait_for_waiters


async def get(client: Client, task: str, **headers: str) -> aiohttp.ClientResponse:
    return await client.get(f"/api/tasks/{task}", headers=headers)


async def conditional(
    client: Client, task: str, etag: str, prefer: str | None = None
) -> aiohttp.ClientResponse:
    headers = {"If-None-Match": etag, **({"Prefer": prefer} if prefer else {})}
    return await client.get(f"/api/tasks/{task}", headers=headers)


async def not_modified(response: aiohttp.ClientResponse, etag: str) -> None:
    assert response.status == 304, await response.text()
    assert response.headers["ETag"] == etag
    assert await response.read() == b""


# --- without Prefer: at once -------------------------------------------------------------------


async def test_current_etag_without_prefer_is_304_at_once(client: Client) -> None:
    await put(client, "build", status="in_progress")
    started = time.monotonic()
    response = await conditional(client, "build", '"1"')
    await not_modified(response, '"1"')
    assert "Preference-Applied" not in response.headers
    assert response.headers["Cache-Control"] == "no-store"
    assert time.monotonic() - started < 1
    assert hub_of(client).waiting_total == 0


async def test_old_etag_is_200_with_the_state_and_its_etag(client: Client) -> None:
    await put(client, "build", status="in_progress")
    latest = await put(client, "build", progress=30)
    response = await conditional(client, "build", '"1"', prefer="wait=30")
    assert response.status == 200
    assert await response.json() == latest
    assert response.headers["ETag"] == '"2"'
    assert response.headers["Preference-Applied"] == "wait=30"


async def test_never_written_task_is_not_modified_at_version_zero(client: Client) -> None:
    await not_modified(await conditional(client, "fresh", '"0"'), '"0"')


async def test_etag_ahead_of_the_store_is_200_so_the_client_resyncs(client: Client) -> None:
    latest = await put(client, "build", status="failed")
    response = await conditional(client, "build", '"9"', prefer="wait=30")
    assert response.status == 200
    assert await response.json() == latest


async def test_weak_etag_star_and_lists_compare_as_rfc_9110_says(client: Client) -> None:
    await put(client, "build", status="in_progress")
    await not_modified(await conditional(client, "build", 'W/"1"'), '"1"')
    await not_modified(await conditional(client, "build", "*"), '"1"')
    await not_modified(await conditional(client, "build", '"0", "1"'), '"1"')
    await not_modified(await conditional(client, "build", '"x", W/"1"'), '"1"')
    listed = await client.get(
        "/api/tasks/build", headers=[("If-None-Match", '"0"'), ("If-None-Match", '"1"')]
    )
    await not_modified(listed, '"1"')
    assert (await conditional(client, "build", '"0", "5"')).status == 200


# --- with Prefer: wait, held -------------------------------------------------------------------


async def test_prefer_wait_holds_and_answers_200_with_the_new_state_on_change(
    client: Client,
) -> None:
    await put(client, "deploy", status="in_progress")
    held = asyncio.create_task(conditional(client, "deploy", '"1"', prefer="wait=30"))
    await wait_for_waiters(client, 1)
    assert not held.done()

    written = await put(client, "deploy", status="completed", progress=100)

    response = await asyncio.wait_for(held, 5)
    assert response.status == 200
    assert await response.json() == written
    assert response.headers["ETag"] == '"2"'
    assert response.headers["Preference-Applied"] == "wait=30"
    await wait_for_waiters(client, 0)


async def test_prefer_wait_answers_304_when_the_wait_passes(client: Client) -> None:
    await put(client, "deploy", status="in_progress")
    started = time.monotonic()
    held = asyncio.create_task(conditional(client, "deploy", '"1"', prefer="wait=1"))
    await wait_for_waiters(client, 1)
    response = await asyncio.wait_for(held, 5)
    elapsed = time.monotonic() - started
    await not_modified(response, '"1"')
    assert response.headers["Preference-Applied"] == "wait=1"
    assert 0.85 <= elapsed < 3, elapsed  # the hold, less at most 10 % of jitter
    assert hub_of(client).waiting_total == 0


async def test_star_with_prefer_wait_holds_until_the_next_change(client: Client) -> None:
    await put(client, "deploy", status="in_progress")
    held = asyncio.create_task(conditional(client, "deploy", "*", prefer="wait=30"))
    await wait_for_waiters(client, 1)
    written = await put(client, "deploy", progress=5)
    response = await asyncio.wait_for(held, 5)
    assert response.status == 200
    assert await response.json() == written


async def test_a_change_to_another_task_does_not_end_the_hold(client: Client) -> None:
    await put(client, "mine", status="in_progress")
    held = asyncio.create_task(conditional(client, "mine", '"1"', prefer="wait=30"))
    await wait_for_waiters(client, 1)
    await put(client, "other", status="completed")
    assert (await client.get("/api/tasks")).status == 200  # a round trip: time to answer wrongly
    assert not held.done()
    written = await put(client, "mine", status="completed")
    assert await (await asyncio.wait_for(held, 5)).json() == written


async def test_the_wait_is_capped_and_preference_applied_says_by_how_much(
    make_client: ClientFactory,
) -> None:
    client = await make_client(poll_timeout=1, poll_timeout_max=1)
    await put(client, "capped", status="in_progress")
    started = time.monotonic()
    for asked in ("wait=600", "wait=" + "9" * 40):
        response = await asyncio.wait_for(conditional(client, "capped", '"1"', prefer=asked), 5)
        await not_modified(response, '"1"')
        assert response.headers["Preference-Applied"] == "wait=1"
    assert time.monotonic() - started < 4


async def test_a_held_conditional_get_answers_304_on_shutdown_with_retry_after(
    client: Client,
) -> None:
    await put(client, "drained", status="in_progress")
    held = asyncio.create_task(conditional(client, "drained", '"1"', prefer="wait=30"))
    await wait_for_waiters(client, 1)
    await client.app.shutdown()  # on_shutdown: the hub releases every held request
    response = await asyncio.wait_for(held, 5)
    await not_modified(response, '"1"')
    assert response.headers["Retry-After"] in {"1", "2", "3"}
    assert response.headers["Connection"].lower() == "close"


async def test_a_page_of_an_allowed_origin_may_long_poll_with_the_standard_headers(
    make_client: ClientFactory,
) -> None:
    origin = "https://board.example"
    client = await make_client(cors_origins=(origin,))
    preflight = await client.options(
        "/api/tasks/cors",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "if-none-match, prefer",
        },
    )
    assert preflight.status == 200
    allowed = preflight.headers["Access-Control-Allow-Headers"].lower().replace(" ", "")
    assert {"if-none-match", "prefer"} <= set(allowed.split(","))
    headers = {"Origin": origin, "If-None-Match": '"0"', "Prefer": "wait=1"}
    response = await asyncio.wait_for(client.get("/api/tasks/cors", headers=headers), 5)
    await not_modified(response, '"0"')
    exposed = set(response.headers["Access-Control-Expose-Headers"].split(","))
    assert {"ETag", "Preference-Applied"} <= exposed


# --- Prefer, leniently -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefer", "applied"),
    [
        ("respond-async, wait=1", "wait=1"),  # other preferences are ignored
        ('wait="1"', "wait=1"),  # a quoted value
        ("WAIT = 1; foo=bar", "wait=1"),  # names are case-insensitive; parameters ignored
        ("wait=1, wait=600", "wait=1"),  # only the first counts
    ],
)
async def test_prefer_wait_is_read_as_rfc_7240_writes_it(
    client: Client, prefer: str, applied: str
) -> None:
    await put(client, "lenient", status="in_progress")
    held = asyncio.create_task(conditional(client, "lenient", '"1"', prefer=prefer))
    await wait_for_waiters(client, 1)
    response = await asyncio.wait_for(held, 5)
    await not_modified(response, '"1"')
    assert response.headers["Preference-Applied"] == applied


async def test_only_the_first_of_several_prefer_headers_counts(client: Client) -> None:
    await put(client, "lenient", status="in_progress")
    headers = [("If-None-Match", '"1"'), ("Prefer", "wait=1"), ("Prefer", "wait=600")]
    response = await asyncio.wait_for(client.get("/api/tasks/lenient", headers=headers), 5)
    await not_modified(response, '"1"')
    assert response.headers["Preference-Applied"] == "wait=1"


@pytest.mark.parametrize(
    "prefer",
    ["handling=lenient", "wait=abc", "wait=-1", "wait=1.5", "wait=", "wait", "=1", "wait=1 2"],
)
async def test_prefer_without_a_usable_wait_is_ignored(client: Client, prefer: str) -> None:
    await put(client, "lenient", status="in_progress")
    started = time.monotonic()
    response = await conditional(client, "lenient", '"1"', prefer=prefer)
    await not_modified(response, '"1"')
    assert "Preference-Applied" not in response.headers
    assert time.monotonic() - started < 1


async def test_prefer_wait_without_if_none_match_is_a_plain_get(client: Client) -> None:
    latest = await put(client, "plain", status="in_progress")
    started = time.monotonic()
    response = await get(client, "plain", Prefer="wait=30")
    assert response.status == 200
    assert await response.json() == latest
    assert "Preference-Applied" not in response.headers
    assert time.monotonic() - started < 1


@pytest.mark.parametrize(
    "etag",
    ["1", '"1', "W/1", '*, "1"', '"1" "2"', '"a b"', "", ",", '"abc"', '"99999999999999999"'],
)
async def test_if_none_match_that_names_no_state_of_ours_is_a_plain_200(
    client: Client, etag: str
) -> None:
    latest = await put(client, "odd", status="in_progress")
    started = time.monotonic()
    response = await conditional(client, "odd", etag, prefer="wait=30")
    assert response.status == 200
    assert await response.json() == latest
    assert "Preference-Applied" not in response.headers
    assert time.monotonic() - started < 1


# --- the parsers, on anything ------------------------------------------------------------------


@given(st.lists(st.text(), max_size=3))
def test_header_parsers_never_raise(values: list[str]) -> None:
    tags = parse_if_none_match(values)
    assert tags is None or tags.any or tags.versions
    wait = parse_prefer_wait(values)
    assert wait is None or 0 <= wait <= MAX_COUNTER


@given(
    st.lists(st.integers(0, MAX_COUNTER), min_size=1, max_size=5),
    st.lists(st.booleans(), min_size=5, max_size=5),
    st.integers(0, MAX_COUNTER),
)
def test_if_none_match_matches_exactly_the_versions_listed(
    versions: list[int], weak: list[bool], current: int
) -> None:
    header = ", ".join(f'{"W/" if w else ""}"{v}"' for v, w in zip(versions, weak, strict=False))
    tags = parse_if_none_match([header])
    assert tags == EntityTags(frozenset(versions))
    assert tags.matches(current) == (current in versions)
