"""A history of what clients were told, and the check that nothing was lost or reordered.

Writers record every write attempt: acknowledged (a 200, with the version the store gave it) or not
(a 5xx, a refused or cut connection: it may or may not have been applied). Watchers record every
state they are shown. After the load, ``check`` compares the history with the store's final states:

- each watcher saw each task's versions in strictly increasing order (a watch snapshot, after a
  reset, may repeat the version the watcher already had, never go back);
- each watcher ended on the task's final version, which is at least its last acknowledged one;
- no acknowledged write is missing: a task's acknowledged versions are distinct (two writes given
  one version would mean one overwrote the other) and none is above the final version; when every
  write to a task was acknowledged, they are exactly ``base + 1 .. final``;
- a write acknowledged before another began has the lower version (real-time order);
- content matches: a state shown (or kept in the store) at an acknowledged version is that write's,
  and a final state at a version nobody acknowledged is one of the unacknowledged attempts.

Each write carries a unique ``message``, so a state tells which write it is. Times are
``time.monotonic()`` in the one process that runs every client.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Write:
    """One write attempt. ``version`` is None when it was not acknowledged."""

    task: str
    message: str
    started: float
    ended: float
    version: int | None
    outcome: str  # "200", "502", "503", or the exception's name


@dataclass(frozen=True, slots=True)
class Seen:
    """One state a watcher was shown, on a request sent at ``asked`` and answered at ``at``."""

    client: str
    task: str
    version: int
    message: str | None
    asked: float
    at: float
    served_by: str
    snapshot: bool = False  # from a watch reset: may repeat what the client had


@dataclass(frozen=True, slots=True)
class Failure:
    """A failure a client saw: a 5xx answer or a request that got no answer."""

    client: str
    what: str
    at: float
    served_by: str = ""


@dataclass
class History:
    writes: list[Write] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    # client -> task -> the version it started from (what it knew before the load)
    follows: dict[str, dict[str, int]] = field(default_factory=dict)
    # (client, task) -> the newest version shown, for waiting on convergence
    position: dict[tuple[str, str], int] = field(default_factory=dict)
    base: dict[str, int] = field(default_factory=dict)  # task -> version before the load

    # --- recording ------------------------------------------------------------------------------

    def follow(self, client: str, tasks: Mapping[str, int]) -> None:
        self.follows[client] = dict(tasks)
        for task, version in tasks.items():
            self.position[client, task] = version

    def write(self, write: Write) -> None:
        self.writes.append(write)

    def observe(self, seen: Seen) -> None:
        self.seen.append(seen)
        key = (seen.client, seen.task)
        self.position[key] = max(self.position.get(key, 0), seen.version)

    def fail(self, failure: Failure) -> None:
        self.failures.append(failure)

    # --- questions during the run ---------------------------------------------------------------

    @property
    def acknowledged(self) -> list[Write]:
        return [w for w in self.writes if w.version is not None]

    @property
    def unacknowledged(self) -> list[Write]:
        return [w for w in self.writes if w.version is None]

    def lagging(self, final: Mapping[str, int]) -> list[str]:
        """Watchers not yet on a task's final version: ``client task: at/final``."""
        return [
            f"{client} {task}: {self.position[client, task]}/{final.get(task, 0)}"
            for client, tasks in self.follows.items()
            for task in tasks
            if self.position[client, task] != final.get(task, 0)
        ]

    # --- the check ------------------------------------------------------------------------------

    def problems(self, final: Mapping[str, Mapping[str, Any]]) -> list[str]:
        """Every way the history contradicts itself or the store's ``final`` states (by task)."""
        found: list[str] = []
        versions = {task: int(state["version"]) for task, state in final.items()}
        by_task: dict[str, list[Write]] = defaultdict(list)
        for write in self.writes:
            by_task[write.task].append(write)
        acked_at: dict[tuple[str, int], Write] = {}
        for task, writes in by_task.items():
            found += _check_writes(task, writes, self.base.get(task, 0), final.get(task), acked_at)
        found += self._check_watchers(versions, acked_at)
        return found

    def check(self, final: Mapping[str, Mapping[str, Any]]) -> None:
        found = self.problems(final)
        assert not found, f"{len(found)} problems in the history:\n" + "\n".join(found[:30])

    def _check_watchers(
        self, final: Mapping[str, int], acked_at: Mapping[tuple[str, int], Write]
    ) -> list[str]:
        found: list[str] = []
        last: dict[tuple[str, str], int] = {}
        for client, tasks in self.follows.items():
            for task, version in tasks.items():
                last[client, task] = version
        for seen in self.seen:
            key = (seen.client, seen.task)
            before = last.get(key, 0)
            if seen.version < before or (seen.version == before and not seen.snapshot):
                found.append(f"{seen.client} saw {seen.task} go from {before} to {seen.version}")
            last[key] = max(before, seen.version)
            write = acked_at.get((seen.task, seen.version))
            if write is not None and seen.message != write.message:
                found.append(
                    f"{seen.client} saw {seen.task} v{seen.version} as {seen.message!r},"
                    f" written as {write.message!r}"
                )
            if write is not None and seen.at < write.started:
                found.append(f"{seen.client} saw {seen.task} v{seen.version} before it was sent")
        for (client, task), version in last.items():
            if version != final.get(task, 0):
                found.append(
                    f"{client} ended {task} on v{version}, the store has v{final.get(task, 0)}"
                )
        return found


def _check_writes(
    task: str,
    writes: Iterable[Write],
    base: int,
    final_state: Mapping[str, Any] | None,
    acked_at: dict[tuple[str, int], Write],
) -> list[str]:
    found: list[str] = []
    final = int(final_state["version"]) if final_state else 0
    attempts = list(writes)
    acked = sorted((w for w in attempts if w.version is not None), key=lambda w: w.version or 0)
    for write in acked:
        assert write.version is not None
        other = acked_at.setdefault((task, write.version), write)
        if other is not write:
            found.append(f"{task}: {write.message} and {other.message} both got v{write.version}")
        if write.version > final:
            found.append(f"{task}: {write.message} got v{write.version}, the store has v{final}")
    if final - base < len(acked):
        found.append(f"{task}: {len(acked)} writes acknowledged, the store moved {final - base}")
    if len(acked) == len(attempts) and [w.version for w in acked] != list(
        range(base + 1, final + 1)
    ):
        found.append(f"{task}: every write acknowledged, yet the store is at v{final}")
    # A write acknowledged before another was sent must have the lower version.
    latest_start = float("-inf")
    for write in acked:
        if write.ended < latest_start:
            found.append(f"{task}: {write.message} (v{write.version}) acknowledged out of order")
        latest_start = max(latest_start, write.started)
    if final_state is not None and final > base:
        message = final_state.get("message")
        kept = acked_at.get((task, final))
        if kept is not None and message != kept.message:
            found.append(f"{task}: the store keeps {message!r} at v{final}, not {kept.message!r}")
        if kept is None and message not in {w.message for w in attempts if w.version is None}:
            found.append(f"{task}: the store keeps {message!r} at v{final}, which nobody wrote")
    return found
