"""Task state, the updates a client may send, and the validation of both.

Everything here is plain data and pure functions: no HTTP, no I/O. Backends apply updates with
``TaskUpdate.apply`` (memory) or its Lua twin (redis), so the rules live here and in one script.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Final

from .errors import bad_request

TASK_ID_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
_TASK_ID_RE: Final = re.compile(TASK_ID_PATTERN)
DEFAULT_TASK: Final = "default"
DEFAULT_STATUSES: Final = ("pending", "in_progress", "completed", "failed", "cancelled")
DEFAULT_TERMINAL_STATUSES: Final = ("completed", "failed", "cancelled")
MESSAGE_MAX_CHARS: Final = 500
# Versions and cursors stay exact in JavaScript numbers (2**53); anything larger is a client error.
MAX_COUNTER: Final = 2**53 - 1
# C0 control characters other than tab, newline and carriage return have no place in a message.
_CONTROL_RE: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
UPDATE_FIELDS: Final = frozenset({"status", "progress", "message", "expected_version"})


class Unset(Enum):
    """An update field the client left out (keep the value), unlike ``None`` (clear it)."""

    UNSET = "unset"


UNSET: Final = Unset.UNSET


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class TaskState:
    """A task's state; with ``deleted``, its tombstone (no status, progress or message).

    A tombstone is the state a deletion leaves, for ``TOMBSTONE_TTL``: every watcher sees it as a
    change like any other, and a write after it continues from its version (``reborn``), so a
    version number never names two different states.
    """

    task: str
    status: str | None
    version: int = 0
    updated_at: str | None = None
    progress: int | None = None
    message: str | None = None
    deleted: bool = False

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "task": self.task,
            "status": self.status,
            "version": self.version,
            "updated_at": self.updated_at,
            "progress": self.progress,
            "message": self.message,
        }
        if self.deleted:
            data["deleted"] = True
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskState:
        return cls(
            task=str(data["task"]),
            status=None if data.get("status") is None else str(data["status"]),
            version=int(data["version"]),
            updated_at=data.get("updated_at"),
            progress=None if data.get("progress") is None else int(data["progress"]),
            message=data.get("message"),
            deleted=data.get("deleted") is True,
        )

    def tombstone(self, now: str) -> TaskState:
        """What deleting this (live) state leaves: the next version, marked deleted."""
        return TaskState(self.task, None, self.version + 1, now, deleted=True)

    def reborn(self, statuses: tuple[str, ...]) -> TaskState:
        """What a write to this state starts from: itself, or for a tombstone the state of a task
        never written, at the tombstone's version (a recreated task continues at V+2)."""
        if not self.deleted:
            return self
        return replace(initial_state(self.task, statuses), version=self.version)

    def supersedes(self, known: TaskState) -> bool:
        """Whether a change to this state is news to a follower that has ``known``: a higher
        version, or, after a tombstone, a task written anew once the tombstone was purged
        (versions start again at 1 then, but its ``updated_at`` is later)."""
        if self.version > known.version:
            return True
        return (
            known.deleted
            and not self.deleted
            and (self.updated_at or "") > (known.updated_at or "")
        )


def initial_state(task_id: str, statuses: tuple[str, ...]) -> TaskState:
    """The state of a task never written: the first configured status, version 0."""
    return TaskState(task=task_id, status=statuses[0])


@dataclass(frozen=True, slots=True)
class TaskUpdate:
    """A validated write. Fields left ``UNSET`` keep their current value; ``None`` clears them."""

    status: str | Unset = UNSET
    progress: int | Unset | None = UNSET
    message: str | Unset | None = UNSET
    expected_version: int | None = None

    def apply(self, current: TaskState, now: str) -> TaskState:
        changes: dict[str, Any] = {"version": current.version + 1, "updated_at": now}
        for name in ("status", "progress", "message"):
            value = getattr(self, name)
            if value is not UNSET:
                changes[name] = value
        return replace(current, **changes)


