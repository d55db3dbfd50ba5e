"""The long poll's fast path: a re-poll taken at the connection, held with no coroutine of its own.

A client of a fan-out re-polls the moment its answer arrives, so at 10,000 polls each change
brings 10,000 new requests. Through aiohttp's ordinary machinery each one costs a request
object, a task, a ``StreamWriter``, the router, four middlewares, the handler's coroutine and a
future to sleep on: ~40 µs of CPU (bench/RESULTS.md, the profile) and several KiB kept for as long
as it is held. This module takes the plain ones before any of that runs:

- ``PollConnection`` is aiohttp's ``RequestHandler`` (one per connection) whose parser hands each
  complete request to ``FastPoll.take`` first. aiohttp's own C parser still splits the bytes
  into requests, so message boundaries, limits and malformed input are exactly aiohttp's.
- ``FastPoll.take`` accepts only a request it can answer exactly as the ordinary path would:
  ``GET /api/tasks/{id}/poll`` or ``/api/poll-status`` over HTTP/1.1 keep-alive, no body, a
  query of plain characters with valid counters, no ``Origin`` when CORS is on, a token already
  verified that grants the read (``auth.VerifiedTokens``), the instance under its held-poll cap,
  and a state this instance knows (``Backend.peek``). Anything else (an error to answer, a
  store to read, a pipelined request) goes the ordinary way, untouched.
- A taken poll that is behind is answered at once with the hub's prebuilt answer; one that is
  current becomes a ``ParkedPoll``: a small object in the hub, which writes its answer
  (``direct.encode_poll_answer``), or a 204 when its hold passes, straight to the connection.

What it bypasses, and where each is kept: routing (two fixed paths), the middlewares (metrics are
counted here, the same counters; errors and CORS are left to the ordinary path; auth by
``may_read``; the write rate limit applies to writes only), ``on_response_prepare`` (the answers'
bytes carry the same headers, ``tests/test_direct.py`` compares them byte for byte), handler
cancellation (``connection_lost`` unparks a poll whose client left), and aiohttp's keep-alive
timer (pushed past each hold, as aiohttp does after each answer). ``FAST_POLL=0`` turns it off.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from email.utils import formatdate
from typing import Any

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler

from .api import hold_for, retry_after
from .auth import TOKENS, VerifiedTokens, may_read
from .backend import Backend
from .config import Config
from .errors import ApiError
from .hub import AnswerEncoder, Change, Hub, Waiter
from .keys import BACKEND, CONFIG, HUB
from .metrics import METRICS, Metrics
from .middleware import OTHER_POLICY
from .model import DEFAULT_TASK, parse_counter, validate_task_id

TASK_POLL_PREFIX, TASK_POLL_SUFFIX = "/api/tasks/", "/poll"
STATUS_POLL = "/api/poll-status"
# A query the fast path reads itself: nothing to decode (no %, no +), so what it reads is what
# aiohttp's would.
_PLAIN_QUERY = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.=&")
TRANSPORT = "longpoll"
TARGETS_KEPT = 4096  # request targets read (``FastPoll._read_target``), forgotten all at once
_UNREAD: Any = object()


class FastPoll:
    """One app's fast path: what ``take`` needs, looked up once."""

    def __init__(self, app: web.Application) -> None:
        self.config: Config = app[CONFIG]
        self.hub: Hub = app[HUB]
        self.backend: Backend = app[BACKEND]
        self.metrics: Metrics = app[METRICS]
        self.tokens: VerifiedTokens | None = app.get(TOKENS)
        self.cors = bool(self.config.cors_origins)
        self._targets: dict[str, tuple[str, int, int] | None] = {}
        self._second = -1  # the second of the Date in the 204's head
        self._head = ""
        self._nothing_new = b""

    def take(self, conn: PollConnection, message: RawRequestMessage) -> bool:
        """Answer or park ``message`` if it is a poll this path answers as the ordinary one
        would; False (and nothing done) for any other request."""
        if message.method != "GET" or message.version != HttpVersion11 or message.should_close:
            return False
        target = self._targets.get(message.path, _UNREAD)
        if target is _UNREAD:
            target = self._read_target(message.path)
        if target is None:
            return False
        task, since, asked = target
        config, hub = self.config, self.hub
        headers = message.headers
        if self.cors and "Origin" in headers:
            return False  # its answer names the origin: the ordinary path adds CORS headers
        if not may_read(self.tokens, config.auth_public_reads, headers.get("Authorization"), task):
            return False
        if hub.closed or hub.waiting_total >= config.max_held_polls:
            return False
        state = self.backend.peek(task)
        if state is None or state.version < since:
            return False  # the store must be read: the ordinary path awaits it
        transport = conn.transport
        assert transport is not None
        if state.version != since:
            latest = hub.latest(task)
            if latest is None or latest.state != state or not hub.answer_now(transport, latest):
                return False
            self.metrics.polls[TRANSPORT, "changed"] += 1
            conn.answered()
            return True
        hold = hold_for(asked, config)
        poll = ParkedPoll(self, conn, task, since)
        hub.park(poll, hold)
        self.metrics.held[TRANSPORT] += 1
        conn.parked(poll, hold)
        return True

    def _read_target(self, path_and_query: str) -> tuple[str, int, int] | None:
        """(task, version the client has, seconds asked) of a poll's request target, or None
        for a target this path leaves to the ordinary one; kept, since the re-polls of a
        fan-out all send the same few targets."""
        target = parse_poll_target(path_and_query, self.config.poll_timeout)
        if len(self._targets) >= TARGETS_KEPT:
            self._targets.clear()
        self._targets[path_and_query] = target
        return target

    def nothing_new(self, *, closing: bool) -> bytes:
        """The 204 of a hold that passed (``closing``: on shutdown, the connection closed after
        it), as the ordinary path's ``api._nothing_new``; its head built once a second (Date)."""
        second = int(time.time())
        if self._second != second:
            self._second = second
            self._head = (
                "HTTP/1.1 204 No Content\r\n"
                f"Date: {formatdate(second, usegmt=True)}\r\n"
                f"Server: {SERVER_SOFTWARE}\r\n"
                f"X-Served-By: {self.config.instance_id}\r\n"
                "Cache-Control: no-store\r\n"
                "X-Content-Type-Options: nosniff\r\n"
                f"Content-Security-Policy: {OTHER_POLICY}\r\n"
            )
            self._nothing_new = f"{self._head}\r\n".encode()
        if closing:  # (once per poll on shutdown: with the ordinary path's jittered Retry-After)
            closing_tail = f"Retry-After: {retry_after()}\r\nConnection: close\r\n\r\n"
            return (self._head + closing_tail).encode()
        return self._nothing_new

    def finished(self, poll: ParkedPoll, outcome: str, change: Change | None = None) -> None:
        metrics = self.metrics
        metrics.held[TRANSPORT] -= 1
        metrics.polls[TRANSPORT, outcome] += 1
        if change is not None:
            metrics.delivered(TRANSPORT, change)


