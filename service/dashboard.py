"""The live dashboard's data: every instance's figures, shared through the store once a second.

Every ``STATS_INTERVAL`` (a tick, 1 s by default) an instance stores a small record of its own
figures (requests held, writes/s, p50/p99 notify delay over the last ``DELAY_WINDOW`` ticks, ready
or not) that expires after ``TTL_TICKS``, and in the same call reads back the record of every live
instance (``Backend.share_stats``: one Lua script on Redis; the embedded backend knows only
itself). An instance that stops sharing (killed, hung, cut off from Redis) shows as down once its
record is ``STALE_TICKS`` old and is gone when the record expires; one stopped gracefully
withdraws it. ``STATS_INTERVAL=0`` shares nothing: the view stays the one of startup.

Each tick makes a new view of the cluster and a sample of its totals (the last ``HISTORY`` kept).
``GET /api/cluster/watch?since=T`` is a long poll on them, like a task poll: ``T`` is the time
(ms, the ``cursor`` of an earlier answer) of the newest sample the client has. The answer is the
current view with the samples after ``T``, at once if there are any, else at the next tick (204
when the hold passes first); with no ``since``, the view and every sample kept (``reset``). The
page (``web/static/dashboard.js``) follows it, whichever instance answers: samples are stamped
with the wall clock, so those of two instances interleave in time order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any, Final

from aiohttp import web

from .backend import Backend
from .config import Config
from .errors import ApiError, BackendUnavailable
from .hub import Hub
from .keys import BACKEND, CONFIG, HUB
from .metrics import METRICS, Metrics, quantile
from .model import parse_counter

log = logging.getLogger(__name__)

CLUSTER_WATCH_PATH: Final = "/api/cluster/watch"
TTL_TICKS: Final = 3  # a record lives this many ticks unless renewed
STALE_TICKS: Final = 2  # an instance silent this many ticks shows as down
DELAY_WINDOW: Final = 10  # ticks the notify delay percentiles cover
HISTORY: Final = 300  # samples kept: five minutes at one a second
# A `since` this far past the newest sample is not from a clock close to ours: start afresh.
FUTURE_TOLERANCE_MS: Final = 5_000
MAX_WATCHERS: Final = 1_000  # dashboards held at once per instance; past it, 503


@dataclass(frozen=True, slots=True)
class InstanceStats:
    """One instance's record, as stored for the others."""

    instance: str
    ready: bool
    held: int
    writes_per_second: float
    notify_p50_ms: float | None
    notify_p99_ms: float | None
    # The Redis primary this instance writes to (host:port; empty for the embedded store), and
    # how many times it has seen Sentinel move it. Records of older versions lack both.
    primary: str = ""
    failovers: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str) -> InstanceStats | None:
        """The record, or None if it is not one (e.g. from another version of the service)."""
        try:
            data = json.loads(raw)
            stats = cls(
                instance=str(data["instance"]),
                ready=data["ready"] is True,
                held=int(data["held"]),
                writes_per_second=float(data["writes_per_second"]),
                notify_p50_ms=_optional_float(data["notify_p50_ms"]),
                notify_p99_ms=_optional_float(data["notify_p99_ms"]),
                primary=str(data.get("primary", "")),
                failovers=int(data.get("failovers", 0)),
            )
        except (ValueError, TypeError, KeyError):
            return None
        return stats if math.isfinite(stats.writes_per_second) else None


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True, slots=True)
class Sample:
    """The cluster's totals at one tick: ``t`` in ms since the epoch (this instance's clock)."""

    t: int
    held: int
    writes_per_second: float


