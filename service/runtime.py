"""Process-wide tuning for holding many idle connections and waking them in bursts.

Both are measured in bench/ (``make bench``), not asserted in tests:

- uvloop runs the event loop in C (libuv): accepting, reading and writing thousands of sockets
  costs less CPU than with the pure-Python selector loop;
- the cyclic garbage collector's youngest generation is collected every 700 allocations by
  default; a fan-out allocates a few objects per waiter, so 10,000 waiters would trigger it
  thousands of times. Objects alive after startup are frozen out of its reach, and the threshold
  is raised so it runs far less often during a burst. Long-lived cycles are still collected.
"""

from __future__ import annotations

import asyncio
import gc
import logging

log = logging.getLogger(__name__)

GC_GEN0_THRESHOLD = 50_000


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


def tune_gc() -> None:
    gc.collect()
    gc.freeze()  # what startup built lives as long as the process: never scan it again
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)
