"""The interface every state store implements: memory (one process) and redis (a cluster).

A backend owns the truth (states, versions, the change stream) and delivers every change, its own
writes and those of other instances, to a ``ChangeSink`` (the hub) once ``start`` returns. It knows
nothing of HTTP.

A task's life: written (created by its first write), deleted (``delete``, or by ``sweep`` once it
is finished and ``Retention.finished_ttl`` passed without a write), which leaves a tombstone that
every watcher receives as a change; a write after that continues from the tombstone's version.
``sweep`` also purges tombstones older than ``Retention.tombstone_ttl``: the task then reads as
never written. Each store keeps the due times it needs for this (no scan of all tasks).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

from ..history import DEFAULT_HISTORY_LENGTH, HistoryEntry
from ..hub import Change
from ..idempotency import IdempotencyKey
from ..model import DEFAULT_TERMINAL_STATUSES, Cursor, TaskState, TaskUpdate, WatchBatch


class ChangeSink(Protocol):
    """Where a backend delivers changes: the hub."""

    def publish(self, change: Change) -> None: ...

    def watched_tasks(self) -> list[str]:
        """Task ids with waiters, to re-read after a gap in the change stream."""
        ...


class TaskLimitReached(Exception):
    """The write would create a task beyond the store's cap; nothing was written."""


class TaskNotFound(Exception):
    """The task to delete does not exist (never written, or already deleted); nothing changed."""


class VersionConflict(Exception):
    """``expected_version`` did not match; nothing was written."""

    def __init__(self, current: TaskState) -> None:
        super().__init__(f"task {current.task} is at version {current.version}")
        self.current = current


@dataclass(frozen=True, slots=True)
class WriteResult:
    previous: TaskState
    state: TaskState


@dataclass(frozen=True, slots=True)
class Retention:
    """How long tasks and tombstones are kept (config: FINISHED_TASK_TTL, TERMINAL_STATUSES,
    TOMBSTONE_TTL), in seconds; ``finished_ttl`` 0 keeps finished tasks forever."""

    finished_ttl: int = 7 * 24 * 3600
    terminal_statuses: tuple[str, ...] = DEFAULT_TERMINAL_STATUSES
    tombstone_ttl: int = 3600

    def expires(self, state: TaskState) -> bool:
        """Whether ``state`` is finished and will be deleted once ``finished_ttl`` passes."""
        return bool(self.finished_ttl) and state.status in self.terminal_statuses


@dataclass(frozen=True, slots=True)
class SweepResult:
    """What one ``sweep`` did: tasks it deleted as expired, tombstones it purged, and whether
    more were due than the batch took."""

    expired: int
    purged: int
    more: bool


class Backend(ABC):
    def __init__(
        self,
        statuses: tuple[str, ...],
        max_tasks: int,
        history_length: int = DEFAULT_HISTORY_LENGTH,
        retention: Retention | None = None,
    ) -> None:
        self.statuses = statuses
        self.max_tasks = max_tasks
        self.history_length = history_length
        self.retention = retention or Retention()

    @abstractmethod
    async def start(self, sink: ChangeSink) -> None:
        """Connect, and from now on call ``sink.publish`` for every change."""

    @abstractmethod
    async def close(self) -> None: ...

    def is_ready(self) -> bool:
        """True when writes can be accepted and no change can be missed."""
        return True

    def peek(self, task_id: str) -> TaskState | None:
        """The task's state as this instance knows it without asking the store, or None.

        A known state is the newest this instance has seen, and any newer one is on its way to
        the hub; a poll whose client is at that version can wait without a read.
        """
        return None

    @abstractmethod
    async def get(self, task_id: str) -> TaskState:
        """The task's state; a task never written reads as its initial state, version 0."""

    @abstractmethod
    async def list_tasks(self) -> list[TaskState]:
        """Every live task (written and not deleted), oldest change first."""

    @abstractmethod
    async def write(
        self,
        task_id: str,
        update: TaskUpdate,
        subject: str | None = None,
        idempotency: IdempotencyKey | None = None,
    ) -> WriteResult:
        """Apply ``update`` atomically: version + 1 and an entry in the task's history, naming
        ``subject`` (who wrote); or ``VersionConflict`` or ``TaskLimitReached`` (a new task beyond
        ``max_tasks``) and no change. With ``idempotency``, a write already made with that key
        is not made again: its answer is (``IdempotencyKeyReused`` if it was another request)."""

    async def delete(
        self,
        task_id: str,
        expected_version: int | None = None,
        idempotency: IdempotencyKey | None = None,
    ) -> TaskState:
        """Delete a live task atomically: its tombstone (version + 1) replaces it, its history
        goes, and every watcher gets the tombstone as a change. ``TaskNotFound`` for a task never
        written or already deleted, ``VersionConflict`` if ``expected_version`` is not its
        version; then nothing changes. ``idempotency`` as for ``write``."""
        tombstone = await self._delete(task_id, expected_version, idempotency)
        self.deleted += 1
        return tombstone

    @abstractmethod
    async def _delete(
        self, task_id: str, expected_version: int | None, idempotency: IdempotencyKey | None
    ) -> TaskState: ...

    async def sweep(self, limit: int) -> SweepResult:
        """Delete up to ``limit`` tasks (and purge tombstones) whose time has come, in one atomic
        step. Any number of instances may sweep at once: each task goes once."""
        result = await self._sweep(limit)
        self.expired += result.expired
        self.purged += result.purged
        return result

    @abstractmethod
    async def _sweep(self, limit: int) -> SweepResult: ...

    @abstractmethod
    async def history(self, task_id: str) -> list[HistoryEntry]:
        """The task's last ``history_length`` changes, newest first; none for a task never
        written."""

    @abstractmethod
    async def changes_since(self, since: Cursor | None, only: frozenset[str] | None) -> WatchBatch:
        """Tasks changed after ``since`` (limited to ``only`` when given) and the cursor now.

        With no cursor, or one from another epoch or ahead of the store, answer a snapshot of all
        (``reset=True``) so the client replaces what it holds.
        """

    # --- what an instance tells of itself (metrics.py, dashboard.py) --------------------------

    reconnects = 0  # times the change subscription came back after it dropped
    errors = 0  # calls to the store that failed
    deleted = 0  # tasks deleted through this instance (DELETE)
    expired = 0  # finished tasks this instance's sweeps deleted
    purged = 0  # tombstones this instance's sweeps removed
    not_replicated = 0  # writes the primary took that too few replicas confirmed in time

    @property
    def failovers(self) -> int:
        """Times the primary moved while this instance followed it (Sentinel)."""
        return 0

    @property
    def primary_address(self) -> str:
        """Where the store's primary is, for the dashboard: empty for the embedded store."""
        return ""

    @abstractmethod
    async def share_stats(self, instance_id: str, record: str, ttl: float) -> SharedStats:
        """Store ``record`` as ``instance_id``'s stats for ``ttl`` seconds, and read back every
        live instance's record (this one's included) and the number of live tasks in the store."""

    @abstractmethod
    async def withdraw_stats(self, instance_id: str) -> None:
        """Remove ``instance_id``'s stats record now (a graceful stop)."""


@dataclass(frozen=True, slots=True)
class SharedStats:
    """What ``share_stats`` reads back: each live instance's record with its age in seconds."""

    records: list[tuple[str, float]]
    tasks: int
