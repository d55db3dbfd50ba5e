"""The embedded backend: state in this process, for one instance with nothing else installed."""

from __future__ import annotations

import secrets
from collections import OrderedDict, deque

from ..history import DEFAULT_HISTORY_LENGTH, HistoryEntry
from ..hub import Change
from ..model import Cursor, TaskState, TaskUpdate, WatchBatch, initial_state, utc_now_iso
from .base import (
    Backend,
    ChangeSink,
    SharedStats,
    TaskLimitReached,
    VersionConflict,
    WriteResult,
)


class MemoryBackend(Backend):
    def __init__(
        self,
        statuses: tuple[str, ...],
        max_tasks: int,
        history_length: int = DEFAULT_HISTORY_LENGTH,
    ) -> None:
        super().__init__(statuses, max_tasks, history_length)
        # Ordered by the sequence number of each task's last change, so a watch reads only the
        # tail it has not seen instead of every task.
        self._tasks: OrderedDict[str, tuple[TaskState, int]] = OrderedDict()
        self._seq = 0
        # Each task's last changes, oldest first; a full deque drops its oldest on append.
        self._history: dict[str, deque[HistoryEntry]] = {}
        # A new process starts from empty state: a new epoch tells watchers to take a snapshot.
        self._epoch = secrets.token_hex(4)
        self._sink: ChangeSink | None = None

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
        return [state for state, _ in self._tasks.values()]

    async def write(
        self, task_id: str, update: TaskUpdate, subject: str | None = None
    ) -> WriteResult:
        # No await from here to the publish: the event loop makes this one atomic step.
        current = self._state(task_id)
        if update.expected_version is not None and update.expected_version != current.version:
            raise VersionConflict(current)
        if task_id not in self._tasks and len(self._tasks) >= self.max_tasks:
            raise TaskLimitReached
        state = update.apply(current, utc_now_iso())
        self._seq += 1
        self._tasks[task_id] = (state, self._seq)
        self._tasks.move_to_end(task_id)
        if self.history_length:
            changes = self._history.setdefault(task_id, deque(maxlen=self.history_length))
            changes.append(HistoryEntry.of(state, subject))
        if self._sink is not None:
            self._sink.publish(Change(state, Cursor(self._epoch, self._seq)))
        return WriteResult(previous=current, state=state)

    async def history(self, task_id: str) -> list[HistoryEntry]:
        return list(reversed(self._history.get(task_id, ())))

    async def changes_since(self, since: Cursor | None, only: frozenset[str] | None) -> WatchBatch:
        cursor = Cursor(self._epoch, self._seq)
        if since is None or since.epoch != self._epoch or since.seq > self._seq:
            tasks = [s for s, _ in self._tasks.values() if only is None or s.task in only]
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
        return SharedStats([(record, 0.0)], len(self._tasks))  # the only instance there is

    async def withdraw_stats(self, instance_id: str) -> None:
        pass
