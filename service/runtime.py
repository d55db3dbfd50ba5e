"""Process-wide tuning for holding many idle connections and waking them in bursts.

Both are measured in bench/ (``make bench``), not asserted in tests:

- uvloop runs the event loop in C (libuv): accepting, reading and writing thousands of sockets
  costs less CPU than with the pure-Python selector loop;
- the cyclic garbage collector runs on allocation counts, so a fan-out to 10,000 waiters (a few
  objects each, plus their re-polls) triggers it over and over in the middle of the burst, full
  collections of every live connection's objects included: a third of the CPU of a fan-out, and
  a write's answer queued behind it (bench/RESULTS.md: with it off, a write during a 10,000-poll
  fan-out was acknowledged in 55 ms instead of 1,088 ms). So in the server the collector does not
  run on allocations; it runs on a clock and on counts instead (``GcPolicy``), outside fan-outs.

  A collection stops the loop for as long as it takes, and it takes what it scans: ~20,000
  objects ~6 ms here (``python -m bench.gc_pause``). What survives a collection is frozen
  (``gc.freeze``), so the next young one scans only what was made since: with the long polls'
  fast path a held poll adds one object, and 10,000 connections held stay out of every young
  scan. A young collection runs every 10 s, or as soon as 20,000 new objects are alive
  (connections opening in a burst: ~27 each). A full
  collection, which must unfreeze and scan everything to find cycles among old objects (~160 ms
  with 10,000 polls held), is due every 15 minutes and waits for a moment with fewer than 1,000
  polls held, an hour at most.

  After each collection the C allocator gives its free pages back to the system (glibc's
  ``malloc_trim``): memory freed after a peak otherwise stays in the process for good. Measured:
  2-3 ms a call; a process with a Redis backend that had written and followed 50,000 tasks through
  their expiry went from +21 MiB of RSS to +7 MiB (``make soak-expiry`` has the cluster's figures).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import functools
import gc
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from .activity import IDLE_SHARE, Activity, CpuShare

log = logging.getLogger(__name__)


def install_event_loop(choice: str) -> str:
    """Use uvloop unless ``choice`` is "asyncio"; return the loop actually used."""
    if choice == "asyncio":
        return "asyncio"
    try:
        import uvloop
    except ImportError:  # not built for this platform: the standard loop works, only slower
        if choice == "uvloop":
            raise
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def freeze_startup_objects() -> None:
    gc.collect()
    gc.freeze()  # what startup built lives as long as the process: never scan it again


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    trim: Callable[[int], int] | None = getattr(ctypes.CDLL(name), "malloc_trim", None)
    return trim


def release_free_memory() -> None:
    """Give the allocator's free pages back to the system (after a collection)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@dataclass(frozen=True)
class GcPolicy:
    """When the collector runs (``scheduled_gc``); seconds, and counts of tracked objects."""

    young_every: float = 10.0  # a young collection at least this often
    # ...and sooner once this many objects were made since the last one (tracked by the
    # collector, less those freed): a scan of ~20,000 young objects takes ~6 ms here, so a
    # burst of new connections (each ~27 objects) is collected in slices, never at once.
    young_limit: int = 20_000
    full_every: float = 900.0  # a full collection due this long after the last one...
    quiet_held: int = 1_000  # ...runs when fewer polls than this are held (and no fan-out)...
    full_wait_max: float = 3_600.0  # ...or anyway once it has waited this long for that
    quiet_check: float = 0.05  # seconds between looks at the clock and the counts
    quiet_wait_max: float = 5.0  # a collection waits at most this long for no fan-out


@dataclass
class CollectionClock:
    """Which collection is due (``due``); ``collected`` once it has run. Times: the loop's."""

    policy: GcPolicy
    last_young: float
    last_full: float
    _due_since: float | None = None  # when the collection now due became due

    def due(self, now: float, young: int, held: int, busy: bool) -> int | None:
        """The generation to collect now (0, or 2 for a full collection), or None."""
        p = self.policy
        full_due = now - self.last_full >= p.full_every
        overdue = now - self.last_full >= p.full_every + p.full_wait_max
        young_due = now - self.last_young >= p.young_every or young >= p.young_limit
        if not (young_due or overdue):
            self._due_since = None
            return None
        if self._due_since is None:
            self._due_since = now
        if busy and now - self._due_since < p.quiet_wait_max:
            return None  # a fan-out is being written: wait for its end, a few seconds at most
        if full_due and (held < p.quiet_held or overdue):
            return 2
        return 0 if young_due else None

    def next_due(self, now: float) -> float:
        """Seconds until a collection falls due by the clock alone (none made objects since)."""
        p = self.policy
        return max(0.0, min(self.last_young + p.young_every, self.last_full + p.full_every) - now)

    def collected(self, generation: int, now: float) -> None:
        self.last_young = now
        if generation == 2:
            self.last_full = now
        self._due_since = None


def collect(generation: int) -> None:
    """A collection that leaves what survives it out of the next ones' scans.

    Survivors are frozen (``gc.freeze``): a young collection then scans only the objects made
    since the last one, whatever the number of connections held. A full collection unfreezes
    everything first, to find cycles among old objects too: it scans every live object (~160 ms
    with 10,000 polls held on this machine), hence ``GcPolicy``'s wait for a quiet moment."""
    if generation == 2:
        gc.unfreeze()
    gc.collect(generation)
    gc.freeze()
    release_free_memory()


def scheduled_gc(
    busy: Callable[[], bool],
    held: Callable[[], int],
    activity: Activity,
    policy: GcPolicy = GcPolicy(),
) -> Callable[[object], AsyncIterator[None]]:
    """cleanup_ctx of the server process: the collector runs on ``policy``, not on allocations,
    and outside a fan-out (``busy()``) when one ends within a few seconds. While the process is
    idle its clock sleeps until work arrives (``activity``) or a collection falls due."""

    async def ctx(app: object) -> AsyncIterator[None]:
        gc.disable()
        loop = asyncio.get_running_loop()

        async def run() -> None:
            clock = CollectionClock(policy, last_young=loop.time(), last_full=loop.time())
            cpu = CpuShare()
            while True:
                await asyncio.sleep(policy.quiet_check)
                now = loop.time()
                generation = clock.due(now, gc.get_count()[0], held(), busy())
                if generation is not None:
                    collect(generation)
                    clock.collected(generation, loop.time())
                elif cpu.take() < IDLE_SHARE and not busy():
                    # Idle: no objects are being made, only the clock can make a collection due.
                    await activity.sleep(clock.next_due(loop.time()))
                    cpu.take()

        task = asyncio.create_task(run(), name="scheduled-gc")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            gc.unfreeze()
            gc.enable()

    return ctx
