"""Faults under load, with nothing lost: each test runs its own cluster, loads it through nginx,
breaks one part, and then checks the history of what every client was told (tests/history.py).

The cluster: redis-server with AOF and ``appendfsync always`` (a write is on disk before Redis
answers it), three instances and nginx with the repo's config. Clients loop like the page: a 200
moves the version on and polls again at once; a 204 polls again, after a random part of its
Retry-After if it has one; a failed request or a 5xx backs off briefly (full jitter, at most 1 s)
and polls again through nginx. Writers put at a steady pace, round-robin over the tasks, and never
retry: an attempt without a 200 is recorded as unacknowledged (it may or may not have applied).

Loads are sized for a 2-core machine shared with other work: polls are spread over many tasks,
so a write wakes ten or twenty of them, not all (1,000 polls on one task would turn every write
into 1,000 answers and 1,000 new polls). Every load loop is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import aiohttp
import pytest

from deploy.cluster import Cluster, Instance, running_cluster

from .conftest import wait_until
from .history import History, Seen, Write
from .load import (
    MAX_HOLD,
    errors_logged,
    held_polls,
    load_on,
    nginx_upstream_errors,
    probe_session,
    task_ids,
    until_held,
    until_ready,
)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A cluster of this test's own: Redis durable on every write (appendfsync always)."""
    with running_cluster(tmp_path, durable_redis=True) as running:
        yield running


@pytest.fixture
async def probe() -> AsyncIterator[aiohttp.ClientSession]:
    async with probe_session() as session:
        yield session


# --- an instance SIGKILLed ------------------------------------------------------------------


async def test_instance_killed_under_1000_held_polls_and_50_writes_a_second_clients_converge(
    cluster: Cluster, probe: aiohttp.ClientSession
) -> None:
    tasks, doomed = task_ids(100), cluster.instances[0]
    async with load_on(cluster) as load:
        load.poll_tasks(tasks, per_task=10)
        await until_held(probe, cluster.instances, 1000)
        writing = asyncio.create_task(load.write_steadily(tasks, rate=50, limit=400))
        await wait_until(
            lambda: len(load.history.acknowledged) >= 100, 10, "100 writes", interval=0.05
        )
        held_there = await held_polls(probe, [doomed])
        killed_at = time.monotonic()
        await asyncio.to_thread(doomed.kill)
        await writing
        final = await load.converge(probe, tasks)

    history = load.history
    history.check(final)
    assert errors_logged(cluster) == []
    assert held_there >= 200, f"only {held_there} of 1,000 polls were on the killed instance"
    after = {seen.served_by for seen in history.seen if seen.asked > killed_at}
    assert after == {app.instance_id for app in cluster.instances[1:]}
    # nginx retries a poll whose instance died on another one: no watcher saw a failure.
    assert [f for f in history.failures if f.client.startswith("poll")] == []
    # A write is never retried by nginx: those sent to the dead instance got 502, unacknowledged.
    assert {w.outcome for w in history.unacknowledged} <= {"502"}
    assert len(history.acknowledged) >= 350


# --- rolling restart --------------------------------------------------------------------------


