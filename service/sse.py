"""Server-Sent Events: a task's states, or a board's changes, as one long response.

``GET /api/tasks/{id}/events`` follows one task, ``GET /api/events[?tasks=a,b]`` a board. Each
event is one ``id:`` line, the place to resume from (the version, or the watch cursor), and one
``data:`` line, the JSON a poll (a state) or a watch (a batch) would answer::

    id: 7
    data: {"task": "build-42", "status": "completed", "version": 7, ...}

A client that reconnects with ``Last-Event-ID`` (EventSource does so by itself) resumes without
loss: its feed catches up from the store, then follows the hub (``feeds.py``). ``since`` in the
query names the place to start from on a first connection. A comment line every
``STREAM_HEARTBEAT`` seconds keeps proxies from closing a quiet stream. Streams count against the
held-poll cap like polls, and end when the token they were opened with expires (the client
comes back with a new one). On shutdown every open stream (kept in a ``WeakSet`` under an app key)
gets a jittered ``retry:`` and ends, so the process exits at once and its clients spread over the
other instances.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import weakref

from aiohttp import web

from .api import admit_waiter, single_param, task_id_of, watch_filter
from .auth import enforced_grant
from .errors import BackendUnavailable
from .feeds import BoardFeed, Event, TaskFeed
from .hub import WATCH_KEY
from .keys import BACKEND, CONFIG, HUB
from .metrics import METRICS
from .model import parse_counter, parse_cursor

log = logging.getLogger(__name__)

HEADERS = {
    "Content-Type": "text/event-stream",
    # Any nginx in front passes each event on at once, whatever its proxy_buffering says.
    "X-Accel-Buffering": "no",
}
HEARTBEAT = b": heartbeat\n\n"


class EventStream:
    """One open stream: the task that writes it, stopped on shutdown."""

    __slots__ = ("__weakref__", "stopping", "task")

    def __init__(self, task: asyncio.Task[object]) -> None:
        self.task = task
        self.stopping = False

    def stop(self) -> None:
        self.stopping = True
        self.task.cancel()


STREAMS = web.AppKey("sse_streams", weakref.WeakSet[EventStream])


def _resume_from(request: web.Request) -> tuple[str, str | None]:
    """Where the client resumes: ``Last-Event-ID`` (a reconnect) over the ``since`` it first
    asked with; with the name to blame if it is malformed."""
    last = request.headers.get("Last-Event-ID", "").strip()
    if last:
        return "Last-Event-ID", last
    return "since", single_param(request, "since")


async def task_events(request: web.Request) -> web.StreamResponse:
    task_id = task_id_of(request)
    name, raw = _resume_from(request)
    since = None if raw is None else parse_counter(name, raw)
    admit_waiter(request)
    with request.app[HUB].waiting(task_id) as waiter:
        feed = TaskFeed(request.app[BACKEND], waiter, task_id, since)
        return await _stream(request, feed)


async def board_events(request: web.Request) -> web.StreamResponse:
    _, raw = _resume_from(request)
    since = parse_cursor(raw or "")
    only = watch_filter(request)
    admit_waiter(request)
    with request.app[HUB].waiting(WATCH_KEY) as waiter:
        feed = BoardFeed(request.app[BACKEND], waiter, only, since)
        return await _stream(request, feed)


async def _stream(request: web.Request, feed: TaskFeed | BoardFeed) -> web.StreamResponse:
    first = await feed.catch_up()  # before the headers: a store that is away is still a 503
    response = web.StreamResponse(headers=HEADERS)
    await response.prepare(request)
    task = asyncio.current_task()
    assert task is not None
    streams, stream = request.app[STREAMS], EventStream(task)
    streams.add(stream)
    try:
        with request.app[METRICS].holding("sse"):
            ending = await _pump(request, response, feed, first)
    except asyncio.CancelledError:
        if not stream.stopping:
            raise  # the client went away
        task.uncancel()
        ending = _retry_hint()
    except ConnectionError:
        return response  # the client went away while we wrote to it
    finally:
        streams.discard(stream)
    if ending:
        with contextlib.suppress(ConnectionError):
            await response.write(ending)
    return response


async def _pump(
    request: web.Request,
    response: web.StreamResponse,
    feed: TaskFeed | BoardFeed,
    first: Event | None,
) -> bytes:
    """Write events, and heartbeats in between, until the stream ends; what to end it with."""
    config, hub, metrics = request.app[CONFIG], request.app[HUB], request.app[METRICS]
    grant = enforced_grant(request, config)
    valid_until = None if grant is None else grant.valid_until
    # The first write sends the headers too: the client knows at once that it is connected.
    await response.write(HEARTBEAT if first is None else _frame(first))
    while True:
        hold = config.stream_heartbeat
        if valid_until is not None:
            hold = min(hold, valid_until - time.time())
            if hold <= 0:  # the client comes back with a new token, or gets its 401
                return b": token expired\n\n"
        try:
            event = await feed.next(hold)
        except BackendUnavailable as exc:
            # A gap in the change stream could not be filled: end here; the client resumes from
            # its last event once the store is back.
            log.warning("event stream ended: %s", exc)
            return b""
        if event is None:
            if hub.closed:
                return _retry_hint()
            await response.write(HEARTBEAT)
            continue
        if event.change is not None:
            metrics.delivered("sse", event.change)
        await response.write(_frame(event))


def _retry_hint() -> bytes:
    """Shutting down: the client comes back after a jittered pause, to another instance."""
    return f"retry: {random.randint(1000, 3000)}\n\n".encode()


def _frame(event: Event) -> bytes:
    # JSON bodies hold no line breaks (json.dumps escapes them), so one data: line is enough.
    return b"id: " + event.id.encode() + b"\ndata: " + event.body + b"\n\n"


async def stop_streams(app: web.Application) -> None:
    """on_shutdown: every open stream ends now, as held polls do."""
    open_streams = app[STREAMS]
    streams = list(open_streams)
    if streams:
        log.info("shutting down: ending %d event streams", len(streams))
    for stream in streams:
        stream.stop()


def setup_sse_routes(app: web.Application) -> None:
    app[STREAMS] = weakref.WeakSet()
    app.router.add_get("/api/tasks/{task_id}/events", task_events, allow_head=False)
    app.router.add_get("/api/events", board_events, allow_head=False)
    app.on_shutdown.append(stop_streams)
