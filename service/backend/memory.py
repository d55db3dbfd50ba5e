"""The embedded backend: state in this process, for one instance with nothing else installed.

Deletion and retention work as on Redis: a tombstone replaces a deleted task, and the due times
of finished tasks and tombstones sit in a heap (``_due``), so a sweep looks only at what is due.
"""

from __future__ import annotations

import heapq
import secrets
import time
from collections import OrderedDict, deque

from ..history import DEFAULT_HISTORY_LENGTH, HistoryEntry
from ..hub import Change
from ..idempotency import IdempotencyKey, KeptAnswers
from ..model import Cursor, TaskState, TaskUpdate, WatchBatch, initial_state, utc_now_iso
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


class MemoryBackend(Backend):
    def __init__(
        self,
        statuses: tuple[str, ...],
        max_tasks: int,
        history_length: int = DEFAULT_HISTORY_LENGTH,
        retention: Retention | None = None,
    ) -> None:
        super().__init__(statuses, max_tasks, history_length, retention)
        # Ordered by the sequence number of each task's last change, so a watch reads only the
        # tail it has not seen instead of every task. Tombstones included.
        self._tasks: OrderedDict[str, tuple[TaskState, int]] = OrderedDict()
        self._live = 0  # tasks in _tasks that are not tombstones: what MAX_TASKS counts
        self._seq = 0
        # Each task's last changes, oldest first; a full deque drops its oldest on append.
        self._history: dict[str, deque[HistoryEntry]] = {}
        # task -> when it is due (seconds since the epoch): a finished task's expiry, or a
        # tombstone's purge. The heap orders them; an entry whose time is no longer the task's
        # (written again since) is skipped when it comes up, and dropped in a rebuild.
        self._due: dict[str, float] = {}
        self._due_heap: list[tuple[float, str]] = []
        # A new process starts from empty state: a new epoch tells watchers to take a snapshot.
        self._epoch = secrets.token_hex(4)
        self._sink: ChangeSink | None = None
        self._answers = KeptAnswers()  # Idempotency-Key: the first answer to each key

    async def start(self, sink: ChangeSink) -> None:
        self._sink = sink

    async def close(self) -> None:
        self._sink = None

    async def get(self, task_id: str) -> TaskState:
        return self._state(task_id)

    def peek(self, task_id: str) -> TaskState | None:
        return self._state(task_id)  # this process holds the truth

    def _state(self, task_id: str) -> TaskState:
        entry = self._tasks.get(task_id)
        return entry[0] if entry else initial_state(task_id, self.statuses)

    async def list_tasks(self) -> list[TaskState]:
        return [state for state, _ in self._tasks.values() if not state.deleted]

    async def write(
        self,
        task_id: str,
        update: TaskUpdate,
        subject: str | None = None,
        idempotency: IdempotencyKey | None = None,
    ) -> WriteResult:
        # No await from here to the publish: the event loop makes this one atomic step.
        if (answered := self._answers.recall(idempotency)) is not None:
            return WriteResult(previous=answered, state=answered)
        current = self._state(task_id)
        if update.expected_version is not None and update.expected_version != current.version:
            raise VersionConflict(current)
        created = task_id not in self._tasks or current.deleted
        if created and self._live >= self.max_tasks:
            raise TaskLimitReached
        state = update.apply(current.reborn(self.statuses), utc_now_iso())
        self._live += created
        self._commit(state)
        if self.retention.expires(state):
            self._schedule(task_id, time.time() + self.retention.finished_ttl)
        else:
            self._schedule(task_id, None)
        if self.history_length:
            changes = self._history.setdefault(task_id, deque(maxlen=self.history_length))
            changes.append(HistoryEntry.of(state, subject))
        self._answers.keep(idempotency, state)
        return WriteResult(previous=current, state=state)

    async def _delete(
        self, task_id: str, expected_version: int | None, idempotency: IdempotencyKey | None
    ) -> TaskState:
        if (answered := self._answers.recall(idempotency)) is not None:
            return answered
        current = self._state(task_id)
        if task_id not in self._tasks or current.deleted:
            raise TaskNotFound
        if expected_version is not None and expected_version != current.version:
            raise VersionConflict(current)
        tombstone = self._bury(current)
        self._answers.keep(idempotency, tombstone)
        return tombstone

    def _bury(self, current: TaskState) -> TaskState:
        """Replace a live task by its tombstone, and publish it."""
        tombstone = current.tombstone(utc_now_iso())
        self._live -= 1
        self._commit(tombstone)
        self._history.pop(current.task, None)
        self._schedule(current.task, time.time() + self.retention.tombstone_ttl)
        return tombstone

    def _commit(self, state: TaskState) -> None:
        self._seq += 1
        self._tasks[state.task] = (state, self._seq)
        self._tasks.move_to_end(state.task)
        if self._sink is not None:
            self._sink.publish(Change(state, Cursor(self._epoch, self._seq)))

    def _schedule(self, task_id: str, due: float | None) -> None:
        if due is None:
            if self._due.pop(task_id, None) is None:
                return
        else:
            self._due[task_id] = due
            heapq.heappush(self._due_heap, (due, task_id))
        if len(self._due_heap) > 2 * len(self._due) + 64:  # mostly stale entries: rebuild
            self._due_heap = [(when, task) for task, when in self._due.items()]
            heapq.heapify(self._due_heap)

    async def _sweep(self, limit: int) -> SweepResult:
        now = time.time()
        expired = purged = 0
        # (self._due_heap each time: burying a task may rebuild it)
        while self._due_heap and self._due_heap[0][0] <= now and expired + purged < limit:
            due, task_id = heapq.heappop(self._due_heap)
            if self._due.get(task_id) != due:
                continue  # written (or deleted) again since: not this entry's time
            del self._due[task_id]
            state = self._tasks[task_id][0]
            if state.deleted:
                del self._tasks[task_id]  # the task reads as never written from now on
                purged += 1
            elif self.retention.expires(state):
                self._bury(state)
                expired += 1
        more = bool(self._due_heap) and self._due_heap[0][0] <= now
        return SweepResult(expired, purged, more)

    async def history(self, task_id: str) -> list[HistoryEntry]:
        return list(reversed(self._history.get(task_id, ())))

    async def changes_since(self, since: Cursor | None, only: frozenset[str] | None) -> WatchBatch:
        cursor = Cursor(self._epoch, self._seq)
        if since is None or since.epoch != self._epoch or since.seq > self._seq:
            # A snapshot holds the live tasks; a tombstone is news only to who saw the task.
            tasks = [
                s
                for s, _ in self._tasks.values()
                if not s.deleted and (only is None or s.task in only)
            ]
            return WatchBatch(cursor=cursor, tasks=tasks, reset=True)
        changed = []
        for state, seq in reversed(self._tasks.values()):
            if seq <= since.seq:
                break
            if only is None or state.task in only:
                changed.append(state)
        changed.reverse()
        return WatchBatch(cursor=cursor, tasks=changed)

    async def share_stats(self, instance_id: str, record: str, ttl: float) -> SharedStats:
        return SharedStats([(record, 0.0)], self._live)  # the only instance there is

    async def withdraw_stats(self, instance_id: str) -> None:
        pass
