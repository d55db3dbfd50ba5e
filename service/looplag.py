"""The event loop's lag, measured from inside: how late the loop runs a callback that is due.

One event loop serves every request of an instance, so anything that holds it — a GC collection,
a long turn of a fan-out, a slow synchronous call — makes every other callback wait: a write's
answer, a poll's wake-up, a re-poll's parsing. Latency figures show the sum of all waits; the lag
shows the pauses themselves. A task sleeps ``INTERVAL`` again and again and counts how much later
than asked it woke; ``metrics.py`` exports the counts (``taskstatus_event_loop_lag_seconds``, and
``taskstatus_event_loop_lag_max_seconds``, the largest since the instance started).

A pause of P seconds shows as one lag between P - ``INTERVAL`` and P (the sleep under way when it
began had some of its interval left); under 1 ms it is noise (uvloop's timers count milliseconds).
Time the process waited for a CPU counts too: on shared cores, other processes' work shows as lag,
as it does in every answer's latency.

What it costs, measured on this 2-core VM: ~1.2 % of one core while the instance is idle
(uvloop; 1.4 % on asyncio's own loop), ~120 µs a wake-up (``time.process_time()`` of a process
running nothing but the loop, 60 s, three runs; a whole idle instance: 0.90 s of CPU in 60 s
against 0.04 s without it). Nearly all of that is the process waking from idle: a bare
``time.sleep(0.01)`` loop costs 53 µs a wake-up here. The monitor's own Python is ~7 µs a
wake-up (10 and 50 monitors in one loop, whose wake-ups share its turns), 0.07 % of a core: what
it adds to a loop that is busy anyway. It allocates a future and a timer handle per look, freed
at once (no cycles for the collector), and never touches the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Final

from aiohttp import web

from .metrics import METRICS, Metrics

INTERVAL: Final = 0.01  # seconds between looks; the resolution of the lag


async def watch(metrics: Metrics, interval: float = INTERVAL) -> None:
    """Sleep ``interval`` over and over; count each wake-up's lateness in ``metrics``."""
    clock = time.perf_counter  # finer than the loop's clock (uvloop's counts milliseconds)
    while True:
        asked = clock()
        await asyncio.sleep(interval)
        # A timer is due by the loop's clock as of the start of its turn (libuv's): by ours it
        # can fire a little early. Early is no lag.
        metrics.loop_lagged(max(0.0, clock() - asked - interval))


async def loop_lag_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: measure the loop's lag for as long as the app runs."""
    task = asyncio.create_task(watch(app[METRICS]), name="loop-lag")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
