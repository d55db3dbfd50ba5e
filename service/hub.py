"""The hub owns the waiters of this instance and wakes them when a change arrives.

Data flows one way: a backend calls ``Hub.publish`` with each change (the memory backend right
after a write, the redis backend from its one pub/sub reader); the hub resolves ONE future per
task, shared by every waiter of that task, plus one future shared by every watch. A change is
serialized once, on first use, whatever the number of waiters it wakes.

A wake-up is a hint: waiters compare versions (or cursors) and ignore stale or duplicate changes.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .model import Cursor, TaskState, WatchBatch

WATCH_KEY = "*"  # not a valid task id, so it never collides with one


class Change:
    """One accepted write as every instance sees it: the new state and its place in the stream.

    The hub fills in the response bodies when it publishes, once per change and only for the
    kinds of waiter present, whatever their number.
    """

    __slots__ = ("_body", "_watch_body", "cursor", "state")

    def __init__(self, state: TaskState, cursor: Cursor) -> None:
        self.state = state
        self.cursor = cursor
        self._body: bytes | None = None
        self._watch_body: bytes | None = None

    @property
    def body(self) -> bytes:
        """The state as a JSON response body, shared by every poll of the task it wakes."""
        assert self._body is not None, "published to task waiters without a body"
        return self._body

    @property
    def watch_body(self) -> bytes:
        """The answer to every watch whose cursor is just before this change."""
        assert self._watch_body is not None, "published to watches without a body"
        return self._watch_body

    def encode_body(self) -> None:
        self._body = json.dumps(self.state.to_dict()).encode()

    def encode_watch_body(self) -> None:
        batch = WatchBatch(cursor=self.cursor, tasks=[self.state])
        self._watch_body = json.dumps(batch.to_dict()).encode()


@dataclass(frozen=True, slots=True)
class Link:
    """One change, and the future that will carry the change after it.

    Each key's futures form a chain: a waiter that turns a change down moves on to ``next`` and so
    cannot miss a change published before it got to wait again.
    """

    change: Change
    next: asyncio.Future[Link | None]


class Waiter:
    """One held request's place in a key's chain of changes (see ``Hub.waiting``)."""

    __slots__ = ("_future",)

    def __init__(self, future: asyncio.Future[Link | None]) -> None:
        self._future = future

    async def wait(self, accept: Callable[[Change], bool], hold: float) -> Change | None:
        """The first change ``accept`` takes, or None after ``hold`` seconds or at shutdown."""
        try:
            async with asyncio.timeout(hold):
                while True:
                    # shield: a waiter that times out or leaves must not cancel the shared future
                    link = await asyncio.shield(self._future)
                    if link is None:
                        return None
                    self._future = link.next
                    if accept(link.change):
                        return link.change
        except TimeoutError:
            return None


class Hub:
    def __init__(self) -> None:
        # key -> the future the next change on that key resolves; present while it has waiters
        self._futures: dict[str, asyncio.Future[Link | None]] = {}
        self._waiters: Counter[str] = Counter()
        self._total = 0
        self._closed = False
        self._disconnected = 0  # waiters whose client went away, since the last report
        self.serializations = 0  # response bodies built by publish, for all waiters together

    # --- the backend side ---------------------------------------------------------------------

    def publish(self, change: Change) -> None:
        task_future = self._futures.get(change.state.task)
        if task_future is not None and not task_future.done():
            change.encode_body()
            self.serializations += 1
            self._advance(change.state.task, task_future, change)
        watch_future = self._futures.get(WATCH_KEY)
        if watch_future is not None and not watch_future.done():
            change.encode_watch_body()
            self.serializations += 1
            self._advance(WATCH_KEY, watch_future, change)

    def _advance(self, key: str, future: asyncio.Future[Link | None], change: Change) -> None:
        following = future.get_loop().create_future()
        self._futures[key] = following
        future.set_result(Link(change, following))

    def close(self) -> None:
        """Release every waiter (they answer 204), e.g. on shutdown; later waits return at once."""
        self._closed = True
        for future in self._futures.values():
            if not future.done():
                future.set_result(None)

    # --- the handler side ---------------------------------------------------------------------

    @contextmanager
    def waiting(self, key: str) -> Iterator[Waiter]:
        """Register a waiter on ``key`` (a task id or ``WATCH_KEY``) for as long as the block runs.

        Enter it BEFORE reading the current version: a change published after the read is then
        already on the waiter's chain, so no wake-up can fall between the read and the wait.
        """
        future = self._futures.get(key)
        if future is None:
            future = self._futures[key] = asyncio.get_running_loop().create_future()
            if self._closed:
                future.set_result(None)
        self._waiters[key] += 1
        self._total += 1
        try:
            yield Waiter(future)
        except asyncio.CancelledError:
            self._disconnected += 1  # handler_cancellation: the client closed its connection
            raise
        finally:
            self._total -= 1
            self._waiters[key] -= 1
            if self._waiters[key] <= 0:
                del self._waiters[key]
                del self._futures[key]

    # --- what the hub can tell ----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def waiting_total(self) -> int:
        return self._total

    @property
    def waiting_watches(self) -> int:
        return self._waiters.get(WATCH_KEY, 0)

    @property
    def waiting_polls(self) -> int:
        return self._total - self.waiting_watches

    def take_disconnected(self) -> int:
        """How many waiters were cleaned up after their client disconnected, since the last call."""
        count, self._disconnected = self._disconnected, 0
        return count

    def watched_tasks(self) -> list[str]:
        """Task ids that have waiters now (the redis backend re-reads these after a reconnect)."""
        return [key for key in self._waiters if key != WATCH_KEY]