@dataclass(frozen=True, slots=True)
class Cursor:
    """A position in the stream of all changes: an epoch (which store) and a global sequence number.

    The epoch changes when the store loses its history (a restart of the embedded backend, a Redis
    flush), so a client holding a cursor from an older epoch gets a full snapshot, not silence.
    """

    epoch: str
    seq: int

    def __str__(self) -> str:
        return f"{self.epoch}-{self.seq}"


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """A watch's answer: tasks changed after a cursor, the new cursor, whether it is a snapshot."""

    cursor: Cursor
    tasks: list[TaskState] = field(default_factory=list)
    reset: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "cursor": str(self.cursor),
            "reset": self.reset,
            "tasks": [state.to_dict() for state in self.tasks],
        }


# --- validation -------------------------------------------------------------------------------


def validate_task_id(task_id: str) -> str:
    if not _TASK_ID_RE.fullmatch(task_id):
        raise bad_request(
            "invalid_task_id",
            "task id must match [A-Za-z0-9][A-Za-z0-9_.-]{0,63}",
        )
    return task_id


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_counter(name: str, raw: str) -> int:
    """A non-negative integer from a query parameter, written as plain decimal digits."""
    if not raw.isascii() or not raw.isdigit() or len(raw) > 16 or int(raw) > MAX_COUNTER:
        raise bad_request("invalid_parameter", f"{name} must be an integer from 0 to {MAX_COUNTER}")
    return int(raw)


def parse_cursor(raw: str) -> Cursor | None:
    """``since`` of a watch: empty or ``0`` asks for a snapshot; else ``<epoch>-<seq>``."""
    if raw in ("", "0"):
        return None
    epoch, sep, seq = raw.rpartition("-")
    if not sep or not re.fullmatch(r"[a-z0-9]{1,32}", epoch):
        raise bad_request("invalid_cursor", "since must be a cursor returned by /api/watch")
    return Cursor(epoch, parse_counter("since", seq))


def _is_encodable(text: str) -> bool:
    """False for lone surrogates (``"\\ud800"`` is valid JSON but no valid UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_json_object(raw: bytes) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(pairs)
        if len(result) != len(pairs):
            raise ValueError("duplicate key")
        return result

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        data = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=no_duplicates,
            parse_constant=no_constants,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad_request("invalid_json", f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise bad_request("invalid_body", "body must be a JSON object")
    return data


def parse_update(raw: bytes, statuses: tuple[str, ...]) -> TaskUpdate:
    """Validate a write body: every rule a write obeys, checked before any state is touched."""
    data = _parse_json_object(raw)
    unknown = sorted(set(data) - UPDATE_FIELDS)
    if unknown:
        raise bad_request("unknown_field", f"unknown field(s): {', '.join(unknown)}")
    if not data.keys() & {"status", "progress", "message"}:
        raise bad_request("empty_update", "give at least one of status, progress, message")

    status: str | Unset = UNSET
    if "status" in data:
        if data["status"] not in statuses:
            raise bad_request("invalid_status", f"status must be one of: {', '.join(statuses)}")
        status = data["status"]

    progress: int | Unset | None = UNSET
    if "progress" in data:
        value = data["progress"]
        if value is not None and not (_is_int(value) and 0 <= value <= 100):
            raise bad_request("invalid_progress", "progress must be an integer 0..100, or null")
        progress = value

    message: str | Unset | None = UNSET
    if "message" in data:
        value = data["message"]
        if value is not None and not isinstance(value, str):
            raise bad_request("invalid_message", "message must be a string or null")
        if isinstance(value, str):
            if len(value) > MESSAGE_MAX_CHARS:
                raise bad_request(
                    "invalid_message", f"message must be at most {MESSAGE_MAX_CHARS} characters"
                )
            if _CONTROL_RE.search(value) or not _is_encodable(value):
                raise bad_request(
                    "invalid_message", "message must be text without control characters"
                )
        message = value

    expected = data.get("expected_version")
    if expected is not None and not (_is_int(expected) and 0 <= expected <= MAX_COUNTER):
        raise bad_request(
            "invalid_expected_version", "expected_version must be a non-negative integer"
        )

    return TaskUpdate(status=status, progress=progress, message=message, expected_version=expected)
