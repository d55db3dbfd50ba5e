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

from .model import Cursor, TaskState, WatchBatch

WATCH_KEY = "*"  # not a valid task id, so it never collides with one


class Change:
    """One accepted write as every instance sees it: the new state and its place in the stream."""

    __slots__ = ("_body", "_watch_body", "cursor", "state")

    def __init__(self, state: TaskState, cursor: Cursor) -> None:
        self.state = state
        self.cursor = cursor
        self._body: bytes | None = None
        self._watch_body: bytes | None = None

    @property
    def body(self) -> bytes:
        """The state as a JSON response body, built once for all the waiters it wakes."""
        if self._body is None:
            self._body = json.dumps(self.state.to_dict()).encode()
        return self._body

    @property
    def watch_body(self) -> bytes:
        """The answer to every watch whose cursor is just before this change."""
        if self._watch_body is None:
            batch = WatchBatch(cursor=self.cursor, tasks=[self.state])
            self._watch_body = json.dumps(batch.to_dict()).encode()
        return self._watch_body


class Hub:
    def __init__(self) -> None:
        self._futures: dict[str, asyncio.Future[Change | None]] = {}
        self._waiters: Counter[str] = Counter()
        self._closed = False
        self._disconnected = 0  # waiters whose client went away, since the last report

    # --- the backend side ---------------------------------------------------------------------

    def publish(self, change: Change) -> None:
        for key in (change.state.task, WATCH_KEY):
            future = self._futures.pop(key, None)
            if future is not None and not future.done():
                future.set_result(change)

    def close(self) -> None:
        """Release every waiter (they answer 204), e.g. on shutdown; later waits return at once."""
        self._closed = True
        futures, self._futures = self._futures, {}
        for future in futures.values():
            if not future.done():
                future.set_result(None)

    # --- the handler side ---------------------------------------------------------------------

    @contextmanager
    def waiting(self, key: str) -> Iterator[None]:
        """Count a waiter on ``key`` (a task id or ``WATCH_KEY``) for as long as the block runs.

        Enter it BEFORE reading the current version: a change published after the read then finds
        the waiter's future in place, so no wake-up can fall between the read and the wait.
        """
        self._waiters[key] += 1
        self._future(key)
        try:
            yield
        except asyncio.CancelledError:
            self._disconnected += 1  # handler_cancellation: the client closed its connection
            raise
        finally:
            self._waiters[key] -= 1
            if self._waiters[key] <= 0:
                del self._waiters[key]
                self._futures.pop(key, None)

    async def wait_for(
        self, key: str, accept: Callable[[Change], bool], hold: float
    ) -> Change | None:
        """The first change on ``key`` that ``accept`` takes, or None at timeout or shutdown."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + hold
        try:
            async with asyncio.timeout_at(deadline):
                while not self._closed:
                    # shield: a waiter that times out or leaves must not cancel the shared future
                    change = await asyncio.shield(self._future(key))
                    if change is None:
                        return None
                    if accept(change):
                        return change
        except TimeoutError:
            pass
        return None

    def _future(self, key: str) -> asyncio.Future[Change | None]:
        future = self._futures.get(key)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            if self._closed:
                future.set_result(None)
            self._futures[key] = future
        return future

    # --- what the hub can tell ----------------------------------------------------------------

    @property
    def waiting_polls(self) -> int:
        return sum(n for key, n in self._waiters.items() if key != WATCH_KEY)

    @property
    def waiting_watches(self) -> int:
        return self._waiters.get(WATCH_KEY, 0)

    @property
    def waiting_total(self) -> int:
        return self.waiting_polls + self.waiting_watches

    def take_disconnected(self) -> int:
        """How many waiters were cleaned up after their client disconnected, since the last call."""
        count, self._disconnected = self._disconnected, 0
        return count

    def watched_tasks(self) -> list[str]:
        """Task ids that have waiters now (the redis backend re-reads these after a reconnect)."""
        return [key for key in self._waiters if key != WATCH_KEY]