def parse_poll_target(path_and_query: str, default_timeout: int) -> tuple[str, int, int] | None:
    """``_read_target``'s reading, with the ordinary path's rules: None for any target it would
    read otherwise or refuse (it then answers the error)."""
    path, _, query = path_and_query.partition("?")
    if path == STATUS_POLL:
        task, counter = DEFAULT_TASK, "last_version"
    elif path.startswith(TASK_POLL_PREFIX) and path.endswith(TASK_POLL_SUFFIX):
        task, counter = path[len(TASK_POLL_PREFIX) : -len(TASK_POLL_SUFFIX)], "since"
    else:
        return None
    params = plain_query(query)
    if params is None or counter not in params:
        return None
    try:
        task = validate_task_id(task)  # (a task id needs no decoding: none has a %)
        since = parse_counter(counter, params[counter])
        raw_timeout = params.get("timeout")
        asked = default_timeout if raw_timeout is None else parse_counter("timeout", raw_timeout)
    except ApiError:
        return None
    return task, since, asked


def plain_query(query: str) -> dict[str, str] | None:
    """``name=value&...`` as a dict; None when aiohttp could read it otherwise (characters to
    decode, a part without ``=``, an empty part) or when a name repeats (the ordinary path
    answers 400 for a repeated counter)."""
    if not _PLAIN_QUERY.issuperset(query):
        return None
    params: dict[str, str] = {}
    for part in query.split("&"):
        name, eq, value = part.partition("=")
        if not eq or not name or name in params:
            return None
        params[name] = value
    return params


