"""Prometheus metrics of one instance, served in the text format at ``GET /metrics``.

What is counted, with bounded labels only (never a task id):

- ``taskstatus_held_polls{transport}``: requests held now (``longpoll``, ``watch``, ``dashboard``
  for the cluster watch; a streaming transport counts its open streams with ``Metrics.holding``);
- ``taskstatus_polls_answered_total{transport,outcome}``: ``changed`` (200), ``timeout`` (nothing
  new: 204, 304), ``disconnected`` (the client left first), ``rejected`` (an error answer: bad
  parameters, no token, the held-poll cap, the store unreachable);
- ``taskstatus_writes_total{result}`` (deletions included): ``ok``, ``conflict`` (409), ``invalid``
  (other 4xx, a deletion of a task that does not exist too),
  ``unauthorized`` (401, 403), ``limit`` (429 rate limit, 507 task cap), ``unavailable`` (503),
  ``error`` (500);
- ``taskstatus_notify_delay_seconds{transport}``: from a write's publish to the answer that
  carries it to a waiter. The publish time travels with the change: its ``updated_at``, stamped
  by Redis' clock in the write script (by this process for the embedded backend), to the
  millisecond, so a delay reads up to 1 ms long and assumes the clocks agree;
- ``taskstatus_pubsub_reconnects_total``, ``taskstatus_redis_errors_total``, ``taskstatus_tasks``
  (live tasks in the store, tombstones not counted, as of the last stats tick, see
  ``dashboard.py``);
- ``taskstatus_tasks_deleted_total`` (``DELETE``s through this instance),
  ``taskstatus_tasks_expired_total`` (finished tasks its retention sweeps deleted),
  ``taskstatus_tombstones_purged_total`` (tombstones its sweeps removed); the cluster's figure
  is the sum over the instances;
- ``taskstatus_redis_failovers_total`` (Sentinel moved the primary),
  ``taskstatus_writes_not_replicated_total`` (WAIT short of REDIS_MIN_REPLICAS);
- ``taskstatus_event_loop_lag_seconds`` (histogram) and ``taskstatus_event_loop_lag_max_seconds``
  (the largest since the instance started): how late the event loop ran a callback that was due,
  a GC pause or a long fan-out turn (measured by ``looplag.py``);
- ``process_*`` (resident memory, open file descriptors, CPU) and ``python_info``.

The counts are plain numbers on the event loop's thread; one collector turns them into metric
families when ``/metrics`` is scraped. prometheus-client's own metric objects take a lock on every
update, which one event loop does not need and a fan-out to 10,000 waiters would pay 10,000 times:
here a woken waiter costs one bisect and a few additions. Each app has its own registry (with the
process and platform collectors), so apps sharing a process (the tests) never share a number.

One middleware, outermost, classifies each request by its route (``POLL_ROUTES``,
``WRITE_ROUTES``) and counts its answer after the error middleware has made it a response. A
handler that answers with a change marks the response with ``delivering``.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Final, TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .backend import Backend
from .hub import Change
from .keys import BACKEND

METRICS_PATH: Final = "/metrics"

TRANSPORTS: Final = ("longpoll", "watch", "dashboard")
DELIVERING: Final = ("longpoll", "watch")  # those that answer with a change (notify delay)
STREAMS: Final = ("sse", "ws")  # held and delivering too, but answered only when they end
POLL_OUTCOMES: Final = ("changed", "timeout", "disconnected", "rejected")
WRITE_RESULTS: Final = (
    "ok",
    "conflict",
    "invalid",
    "unauthorized",
    "limit",
    "unavailable",
    "error",
)
# Upper bounds, in seconds: a delivery inside an instance takes well under a millisecond, across
# instances a few; the long tail is a loaded instance or a resync after a reconnect.
DELAY_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# The event loop's lag: under a millisecond when idle; a frame is ~16 ms; the bound 50 ms;
# a young GC collection with 10,000 polls held ~260 ms.
LAG_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# (method, route) -> transport, for the routes that hold a request until a change; and writes.
POLL_ROUTES: Final = {
    ("GET", "/api/tasks/{task_id}/poll"): "longpoll",
    ("GET", "/api/poll-status"): "longpoll",
    ("GET", "/api/watch"): "watch",
    ("GET", "/api/cluster/watch"): "dashboard",
}
WRITE_ROUTES: Final = frozenset(
    {
        ("PUT", "/api/tasks/{task_id}"),
        ("DELETE", "/api/tasks/{task_id}"),
        ("POST", "/api/update-status"),
    }
)
# A conditional GET of a task (If-None-Match and Prefer: wait) is a long poll too.
CONDITIONAL_ROUTE: Final = ("GET", "/api/tasks/{task_id}")
_WRITE: Final = "write"
_CONDITIONAL: Final = "conditional"


def poll_outcome(status: int) -> str:
    if status == 200:
        return "changed"
    if status in (204, 304):
        return "timeout"
    return "rejected"


def write_result(status: int) -> str:
    if status < 300:
        return "ok"
    if status == 409:
        return "conflict"
    if status in (401, 403):
        return "unauthorized"
    if status in (429, 507):
        return "limit"
    if status == 503:
        return "unavailable"
    return "invalid" if status < 500 else "error"


class DelayHistogram:
    """Counts per bucket of ``bounds`` (the last one past the largest bound) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = DELAY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus' buckets: (upper bound, observations at most that), ending with +Inf."""
        buckets, total = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            buckets.append((bound, float(total)))
        return buckets