async def test_rolling_restart_answers_held_polls_at_once_and_no_client_sees_an_error(
    cluster: Cluster, probe: aiohttp.ClientSession
) -> None:
    tasks, quiet, drains = task_ids(45), [f"quiet{n}" for n in range(15)], []
    async with load_on(cluster, keep_alive=False) as load:
        load.poll_tasks(tasks, per_task=10)
        # Polls held 30 s on tasks nobody writes: each instance still holds its share of them
        # when it stops, however long nginx takes to stop sending it new requests.
        load.poll_tasks(quiet, per_task=10, hold=MAX_HOLD)
        await until_held(probe, cluster.instances, 600)
        writes_done = asyncio.Event()
        writing = asyncio.create_task(load.write_steadily(tasks, 50, 3000, writes_done))
        for app in cluster.instances:
            # Drain-safe: nginx stops routing to the instance first (cluster.take_out), so no
            # write can reach it while it stops; its held polls stay until it answers them.
            await asyncio.to_thread(cluster.take_out, app)
            sent = time.monotonic()
            code = await asyncio.to_thread(app.stop, signal.SIGTERM)
            stopped = time.monotonic()
            drains.append(Drain(app, sent, stopped, code))
            await asyncio.to_thread(app.start)  # same port; returns once /readyz answers 200
            await asyncio.to_thread(cluster.put_back, app)
            await until_held(probe, [app], 50)  # its clients come back
        writes_done.set()
        await writing
        final = await load.converge(probe, tasks + quiet)

    history = load.history
    history.check(final)
    assert errors_logged(cluster) == []
    assert history.failures == [], history.failures[:10]  # every write acknowledged, too
    assert nginx_upstream_errors(cluster) == []  # nothing refused, reset or cut short
    for drain in drains:
        took = drain.stopped - drain.sent
        assert drain.code == 0 and took < 3, f"{drain} exited with {drain.code} after {took} s"
        # What it held at the SIGTERM, it answered at once: 204 with a jittered Retry-After
        # (only a draining instance adds one), each reaching its client within 2 s, none cut;
        # or 200, for a poll whose change (written through another instance) came meanwhile.
        answered = [
            r for r in load.replies if r.served_by == drain.app.instance_id and r.at >= drain.sent
        ]
        sent_away = [r for r in answered if r.retry_after]
        assert 20 <= len(sent_away) <= drain.released() <= len(answered), (
            drain,
            len(sent_away),
            len(answered),
        )
        assert {r.status for r in sent_away} == {204}
        assert max(r.at for r in sent_away) - drain.sent < 2
        assert {r.retry_after for r in sent_away} == {"1", "2", "3"}


@dataclass(frozen=True, slots=True)
class Drain:
    app: Instance
    sent: float  # SIGTERM
    stopped: float  # exited
    code: int | None

    def released(self) -> int:
        """How many held polls the instance released as it stopped, as its log tells."""
        counts = re.findall(r"releasing (\d+) waiting clients", self.app.log_text())
        assert len(counts) == 1, counts
        return int(counts[0])


# --- Redis SIGKILLed --------------------------------------------------------------------------


async def test_redis_killed_and_restarted_from_its_aof_keeps_every_acknowledged_write(
    cluster: Cluster, probe: aiohttp.ClientSession
) -> None:
    tasks = task_ids(40)
    async with load_on(cluster) as load:
        load.poll_tasks(tasks, per_task=5)
        await until_held(probe, cluster.instances, 200)
        writing = asyncio.create_task(load.write_steadily(tasks, rate=50, limit=500))
        history = load.history
        await wait_until(lambda: len(history.acknowledged) >= 100, 10, "100 writes", interval=0.05)
        await asyncio.to_thread(cluster.redis.kill)
        await wait_until(
            lambda: len(history.unacknowledged) >= 10, 10, "refused writes", interval=0.05
        )
        held_while_away = await held_polls(probe, cluster.instances)
        before = len(history.acknowledged)
        await asyncio.to_thread(cluster.redis.start)  # same port, same append-only file
        await until_ready(probe, cluster.instances)
        await writing
        final = await load.converge(probe, tasks)

    # Every write answered 200 is in the store: its version at most the final one, no version
    # given twice, and the store keeps the last acknowledged write's state.
    history.check(final)
    assert errors_logged(cluster) == []
    assert len(history.acknowledged) - before >= 50, "too few writes after Redis came back"
    assert held_while_away >= 100, "held polls should stay held while Redis is away"
    # Refused writes were the instances' own 503 (state store unreachable), never applied twice.
    assert {w.outcome for w in history.unacknowledged} == {"503"}
    assert {f.what for f in history.failures} <= {"503"}


# --- nginx reloaded ---------------------------------------------------------------------------