class ParkedPoll(Waiter):
    """A held long poll with no handler: the hub writes its answer (``_write_answer``), which
    ends it; or its hold passes (``_time_up``), or the hub closes, or its client leaves
    (``PollConnection.connection_lost``). Only the hub's side of ``Waiter`` is used."""

    __slots__ = ("_conn", "_route", "_since")

    def __init__(self, route: FastPoll, conn: PollConnection, task: str, since: int) -> None:
        # (not Waiter.__init__: none of a handler's wait state is needed, 10,000 times over)
        self._hub, self._key, self._since = route.hub, task, since
        self._route: FastPoll | None = route  # None once it has ended
        self._conn = conn
        self._due = self.delivered = None
        self._wake = None
        self._expiry = 0

    @property
    def parked(self) -> bool:
        return True

    def _offer(self, change: Change) -> bool:
        if self.delivered is not None or self._route is None or change.state.version <= self._since:
            return False  # answered or ended, or a change it has (stale, or a duplicate)
        first = self._due is None
        self._due = change  # the newest one is the one its answer will carry
        return first

    def _write_answer(self, encode: AnswerEncoder) -> None:
        route, change = self._route, self._due
        if route is None or change is None:
            return
        self._due = None
        transport = self._conn.transport
        if transport is None or transport.is_closing():
            return  # the client left: connection_lost ends it
        transport.write(change.answer(encode))
        # Its connection is still read: a re-poll waits for ``_release`` (stashed, as
        # ``Waiter._write_answer`` leaves it in the socket), anything else ends it at once.
        self.delivered = change

    def _release(self) -> None:
        route, change = self._route, self.delivered
        if route is None or change is None:
            return  # ended already, or its client left before the answer was written
        self._end(route, "changed", change)

    def _time_up(self) -> None:
        self._answer_nothing_new(closing=False)

    def _hub_closed(self) -> None:
        self._answer_nothing_new(closing=True)

    def _answer_nothing_new(self, *, closing: bool) -> None:
        route = self._route
        if route is None or self._due is not None or self.delivered is not None:
            return  # ended, or its answer is written in a coming turn of the hub
        transport = self._conn.transport
        if transport is None or transport.is_closing():
            return  # connection_lost ends it
        transport.write(route.nothing_new(closing=closing))
        self._end(route, "timeout")
        if closing:
            self._conn.close_after_answer()

    def disconnected(self) -> None:
        route = self._route
        if route is not None:
            self._end(route, "disconnected", disconnected=True)

    def _end(
        self,
        route: FastPoll,
        outcome: str,
        change: Change | None = None,
        *,
        disconnected: bool = False,
    ) -> None:
        self._route = None
        route.hub.unpark(self, disconnected=disconnected)
        route.finished(self, outcome, change)
        self._conn.unparked(self)


class _PollFilter:
    """The connection's parser, with each request offered to the fast path before aiohttp's
    queue sees it (``feed_data`` returns the requests the fast path did not take)."""

    __slots__ = ("_conn", "_parser")

    def __init__(self, parser: Any, conn: PollConnection) -> None:
        self._parser = parser
        self._conn = conn

    def feed_data(self, data: bytes) -> tuple[list[tuple[RawRequestMessage, Any]], bool, bytes]:
        messages, upgraded, tail = self._parser.feed_data(data)
        if len(messages) == 1 and not upgraded:
            message, payload = messages[0]
            conn = self._conn
            if payload is EMPTY_PAYLOAD and conn.idle() and conn.route.take(conn, message):
                self._parser.message_consumed()  # what aiohttp does for each request it takes
                return [], upgraded, tail
        self._conn.ordinary += len(messages)
        return messages, upgraded, tail

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parser, name)


