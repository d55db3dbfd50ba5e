"""WebSocket: one connection follows any number of tasks, and a board, with JSON both ways.

``GET /api/ws`` upgrades. The client sends one JSON object per text message::

    {"subscribe": {"task": "build-42", "version": 3}}      version: what it has; left out: none
    {"subscribe": {"board": true, "cursor": "k3x9-17", "tasks": ["a", "b"]}}  both optional
    {"unsubscribe": {"task": "build-42"}}
    {"unsubscribe": {"board": true}}
    {"ping": 17}                                            any JSON: answered {"pong": 17}

and the server answers with::

    {"hello": {"instance": "app-1"}}           first, once: the instance serving the socket
    {"state": {...}}                           the task's state: at once if the client was behind
                                               (another version, or none), then every change
    {"board": {"cursor", "reset", "tasks"}}    a watch batch: a snapshot (reset), the catch-up
                                               after the cursor, then every change
    {"subscribed": {"task": "build-42"}}       after the catch-up: the client is up to date, and
                                               from here on no change of it can be missed
    {"unsubscribed": {"task": "build-42"}}     no more of it after this
    {"error": {"code", "message"}, "task": "build-42"}   a message refused (the subscription it
                                               concerns, if any); the connection stays open

Each subscription is a feed (``feeds.py``) on its own waiter chain in the hub; subscribing again
replaces it (and catches up again). Subscriptions count against the held-poll cap, and a token
that covers some tasks only may subscribe to those only. aiohttp pings every ``STREAM_HEARTBEAT``
seconds and drops a client that does not answer. A browser, which cannot set headers on a
WebSocket, offers its token as the subprotocol ``bearer.<token>`` beside ``taskstatus`` (auth.py);
the socket closes with 1008 when that token expires. On shutdown every open socket (kept in a
``WeakSet`` under an app key) is closed with 1001 "going away".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from .api import MAX_WATCH_TASKS, admit_waiter
from .auth import READ_SCOPE, Access, check_grant, enforced_grant
from .errors import ApiError, BackendUnavailable, bad_request
from .feeds import BoardFeed, TaskFeed
from .hub import WATCH_KEY, Waiter
from .keys import BACKEND, CONFIG, HUB
from .metrics import METRICS
from .model import MAX_COUNTER, parse_cursor, validate_task_id

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 1024  # a board subscription of 100 ids of 64 characters fits
MAX_SUBSCRIPTIONS = MAX_WATCH_TASKS  # per connection, a board counting as one
CLOSE_TIMEOUT = 2.0  # seconds to wait for the client's close frame
IDLE_HOLD = 3600.0  # a subscription's wait between changes; aiohttp's pings keep it alive
SUBPROTOCOL = "taskstatus"

_INTERNAL_ERROR = ApiError(500, "internal_error", "internal server error")

# A subscription: ("task", id) or ("board", "").
Target = tuple[str, str]
Feed = TaskFeed | BoardFeed


def _name(target: Target) -> dict[str, Any]:
    """How messages name a subscription: ``{"task": id}`` or ``{"board": true}``."""
    kind, task_id = target
    return {"task": task_id} if kind == "task" else {"board": True}


class Connection:
    """One client's socket and its subscriptions, each followed by a task of its own."""

    __slots__ = ("__weakref__", "_request", "_subscriptions", "ws")

    def __init__(self, request: web.Request, ws: web.WebSocketResponse) -> None:
        self._request = request
        self.ws = ws
        self._subscriptions: dict[Target, asyncio.Task[None]] = {}

    # --- what the client sends ----------------------------------------------------------------

    async def receive(self, text: str) -> None:
        target: Target | None = None
        try:
            action, body = _parse_message(text)
            if action == "ping":  # a client that wants to see the connection is alive
                await self.send_json({"pong": body})
                return
            target = _target(body)
            if action == "subscribe":
                self._subscribe(target, body)
            else:
                await self._unsubscribe(target)
        except ApiError as error:
            await self.send_json({**error.body(), **(_name(target) if target else {})})
        except Exception:
            # A bug, not the client's mistake: say so, keep the traceback, keep the socket.
            log.exception("websocket message not handled: %.200s", text)
            await self.send_json(_INTERNAL_ERROR.body())

    def _subscribe(self, target: Target, body: dict[str, Any]) -> None:
        app = self._request.app
        kind, task_id = target
        if kind == "task":
            _only_keys(body, {"task", "version"})
            version = body.get("version")
            if version is not None and not _is_counter(version):
                raise bad_request(
                    "invalid_version", f"version must be an integer from 0 to {MAX_COUNTER}"
                )
            self._check_grant(frozenset({task_id}))
            key = task_id

            def feed(waiter: Waiter) -> Feed:
                return TaskFeed(app[BACKEND], waiter, task_id, version)

        else:
            _only_keys(body, {"board", "cursor", "tasks"})
            cursor = body.get("cursor")
            if cursor is not None and not isinstance(cursor, str):
                raise bad_request("invalid_cursor", "cursor must be a cursor from a board message")
            since = parse_cursor(cursor or "")
            only = _task_list(body.get("tasks"))
            self._check_grant(only)
            key = WATCH_KEY

            def feed(waiter: Waiter) -> Feed:
                return BoardFeed(app[BACKEND], waiter, only, since)

        old = self._subscriptions.get(target)
        if old is None:  # a new one: within the limits (a replacement holds what the old held)
            if len(self._subscriptions) >= MAX_SUBSCRIPTIONS:
                raise bad_request(
                    "too_many_subscriptions", f"a connection has at most {MAX_SUBSCRIPTIONS}"
                )
            if app[HUB].waiting_total >= app[CONFIG].max_held_polls:
                raise ApiError(503, "too_many_waiters", "this instance follows as many as it may")
        else:
            old.cancel()  # replaced: the new one catches up from what the client has now
        self._subscriptions[target] = asyncio.create_task(self._follow(target, key, feed))

    async def _unsubscribe(self, target: Target) -> None:
        task = self._subscriptions.pop(target, None)
        if task is not None:
            task.cancel()
            await asyncio.wait([task])  # its last message, if any, goes out before the answer
        await self.send_json({"unsubscribed": _name(target)})

    def _check_grant(self, tasks: frozenset[str] | None) -> None:
        """The token's task limits, per subscription (the socket itself needs tasks:read)."""
        grant = enforced_grant(self._request, self._request.app[CONFIG])
        if grant is not None:
            check_grant(grant, Access(READ_SCOPE, tasks))

    # --- what the server sends ----------------------------------------------------------------

    async def _follow(self, target: Target, key: str, make_feed: Callable[[Waiter], Feed]) -> None:
        hub, metrics = self._request.app[HUB], self._request.app[METRICS]
        wrap = b'{"state": ' if target[0] == "task" else b'{"board": '
        try:
            # The waiter first, then the catch-up: no change falls between.
            with metrics.holding("ws"), hub.waiting(key) as waiter:
                feed = make_feed(waiter)
                first = await feed.catch_up()
                if first is not None:
                    await self._send(wrap + first.body + b"}")
                await self.send_json({"subscribed": _name(target)})
                while True:
                    event = await feed.next(IDLE_HOLD)
                    if event is not None:
                        if event.change is not None:
                            metrics.delivered("ws", event.change)
                        await self._send(wrap + event.body + b"}")
                    elif hub.closed:
                        return
        except BackendUnavailable as exc:
            # Nothing is followed from here: the client subscribes again later.
            if self._subscriptions.get(target) is asyncio.current_task():
                del self._subscriptions[target]
            error = ApiError(503, "backend_unavailable", f"the state store is unreachable ({exc})")
            with contextlib.suppress(ConnectionError):
                await self.send_json({**error.body(), **_name(target)})
        except ConnectionError:
            pass  # the socket is gone; the handler cleans up
        except Exception:
            log.exception("websocket subscription %s failed", target)
            if self._subscriptions.get(target) is asyncio.current_task():
                del self._subscriptions[target]
            with contextlib.suppress(ConnectionError):
                await self.send_json({**_INTERNAL_ERROR.body(), **_name(target)})

    async def send_json(self, message: dict[str, Any]) -> None:
        await self._send(json.dumps(message).encode())

    async def _send(self, data: bytes) -> None:
        if not self.ws.closed:
            await self.ws.send_frame(data, WSMsgType.TEXT)

    async def close(self) -> None:
        """End every subscription (the socket is closed, or closing)."""
        tasks = list(self._subscriptions.values())
        self._subscriptions.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)


