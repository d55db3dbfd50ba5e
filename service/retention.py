"""The retention sweep: every instance deletes the tasks whose time has come, a batch at a time.

Finished tasks (a status of ``TERMINAL_STATUSES``) that nobody wrote for ``FINISHED_TASK_TTL``
seconds are deleted as if through ``DELETE`` (a tombstone every watcher sees), and tombstones older
than ``TOMBSTONE_TTL`` are purged. The store keeps the due time of each (``Backend.sweep``): a sweep
reads only what is due, never the whole keyspace, and no instance keeps a timer per task. Every
instance sweeps, each ``SWEEP_INTERVAL`` seconds (config; 0: this one does not); a batch is one
atomic step in the store, so sweeps of several instances at once each take different tasks, and a
task goes once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Final

from aiohttp import web

from .backend import Backend
from .errors import BackendUnavailable
from .keys import BACKEND, CONFIG

log = logging.getLogger(__name__)

# Tasks per batch (one Lua script on Redis, which runs nothing else meanwhile); between batches
# the instance and Redis serve everything else. Measured with `python -m deploy.soak --expire`:
# see docs/lifecycle.md for the cost per task and the write p99 during a sweep.
SWEEP_BATCH: Final = 100
# Batches in a row before the sweep yields to its interval: a backlog (100,000 tasks due at once)
# is worked off over a few seconds instead of in one run of the store.
BATCHES_PER_TICK: Final = 50


async def sweep_due(backend: Backend, batch: int = SWEEP_BATCH) -> tuple[int, int]:
    """Sweep until nothing more is due, or ``BATCHES_PER_TICK`` batches; (expired, purged)."""
    expired = purged = 0
    for _ in range(BATCHES_PER_TICK):
        result = await backend.sweep(batch)
        expired, purged = expired + result.expired, purged + result.purged
        if not result.more:
            break
        await asyncio.sleep(0)  # the requests waiting meanwhile go first
    return expired, purged


async def run_sweeps(backend: Backend, stop: asyncio.Event, interval: float) -> None:
    """Sweep every ``interval`` seconds until ``stop`` is set; a failed sweep is logged, never
    fatal (a store that is away is swept once it is back)."""
    while not stop.is_set():
        try:
            expired, purged = await sweep_due(backend)
            if expired or purged:
                log.debug("sweep: %d finished tasks expired, %d tombstones purged", expired, purged)
        except BackendUnavailable as exc:
            log.debug("sweep skipped: %s", exc)
        except Exception:
            log.exception("retention sweep failed")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await stop.wait()


async def retention_ctx(app: web.Application) -> AsyncIterator[None]:
    """Sweep from startup (after the backend started) to cleanup; a sweep under way finishes."""
    interval = app[CONFIG].sweep_interval
    if not interval:
        yield
        return
    stop = asyncio.Event()
    task = asyncio.create_task(run_sweeps(app[BACKEND], stop, interval), name="retention-sweep")
    yield
    stop.set()
    await task
