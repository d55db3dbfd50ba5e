"""High availability: a primary, two replicas and three Sentinels (real redis-server processes),
three instances that find and follow the primary through the Sentinels, and nginx.

Writes are acknowledged only once a replica has them (REDIS_MIN_REPLICAS, 1 by default with
Sentinel), so the death of the primary loses no write answered 200; a write no replica confirms in
time is answered 503 ``not_replicated``. Each test runs its own topology on loopback ports and
checks what clients were told with the history checker (tests/history.py).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from deploy.cluster import HA_REDIS_CONF, NGINX_CONF, REPO, HACluster, running_ha_cluster

from .conftest import wait_until
from .load import (
    errors_logged,
    load_on,
    probe_session,
    ready,
    task_ids,
    until_held,
    until_ready,
)

# A failover takes Sentinel about 3 s here (down-after 2 s, then the vote); the instances follow
# it within a moment. The figure is 5 s; this bound leaves room for two busy cores.
FAILOVER_BOUND = 10.0


@pytest.fixture
def ha(tmp_path: Path) -> Iterator[HACluster]:
    with running_ha_cluster(tmp_path) as running:
        yield running


@pytest.fixture
async def probe() -> AsyncIterator[aiohttp.ClientSession]:
    async with probe_session() as session:
        yield session


async def put(session: aiohttp.ClientSession, url: str, message: str) -> aiohttp.ClientResponse:
    """One write of ``message``; the answer, body read."""
    body = {"status": "in_progress", "message": message}
    async with session.put(url, json=body) as response:
        await response.read()
        return response


def failed_over(ha: HACluster, old: int) -> bool:
    """Every running Sentinel names one primary, not the one on port ``old``."""
    named = {s.primary() for s in ha.sentinels if s.running}
    return len(named) == 1 and None not in named and old not in named


async def test_primary_killed_under_1000_held_polls_and_50_writes_a_second_loses_no_acknowledged_write(  # noqa: E501
    ha: HACluster, probe: aiohttp.ClientSession
) -> None:
    tasks, old = task_ids(100), ha.redis
    async with load_on(ha) as load:
        load.poll_tasks(tasks, per_task=10)
        await until_held(probe, ha.instances, 1000)
        writing = asyncio.create_task(load.write_steadily(tasks, rate=50, limit=600))
        history = load.history
        await wait_until(lambda: len(history.acknowledged) >= 100, 10, "100 writes", interval=0.05)
        killed_at = time.monotonic()
        await asyncio.to_thread(old.kill)
        await wait_until(
            lambda: failed_over(ha, old.port), 20, "Sentinel to promote a replica", interval=0.05
        )
        await wait_until(
            lambda: any(w.version and w.started > killed_at for w in history.writes),
            FAILOVER_BOUND,
            "a write acknowledged by the new primary",
            interval=0.05,
        )
        first = min(w.ended for w in history.writes if w.version and w.started > killed_at)
        await until_ready(probe, ha.instances)
        await writing
        final = await load.converge(probe, tasks)
    # Every acknowledged write is on the new primary with its content, in order; every watcher
    # ended on the final versions; no version was shown with two contents.
    history.check(final)
    assert errors_logged(ha) == []
    refused = {w.outcome for w in history.unacknowledged}
    assert refused <= {"503"}, f"writes during the failover got {refused}, not only 503"
    assert len(history.acknowledged) >= 300
    took = first - killed_at
    print(f"\nfailover: primary SIGKILLed -> first acknowledged write {took:.2f} s")
    assert took < FAILOVER_BOUND


async def test_a_write_no_replica_confirms_in_time_is_503_not_replicated(
    ha: HACluster, probe: aiohttp.ClientSession
) -> None:
    url = f"{ha.url}/api/tasks/frozen"
    assert (await put(probe, url, "before")).status == 200
    for replica in ha.replicas:
        replica.send(signal.SIGSTOP)
    try:
        refused = await put(probe, url, "unconfirmed")
        assert refused.status == 503
        assert refused.headers["Retry-After"]
        body = await refused.json()
        assert body["error"]["code"] == "not_replicated", body
    finally:
        for replica in ha.replicas:
            replica.send(signal.SIGCONT)
    confirmed = await put(probe, url, "after")
    assert confirmed.status == 200


async def test_a_primary_left_without_replicas_refuses_writes_with_503_not_replicated(
    ha: HACluster, probe: aiohttp.ClientSession
) -> None:
    """min-replicas-to-write 1: a primary cut off from its replicas takes no write (NOREPLICAS),
    so no write can be acknowledged by a primary that a failover would leave behind."""
    url = f"{ha.url}/api/tasks/alone"
    for replica in ha.replicas:
        await asyncio.to_thread(replica.kill)
    refused = await put(probe, url, "alone")
    assert refused.status == 503
    assert (await refused.json())["error"]["code"] == "not_replicated"
    assert refused.headers["Retry-After"]
    assert errors_logged(ha) == []


async def test_the_old_primary_restarted_rejoins_as_a_replica_and_the_cluster_keeps_serving(
    ha: HACluster, probe: aiohttp.ClientSession
) -> None:
    old, shared_config = ha.redis, HA_REDIS_CONF.read_text()
    url = f"{ha.url}/api/tasks/rejoin"
    assert (await put(probe, url, "first")).status == 200
    await asyncio.to_thread(old.kill)
    # Until an instance is on the new primary, /readyz says it is not ready.
    not_ready: set[str] = set()

    async def moved() -> bool:
        for app in ha.instances:
            if not await ready(probe, app):
                not_ready.add(app.name)
        return failed_over(ha, old.port)

    await wait_until(moved, 20, "Sentinel to promote a replica", interval=0.05)
    await until_ready(probe, ha.instances)
    assert not_ready == {app.name for app in ha.instances}
    new = ha.primary()

    async def shown() -> bool:  # the dashboard: each instance's record, shared once a second
        async with probe.get(f"{ha.url}/api/cluster/watch") as response:
            rows = (await response.json())["instances"]
        figures = {(row["primary"], row["failovers"]) for row in rows}
        return len(rows) == 3 and figures == {(f"127.0.0.1:{new.port}", 1)}

    await wait_until(
        shown, 10, "the dashboard to show the new primary and one failover", interval=0.05
    )
    for app in ha.instances:
        async with probe.get(f"{app.url}/metrics") as response:
            assert "taskstatus_redis_failovers_total 1.0" in await response.text()
    await asyncio.to_thread(old.start)  # same port: Sentinel turns it into a replica
    await wait_until(
        lambda: old.info("replication").get("role") == "slave",
        20,
        "the old primary to rejoin as a replica",
        interval=0.05,
    )
    assert new is not old and ha.primary() is new
    assert (await put(probe, url, "second")).status == 200
    async with probe.get(url) as response:
        state = await response.json()
    assert (state["version"], state["message"]) == (2, "second")
    # Sentinel had the nodes rewrite their config files: their own, not the shared one.
    assert HA_REDIS_CONF.read_text() == shared_config
    assert "replicaof" in (old.log_path.parent / "redis.conf").read_text()
    assert errors_logged(ha) == []


async def test_two_sentinels_of_three_killed_the_primary_keeps_serving(
    ha: HACluster, probe: aiohttp.ClientSession
) -> None:
    """No failover without a majority: the primary stays, and so do the writes."""
    url = f"{ha.url}/api/tasks/minority"
    for sentinel in ha.sentinels[:2]:
        await asyncio.to_thread(sentinel.kill)
    for n in range(20):
        assert (await put(probe, url, f"w{n}")).status == 200
    assert ha.sentinels[2].primary() == ha.redis.port
    assert ha.redis.info("replication")["role"] == "master"
    assert errors_logged(ha) == []


def test_the_ha_compose_file_is_valid_and_uses_the_one_redis_and_nginx_config() -> None:
    compose = ["docker-compose", "-f", str(REPO / "docker-compose.ha.yml"), "config"]
    rendered = subprocess.run(compose, capture_output=True, text=True, cwd=REPO)
    assert rendered.returncode == 0, rendered.stderr
    services = yaml.safe_load(rendered.stdout)["services"]
    assert sorted(services) == [
        "app1", "app2", "app3", "nginx",
        "redis-primary", "redis-replica-1", "redis-replica-2",
        "sentinel-1", "sentinel-2", "sentinel-3",
    ]  # fmt: skip
    for node in ("redis-primary", "redis-replica-1", "redis-replica-2"):
        assert f"{HA_REDIS_CONF}:/usr/local/etc/redis/ha.conf:ro" in str(services[node]["volumes"])
    assert f"{NGINX_CONF}:/etc/nginx/nginx.conf:ro" in str(services["nginx"]["volumes"])
    for app in ("app1", "app2", "app3"):
        env = services[app]["environment"]
        assert env["REDIS_SENTINELS"] == "sentinel-1:26379,sentinel-2:26379,sentinel-3:26379"
        assert "REDIS_URL" not in env
    script = " ".join(services["sentinel-1"]["command"])
    assert "sentinel monitor taskstatus redis-primary 6379 2" in script


async def test_a_second_failover_right_after_the_first_is_followed_too(
    ha: HACluster, probe: aiohttp.ClientSession
) -> None:
    """The instances keep following the Sentinels after the first switch."""
    url = f"{ha.url}/api/tasks/twice"
    first = ha.redis
    assert (await put(probe, url, "on the first primary")).status == 200
    await asyncio.to_thread(first.kill)
    await wait_until(lambda: failed_over(ha, first.port), 20, "the first failover", interval=0.05)
    second = ha.primary()
    await asyncio.to_thread(first.start)  # back as a replica: the next primary needs one
    await wait_until(
        lambda: first.info("replication").get("role") == "slave",
        20,
        "a replica again",
        interval=0.05,
    )
    await until_ready(probe, ha.instances)
    assert (await put(probe, url, "on the second primary")).status == 200
    await asyncio.to_thread(second.kill)
    await wait_until(lambda: failed_over(ha, second.port), 20, "the second failover", interval=0.05)
    assert ha.primary() is not second

    async def acknowledged() -> bool:
        return (await put(probe, url, "on the third primary")).status == 200

    await wait_until(acknowledged, 15, "a write acknowledged on the third primary", interval=0.05)
    # The write was acknowledged by an instance that follows the third primary; the read may
    # reach another, which answers 503 until it follows it too.
    await until_ready(probe, ha.instances)
    async with probe.get(url) as response:
        state = await response.json()
        assert response.status == 200, state
    # A refused attempt may have been applied (a WAIT that timed out): 3 or more.
    assert state["version"] >= 3 and state["message"] == "on the third primary"
    for app in ha.instances:
        async with probe.get(f"{app.url}/metrics") as response:
            assert "taskstatus_redis_failovers_total 2.0" in await response.text()
    assert errors_logged(ha) == []


async def test_writes_no_replica_holds_are_shown_to_no_one_and_a_failover_takes_back_nothing_shown(
    ha: HACluster, probe: aiohttp.ClientSession
) -> None:
    """The replicas frozen (SIGSTOP): writes are answered 503 not_replicated and no watcher is
    shown them (they are published only once replicated, and reads wait for the replicas too).
    Then the primary dies with those writes, a replica is promoted: every state any client was
    shown is in the new primary's history, with the same content."""
    tasks = task_ids(10)
    async with load_on(ha) as load:
        load.poll_tasks(tasks, per_task=5)
        await until_held(probe, ha.instances, 50)
        writing = asyncio.create_task(load.write_steadily(tasks, rate=50, limit=400))
        history = load.history
        await wait_until(lambda: len(history.acknowledged) >= 50, 10, "50 writes", interval=0.05)
        for replica in ha.replicas:
            replica.send(signal.SIGSTOP)
        frozen_at = time.monotonic()
        await wait_until(
            lambda: sum(w.outcome == "503" for w in history.writes if w.started > frozen_at) >= 10,
            15,
            "10 writes refused while the replicas are frozen",
            interval=0.05,
        )
        killed_at = time.monotonic()
        await asyncio.to_thread(ha.redis.kill)
        for replica in ha.replicas:
            replica.send(signal.SIGCONT)
        await wait_until(lambda: failed_over(ha, ha.redis.port), 30, "a failover", interval=0.05)
        await until_ready(probe, ha.instances)
        await writing
        final = await load.converge(probe, tasks)
    history.check(final)
    # Refused while the replicas were frozen. They may survive even so (the kernel holds what
    # the primary sent a stopped replica, which reads it once it runs again), but until the
    # failover no client may be shown one.
    refused = {w.message for w in history.writes if frozen_at < w.started and w.ended < killed_at}
    assert len(refused) >= 10
    assert {w.outcome for w in history.writes if w.message in refused} == {"503"}
    kept: dict[tuple[str, int], str | None] = {}
    for task in tasks:
        async with probe.get(f"{ha.url}/api/tasks/{task}/history") as response:
            for entry in (await response.json())["history"]:
                kept[task, entry["version"]] = entry["message"]
    shown = {(s.task, s.version): s.message for s in history.seen if s.version > 0}
    missing = {k: v for k, v in shown.items() if kept.get(k, "(none)") != v}
    assert not missing, f"clients were shown states the new primary lacks: {missing}"
    early = [s for s in history.seen if s.at < killed_at and s.message in refused]
    assert not early, f"shown before any replica had them: {early[:5]}"
    assert errors_logged(ha) == []