def quantile(q: float, counts: list[int]) -> float | None:
    """The ``q``-quantile (0..1) of observations counted per bucket, interpolated linearly inside
    its bucket, as Prometheus' ``histogram_quantile`` does; None without observations."""
    total = sum(counts)
    if total == 0:
        return None
    rank, seen, lower = q * total, 0, 0.0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            if i == len(DELAY_BUCKETS):
                return DELAY_BUCKETS[-1]  # past the largest bound: that bound is all we know
            return lower + (DELAY_BUCKETS[i] - lower) * max(rank - seen, 0) / count
        seen += count
        if i < len(DELAY_BUCKETS):
            lower = DELAY_BUCKETS[i]
    return DELAY_BUCKETS[-1]


def published_at(stamp: str) -> float:
    """Seconds since the epoch of an ``updated_at`` (``2026-11-26T03:20:25.029Z``)."""
    return datetime.fromisoformat(stamp).timestamp()


class Metrics:
    """This instance's counts, and the registry that exports them."""

    def __init__(self, backend: Backend) -> None:
        # Every series exists from the start (at 0), so a dashboard's rate() sees the first one.
        self.held: Counter[str] = Counter(dict.fromkeys(TRANSPORTS + STREAMS, 0))
        self.polls: Counter[tuple[str, str]] = Counter(
            {(t, o): 0 for t in TRANSPORTS for o in POLL_OUTCOMES}
        )
        self.writes: Counter[str] = Counter(dict.fromkeys(WRITE_RESULTS, 0))
        self.notify_delay = {transport: DelayHistogram() for transport in DELIVERING + STREAMS}
        self.tasks: int | None = None  # tasks in the store, as of the last stats tick
        self.loop_lag = DelayHistogram(LAG_BUCKETS)  # observed by looplag.py
        self.loop_lag_max = 0.0
        self.backend = backend
        # Every waiter woken by one change asks for its publish time: parse it once.
        self._stamp: tuple[str, float] = ("", 0.0)
        self._kinds: dict[web.AbstractRoute, str | None] = {}
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)  # collections by generation (runtime.GcPolicy's)
        self.registry.register(_Exporter(self))

    # --- counting -----------------------------------------------------------------------------

    def delivered(self, transport: str, change: Change) -> None:
        """A waiter's answer carrying ``change`` is being written now: observe the delay."""
        stamp = change.state.updated_at
        if stamp is None:
            return
        if stamp != self._stamp[0]:
            self._stamp = (stamp, published_at(stamp))
        delay = max(0.0, time.time() - self._stamp[1])  # clocks a little apart: not < 0
        histogram = self.notify_delay.get(transport)
        if histogram is None:
            histogram = self.notify_delay[transport] = DelayHistogram()
        histogram.observe(delay)

    def loop_lagged(self, seconds: float) -> None:
        """The event loop ran a callback ``seconds`` after it was due."""
        self.loop_lag.observe(seconds)
        if seconds > self.loop_lag_max:
            self.loop_lag_max = seconds

    @contextlib.contextmanager
    def holding(self, transport: str) -> Iterator[None]:
        """Count a request (or stream) of ``transport`` as held for as long as the block runs."""
        self.held[transport] += 1
        try:
            yield
        finally:
            self.held[transport] -= 1

    def delay_counts(self) -> list[int]:
        """Notify delays observed so far per bucket, over every transport."""
        columns = zip(*(h.counts for h in self.notify_delay.values()), strict=True)
        return [sum(column) for column in columns]

    # --- the middleware -----------------------------------------------------------------------

    def _kind(self, request: web.Request) -> str | None:
        route = request.match_info.route
        kind = self._kinds.get(route, "")
        if kind == "":
            resource = route.resource
            key = (route.method, resource.canonical if resource is not None else "")
            if key in WRITE_ROUTES:
                kind = _WRITE
            elif key == CONDITIONAL_ROUTE:
                kind = _CONDITIONAL
            else:
                kind = POLL_ROUTES.get(key)
            self._kinds[route] = kind
        return kind

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        kind = self._kind(request)
        if kind is None:
            return await handler(request)
        if kind == _WRITE:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                self.writes[write_result(exc.status)] += 1
                raise
            self.writes[write_result(response.status)] += 1
            return response
        transport = kind
        if kind == _CONDITIONAL:
            if "Prefer" not in request.headers or "If-None-Match" not in request.headers:
                return await handler(request)  # a plain read
            transport = "longpoll"
        # (``holding`` inline: its generator would stay alive with each of 10,000 held polls)
        self.held[transport] += 1
        try:
            response = await handler(request)
        except asyncio.CancelledError:  # handler_cancellation: the client went away
            self.polls[transport, "disconnected"] += 1
            raise
        except web.HTTPException as exc:
            self.polls[transport, poll_outcome(exc.status)] += 1
            raise
        finally:
            self.held[transport] -= 1
        self.polls[transport, poll_outcome(response.status)] += 1
        change = response.get(DELIVERED)
        if change is not None:
            self.delivered(transport, change)
        return response


