"""Task history: the last changes of each task, as the write that made each one left it.

Every accepted write appends one entry to its task's history, in the same atomic step as the write
itself (the memory backend in one loop step, the redis backend in its one write script), so the
history and the state never disagree. Each task keeps its last ``HISTORY_LENGTH`` entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from .model import TaskState

DEFAULT_HISTORY_LENGTH: Final = 100
MAX_HISTORY_LENGTH: Final = 10_000  # one answer holds a whole history; keep it a few MiB at most


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One change: the task's state right after it, and who made it (the token's subject, when
    authentication is on and the token names one)."""

    version: int
    status: str
    progress: int | None
    message: str | None
    updated_at: str | None
    subject: str | None = None

    @classmethod
    def of(cls, state: TaskState, subject: str | None) -> HistoryEntry:
        """The entry of a write (a deletion has none: it takes the task's history with it)."""
        assert state.status is not None, "a tombstone has no history entry"
        return cls(
            version=state.version,
            status=state.status,
            progress=state.progress,
            message=state.message,
            updated_at=state.updated_at,
            subject=subject,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "status": self.status,
            "progress": self.progress,
            "message": self.message,
            "updated_at": self.updated_at,
            "subject": self.subject,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HistoryEntry:
        return cls(
            version=int(data["version"]),
            status=str(data["status"]),
            progress=None if data.get("progress") is None else int(data["progress"]),
            message=data.get("message"),
            updated_at=data.get("updated_at"),
            subject=data.get("subject"),
        )
