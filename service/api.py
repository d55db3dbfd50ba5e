"""JSON API handlers: parse and validate, call the backend or the hub, serialize.

Long polls register with the hub BEFORE reading the backend, so an update landing between the
read and the wait still wakes them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Mapping
from typing import Any

from aiohttp import hdrs, web

from .auth import GRANT
from .backend import TaskLimitReached, TaskNotFound, VersionConflict
from .conditional import parse_if_none_match, parse_prefer_wait
from .config import Config
from .direct import AlreadyAnswered, direct_transport
from .errors import ApiError, bad_request
from .hub import TICK, WATCH_KEY, Change
from .idempotency import HEADER as IDEMPOTENCY_HEADER
from .idempotency import IdempotencyKey, IdempotencyKeyReused, idempotency_key
from .idempotency import mismatch as idempotency_mismatch
from .keys import BACKEND, CONFIG, HUB
from .metrics import delivering
from .model import (
    DEFAULT_TASK,
    MAX_COUNTER,
    Cursor,
    TaskState,
    parse_counter,
    parse_cursor,
    parse_update,
    validate_task_id,
)

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024
# 100 ids of 64 characters fit in the 8 KiB request line of aiohttp and nginx.
MAX_WATCH_TASKS = 100


def json_response(
    data: object, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return raw_json_response(json.dumps(data).encode(), status=status, headers=headers)


def raw_json_response(
    body: bytes, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)


def state_response(state: TaskState) -> web.Response:
    return json_response(state.to_dict(), headers={"ETag": f'"{state.version}"'})


def change_response(change: Change) -> web.Response:
    response = raw_json_response(change.body, headers={"ETag": f'"{change.state.version}"'})
    return delivering(response, change)


# --- query parsing ----------------------------------------------------------------------------


def single_param(request: web.Request, name: str) -> str | None:
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise bad_request("duplicate_parameter", f"{name} given more than once")
    return values[0] if values else None


def _required_counter(request: web.Request, name: str) -> int:
    raw = single_param(request, name)
    if raw is None:
        raise bad_request("missing_parameter", f"{name} is required")
    return parse_counter(name, raw)


def _poll_timeout(request: web.Request, asked: int | None = None) -> float:
    """The hold: asked for (``asked``, else the query's ``timeout``, else the default), capped,
    and shortened by a little random jitter.

    The jitter (up to 10 %, at most 2 s) spreads the return of clients that connected together,
    so they do not all come back in the same instant. It is at least the hub's clock tick, by
    which a wait may end late: a hold never exceeds what was asked.
    """
    config = request.app[CONFIG]
    if asked is None:
        raw = single_param(request, "timeout")
        asked = config.poll_timeout if raw is None else parse_counter("timeout", raw)
    return hold_for(asked, config)


def hold_for(asked: int, config: Config) -> float:
    """``_poll_timeout`` once the seconds asked for are known (the fast path's too)."""
    hold = min(asked, config.poll_timeout_max)
    return hold - max(TICK, random.uniform(0, min(hold * 0.1, 2.0)))


def retry_after() -> str:
    """A jittered Retry-After, so clients sent away together do not return together."""
    return str(random.randint(1, 3))


def admit_waiter(request: web.Request) -> None:
    """Refuse a new held request past the instance's cap; those already held are untouched."""
    if request.app[HUB].waiting_total >= request.app[CONFIG].max_held_polls:
        raise ApiError(
            503,
            "too_many_waiters",
            "this instance holds as many polls as it may; retry shortly",
            headers={"Retry-After": retry_after()},
        )


def _nothing_new(request: web.Request, etag: int | None = None) -> web.Response:
    """204 (304 with the ``etag`` of a conditional GET): the hold passed with no change, or the
    instance is shutting down.

    On shutdown the answer also closes the connection and asks for a jittered pause, so the
    clients of a drained instance spread over the others instead of all reconnecting at once.
    """
    status, headers = 204, {}
    if etag is not None:
        status, headers = 304, {"ETag": f'"{etag}"'}
    if request.app[HUB].closed:
        headers |= {"Retry-After": retry_after(), "Connection": "close"}
    return web.Response(status=status, headers=headers)


def task_id_of(request: web.Request) -> str:
    return validate_task_id(request.match_info["task_id"])


# --- reads ------------------------------------------------------------------------------------


async def get_status(request: web.Request) -> web.Response:
    return state_response(await request.app[BACKEND].get(DEFAULT_TASK))


async def get_task(request: web.Request) -> web.StreamResponse:
    """The state; a conditional GET (``If-None-Match``, ``Prefer: wait``) is a long poll."""
    task_id = task_id_of(request)
    backend = request.app[BACKEND]
    tags = parse_if_none_match(request.headers.getall(hdrs.IF_NONE_MATCH, []))
    if tags is None:  # unconditional, or naming no state of ours: nothing matches
        return state_response(await backend.get(task_id))
    wait = parse_prefer_wait(request.headers.getall("Prefer", []))
    since = tags.single
    if since is None or wait is None:  # "*" or several tags: the current one is the one to hold
        state = await backend.get(task_id)
        if not tags.matches(state.version):
            return state_response(state)
        if wait is None:
            return _nothing_new(request, etag=state.version)
        since = state.version
    response = await _poll(request, task_id, since, asked=wait, conditional=True)
    applied = min(wait, request.app[CONFIG].poll_timeout_max)
    response.headers["Preference-Applied"] = f"wait={applied}"
    return response


async def task_history(request: web.Request) -> web.Response:
    """The task's last changes, newest first (empty for a task never written)."""
    task_id = task_id_of(request)
    entries = await request.app[BACKEND].history(task_id)
    return json_response({"task": task_id, "history": [entry.to_dict() for entry in entries]})


async def list_tasks(request: web.Request) -> web.Response:
    """Every live task: deleted ones are left out."""
    states = await request.app[BACKEND].list_tasks()
    return json_response({"tasks": [state.to_dict() for state in states]})


# --- long polls -------------------------------------------------------------------------------


class NewerThan:
    """A poll's test of a change: a version above the one it has (a slotted object is a third
    of the memory of a lambda and its cell, for each of 10,000 held polls)."""

    __slots__ = ("version",)

    def __init__(self, version: int) -> None:
        self.version = version

    def __call__(self, change: Change) -> bool:
        return change.state.version > self.version


async def _poll(
    request: web.Request,
    task_id: str,
    since: int,
    *,
    asked: int | None = None,
    conditional: bool = False,
) -> web.StreamResponse:
    """Hold until the task's version is not ``since``, for ``asked`` seconds (default: the query's
    ``timeout``); a ``conditional`` GET answers 304 rather than 204 when nothing changed."""
    timeout = _poll_timeout(request, asked)
    admit_waiter(request)
    config, hub, backend = request.app[CONFIG], request.app[HUB], request.app[BACKEND]
    with hub.waiting(task_id) as waiter:
        state = backend.peek(task_id)
        if state is None or state.version < since:
            # Unknown here, or the client is ahead of what this instance has seen: ask the store.
            state = await backend.get(task_id)
        transport = None if conditional else direct_transport(request, bool(config.cors_origins))
        if state.version != since:  # also when the client is ahead: it resyncs after a reset
            latest = hub.latest(task_id)
            if (
                transport
                and latest is not None
                and latest.state == state
                and hub.answer_now(transport, latest)
            ):
                return AlreadyAnswered()  # (no notify delay: it is not a wake-up)
            return state_response(state)
        if transport:
            waiter.answer_directly(transport, since)
        change = await waiter.wait(NewerThan(since), timeout, newest=True)
    if change is None:
        return _nothing_new(request, etag=since if conditional else None)
    if change is waiter.delivered:
        return delivering(AlreadyAnswered(), change)  # the hub wrote the answer
    return change_response(change)


async def poll_status(request: web.Request) -> web.StreamResponse:
    return await _poll(request, DEFAULT_TASK, _required_counter(request, "last_version"))


async def poll_task(request: web.Request) -> web.StreamResponse:
    task_id = task_id_of(request)
    return await _poll(request, task_id, _required_counter(request, "since"))


def watch_filter(request: web.Request) -> frozenset[str] | None:
    raw = single_param(request, "tasks")
    if raw is None:
        return None
    ids = frozenset(validate_task_id(part) for part in raw.split(","))
    if len(ids) > MAX_WATCH_TASKS:
        raise bad_request("too_many_tasks", f"a watch covers at most {MAX_WATCH_TASKS} tasks")
    return ids


async def watch(request: web.Request) -> web.StreamResponse:
    """Every task changed after the cursor ``since`` (or a snapshot), held like a poll.

    One request covers the whole board, however many tasks it shows and however many are created.
    """
    since = parse_cursor(single_param(request, "since") or "")
    only = watch_filter(request)
    timeout = _poll_timeout(request)
    admit_waiter(request)
    hub, backend = request.app[HUB], request.app[BACKEND]
    deadline = asyncio.get_running_loop().time() + timeout
    with hub.waiting(WATCH_KEY) as waiter:
        batch = await backend.changes_since(since, only)
        if since is None or batch.reset or batch.tasks:
            return json_response(batch.to_dict())
        position = batch.cursor  # nothing this watch shows changed up to the store's cursor

        def news(change: Change) -> bool:
            nonlocal position
            if change.cursor.epoch != position.epoch:
                return True  # the store was reset: answer with a snapshot
            if change.cursor.seq <= position.seq:
                return False  # stale or duplicate
            if change.cursor.seq == position.seq + 1 and only and change.state.task not in only:
                position = change.cursor  # nothing this watch shows happened up to here
                return False
            return True

        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            change = await waiter.wait(news, remaining)
            if change is None:
                return _nothing_new(request)
            if _follows(change.cursor, position):
                # The body is shared by every watch here.
                return delivering(raw_json_response(change.watch_body), change)
            # A gap (a resync after a reconnect, or changes this watch does not show): ask the
            # store, and keep waiting if none of what it missed is for this watch.
            batch = await backend.changes_since(position, only)
            if batch.reset or batch.tasks:
                return json_response(batch.to_dict())
            position = batch.cursor


def _follows(cursor: Cursor, position: Cursor) -> bool:
    return cursor.epoch == position.epoch and cursor.seq == position.seq + 1


# --- writes -----------------------------------------------------------------------------------


async def _read_json_body(request: web.Request) -> bytes:
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise ApiError(413, "body_too_large", f"the body must be at most {MAX_BODY_BYTES} bytes")
    try:
        # Bounded: a body that stops arriving (or a broken chunked encoding, which aiohttp's
        # parser can leave unanswered) must not hold the request forever.
        async with asyncio.timeout(request.app[CONFIG].body_read_timeout):
            return await request.read()  # client_max_size stops longer chunked bodies (413)
    except TimeoutError:
        raise ApiError(408, "body_timeout", "the body did not arrive in time") from None


def _idempotency(request: web.Request, task_id: str, body: Any) -> IdempotencyKey | None:
    """The Idempotency-Key the write names, with the fingerprint of what it asks."""
    return idempotency_key(request.headers.get(IDEMPOTENCY_HEADER), request.method, task_id, body)


async def _write(request: web.Request, task_id: str) -> web.Response:
    config = request.app[CONFIG]
    body = await _read_json_body(request)
    update = parse_update(body, config.statuses)
    key = _idempotency(request, task_id, json.loads(body))
    grant = request.get(GRANT)
    try:
        result = await request.app[BACKEND].write(task_id, update, grant and grant.subject, key)
    except IdempotencyKeyReused:
        raise idempotency_mismatch() from None
    except TaskLimitReached:
        raise ApiError(
            507,
            "task_limit_reached",
            f"the store holds its maximum of {config.max_tasks} tasks; write to an existing one",
        ) from None
    except VersionConflict as conflict:
        raise _conflict(update.expected_version, conflict) from None
    state = result.state
    # DEBUG, not INFO: a line per write was 7 % of an instance's CPU at 1,600 writes/s (py-spy,
    # bench throughput); the task's history keeps who wrote what.
    log.debug(
        "task %s: %s -> %s (version %d)",
        task_id,
        result.previous.status,
        state.status,
        state.version,
    )
    return state_response(state)


def _conflict(expected: int | None, conflict: VersionConflict) -> ApiError:
    return ApiError(
        409,
        "version_conflict",
        f"expected version {expected}, task is at {conflict.current.version}",
        extra={"current": conflict.current.to_dict()},
    )


async def delete_task(request: web.Request) -> web.Response:
    """Delete a task: its tombstone (version + 1, ``deleted``) is the answer, and every
    watcher's next change."""
    task_id = task_id_of(request)
    raw = single_param(request, "expected_version")
    expected = None if raw is None else parse_counter("expected_version", raw)
    key = _idempotency(request, task_id, {"expected_version": expected})
    try:
        tombstone = await request.app[BACKEND].delete(task_id, expected, key)
    except IdempotencyKeyReused:
        raise idempotency_mismatch() from None
    except TaskNotFound:
        raise ApiError(
            404, "task_not_found", f"task {task_id} does not exist (or is deleted already)"
        ) from None
    except VersionConflict as conflict:
        raise _conflict(expected, conflict) from None
    log.debug("task %s: deleted (version %d)", task_id, tombstone.version)
    return state_response(tombstone)


async def update_status(request: web.Request) -> web.Response:
    return await _write(request, DEFAULT_TASK)


async def put_task(request: web.Request) -> web.Response:
    return await _write(request, task_id_of(request))


def setup_api_routes(app: web.Application) -> None:
    app.router.add_get("/api/status", get_status, allow_head=False)
    app.router.add_get("/api/poll-status", poll_status, allow_head=False)
    app.router.add_post("/api/update-status", update_status)
    app.router.add_get("/api/tasks", list_tasks, allow_head=False)
    app.router.add_get("/api/tasks/{task_id}", get_task, allow_head=False)
    app.router.add_put("/api/tasks/{task_id}", put_task)
    app.router.add_delete("/api/tasks/{task_id}", delete_task)
    app.router.add_get("/api/tasks/{task_id}/poll", poll_task, allow_head=False)
    app.router.add_get("/api/tasks/{task_id}/history", task_history, allow_head=False)
    app.router.add_get("/api/watch", watch, allow_head=False)


__all__ = ["MAX_BODY_BYTES", "MAX_COUNTER", "setup_api_routes"]
