"""Lets the instance's periodic watchers sleep while it is idle, and wakes them when work arrives.

Two tasks look at the instance on a clock: the event-loop lag monitor (``looplag``, every 10 ms)
and the collector's clock (``runtime.scheduled_gc``, every 50 ms). On this VM waking an idle
process costs ~50-120 µs whatever it then does, so the two together kept an instance that had
nothing to do at 1.65 % of a core (0.33 s of CPU in 20 s; 0.05 % before they existed): a cost
paid for months by every idle instance, and counted in each notification of a quiet stream.

So each watcher, once the process has used almost no CPU for a while (``IDLE_SHARE``), sleeps
until ``nudge``-d or until its own deadline. The places where work enters the instance nudge:
bytes arriving on a connection (``fastpoll.PollConnection``), a change to fan out
(``Hub.publish``), a hold ending (``Hub._expire``) and a handler starting to wait (a poll, stream
or socket on aiohttp's ordinary path). A nudge costs a counter's increment and one attribute
test when nobody sleeps, once per request on the long polls' fast path.

The lag monitor keeps its meaning: woken by a nudge, it counts as lag how late the loop came
to it after the nudge (the rest of the turn that nudged, and any turn after it), exactly as if a
timer had been due at that instant; the turns after are timed as before, every 10 ms.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

# Below this share of one core, averaged over a watcher's window, the process counts as idle
# (the two watchers' own wake-ups cost ~1.5 %).
IDLE_SHARE: Final = 0.03


class Activity:
    """Where work arriving meets the watchers waiting for it (one per instance, on the hub)."""

    __slots__ = ("_sleepers", "_woken", "nudged_at", "nudges")

    def __init__(self) -> None:
        self._woken: asyncio.Event | None = None  # set by the next nudge; None: nobody sleeps
        self.nudged_at = 0.0  # ``time.perf_counter()`` of the last nudge that woke a sleeper
        self.nudges = 0  # how many so far: a watcher that saw none in its window may sleep
        self._sleepers = 0

    def nudge(self) -> None:
        """Work has arrived: wake whoever sleeps on ``sleep``."""
        self.nudges += 1
        woken = self._woken
        if woken is not None:
            self._woken = None
            self.nudged_at = time.perf_counter()
            woken.set()

    @property
    def asleep(self) -> bool:
        """Someone sleeps until the next nudge."""
        return self._woken is not None

    async def sleep(self, timeout: float) -> bool:
        """Sleep until nudged (True) or until ``timeout`` seconds have passed (False)."""
        woken = self._woken
        if woken is None:
            woken = self._woken = asyncio.Event()
        self._sleepers += 1
        try:
            async with asyncio.timeout(timeout):
                await woken.wait()
        except TimeoutError:
            return False
        finally:
            self._sleepers -= 1
            if not self._sleepers and self._woken is woken:
                self._woken = None  # the last one left: the next nudge has nobody to wake
        return True


class CpuShare:
    """The share of one core this process used between two ``take`` calls."""

    __slots__ = ("_cpu", "_wall")

    def __init__(self) -> None:
        self._cpu, self._wall = time.process_time(), time.perf_counter()

    def take(self) -> float:
        cpu, wall = time.process_time(), time.perf_counter()
        share = (cpu - self._cpu) / max(wall - self._wall, 1e-9)
        self._cpu, self._wall = cpu, wall
        return share