async def test_nginx_reloaded_five_times_under_load_fails_no_request(
    cluster: Cluster, probe: aiohttp.ClientSession
) -> None:
    tasks = task_ids(40)
    async with load_on(cluster, keep_alive=False) as load:
        load.poll_tasks(tasks, per_task=10)
        await until_held(probe, cluster.instances, 400)
        writes_done = asyncio.Event()
        writing = asyncio.create_task(load.write_steadily(tasks, 50, 3000, writes_done))
        history = load.history
        for n in range(1, 6):
            # SIGHUP to the master, as `nginx -s reload`; returns once the new workers serve.
            await asyncio.to_thread(cluster.nginx.reload)
            await wait_until(
                partial(_written, history, 40 * n), 10, "40 writes more", interval=0.05
            )
        writes_done.set()
        await writing
        final = await load.converge(probe, tasks)

    history.check(final)
    assert errors_logged(cluster) == []
    assert history.failures == [], history.failures[:10]  # every write acknowledged, too
    assert nginx_upstream_errors(cluster) == []
    assert len(history.acknowledged) >= 200


def _written(history: History, count: int) -> bool:
    return len(history.writes) >= count


# --- the subscription cut again and again ---------------------------------------------------


async def test_subscription_killed_every_200ms_for_3s_during_writes_every_watcher_ends_current(
    cluster: Cluster, probe: aiohttp.ClientSession
) -> None:
    tasks = task_ids(20)
    async with load_on(cluster) as load:
        load.poll_tasks(tasks, per_task=10)
        for n in range(5):
            load.watch(f"watch-all-{n}", tasks, only=False)
            load.watch(f"watch-four-{n}", tasks[4 * n : 4 * n + 4], only=True)
        await until_held(probe, cluster.instances, 210)
        writing = asyncio.create_task(load.write_steadily(tasks, rate=50, limit=250))
        history = load.history
        await wait_until(lambda: len(history.acknowledged) >= 25, 10, "25 writes", interval=0.05)
        killed = 0
        for _ in range(15):  # the fault's schedule: a kill every 200 ms for 3 s
            out = await asyncio.to_thread(cluster.redis.command, "CLIENT", "KILL", "TYPE", "pubsub")
            killed += int(out)
            await asyncio.sleep(0.2)
        await writing
        await until_ready(probe, cluster.instances)  # each subscribed again
        final = await load.converge(probe, tasks)

    history.check(final)
    assert errors_logged(cluster) == []
    # Redis itself stayed up: reads fell back to it while a subscription was down.
    assert history.failures == [], history.failures[:10]
    assert killed >= 15, f"only {killed} subscriptions killed"
    watchers = {seen.client for seen in history.seen if seen.client.startswith("watch")}
    assert len(watchers) == 10


# --- the checker itself ---------------------------------------------------------------------


def _history(*writes: tuple[str, int | None, float], seen: tuple[int, ...] = (1, 2)) -> History:
    """Writes to task "t" (message, acknowledged version, start time) and one watcher of it."""
    history = History()
    history.follow("watcher", {"t": 0})
    for message, version, started in writes:
        history.write(Write("t", message, started, started + 0.5, version, str(version)))
    for at, version in enumerate(seen, start=10):
        shown = {1: "a", 2: "b"}.get(version)
        history.observe(Seen("watcher", "t", version, shown, at - 0.1, at, "i1"))
    return history


@pytest.mark.parametrize(
    ("history", "final", "problem"),
    [
        (_history(("a", 1, 0), ("b", 2, 1)), (2, "b"), None),
        (_history(("a", 1, 0), ("b", None, 1)), (2, "b"), None),  # unacknowledged, applied
        (_history(("a", 1, 0), ("b", 2, 1)), (1, "a"), "b got v2, the store has v1"),
        (_history(("a", 1, 0), ("b", 1, 1)), (2, "b"), "both got v1"),
        (_history(("a", 2, 0), ("b", 1, 1)), (2, "a"), "acknowledged out of order"),
        (_history(("a", 1, 0), ("b", 2, 1)), (2, "c"), "keeps 'c' at v2, not 'b'"),
        (_history(("a", 1, 0), ("b", 2, 1), seen=(2, 1)), (2, "b"), "go from 2 to 1"),
        (_history(("a", 1, 0), ("b", 2, 1), seen=(1,)), (2, "b"), "ended t on v1"),
    ],
)
def test_history_check_finds_lost_reordered_and_stale_states(
    history: History, final: tuple[int, str], problem: str | None
) -> None:
    version, message = final
    found = history.problems({"t": {"version": version, "message": message}})
    assert found == [] if problem is None else any(problem in line for line in found), found
