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

What it costs, measured on this 2-core VM: ~120 µs a wake-up, nearly all of it the process waking
from idle (a bare ``time.sleep(0.01)`` loop costs 53 µs a wake-up here); the monitor's own
Python is ~7 µs a wake-up, 0.07 % of a core: what it adds to a loop that is busy anyway. Woken
100 times a second, an idle instance paid ~1.2 % of a core for it, so once the process has been
idle for ``IDLE_AFTER`` the monitor sleeps until work arrives (``activity.py``) and counts the
lateness from that moment on. It allocates a future and a timer handle per look, freed at once
(no cycles for the collector), and never touches the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Final

from aiohttp import web

from .activity import IDLE_SHARE, Activity, CpuShare
from .keys import HUB
from .metrics import METRICS, Metrics

INTERVAL: Final = 0.01  # seconds between looks; the resolution of the lag
# Once the process has been idle this long (``activity.IDLE_SHARE``), the monitor sleeps until
# work arrives (``Activity.nudge``), looking anyway every ``IDLE_LOOK`` seconds.
IDLE_AFTER: Final = 0.05
IDLE_LOOK: Final = 1.0


async def watch(metrics: Metrics, activity: Activity, interval: float = INTERVAL) -> None:
    """Sleep ``interval`` over and over; count each wake-up's lateness in ``metrics``. While
    the process is idle, sleep until ``activity`` is nudged instead (``activity.py``)."""
    clock = time.perf_counter  # finer than the loop's clock (uvloop's counts milliseconds)
    cpu = CpuShare()
    window, nudges = clock(), activity.nudges
    while True:
        asked = clock()
        await asyncio.sleep(interval)
        now = clock()
        # A timer is due by the loop's clock as of the start of its turn (libuv's): by ours it
        # can fire a little early. Early is no lag.
        metrics.loop_lagged(max(0.0, now - asked - interval))
        if now - window < IDLE_AFTER:
            continue
        # Idle: no work arrived and almost no CPU used since the window began.
        idle = activity.nudges == nudges
        while cpu.take() < IDLE_SHARE and idle:  # (take first: it starts the next window)
            asked = clock()
            if await activity.sleep(IDLE_LOOK):
                # As late as a timer due at the nudge would have been.
                metrics.loop_lagged(max(0.0, clock() - activity.nudged_at))
                cpu.take()  # a new window from here
                break
            metrics.loop_lagged(max(0.0, clock() - asked - IDLE_LOOK))
        window, nudges = clock(), activity.nudges


async def loop_lag_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: measure the loop's lag for as long as the app runs."""
    task = asyncio.create_task(watch(app[METRICS], app[HUB].activity), name="loop-lag")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
