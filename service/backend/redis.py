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

With Sentinel (``sentinel.py``) the primary is found and followed there: when it moves, the client
and the subscription move with it (the old client is closed, which cuts the subscription, and the
reader resubscribes on the new primary and resyncs). With ``min_replicas`` a change is acknowledged
only once that many replicas have it: the script and a ``WAIT`` go in one pipeline, over one
connection, since ``WAIT`` counts the writes of the connection that sends it; the scripts then
publish nothing, and the instance publishes the change once it is replicated. Reads wait for the
replicas too (``_confirm_reads``): nobody is shown what a failover could take back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import Pipeline, PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..config import Address
from ..errors import BackendUnavailable, NotReplicated
from ..history import DEFAULT_HISTORY_LENGTH, HistoryEntry
from ..hub import Change
from ..idempotency import KEY_TTL_SECONDS, IdempotencyKey, IdempotencyKeyReused
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
from .sentinel import PrimaryFollower, SentinelSettings

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


# Replies of a node that is not (or no longer) a primary that may take writes: expected while
# Sentinel moves the primary, so a 503 and a check of the primary, not a logged traceback.
_NOT_PRIMARY = ("READONLY", "NOREPLICAS", "MASTERDOWN", "LOADING")


def _connection_error(exc: BaseException) -> bool:
    return isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError)


def _not_primary(exc: BaseException) -> bool:
    return isinstance(exc, ResponseError) and str(exc).startswith(_NOT_PRIMARY)