DELIVERED: Final = web.ResponseKey("delivered", Change)
METRICS: Final = web.AppKey("metrics", Metrics)


_R = TypeVar("_R", bound=web.StreamResponse)


def delivering(response: _R, change: Change) -> _R:
    """Mark ``response`` as the answer that delivers ``change`` to a waiter (its notify delay is
    observed as it is written)."""
    response[DELIVERED] = change
    return response


class _Exporter(Collector):
    """The counts of one ``Metrics``, as metric families, read at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        m = self._metrics
        held = GaugeMetricFamily(
            "taskstatus_held_polls", "Requests held open now, by transport", labels=["transport"]
        )
        for transport, count in sorted(m.held.items()):
            held.add_metric([transport], count)
        polls = CounterMetricFamily(
            "taskstatus_polls_answered",
            "Held requests answered, by transport and outcome",
            labels=["transport", "outcome"],
        )
        for (transport, outcome), count in sorted(m.polls.items()):
            polls.add_metric([transport, outcome], count)
        writes = CounterMetricFamily(
            "taskstatus_writes", "Writes answered, by result", labels=["result"]
        )
        for result, count in m.writes.items():
            writes.add_metric([result], count)
        delay = HistogramMetricFamily(
            "taskstatus_notify_delay_seconds",
            "From a write's publish (its updated_at) to the answer that carries it to a waiter",
            labels=["transport"],
        )
        for transport, histogram in sorted(m.notify_delay.items()):
            delay.add_metric([transport], histogram.cumulative(), histogram.sum)
        lag = HistogramMetricFamily(
            "taskstatus_event_loop_lag_seconds",
            "How late the event loop ran a callback that was due (GC pauses, long turns)",
        )
        lag.add_metric([], m.loop_lag.cumulative(), m.loop_lag.sum)
        lag_max = GaugeMetricFamily(
            "taskstatus_event_loop_lag_max_seconds",
            "The largest event loop lag since the instance started",
            value=m.loop_lag_max,
        )
        yield from (held, polls, writes, delay, lag, lag_max)
        backend = m.backend
        yield CounterMetricFamily(
            "taskstatus_pubsub_reconnects",
            "Times the change subscription came back after it dropped",
            value=backend.reconnects,
        )
        yield CounterMetricFamily(
            "taskstatus_redis_errors", "Failed calls to Redis", value=backend.errors
        )
        yield CounterMetricFamily(
            "taskstatus_redis_failovers",
            "Times this instance saw Sentinel move the Redis primary",
            value=backend.failovers,
        )
        yield CounterMetricFamily(
            "taskstatus_writes_not_replicated",
            "Writes the primary took that too few replicas confirmed in time (503 not_replicated)",
            value=backend.not_replicated,
        )
        yield CounterMetricFamily(
            "taskstatus_tasks_deleted", "Tasks deleted through this instance", value=backend.deleted
        )
        yield CounterMetricFamily(
            "taskstatus_tasks_expired",
            "Finished tasks deleted by this instance's retention sweeps (FINISHED_TASK_TTL)",
            value=backend.expired,
        )
        yield CounterMetricFamily(
            "taskstatus_tombstones_purged",
            "Tombstones removed by this instance's retention sweeps (TOMBSTONE_TTL)",
            value=backend.purged,
        )
        if m.tasks is not None:
            yield GaugeMetricFamily(
                "taskstatus_tasks",
                "Live tasks in the store, tombstones not counted (as of the last stats tick)",
                value=m.tasks,
            )


def setup_metrics(app: web.Application) -> None:
    """``GET /metrics``, and the middleware that counts (outermost, so it sees every answer)."""
    metrics = app[METRICS] = Metrics(app[BACKEND])
    app.middlewares.insert(0, metrics.middleware)
    app.router.add_get(METRICS_PATH, make_aiohttp_handler(metrics.registry), allow_head=False)
