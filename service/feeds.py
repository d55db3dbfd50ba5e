"""What a stream sends next: one task's states, or a board's changes, in order and resumable.

The streaming transports (``sse.py``, ``ws.py``) follow a task or a board for as long as a client
stays connected. A feed keeps the client's place: it starts from what the client has (a version, a
cursor, or nothing), catches up from the store once, then takes every change from its waiter's
chain in the hub (no store read per change), and reads the store again only after a gap in the
change stream. The rules are the long poll's and the watch's: versions and cursors are compared,
never counted, so stale and duplicate changes are ignored.

Each event carries the id a client resumes from (a version, or a cursor) and a JSON body. A live
event's body is the one the hub built once per change, shared by every stream, poll and watch
the change wakes.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from .backend import Backend
from .hub import Change, Waiter
from .model import Cursor, TaskState, WatchBatch


@dataclass(frozen=True, slots=True)
class Event:
    """One message of a stream: ``id`` to resume from, ``body`` (JSON) to show, and the change it
    delivers as it happens (none for a catch-up from the store)."""

    id: str
    body: bytes
    change: Change | None = None


class TaskFeed:
    """One task's states, each newer than the last; its ids are versions.

    Register the waiter first, then ``catch_up``: a change published in between is on the chain.
    """

    def __init__(self, backend: Backend, waiter: Waiter, task_id: str, since: int | None) -> None:
        self._backend = backend
        self._waiter = waiter
        self._task_id = task_id
        self._since = since
        self._state: TaskState | None = None  # the newest state this feed has
        self._epoch: str | None = None  # the store's, learned from the first change seen

    async def catch_up(self) -> Event | None:
        """The state now, unless the client has this very version (also when it is ahead: a
        store that was reset)."""
        state = self._backend.peek(self._task_id)
        if state is None or (self._since is not None and state.version < self._since):
            state = await self._backend.get(self._task_id)
        self._state = state
        if state.version == self._since:
            return None
        return Event(str(state.version), json.dumps(state.to_dict()).encode())

    async def next(self, hold: float) -> Event | None:
        """The next newer state, or None when ``hold`` seconds pass or the hub closes."""
        change = await self._waiter.wait(self._news, hold)
        if change is None:
            return None
        self._state = change.state
        return Event(str(change.state.version), change.body, change)

    def _news(self, change: Change) -> bool:
        reset = self._epoch is not None and change.cursor.epoch != self._epoch
        self._epoch = change.cursor.epoch
        # After a reset of the store the versions start again: take the new state as it is.
        # So they do for a task written anew after its tombstone was purged (``supersedes``).
        return reset or self._state is None or change.state.supersedes(self._state)


class BoardFeed:
    """Every task changed (or only those in ``only``), as watch batches; its ids are cursors."""

    def __init__(
        self,
        backend: Backend,
        waiter: Waiter,
        only: frozenset[str] | None,
        since: Cursor | None,
    ) -> None:
        self._backend = backend
        self._waiter = waiter
        self._only = only
        self._since = since
        self._position = Cursor("", 0)  # set by catch_up

    async def catch_up(self) -> Event | None:
        """A snapshot (no cursor, or one the store cannot continue from), or what changed after
        the cursor; None when nothing this feed shows did."""
        batch = await self._backend.changes_since(self._since, self._only)
        self._position = batch.cursor
        if self._since is None or batch.reset or batch.tasks:
            return _batch_event(batch)
        return None

    async def next(self, hold: float) -> Event | None:
        """The next change this feed shows, or None when ``hold`` seconds pass or the hub closes.

        A change right after the feed's position comes from the hub as is; after a gap (the
        instance resynced after a reconnect, or changes this feed does not show) the store says
        what was missed, and the feed waits on if none of it is for this feed.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + hold
        while True:
            change = await self._waiter.wait(self._news, deadline - loop.time())
            if change is None:
                return None
            if _follows(change.cursor, self._position):
                self._position = change.cursor
                return Event(str(change.cursor), change.watch_body, change)
            batch = await self._backend.changes_since(self._position, self._only)
            self._position = batch.cursor
            if batch.reset or batch.tasks:
                return _batch_event(batch)

    def _news(self, change: Change) -> bool:
        position = self._position
        if change.cursor.epoch != position.epoch:
            return True  # the store was reset: the catch-up answers with a snapshot
        if change.cursor.seq <= position.seq:
            return False  # stale or duplicate
        if _follows(change.cursor, position) and self._only and change.state.task not in self._only:
            self._position = change.cursor  # nothing this feed shows happened up to here
            return False
        return True


def _follows(cursor: Cursor, position: Cursor) -> bool:
    return cursor.epoch == position.epoch and cursor.seq == position.seq + 1


def _batch_event(batch: WatchBatch) -> Event:
    return Event(str(batch.cursor), json.dumps(batch.to_dict()).encode())