@dataclass(frozen=True)
class _Primary:
    """One client of the primary, with the scripts registered on it."""

    redis: Redis
    write: AsyncScript
    delete: AsyncScript
    sweep: AsyncScript
    changes: AsyncScript
    stats: AsyncScript


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
        url: str = "",
        prefix: str,
        history_length: int = DEFAULT_HISTORY_LENGTH,
        retention: Retention | None = None,
        sentinel: SentinelSettings | None = None,
        password: str = "",
        min_replicas: int = 0,
        replication_timeout_ms: int = 500,
    ) -> None:
        super().__init__(statuses, max_tasks, history_length, retention)
        self._url = url
        self._password = password
        self.min_replicas = min_replicas
        self.replication_timeout_ms = replication_timeout_ms
        self._prefix = prefix
        self._channel = f"{prefix}changes"
        self._index_key = f"{prefix}changes"
        self._seq_key = f"{prefix}seq"
        self._epoch_key = f"{prefix}epoch"
        self._instances_key = f"{prefix}instances"
        self._live_key = f"{prefix}live"
        self._due_key = f"{prefix}due"
        self._terminal = "," + ",".join(self.retention.terminal_statuses) + ","
        self._barrier_key = f"{prefix}barrier"  # written by read barriers (_confirm_reads)
        self._follower = PrimaryFollower(sentinel, self._switch_primary) if sentinel else None
        self._following: asyncio.Task[None] | None = None
        # With Sentinel, known once a Sentinel names the primary (the reader asks first thing).
        self._primary: _Primary | None = None if sentinel else self._connect(url=url)
        self._sink: ChangeSink | None = None
        self._reader: asyncio.Task[None] | None = None
        self._live = asyncio.Event()
        self._moved = asyncio.Event()  # set when the primary moves: the reader reconnects now
        self._closing = False
        # The newest state of the KNOWN_KEPT tasks most recently changed or read since the
        # subscription went live (messages, reads): lets a re-poll at the current version wait
        # without a Redis read. Emptied whenever the subscription drops, since messages may be
        # missed from then until the resync.
        self._known: OrderedDict[str, TaskState] = OrderedDict()
        self._known_epoch = ""
        self._generation = 0  # bumped on every drop: a read begun before it must not be kept

    def _connect(self, *, url: str = "", address: Address | None = None) -> _Primary:
        """A client of the primary at ``url`` or ``address``, and the scripts on it."""
        # No retries: a write whose reply was lost must not run twice (it would skip a version).
        # A blocking pool: a burst of polls (thousands re-polling after one fan-out) queues for a
        # connection instead of failing with MaxConnectionsError; Redis is single-threaded, so a
        # few dozen connections serve it as fast as thousands would.
        options: dict[str, Any] = {
            "max_connections": POOL_SIZE,
            "timeout": SOCKET_TIMEOUT,
            "socket_timeout": SOCKET_TIMEOUT,
            "socket_connect_timeout": SOCKET_TIMEOUT,
            "retry": Retry(NoBackoff(), 0),
        }
        if address is None:
            pool = BlockingConnectionPool.from_url(url, **options)
        else:
            host, port = address
            pool = BlockingConnectionPool(
                host=host, port=port, password=self._password or None, **options
            )
        redis = Redis(connection_pool=pool)
        return _Primary(
            redis,
            redis.register_script(_script("common.lua", "write.lua")),
            redis.register_script(_script("common.lua", "delete.lua")),
            redis.register_script(_script("common.lua", "sweep.lua")),
            redis.register_script(_script("changes.lua")),
            redis.register_script(_script("stats.lua")),
        )

    @property
    def _published_on(self) -> str:
        """The channel a script publishes its changes on; none ('') when they are published
        only once replicated (``_change``)."""
        return "" if self.min_replicas else self._channel

    @property
    def _redis(self) -> Redis:
        return self._current().redis

    @property
    def write_script(self) -> AsyncScript:
        return self._current().write

    def _current(self) -> _Primary:
        if self._primary is None:
            raise BackendUnavailable("no Redis primary known yet")
        return self._primary

    async def _switch_primary(self, address: Address) -> None:
        """Move to the primary at ``address``: new connections there, the old ones closed. The
        subscription is cut with them; the reader resubscribes on the new primary and resyncs,
        and the instance is not ready until it has."""
        old, self._primary = self._primary, self._connect(address=address)
        self._moved.set()
        log.warning("redis primary: %s:%d", *address)
        if old is not None:
            with contextlib.suppress(Exception):
                await old.redis.aclose(close_connection_pool=True)

    @property
    def primary_address(self) -> str:
        """Where the primary is, for the dashboard: host:port, or the URL without a password."""
        if self._follower is not None:
            primary = self._follower.primary
            return f"{primary[0]}:{primary[1]}" if primary else ""
        kwargs = self._redis.connection_pool.connection_kwargs
        return f"{kwargs.get('host', '')}:{kwargs.get('port', '')}"

    @property
    def failovers(self) -> int:
        return self._follower.switches if self._follower is not None else 0

    def _instance_key(self, instance_id: str) -> str:
        return f"{self._prefix}instance:{instance_id}"

    def _task_key(self, task_id: str) -> str:
        return f"{self._prefix}task:{task_id}"

    def _history_key(self, task_id: str) -> str:
        return f"{self._prefix}history:{task_id}"

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self, sink: ChangeSink) -> None:
        self._sink = sink
        if self._follower is not None:
            self._following = asyncio.create_task(self._follower.follow(), name="sentinel")
        self._reader = asyncio.create_task(self._read_changes(), name="redis-subscriber")
        try:
            await asyncio.wait_for(self._live.wait(), FIRST_SUBSCRIBE_WAIT)
        except TimeoutError:
            log.warning("redis subscription not live yet at %s; serving, not ready", self._url)

    async def close(self) -> None:
        self._closing = True
        if self._following is not None:
            self._following.cancel()
            await asyncio.wait([self._following], timeout=SOCKET_TIMEOUT)
        if self._reader is not None:
            self._reader.cancel()
            # Bounded: redis-py may swallow the cancellation; _closing stops the loop then.
            await asyncio.wait([self._reader], timeout=SOCKET_TIMEOUT)
        if self._follower is not None:
            await self._follower.close()
        if self._primary is not None:
            await self._primary.redis.aclose(close_connection_pool=True)

    def is_ready(self) -> bool:
        return self._live.is_set()

    # --- the one subscription ----------------------------------------------------------------

    async def _read_changes(self) -> None:
        """Subscribe, resync, deliver; on any failure reconnect with backoff. Never dies."""
        attempt = 0
        outage_since: float | None = None
        while not self._closing:
            pubsub: PubSub | None = None
            try:
                if self._primary is None and self._follower is not None:
                    await self._follower.check()  # the first primary, or none yet: backoff
                pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
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
                self._suspect_primary(exc)
                if outage_since is None:
                    outage_since = time.monotonic()
                    if _connection_error(exc):
                        log.warning("redis subscription lost (%s); reconnecting", exc)
                    else:
                        log.exception("redis subscriber failed; reconnecting")
                attempt += 1
                # A new primary ends the pause at once: the outage is over for this instance.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._moved.wait(), full_jitter_backoff(attempt))
                self._moved.clear()
            finally:
                self._forget()
                if pubsub is not None:
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
        await self._confirm_reads()
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
            self._suspect_primary(exc)
            if _not_primary(exc):
                if str(exc).startswith("NOREPLICAS"):
                    raise NotReplicated(str(exc)) from exc
                raise BackendUnavailable(str(exc)) from exc
            if not _connection_error(exc):
                log.exception("redis command failed")
            raise BackendUnavailable(type(exc).__name__) from exc
        except OSError as exc:  # TimeoutError (COMMAND_TIMEOUT) included
            self.errors += 1
            self._suspect_primary(exc)
            raise BackendUnavailable(type(exc).__name__) from exc

    def _suspect_primary(self, exc: BaseException) -> None:
        """With Sentinel, a failure that may mean the primary moved: ask the Sentinels now."""
        if self._follower is not None and (_connection_error(exc) or _not_primary(exc)):
            self._follower.suspect()

    async def get(self, task_id: str) -> TaskState:
        generation = self._generation
        raw = await self._call(self._redis.hget(self._task_key(task_id), "state"))
        if self.min_replicas:  # no task, shield and timeout per read when there is no barrier
            await self._call(self._confirm_reads())
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
        self,
        task_id: str,
        update: TaskUpdate,
        subject: str | None = None,
        idempotency: IdempotencyKey | None = None,
    ) -> tuple[list[str], list[str]]:
        """The write script's keys and arguments for ``update`` of ``task_id`` by ``subject``."""
        expected = "" if update.expected_version is None else str(update.expected_version)
        keys = self._task_keys(task_id)
        args = [
            task_id,
            self.statuses[0],
            expected,
            _new_epoch(),
            self._published_on,
            *_field_args(update.status),
            *_field_args(update.progress),
            *_field_args(update.message),
            str(self.max_tasks),
            str(self.history_length),
            subject or "",
            str(self.retention.finished_ttl * 1000),
            self._terminal,
            *self._idempotency_args(idempotency),
        ]
        return keys, args

    def _idempotency_args(self, idempotency: IdempotencyKey | None) -> list[str]:
        """The key name, fingerprint and lifetime (ms) a changing script keeps an answer under."""
        if idempotency is None:
            return ["", "", "0"]
        key = f"{self._prefix}idempotency:{idempotency.key}"
        return [key, idempotency.fingerprint, str(KEY_TTL_SECONDS * 1000)]

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
        self,
        task_id: str,
        update: TaskUpdate,
        subject: str | None = None,
        idempotency: IdempotencyKey | None = None,
    ) -> WriteResult:
        keys, args = self.write_call(task_id, update, subject, idempotency)
        change = self._change(lambda primary: primary.write, keys, args, kept=3)
        outcome, *rest = await self._call(change, shielded=False)
        if outcome == b"replay":
            answered = TaskState.from_dict(json.loads(rest[0]))
            return WriteResult(previous=answered, state=answered)
        if outcome == b"reused":
            raise IdempotencyKeyReused
        if outcome == b"conflict":
            raise VersionConflict(TaskState.from_dict(json.loads(rest[0])))
        if outcome == b"task_limit":
            raise TaskLimitReached
        previous_status, state_json = rest
        state = TaskState.from_dict(json.loads(state_json))
        previous = TaskState(task_id, previous_status.decode(), version=state.version - 1)
        return WriteResult(previous=previous, state=state)

    async def _change(
        self, script: Callable[[_Primary], AsyncScript], keys: list[str], args: list[str], kept: int
    ) -> list[Any]:
        """Run a script that changes tasks (write, delete, a sweep batch); its reply's first
        ``kept`` elements, once ``min_replicas`` replicas have what it changed.

        The script and ``WAIT`` go in one pipeline, so over one connection: ``WAIT`` counts the
        replication of the writes its own connection made. With ``min_replicas`` the script
        publishes nothing and returns its messages after the ``kept`` elements; they are published
        here, once replicated. A refused change (a conflict, the task limit) has none."""
        primary = self._current()
        if not self.min_replicas:
            reply: list[Any] = await script(primary)(keys=keys, args=args)
            return reply
        try:
            reply = await self._replicated(primary, lambda pipe: script(primary)(keys, args, pipe))
        except NotReplicated:
            self.not_replicated += 1
            raise
        await self._announce(primary, reply[kept:])
        return reply[:kept]

    async def _replicated(
        self, primary: _Primary, queue: Callable[[Pipeline], Awaitable[Any]]
    ) -> Any:
        """Run what ``queue`` puts in a pipeline, then ``WAIT`` for ``min_replicas`` on the same
        connection; the first reply, or NotReplicated when too few replicas confirm in time."""
        async with primary.redis.pipeline(transaction=False) as pipe:
            await queue(pipe)
            pipe.execute_command("WAIT", self.min_replicas, self.replication_timeout_ms)
            # Errors as values: raised as they are, so _call sees Redis's own reply (NOREPLICAS),
            # not a message about the pipeline around it.
            reply, replicas = await pipe.execute(raise_on_error=False)
        for result in (reply, replicas):
            if isinstance(result, Exception):
                raise result
        if replicas < self.min_replicas:
            raise NotReplicated(f"{replicas} of {self.min_replicas} replicas in time")
        return reply

    async def _announce(self, primary: _Primary, messages: list[bytes]) -> None:
        """Publish changes that the replicas now hold. Best effort: the write is acknowledged
        whatever happens here, and an instance that misses the message reads the change at its
        next resync, or when a poll's hold ends and it asks again."""
        try:
            async with primary.redis.pipeline(transaction=False) as pipe:
                for message in messages:
                    pipe.publish(self._channel, message)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self.errors += 1
            log.warning("a replicated change was not published (%s)", exc)

    async def _confirm_reads(self) -> None:
        """Return once ``min_replicas`` replicas hold everything read so far: a barrier (a write
        after the reads, and ``WAIT`` on its connection, which covers every write before it).

        A write is in the primary before any replica has it; a read must not show it until they
        do, or a failover could take back what a client was shown (a write answered 503
        ``not_replicated`` stays in the primary until replicas catch up or a failover drops it).
        """
        if not self.min_replicas:
            return

        async def barrier(pipe: Pipeline) -> None:
            pipe.incr(self._barrier_key)

        try:
            await self._replicated(self._current(), barrier)
        except NotReplicated as exc:  # a 503 like any other unavailable read
            raise BackendUnavailable(f"no replica confirmed the read in time ({exc})") from exc
        except ResponseError as exc:
            if _not_primary(exc):
                self._suspect_primary(exc)
                raise BackendUnavailable(f"no replica to confirm the read ({exc})") from exc
            raise

    async def _delete(
        self, task_id: str, expected_version: int | None, idempotency: IdempotencyKey | None
    ) -> TaskState:
        expected = "" if expected_version is None else str(expected_version)
        args = [task_id, expected, _new_epoch(), self._published_on]
        args += [str(self.retention.tombstone_ttl * 1000), *self._idempotency_args(idempotency)]
        change = self._change(lambda primary: primary.delete, self._task_keys(task_id), args, 2)
        outcome, *rest = await self._call(change, shielded=False)
        if outcome == b"not_found":
            raise TaskNotFound
        if outcome == b"reused":
            raise IdempotencyKeyReused
        state = TaskState.from_dict(json.loads(rest[0]))
        if outcome == b"conflict":
            raise VersionConflict(state)
        return state  # deleted now, or by the first request with this Idempotency-Key

    async def _sweep(self, limit: int) -> SweepResult:
        keys = [self._due_key, self._index_key, self._seq_key, self._epoch_key, self._live_key]
        args = [self._task_key(""), self._history_key(""), _new_epoch(), self._published_on]
        args.append(str(limit))
        args += [
            str(self.retention.tombstone_ttl * 1000),
            self._terminal,
            str(self.retention.finished_ttl * 1000),
        ]
        change = self._change(lambda primary: primary.sweep, keys, args, kept=3)
        expired, purged, more = await self._call(change)
        return SweepResult(int(expired), int(purged), bool(more))

    async def history(self, task_id: str) -> list[HistoryEntry]:
        if not self.history_length:
            return []
        key = self._history_key(task_id)
        entries = await self._call(self._redis.lrange(key, 0, self.history_length - 1))
        if self.min_replicas:  # no task, shield and timeout per read when there is no barrier
            await self._call(self._confirm_reads())
        return [HistoryEntry.from_dict(json.loads(raw)) for raw in entries]

    async def changes_since(self, since: Cursor | None, only: frozenset[str] | None) -> WatchBatch:
        args: list[str | int] = [
            self._task_key(""),
            since.epoch if since else "",
            since.seq if since else 0,
            _new_epoch(),
        ]
        keys = [self._index_key, self._seq_key, self._epoch_key]
        epoch, seq, reset, *states = await self._call(self._current().changes(keys=keys, args=args))
        if self.min_replicas:  # no task, shield and timeout per read when there is no barrier
            await self._call(self._confirm_reads())
        tasks = [TaskState.from_dict(json.loads(raw)) for raw in states]
        if only is not None:
            tasks = [state for state in tasks if state.task in only]
        return WatchBatch(cursor=Cursor(epoch.decode(), int(seq)), tasks=tasks, reset=bool(reset))

    async def share_stats(self, instance_id: str, record: str, ttl: float) -> SharedStats:
        ttl_ms = round(ttl * 1000)
        keys = [self._instances_key, self._live_key, self._index_key]
        args = [self._instance_key(""), instance_id, record, str(ttl_ms)]
        tasks, *found = await self._call(self._current().stats(keys=keys, args=args))
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
