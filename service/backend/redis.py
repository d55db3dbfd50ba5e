"""The Redis backend: state in Redis, every change fanned out over ONE pub/sub subscription.

Key layout (``prefix`` defaults to ``taskstatus:``):

- ``{prefix}task:{id}``  hash: ``state`` (the state as JSON), ``version``, ``seq``
- ``{prefix}changes``    sorted set: task id -> ``seq`` of its last change (the watch index)
- ``{prefix}seq``        the global change counter
- ``{prefix}epoch``      a random id of this data set; a new one tells watchers to resnapshot
- ``{prefix}history:{id}`` list: the task's last changes as JSON, newest first, trimmed by the write
- ``{prefix}live``       the number of live tasks (not tombstones): what ``MAX_TASKS`` counts
- ``{prefix}due``        sorted set: task id -> when the sweep is to look at it (ms): a finished
  task's expiry (``FINISHED_TASK_TTL`` after its last write) or a tombstone's purge
- a tombstone is a task hash with ``deleted`` = 1, expiring after ``TOMBSTONE_TTL``
- channel ``{prefix}changes``: one message per change, ``{"epoch", "seq", "state"}``; and one per
  sweep batch that purged tombstones, ``{"epoch", "forget": [ids]}``
- ``{prefix}instances``  sorted set: instance id -> expiry of its stats record (dashboard.py)
- ``{prefix}instance:{id}`` the instance's stats record, expiring unless renewed (``lua/stats.lua``)

Writes, deletions and each batch of the retention sweep are one Lua script each (``lua/write.lua``,
``lua/delete.lua``, ``lua/sweep.lua``, with ``lua/common.lua`` in front of each). The reader task
subscribes, then re-reads every task that has waiters and the newest change, so whatever was
published while it was not subscribed still reaches its waiters; only then does the instance
report ready. It reconnects forever, with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..errors import BackendUnavailable
from ..history import DEFAULT_HISTORY_LENGTH, HistoryEntry
from ..hub import Change
from ..model import UNSET, Cursor, TaskState, TaskUpdate, WatchBatch, initial_state
from .base import (
    Backend,
    ChangeSink,
    Retention,
    SharedStats,
    SweepResult,
    TaskLimitReached,
    TaskNotFound,
    VersionConflict,
    WriteResult,
)

log = logging.getLogger(__name__)

_LUA = Path(__file__).with_name("lua")
SOCKET_TIMEOUT = 2.0  # seconds: a write fails fast (503) rather than hanging while Redis is away
COMMAND_TIMEOUT = 3 * SOCKET_TIMEOUT  # a whole command: waiting for a connection, connecting, reply
FIRST_SUBSCRIBE_WAIT = 5.0  # seconds start() waits for the subscription before serving anyway
RECONNECT_BASE, RECONNECT_CAP = 0.05, 2.0  # seconds, exponential backoff with full jitter
HEALTH_CHECK_INTERVAL = 5  # seconds of silence before the subscriber PINGs Redis
_EPOCH_RANDOM = random.Random()
POOL_SIZE = 64  # connections to Redis, the subscriber's one among them
# Task states an instance keeps to let re-polls wait without a read (``peek``), the most recently
# changed first: held polls are at most MAX_HELD_POLLS (20,000) per instance, mostly on far fewer
# tasks. Kept for every task (up to MAX_TASKS), 100,000 tasks created and expired left each
# instance +28 MiB of RSS for good (make soak-expiry: freed, but the allocator's arenas stay
# pinned by the objects made later); 10,000 keep the peak a tenth of that.
KNOWN_KEPT = 10_000


def _connection_error(exc: BaseException) -> bool:
    return isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError)


def full_jitter_backoff(attempt: int) -> float:
    """Seconds to wait before reconnect attempt ``attempt`` (1, 2, ...): spread, capped."""
    return random.uniform(0, min(RECONNECT_CAP, RECONNECT_BASE * 2**attempt))


def _field_args(value: object) -> tuple[str, str]:
    """(mode, value) for one optional field of the write script."""
    if value is UNSET:
        return "keep", ""
    if value is None:
        return "null", ""
    return "set", str(value)


def _consume_outcome(task: asyncio.Future[Any]) -> None:
    """Retrieve the outcome of a command nobody awaits any more, so asyncio does not log it."""
    if not task.cancelled():
        task.exception()


def parse_message(data: bytes) -> Change | list[str]:
    """A message of the channel: a change, or the ids of purged tombstones to forget."""
    message = json.loads(data)
    if "forget" in message:
        return [str(task_id) for task_id in message["forget"]]
    return Change(TaskState.from_dict(message["state"]), Cursor(message["epoch"], message["seq"]))


def _script(*names: str) -> str:
    return "".join((_LUA / name).read_text() for name in names)


def _new_epoch() -> str:
    """A name for a new data set, used by a script only if Redis has none (it was emptied).

    Unique, not secret: ``random`` rather than ``secrets``, whose system call per write was 2 %
    of an instance's CPU under a stream of writes (py-spy). A generator of its own, seeded from
    the system once: the global one is reseeded by whoever likes (hypothesis does, per example)."""
    return f"{_EPOCH_RANDOM.getrandbits(32):08x}"


class RedisBackend(Backend):
    def __init__(
        self,
        statuses: tuple[str, ...],
        max_tasks: int,
        *,
        url: str,
        prefix: str,
        history_length: int = DEFAULT_HISTORY_LENGTH,
        retention: Retention | None = None,
    ) -> None:
        super().__init__(statuses, max_tasks, history_length, retention)
        self._url = url
        self._prefix = prefix
        self._channel = f"{prefix}changes"
        self._index_key = f"{prefix}changes"
        self._seq_key = f"{prefix}seq"
        self._epoch_key = f"{prefix}epoch"
        self._instances_key = f"{prefix}instances"
        self._live_key = f"{prefix}live"
        self._due_key = f"{prefix}due"
        self._terminal = "," + ",".join(self.retention.terminal_statuses) + ","
        # No retries: a write whose reply was lost must not run twice (it would skip a version).
        # A blocking pool: a burst of polls (thousands re-polling after one fan-out) queues for a
        # connection instead of failing with MaxConnectionsError; Redis is single-threaded, so a
        # few dozen connections serve it as fast as thousands would.
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=POOL_SIZE,
            timeout=SOCKET_TIMEOUT,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=SOCKET_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
        )
        self._redis = Redis(connection_pool=pool)
        self.write_script = self._redis.register_script(_script("common.lua", "write.lua"))
        self._delete_script = self._redis.register_script(_script("common.lua", "delete.lua"))
        self._sweep_script = self._redis.register_script(_script("common.lua", "sweep.lua"))
        self._changes_script = self._redis.register_script((_LUA / "changes.lua").read_text())
        self._stats_script = self._redis.register_script((_LUA / "stats.lua").read_text())
        self._sink: ChangeSink | None = None
        self._reader: asyncio.Task[None] | None = None
        self._live = asyncio.Event()
        self._closing = False
        # The newest state of the KNOWN_KEPT tasks most recently changed or read since the
        # subscription went live (messages, reads): lets a re-poll at the current version wait
        # without a Redis read. Emptied whenever the subscription drops, since messages may be
        # missed from then until the resync.
        self._known: OrderedDict[str, TaskState] = OrderedDict()
        self._known_epoch = ""
        self._generation = 0  # bumped on every drop: a read begun before it must not be kept

    def _instance_key(self, instance_id: str) -> str:
        return f"{self._prefix}instance:{instance_id}"

    def _task_key(self, task_id: str) -> str:
        return f"{self._prefix}task:{task_id}"

    def _history_key(self, task_id: str) -> str:
        return f"{self._prefix}history:{task_id}"

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self, sink: ChangeSink) -> None:
        self._sink = sink
        self._reader = asyncio.create_task(self._read_changes(), name="redis-subscriber")
        try:
            await asyncio.wait_for(self._live.wait(), FIRST_SUBSCRIBE_WAIT)
        except TimeoutError:
            log.warning("redis subscription not live yet at %s; serving, not ready", self._url)

    async def close(self) -> None:
        self._closing = True
        if self._reader is not None:
            self._reader.cancel()
            # Bounded: redis-py may swallow the cancellation; _closing stops the loop then.
            await asyncio.wait([self._reader], timeout=SOCKET_TIMEOUT)
        await self._redis.aclose(close_connection_pool=True)

    def is_ready(self) -> bool:
        return self._live.is_set()

    # --- the one subscription ----------------------------------------------------------------

    async def _read_changes(self) -> None:
        """Subscribe, resync, deliver; on any failure reconnect with backoff. Never dies."""
        attempt = 0
        outage_since: float | None = None
        while not self._closing:
            pubsub: PubSub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                await self._resync()
                self._live.set()
                if outage_since is not None:
                    self.reconnects += 1
                    log.warning(
                        "redis subscription restored after %.1f s", time.monotonic() - outage_since
                    )
                outage_since, attempt = None, 0
                await self._deliver_messages(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._forget()
                self.errors += 1
                if outage_since is None:
                    outage_since = time.monotonic()
                    if _connection_error(exc):
                        log.warning("redis subscription lost (%s); reconnecting", exc)
                    else:
                        log.exception("redis subscriber failed; reconnecting")
                attempt += 1
                await asyncio.sleep(full_jitter_backoff(attempt))
            finally:
                self._forget()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _deliver_messages(self, pubsub: PubSub) -> None:
        """Deliver the changes as they come; after ``HEALTH_CHECK_INTERVAL`` of silence, PING.

        A connection that is half-open, or whose Redis hangs, is silent, not failed: sending the
        PING succeeds all the same (it only fills a socket buffer), and redis-py does not wait for
        the answer in pub/sub mode. So the answer, a "pong" message, must come within
        ``SOCKET_TIMEOUT``, or the subscription counts as lost (reconnect, resync).
        """
        heard = time.monotonic()  # anything from Redis shows the connection alive
        pinged: float | None = None  # when the PING still unanswered was sent
        while not self._closing:
            # A bounded wait, not a spin: returns None after a second of silence.
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            now = time.monotonic()
            if message is not None:
                heard, pinged = now, None
                if message["type"] == "message":
                    parsed = parse_message(message["data"])
                    if isinstance(parsed, Change):
                        self._publish(parsed)
                    else:
                        self._forget_purged(parsed)
            elif pinged is not None:
                if now - pinged > SOCKET_TIMEOUT:
                    raise RedisTimeoutError(f"no answer to a PING in {now - pinged:.1f} s")
            elif now - heard > HEALTH_CHECK_INTERVAL:
                await pubsub.ping()
                pinged = time.monotonic()

    def _publish(self, change: Change) -> None:
        if change.cursor.epoch != self._known_epoch:  # a new data set: what we knew is void
            self._known.clear()
            self._known_epoch = change.cursor.epoch
        self._remember(change.state)
        if self._sink is not None:
            self._sink.publish(change)

    def _remember(self, state: TaskState) -> None:
        """Keep ``state`` if it is the newest seen. Tombstones too, until they are purged (a
        ``forget`` message): else an older state read before the deletion could come back."""
        known = self._known.get(state.task)
        if known is None:
            if state.version > 0:
                self._known[state.task] = state
                if len(self._known) > KNOWN_KEPT:
                    self._known.popitem(last=False)  # a poll of it reads Redis once, then peeks
        elif state.supersedes(known):
            self._known[state.task] = state
            self._known.move_to_end(state.task)

    def _forget_purged(self, task_ids: list[str]) -> None:
        """Tombstones purged: those tasks read as never written now."""
        for task_id in task_ids:
            self._known.pop(task_id, None)

    def _forget(self) -> None:
        self._live.clear()
        self._known.clear()
        self._generation += 1

    def peek(self, task_id: str) -> TaskState | None:
        return self._known.get(task_id) if self._live.is_set() else None

    async def _resync(self) -> None:
        """Re-read what waiters may have missed while unsubscribed, and hand it to the hub.

        For each task with waiters, its state; for watches, the newest change. Waiters compare
        versions and cursors, so re-delivering what they already know is harmless.
        """
        if self._sink is None:
            return
        task_ids = self._sink.watched_tasks()
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(self._epoch_key, _new_epoch(), nx=True)
        pipe.get(self._epoch_key)
        pipe.zrevrange(self._index_key, 0, 0)
        for task_id in task_ids:
            pipe.hmget(self._task_key(task_id), "state", "seq")
        _, epoch, newest, *entries = await pipe.execute()
        if newest:
            newest_id = newest[0].decode()
            if newest_id not in task_ids:
                task_ids.append(newest_id)
                entries.append(await self._redis.hmget(self._task_key(newest_id), "state", "seq"))
        cursor_epoch = epoch.decode()
        for state_json, seq in entries:
            if state_json is not None:
                state = TaskState.from_dict(json.loads(state_json))
                self._publish(Change(state, Cursor(cursor_epoch, int(seq))))

    # --- reads and writes --------------------------------------------------------------------

    async def _call(self, command: Awaitable[Any], *, shielded: bool = True) -> Any:
        """Await a Redis command; an unreachable Redis becomes BackendUnavailable (503).

        The command runs in a task of its own, shielded: redis-py (8.1 seen) can swallow the
        cancellation of a task awaiting a command, and a poll whose client disconnected would
        then stay registered. Shielded, the caller is cancelled at once and the command finishes
        on its own, leaving its connection in a clean state. A write is awaited directly
        (``shielded=False``): the task and the shield cost it two turns of the event loop, each
        as long as the fan-out work in it, and a write that finishes although its client left
        is what it should do anyway.
        """
        try:
            # Bounded as a whole (pool, connect, reply), whatever redis-py does inside: a client
            # then gets a 503 after COMMAND_TIMEOUT at worst, never a request that hangs.
            async with asyncio.timeout(COMMAND_TIMEOUT):
                if not shielded:
                    return await command
                task = asyncio.ensure_future(command)
                try:
                    return await asyncio.shield(task)
                except asyncio.CancelledError:
                    task.add_done_callback(_consume_outcome)
                    raise
        except RedisError as exc:
            self.errors += 1
            if not _connection_error(exc):
                log.exception("redis command failed")
            raise BackendUnavailable(type(exc).__name__) from exc
        except OSError as exc:  # TimeoutError (COMMAND_TIMEOUT) included
            self.errors += 1
            raise BackendUnavailable(type(exc).__name__) from exc

    async def get(self, task_id: str) -> TaskState:
        generation = self._generation
        raw = await self._call(self._redis.hget(self._task_key(task_id), "state"))
        if raw is None:
            return initial_state(task_id, self.statuses)
        state = TaskState.from_dict(json.loads(raw))
        # Read while subscribed: any later write reaches us. Not a tombstone: read just before
        # its purge, it would stay after the purge's forget message.
        if self._live.is_set() and generation == self._generation and not state.deleted:
            self._remember(state)
        return state

    async def list_tasks(self) -> list[TaskState]:
        return (await self.changes_since(None, None)).tasks

    def write_call(
        self, task_id: str, update: TaskUpdate, subject: str | None = None
    ) -> tuple[list[str], list[str]]:
        """The write script's keys and arguments for ``update`` of ``task_id`` by ``subject``."""
        expected = "" if update.expected_version is None else str(update.expected_version)
        keys = self._task_keys(task_id)
        args = [
            task_id,
            self.statuses[0],
            expected,
            _new_epoch(),
            self._channel,
            *_field_args(update.status),
            *_field_args(update.progress),
            *_field_args(update.message),
            str(self.max_tasks),
            str(self.history_length),
            subject or "",
            str(self.retention.finished_ttl * 1000),
            self._terminal,
        ]
        return keys, args

    def _task_keys(self, task_id: str) -> list[str]:
        """The keys a script that changes ``task_id`` touches (write.lua, delete.lua)."""
        return [
            self._task_key(task_id),
            self._index_key,
            self._seq_key,
            self._epoch_key,
            self._history_key(task_id),
            self._live_key,
            self._due_key,
        ]

    async def write(
        self, task_id: str, update: TaskUpdate, subject: str | None = None
    ) -> WriteResult:
        keys, args = self.write_call(task_id, update, subject)
        outcome, *rest = await self._call(self.write_script(keys=keys, args=args), shielded=False)
        if outcome == b"conflict":
            raise VersionConflict(TaskState.from_dict(json.loads(rest[0])))
        if outcome == b"task_limit":
            raise TaskLimitReached
        previous_status, state_json = rest
        state = TaskState.from_dict(json.loads(state_json))
        previous = TaskState(task_id, previous_status.decode(), version=state.version - 1)
        return WriteResult(previous=previous, state=state)

    async def _delete(self, task_id: str, expected_version: int | None) -> TaskState:
        expected = "" if expected_version is None else str(expected_version)
        args = [task_id, expected, _new_epoch(), self._channel]
        args.append(str(self.retention.tombstone_ttl * 1000))
        script = self._delete_script(keys=self._task_keys(task_id), args=args)
        outcome, *rest = await self._call(script, shielded=False)
        if outcome == b"not_found":
            raise TaskNotFound
        state = TaskState.from_dict(json.loads(rest[0]))
        if outcome == b"conflict":
            raise VersionConflict(state)
        return state

    async def _sweep(self, limit: int) -> SweepResult:
        keys = [self._due_key, self._index_key, self._seq_key, self._epoch_key, self._live_key]
        args = [self._task_key(""), self._history_key(""), _new_epoch(), self._channel, str(limit)]
        args += [
            str(self.retention.tombstone_ttl * 1000),
            self._terminal,
            str(self.retention.finished_ttl * 1000),
        ]
        expired, purged, more = await self._call(self._sweep_script(keys=keys, args=args))
        return SweepResult(int(expired), int(purged), bool(more))

    async def history(self, task_id: str) -> list[HistoryEntry]:
        if not self.history_length:
            return []
        key = self._history_key(task_id)
        entries = await self._call(self._redis.lrange(key, 0, self.history_length - 1))
        return [HistoryEntry.from_dict(json.loads(raw)) for raw in entries]

    async def changes_since(self, since: Cursor | None, only: frozenset[str] | None) -> WatchBatch:
        args: list[str | int] = [
            self._task_key(""),
            since.epoch if since else "",
            since.seq if since else 0,
            _new_epoch(),
        ]
        keys = [self._index_key, self._seq_key, self._epoch_key]
        epoch, seq, reset, *states = await self._call(self._changes_script(keys=keys, args=args))
        tasks = [TaskState.from_dict(json.loads(raw)) for raw in states]
        if only is not None:
            tasks = [state for state in tasks if state.task in only]
        return WatchBatch(cursor=Cursor(epoch.decode(), int(seq)), tasks=tasks, reset=bool(reset))

    async def share_stats(self, instance_id: str, record: str, ttl: float) -> SharedStats:
        ttl_ms = round(ttl * 1000)
        keys = [self._instances_key, self._live_key, self._index_key]
        args = [self._instance_key(""), instance_id, record, str(ttl_ms)]
        tasks, *found = await self._call(self._stats_script(keys=keys, args=args))
        records = [
            (raw.decode(), (ttl_ms - int(remaining)) / 1000)
            for raw, remaining in zip(found[::2], found[1::2], strict=True)
        ]
        return SharedStats(records, int(tasks))

    async def withdraw_stats(self, instance_id: str) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(self._instance_key(instance_id))
        pipe.zrem(self._instances_key, instance_id)
        await self._call(pipe.execute())