class Dashboard:
    """This instance's side of the dashboard: its own figures, and the cluster as last read."""

    def __init__(self, config: Config, hub: Hub, backend: Backend, metrics: Metrics) -> None:
        self._config = config
        self._hub = hub
        self._backend = backend
        self._metrics = metrics
        self.interval = config.stats_interval  # seconds between ticks; 0: no ticks
        self.ttl = TTL_TICKS * self.interval
        self.stale_after = STALE_TICKS * self.interval
        self._samples: deque[Sample] = deque(maxlen=HISTORY)
        self._instances: list[dict[str, Any]] = []
        self._store_reachable = True
        self._writes_seen = (time.monotonic(), 0)
        self._delays: deque[list[int]] = deque(maxlen=DELAY_WINDOW + 1)
        self._next: asyncio.Future[None] | None = None
        self._closed = False
        self.watchers = 0

    # --- the ticks ----------------------------------------------------------------------------

    def own_stats(self) -> InstanceStats:
        """This instance's figures now; the rates over the time since the previous call."""
        now, ok = time.monotonic(), self._metrics.writes["ok"]
        then, ok_before = self._writes_seen
        self._writes_seen = (now, ok)
        self._delays.append(self._metrics.delay_counts())
        window = [new - old for new, old in zip(self._delays[-1], self._delays[0], strict=True)]
        p50, p99 = quantile(0.5, window), quantile(0.99, window)
        return InstanceStats(
            instance=self._config.instance_id,
            ready=self._backend.is_ready() and not self._hub.closed,
            held=self._hub.waiting_total,
            writes_per_second=round((ok - ok_before) / (now - then), 2) if now > then else 0.0,
            notify_p50_ms=None if p50 is None else round(p50 * 1000, 2),
            notify_p99_ms=None if p99 is None else round(p99 * 1000, 2),
            primary=self._backend.primary_address,
            failovers=self._backend.failovers,
        )

    async def tick(self) -> None:
        """Share this instance's record, read everyone's, and wake the dashboards."""
        own = self.own_stats()
        try:
            shared = await self._backend.share_stats(own.instance, own.to_json(), self.ttl)
        except BackendUnavailable:
            self._show([(own, 0.0)], store_reachable=False)
            return
        self._metrics.tasks = shared.tasks
        records = []
        for raw, age in shared.records:
            stats = InstanceStats.from_json(raw)
            if stats is not None:
                records.append((stats, age))
        self._show(records, store_reachable=True)

    def begin(self) -> None:
        """A first view of this instance alone, before the first tick reads the store."""
        self._show([(self.own_stats(), 0.0)], store_reachable=True)

    def _show(self, records: list[tuple[InstanceStats, float]], *, store_reachable: bool) -> None:
        rows = []
        for stats, age in sorted(records, key=lambda record: record[0].instance):
            state = "down" if age >= self.stale_after else "up" if stats.ready else "not_ready"
            rows.append({**asdict(stats), "state": state, "age_ms": round(age * 1000)})
        fresh = [row for row in rows if row["state"] != "down"]
        newest = self._samples[-1].t if self._samples else 0
        self._samples.append(
            Sample(
                t=max(round(time.time() * 1000), newest + 1),  # strictly later than the last
                held=sum(row["held"] for row in fresh),
                writes_per_second=round(sum(row["writes_per_second"] for row in fresh), 2),
            )
        )
        self._instances = rows
        self._store_reachable = store_reachable
        if self._next is not None:
            self._next.set_result(None)
            self._next = None

    async def run(self, stop: asyncio.Event) -> None:
        """Tick every ``interval`` seconds until ``stop`` is set; a failed tick is logged, never
        fatal. A tick under way finishes first: no store call is left behind half done."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        while not stop.is_set():
            try:
                await self.tick()
            except Exception:
                log.exception("dashboard stats tick failed")
            due = max(due + self.interval, loop.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(due):
                    await stop.wait()

    async def withdraw(self) -> None:
        """Take this instance's record out of the store now (a graceful stop)."""
        with contextlib.suppress(BackendUnavailable):
            await self._backend.withdraw_stats(self._config.instance_id)

    # --- the long poll ------------------------------------------------------------------------

    def answer(self, since: int | None) -> dict[str, Any] | None:
        """The view and the samples after ``since``; None when there are none yet."""
        newest = self._samples[-1].t
        if not since or since > newest + FUTURE_TOLERANCE_MS:
            reset, samples = True, list(self._samples)
        else:
            reset, samples = False, [sample for sample in self._samples if sample.t > since]
            if not samples:
                return None
        return {
            "cursor": newest,
            "reset": reset,
            "store_reachable": self._store_reachable,
            "instances": self._instances,
            "samples": [asdict(sample) for sample in samples],
        }

    async def next_view(self, timeout: float) -> bool:
        """Wait for the next tick: False when ``timeout`` passes first or at shutdown."""
        if self._closed:
            return False
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._next)  # shared: a leaving waiter must not cancel it
        except TimeoutError:
            return False
        return not self._closed

    def close(self) -> None:
        """Release every held dashboard (they answer 204); later waits return at once."""
        self._closed = True
        if self._next is not None:
            self._next.set_result(None)
            self._next = None

    @property
    def closed(self) -> bool:
        return self._closed


DASHBOARD: Final = web.AppKey("dashboard", Dashboard)


async def cluster_watch(request: web.Request) -> web.Response:
    config, dashboard = request.app[CONFIG], request.app[DASHBOARD]
    since = _counter(request, "since")
    asked = _counter(request, "timeout")
    hold = min(config.poll_timeout if asked is None else asked, config.poll_timeout_max)
    body = dashboard.answer(since)
    if body is None:
        if dashboard.watchers >= MAX_WATCHERS:
            raise ApiError(
                503,
                "too_many_waiters",
                "this instance holds as many dashboards as it may; retry shortly",
                headers={"Retry-After": "2"},
            )
        deadline = asyncio.get_running_loop().time() + hold
        dashboard.watchers += 1
        try:
            while body is None:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0 or not await dashboard.next_view(remaining):
                    break
                body = dashboard.answer(since)
        finally:
            dashboard.watchers -= 1
    if body is None:
        if dashboard.closed:  # shutting down: come back to another instance
            return web.Response(status=204, headers={"Retry-After": "1", "Connection": "close"})
        return web.Response(status=204)
    return web.json_response(body)


def _counter(request: web.Request, name: str) -> int | None:
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise ApiError(400, "duplicate_parameter", f"{name} given more than once")
    return parse_counter(name, values[0]) if values else None


async def dashboard_ctx(app: web.Application) -> AsyncIterator[None]:
    """Tick from startup (after the backend started) to cleanup, then withdraw the record."""
    dashboard = app[DASHBOARD]
    dashboard.begin()
    if not dashboard.interval:
        yield
        return
    stop = asyncio.Event()
    task = asyncio.create_task(dashboard.run(stop), name="dashboard-stats")
    yield
    stop.set()
    await task
    await dashboard.withdraw()


async def release_dashboards(app: web.Application) -> None:
    app[DASHBOARD].close()


def setup_dashboard(app: web.Application) -> None:
    """``GET /api/cluster/watch``. Call after ``setup_metrics``; the ticks run in
    ``dashboard_ctx``, a cleanup context to add after the backend's."""
    app[DASHBOARD] = Dashboard(app[CONFIG], app[HUB], app[BACKEND], app[METRICS])
    app.router.add_get(CLUSTER_WATCH_PATH, cluster_watch, allow_head=False)
    app.on_shutdown.append(release_dashboards)