class PollConnection(RequestHandler):
    """aiohttp's protocol for one connection, with the fast path in front of its request queue."""

    __slots__ = ("_poll", "_stash", "ordinary", "route")

    def __init__(self, manager: web.Server, *, route: FastPoll, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.route = route
        self.ordinary = 0  # requests handed to aiohttp whose answer is not written yet
        self._poll: ParkedPoll | None = None
        self._stash = b""  # bytes that arrived while a poll was parked (a pipelined request)
        self._parser = _PollFilter(self._parser, self)  # type: ignore[assignment]

    def idle(self) -> bool:
        """No request in aiohttp's hands or parked: the next one may be answered here, in order
        (also the first request of a connection, which arrives before aiohttp's loop starts)."""
        return self._poll is None and self.ordinary == 0

    async def _handle_request(self, *args: Any, **kwargs: Any) -> tuple[web.StreamResponse, bool]:
        try:
            return await super()._handle_request(*args, **kwargs)
        finally:
            self.ordinary -= 1  # its answer is written (or never will be: the client left)

    def data_received(self, data: bytes) -> None:
        self.route.hub.activity.nudge()  # work arrived: wake the idle watchers (``activity``)
        poll = self._poll
        if poll is not None:
            if not data:
                return  # (aiohttp's nudge to parse what it holds: nothing, while parked)
            if poll.delivered is not None and not self._stash and not data.startswith(b"GET "):
                # Answered, and only waiting for the hub's turn to end it: a request that is not
                # the re-poll (a write, through a proxy that reuses this connection) is not kept
                # waiting behind the fan-out's other answers.
                poll._release()
                self.data_received(data)
                return
            # A request behind a parked poll is answered after it, as HTTP requires: keep its
            # bytes until then. The first read is kept as it comes (the re-poll of a fan-out,
            # whose answer is out: stopping and restarting the socket's reads for it would cost
            # two epoll system calls per poll); a second one stops the reading.
            if self._stash and self.transport is not None:
                self.transport.pause_reading()
            self._stash += data
            return
        super().data_received(data)

    def parked(self, poll: ParkedPoll, hold: float) -> None:
        self._poll = poll
        self._keep_alive_after(hold)

    def unparked(self, poll: ParkedPoll) -> None:
        if self._poll is not poll:
            return
        self._poll = None
        # (no ``answered()``: the keep-alive time set when it was parked, past its whole hold,
        # is already at least a keep-alive timeout after now)
        stash, self._stash = self._stash, b""
        transport = self.transport
        if stash and transport is not None and not transport.is_closing():
            if not transport.is_reading():
                transport.resume_reading()
            self.data_received(stash)

    def answered(self) -> None:
        """An answer was written here: the keep-alive timer counts from now, as aiohttp's does."""
        self._keep_alive_after(0.0)

    def _keep_alive_after(self, hold: float) -> None:
        # aiohttp closes an idle connection once ``keepalive_timeout`` has passed since its last
        # answer; its timer re-arms itself when it fires before the time set here.
        loop = self._loop
        close_time = loop.time() + hold + self._keepalive_timeout
        self._next_keepalive_close_time = close_time
        if self._keepalive_handle is None and self._keepalive_timeout > 0:
            self._keepalive_handle = loop.call_at(close_time, self._process_keepalive)

    def close_after_answer(self) -> None:
        self.force_close()  # the transport writes what it holds before it closes

    def connection_lost(self, exc: BaseException | None) -> None:
        poll = self._poll
        if poll is not None:
            poll.disconnected()
        super().connection_lost(exc)


class PollServer(web.Server):
    """aiohttp's server (the protocol factory), making ``PollConnection`` s."""

    route: FastPoll

    def __call__(self) -> RequestHandler:
        return PollConnection(self, route=self.route, loop=self._loop, **self._kwargs)


class PollRunner(web.AppRunner):
    """``web.AppRunner`` whose server takes fast polls (unless the app's ``FAST_POLL`` is off)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        app = self.app
        if app[CONFIG].fast_poll:
            # The app builds its server itself (``Application._make_handler``, with the handler
            # arguments): the fast path only changes which protocol objects it makes.
            server.__class__ = PollServer
            assert isinstance(server, PollServer)
            server.route = FastPoll(app)
        return server


def serve(
    app: web.Application, *, host: str, port: int, backlog: int, shutdown_timeout: float
) -> None:
    """``web.run_app`` with ``PollRunner``: serve until SIGINT or SIGTERM, then stop gracefully
    (on_shutdown answers the held polls; requests in progress get ``shutdown_timeout``)."""

    async def run() -> None:
        runner = PollRunner(
            app,
            handle_signals=True,  # SIGINT, SIGTERM: GracefulExit, out of run_until_complete
            handler_cancellation=True,  # a client that disconnects cancels its poll
            access_log=None,
            shutdown_timeout=shutdown_timeout,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, backlog=backlog)
            await site.start()
            await asyncio.Event().wait()  # until the signal
        finally:
            await runner.cleanup()

    # As ``web.run_app`` does: the signal ends the loop's run; cancelling the main task then runs
    # the runner's cleanup (on_shutdown, the connections' shutdown, cleanup_ctx) in it.
    loop = asyncio.new_event_loop()
    main = loop.create_task(run())
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        main.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(main)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
