"""Process-wide tuning for holding many idle connections and waking them in bursts.

Both are measured in bench/ (``make bench``), not asserted in tests:

- uvloop runs the event loop in C (libuv): accepting, reading and writing thousands of sockets
  costs less CPU than with the pure-Python selector loop;
- the cyclic garbage collector runs on allocation counts, so a fan-out to 10,000 waiters (a few
  objects each, plus their re-polls) triggers it over and over in the middle of the burst, full
  collections of every live connection's objects included: a third of the CPU of a fan-out, and
  a write's answer queued behind it (bench/RESULTS.md: with it off, a write during a 10,000-poll
  fan-out was acknowledged in 55 ms instead of 1,088 ms). So in the server the collector does not
  run on allocations; it runs on a clock instead: the young generations every 10 seconds,
  everything every 5 minutes. Objects alive after startup are frozen out of its reach. Cycles
  are still collected, just not in the middle of a burst.

  A young collection costs what is alive among the objects made since the last one: with 10,000
  polls held that is every re-poll's request (~44 objects each), ~260 ms on this machine whether
  it runs every second or every 10 s, while the cyclic garbage it finds is ~300 objects a second
  (measured with the fan-out bench). Hence 10 s: a tenth of the pauses, ~30 KB of garbage.

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


YOUNG_EVERY = 10.0  # seconds between collections of generations 0 and 1
FULL_EVERY = 30  # young collections between full ones (5 minutes)


QUIET_CHECK = 0.05  # seconds between looks for a quiet moment to collect in
QUIET_WAIT_MAX = 5.0  # a collection waits at most this long for one


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


def scheduled_gc(busy: Callable[[], bool]) -> Callable[[object], AsyncIterator[None]]:
    """cleanup_ctx of the server process: the collector runs on a clock, not on allocations, and
    at a moment ``busy()`` is false (no fan-out in progress) if one comes within a few seconds:
    a collection stops the loop for as long as it takes (~260 ms with 10,000 polls held)."""

    async def ctx(app: object) -> AsyncIterator[None]:
        gc.disable()

        async def collect() -> None:
            rounds = 0
            while True:
                await asyncio.sleep(YOUNG_EVERY)
                waited = 0.0
                while busy() and waited < QUIET_WAIT_MAX:
                    await asyncio.sleep(QUIET_CHECK)
                    waited += QUIET_CHECK
                rounds += 1
                gc.collect(2 if rounds % FULL_EVERY == 0 else 1)
                release_free_memory()

        task = asyncio.create_task(collect(), name="scheduled-gc")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            gc.enable()

    return ctx