# --- message parsing --------------------------------------------------------------------------


def _parse_message(text: str) -> tuple[str, Any]:
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):
        raise bad_request("invalid_json", "a message must be a JSON object") from None
    if not isinstance(message, dict) or len(message) != 1:
        raise bad_request("invalid_message", 'send {"subscribe": {...}} or {"unsubscribe": {...}}')
    ((action, body),) = message.items()
    if action not in ("subscribe", "unsubscribe", "ping"):
        raise bad_request("unknown_action", "the action must be subscribe, unsubscribe or ping")
    if action != "ping" and not isinstance(body, dict):
        raise bad_request("invalid_message", f"{action} takes an object")
    return action, body


def _target(body: dict[str, Any]) -> Target:
    if ("task" in body) == ("board" in body):
        raise bad_request("invalid_message", 'name one "task", or "board": true')
    if "board" in body:
        if body["board"] is not True:
            raise bad_request("invalid_message", '"board" must be true')
        return ("board", "")
    task_id = body["task"]
    if not isinstance(task_id, str):
        raise bad_request("invalid_task_id", "task must be a task id")
    return ("task", validate_task_id(task_id))


def _only_keys(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad_request("unknown_field", f"unknown field(s): {', '.join(unknown)}")


def _is_counter(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNTER


def _task_list(value: Any) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise bad_request("invalid_tasks", "tasks must be a list of task ids")
    if len(value) > MAX_WATCH_TASKS:
        raise bad_request("too_many_tasks", f"a board covers at most {MAX_WATCH_TASKS} tasks")
    return frozenset(validate_task_id(item) for item in value)


# --- the handler ------------------------------------------------------------------------------

SOCKETS = web.AppKey("ws_connections", weakref.WeakSet[Connection])


async def websocket(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    ws = web.WebSocketResponse(
        heartbeat=config.stream_heartbeat,
        max_msg_size=MAX_MESSAGE_BYTES,
        timeout=CLOSE_TIMEOUT,
        protocols=(SUBPROTOCOL,),  # chosen when offered (a browser's token comes beside it)
        # No permessage-deflate: it keeps a zlib context per socket (~114 KiB each, measured by
        # `python -m bench --scenarios transports`) to shrink messages of ~150 bytes.
        compress=False,
    )
    if not ws.can_prepare(request).ok:
        raise bad_request(
            "websocket_required",
            "this endpoint speaks WebSocket only: Upgrade: websocket, Connection: Upgrade, "
            "Sec-WebSocket-Key (16 bytes in base64) and Sec-WebSocket-Version: 13",
        )
    admit_waiter(request)
    await ws.prepare(request)
    connection = Connection(request, ws)
    sockets = request.app[SOCKETS]
    sockets.add(connection)
    grant = enforced_grant(request, config)
    expiry = None
    if grant is not None and grant.valid_until is not None:
        expiry = asyncio.create_task(_close_when_expired(ws, grant.valid_until))
    try:
        await connection.send_json({"hello": {"instance": config.instance_id}})
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                await connection.receive(message.data)
            elif message.type is WSMsgType.BINARY:
                error = bad_request("text_only", "send JSON in text messages")
                await connection.send_json(error.body())
    except ConnectionError:
        pass  # gone while we answered it
    finally:
        if expiry is not None:
            expiry.cancel()
        sockets.discard(connection)
        await connection.close()
    return ws


async def _close_when_expired(ws: web.WebSocketResponse, valid_until: float) -> None:
    """The token the socket was opened with expires: close it (the client needs a new one)."""
    await asyncio.sleep(max(0.0, valid_until - time.time()))
    await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"token expired")


async def close_sockets(app: web.Application) -> None:
    """on_shutdown: every socket is closed with 1001, so clients move to another instance."""
    sockets = app[SOCKETS]
    connections = list(sockets)
    if connections:
        log.info("shutting down: closing %d websockets", len(connections))
    await asyncio.gather(
        *(
            c.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
            for c in connections
        ),
        return_exceptions=True,
    )


def setup_ws_routes(app: web.Application) -> None:
    app[SOCKETS] = weakref.WeakSet()
    app.router.add_get("/api/ws", websocket, allow_head=False)
    app.on_shutdown.append(close_sockets)
