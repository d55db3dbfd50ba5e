"""The cluster for real: redis-server, three service processes and nginx, on free loopback ports.

Each test uses its own task ids (or its own cluster when it breaks something), so tests sharing the
module's cluster cannot see each other's writes.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from deploy.cluster import (
    HOST,
    NGINX_CONF,
    REPO,
    Cluster,
    Instance,
    Nginx,
    free_port,
    running_cluster,
)
from service.backend.redis import RedisBackend
from service.model import DEFAULT_STATUSES, TaskUpdate

from .conftest import wait_until

JSON = dict[str, Any]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running


@pytest.fixture(scope="module")
def retaining_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Finished tasks expire after 1 s; every instance sweeps every 50 ms."""
    args = ["--finished-task-ttl", "1", "--sweep-interval", "0.05"]
    with running_cluster(tmp_path_factory.mktemp("retaining"), instance_args=args) as running:
        yield running


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A cluster of this test's own, for tests that kill or cut parts of it."""
    with running_cluster(tmp_path, durable_redis=True) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # force_close: each request on its own connection, so nginx balances every one of them
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


async def put(http: aiohttp.ClientSession, base: str, task: str, body: JSON) -> tuple[int, JSON]:
    async with http.put(f"{base}/api/tasks/{task}", json=body) as response:
        return response.status, await response.json()


async def poll(
    http: aiohttp.ClientSession, base: str, task: str, since: int, timeout: int = 10
) -> tuple[int, JSON | None, str]:
    url = f"{base}/api/tasks/{task}/poll?since={since}&timeout={timeout}"
    async with http.get(url) as response:
        body = await response.json() if response.status == 200 else None
        return response.status, body, response.headers["X-Served-By"]


async def follow(
    http: aiohttp.ClientSession, instance: Instance, task: str, *, until_version: int
) -> list[JSON]:
    """Poll ``task`` on ``instance`` as a page does, from version 0 until ``until_version``;
    every state answered, in order."""
    seen: list[JSON] = []
    version = 0
    while version < until_version:
        code, state, _ = await poll(http, instance.url, task, since=version)
        if code == 200:
            assert state is not None
            version = state["version"]
            seen.append(state)
    return seen


async def waiting_polls(http: aiohttp.ClientSession, instance: Instance) -> int:
    async with http.get(f"{instance.url}/healthz") as response:
        count: int = (await response.json())["waiting"]["polls"]
        return count


async def all_held(http: aiohttp.ClientSession, cluster: Cluster, count: int) -> None:
    async def held() -> bool:
        counts = [await waiting_polls(http, app) for app in cluster.instances]
        return sum(counts) >= count

    await wait_until(held, 10.0, f"{count} held polls", interval=0.05)


async def delete(http: aiohttp.ClientSession, base: str, task: str) -> tuple[int, JSON]:
    async with http.delete(f"{base}/api/tasks/{task}") as response:
        return response.status, await response.json()


# --- fan-out across instances ---------------------------------------------------------------


async def test_poll_on_one_instance_wakes_on_update_through_another_within_200ms(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    first, third = cluster.instances[0], cluster.instances[2]
    held = asyncio.create_task(poll(http, first.url, "cross-1", since=0))
    await wait_until(
        lambda: _positive(waiting_polls(http, first)),
        10.0,
        "the poll held on instance 1",
        interval=0.05,
    )
    count_before, total_before = await notify_delay(http, first)
    status, written = await put(http, third.url, "cross-1", {"status": "in_progress"})
    code, state, served_by = await held
    assert status == 200 and code == 200
    assert state is not None and state["version"] == written["version"] == 1
    assert state["status"] == "in_progress"
    assert served_by == first.instance_id
    # Timed by the clocks that see it: from the write's publish (Redis' clock stamps it) to the
    # moment instance 1 wrote the answer (its notify delay), not by this process, which shares
    # two cores with three instances, nginx and Redis.
    count, total = await notify_delay(http, first)
    delay = total - total_before
    assert count == count_before + 1 and delay < 0.2, f"woken after {delay * 1000:.0f} ms"


async def notify_delay(http: aiohttp.ClientSession, instance: Instance) -> tuple[float, float]:
    """How many long polls ``instance`` answered with a change, and their notify delays' sum."""
    async with http.get(f"{instance.url}/metrics") as response:
        text = await response.text()
    found = {}
    for line in text.splitlines():
        if line.startswith("taskstatus_notify_delay_seconds_") and 'transport="longpoll"' in line:
            name, value = line.rsplit(" ", 1)
            found[name.split("{")[0].rsplit("_", 1)[1]] = float(value)
    return found["count"], found["sum"]


async def _positive(count: Any) -> bool:
    return bool(await count > 0)


async def test_five_pollers_through_nginx_on_several_instances_all_receive_one_update(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    pollers = [asyncio.create_task(poll(http, cluster.url, "fan-5", since=0)) for _ in range(5)]
    await all_held(http, cluster, 5)
    status, written = await put(http, cluster.url, "fan-5", {"status": "completed"})
    results = await asyncio.gather(*pollers)
    assert status == 200
    assert all(code == 200 and body == written for code, body, _ in results)
    assert len({served_by for _, _, served_by in results}) > 1, "nginx used one instance only"


async def test_twenty_writers_on_different_instances_get_gapless_versions_and_pollers_end_on_last(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    task, writers = "gapless-20", 20
    followers = [
        asyncio.create_task(follow(http, app, task, until_version=writers))
        for app in cluster.instances
    ]
    results = await asyncio.gather(
        *(
            put(http, cluster.instances[n % 3].url, task, {"status": "in_progress", "progress": n})
            for n in range(writers)
        )
    )
    versions = sorted(body["version"] for code, body in results if code == 200)
    assert versions == list(range(1, writers + 1))
    for states in await asyncio.wait_for(asyncio.gather(*followers), 20):
        seen = [state["version"] for state in states]
        assert seen == sorted(set(seen)), "a follower saw versions out of order"
        assert seen[-1] == writers


async def test_expected_version_conflict_is_detected_across_instances(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    first, second = cluster.instances[0], cluster.instances[1]
    _, created = await put(http, first.url, "occ", {"status": "in_progress"})
    ok, _ = await put(http, second.url, "occ", {"status": "completed", "expected_version": 1})
    late, body = await put(http, first.url, "occ", {"status": "failed", "expected_version": 1})
    assert created["version"] == 1 and ok == 200
    assert late == 409
    assert body["error"]["code"] == "version_conflict"
    assert body["current"]["version"] == 2 and body["current"]["status"] == "completed"


async def test_watch_on_one_instance_sees_tasks_created_through_another(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    first, second = cluster.instances[0], cluster.instances[1]
    async with http.get(f"{first.url}/api/watch") as response:
        cursor = (await response.json())["cursor"]

    async def watch() -> JSON:
        async with http.get(f"{first.url}/api/watch?since={cursor}&timeout=10") as response:
            assert response.status == 200
            body: JSON = await response.json()
            return body

    held = asyncio.create_task(watch())

    async def watch_held() -> bool:
        async with http.get(f"{first.url}/healthz") as response:
            return bool((await response.json())["waiting"]["watches"] > 0)

    await wait_until(watch_held, 10.0, "the watch held on instance 1", interval=0.05)
    _, created = await put(http, second.url, "watch-new-task", {"status": "pending"})
    answer = await held
    assert [state["task"] for state in answer["tasks"]] == ["watch-new-task"]
    assert answer["tasks"][0] == created
    assert answer["cursor"] != cursor and answer["reset"] is False


# --- faults ---------------------------------------------------------------------------------


async def test_subscription_cut_while_update_published_still_reaches_waiters(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    task = "cut-sub"
    pollers = [asyncio.create_task(poll(http, app.url, task, since=0)) for app in cluster.instances]
    await all_held(http, cluster, 3)
    # Cut every instance's subscription and publish in ONE transaction: the message goes out
    # while no instance is subscribed, so only the resync after reconnecting can deliver it.
    backend = RedisBackend(DEFAULT_STATUSES, 100, url=cluster.redis.url, prefix="taskstatus:")
    keys, args = backend.write_call(task, TaskUpdate(status="completed"))
    redis = Redis.from_url(cluster.redis.url)
    try:
        pipe = redis.pipeline(transaction=True)
        pipe.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        pipe.eval(str(backend.write_script.script), len(keys), *keys, *args)
        killed, (outcome, *_) = await pipe.execute()
    finally:
        await redis.aclose()
        await backend.close()
    assert killed >= 3 and outcome == b"ok"
    results = await asyncio.wait_for(asyncio.gather(*pollers), 10)
    assert [(code, body and body["status"]) for code, body, _ in results] == [
        (200, "completed")
    ] * 3


async def test_redis_killed_and_restarted_mid_poll_loses_no_acknowledged_update(
    own_cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    task, redis = "redis-crash", own_cluster.redis
    _, first = await put(http, own_cluster.url, task, {"status": "in_progress", "progress": 10})
    pollers = [
        asyncio.create_task(poll(http, app.url, task, since=1, timeout=30))
        for app in own_cluster.instances
    ]
    await all_held(http, own_cluster, 3)

    redis.kill()
    status, body = await put(http, own_cluster.url, task, {"status": "failed"})
    assert status == 503 and body["error"]["code"] == "backend_unavailable"
    async with http.put(
        f"{own_cluster.instances[0].url}/api/tasks/{task}", json={"progress": 1}
    ) as r:
        assert r.status == 503 and r.headers["Retry-After"]
    async with http.get(f"{own_cluster.instances[0].url}/readyz") as r:
        assert r.status == 503
    assert not any(p.done() for p in pollers), "held polls must stay held during the outage"

    redis.start()  # same port, same AOF file: the acknowledged write is still there
    for app in own_cluster.instances:
        await wait_until(partial(_ready, http, app), 10.0, f"{app.name} ready again", interval=0.05)
    status, second = await put(http, own_cluster.url, task, {"status": "completed"})
    assert status == 200 and second["version"] == first["version"] + 1 == 2
    results = await asyncio.wait_for(asyncio.gather(*pollers), 10)
    assert all(code == 200 and body == second for code, body, _ in results)
    logs = "".join(app.log_text() for app in own_cluster.instances)
    assert "Traceback" not in logs
    assert logs.count("redis subscription lost") == 3, "one warning per instance per outage"


async def _ready(http: aiohttp.ClientSession, app: Instance) -> bool:
    async with http.get(f"{app.url}/readyz") as response:
        return response.status == 200


async def test_killed_instance_polls_move_to_the_others_and_converge(
    own_cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    task, doomed = "instance-crash", own_cluster.instances[0]
    _, created = await put(http, own_cluster.url, task, {"status": "in_progress"})
    held = asyncio.create_task(poll(http, doomed.url, task, since=1, timeout=30))
    await wait_until(
        lambda: _positive(waiting_polls(http, doomed)),
        10.0,
        "a poll on the doomed instance",
        interval=0.05,
    )
    doomed.stop(signal.SIGKILL)
    with pytest.raises(aiohttp.ClientError):
        await held  # the client sees its connection drop, and polls again through nginx
    # A write through nginx is never retried on another instance, so it may fail once (502,
    # not acknowledged) while nginx still counts the dead instance as up.
    code, body = await put(http, own_cluster.url, task, {"status": "completed"})
    assert code == 200 or (code == 502 and body["error"]["code"] == "upstream_unavailable")
    if code != 200:
        code, body = await put(http, own_cluster.url, task, {"status": "completed"})
    assert code == 200
    latest = body
    served = set()
    for _ in range(6):
        code, state, served_by = await poll(http, own_cluster.url, task, since=created["version"])
        assert code == 200 and state == latest
        served.add(served_by)
    assert doomed.instance_id not in served
    assert len(served) == 2


# --- the deployment files -------------------------------------------------------------------


def test_compose_file_is_valid_and_mounts_the_one_nginx_config() -> None:
    compose = ["docker-compose", "-f", str(REPO / "docker-compose.yml")]
    rendered = subprocess.run([*compose, "config"], capture_output=True, text=True, cwd=REPO)
    assert rendered.returncode == 0, rendered.stderr
    services = subprocess.run(
        [*compose, "config", "--services"], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout.split()
    assert sorted(services) == ["app1", "app2", "app3", "nginx", "redis"]
    # The file the local cluster (make demo, these tests) runs nginx with, mounted as is.
    assert f"- {NGINX_CONF}:/etc/nginx/nginx.conf:ro" in rendered.stdout


def test_nginx_refuses_to_start_on_a_port_another_process_listens_on(tmp_path: Path) -> None:
    """Else its start probe reaches the other listener and takes nginx for started. It happened:
    nginx got instance-1's port, failed to bind it, and every request "through nginx" went to
    instance-1."""
    with socket.socket() as other:
        other.bind((HOST, 0))
        other.listen()
        nginx = Nginx(tmp_path, [free_port()], port=other.getsockname()[1])
        with pytest.raises(RuntimeError, match="already taken"):
            nginx.start()
        assert not nginx.running


# --- the task lifecycle across instances ------------------------------------------------------


async def _held(http: aiohttp.ClientSession, app: Instance, kind: str) -> bool:
    async with http.get(f"{app.url}/healthz") as response:
        return bool((await response.json())["waiting"][kind] > 0)


async def test_a_deletion_through_one_instance_reaches_polls_watches_and_streams_on_the_others(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    first, second, third = cluster.instances
    _, created = await put(http, first.url, "doomed-x", {"status": "in_progress"})
    async with http.get(f"{second.url}/api/watch") as response:
        cursor = (await response.json())["cursor"]
    held_poll = asyncio.create_task(poll(http, first.url, "doomed-x", since=1))

    async def held_watch() -> JSON:
        async with http.get(f"{second.url}/api/watch?since={cursor}&timeout=10") as response:
            body: JSON = await response.json()
            return body

    watch = asyncio.create_task(held_watch())
    sse = await http.get(f"{third.url}/api/tasks/doomed-x/events")
    ws = await http.ws_connect(f"{second.url.replace('http', 'ws')}/api/ws")
    try:
        catch_up = [await sse.content.readline() for _ in range(2)]  # registered by now
        assert catch_up[0] == b"id: 1\n" and catch_up[1].startswith(b"data: "), catch_up
        assert "hello" in await ws.receive_json(timeout=5)
        await ws.send_json({"subscribe": {"task": "doomed-x", "version": 1}})
        assert await ws.receive_json(timeout=5) == {"subscribed": {"task": "doomed-x"}}
        await wait_until(
            lambda: _held(http, first, "polls"), 10.0, "the poll held on instance 1", interval=0.05
        )
        await wait_until(
            lambda: _held(http, second, "watches"),
            10.0,
            "the watch held on instance 2",
            interval=0.05,
        )

        status, tombstone = await delete(http, third.url, "doomed-x")
        assert status == 200 and tombstone["version"] == created["version"] + 1

        code, state, served_by = await held_poll
        assert (code, state, served_by) == (200, tombstone, first.instance_id)
        assert (await watch)["tasks"] == [tombstone]
        async with asyncio.timeout(5):
            line = b""
            while not line.startswith(b"data: "):
                line = await sse.content.readline()
        assert json.loads(line.removeprefix(b"data: ")) == tombstone
        assert await ws.receive_json(timeout=5) == {"state": tombstone}
    finally:
        sse.close()
        await ws.close()


async def test_delete_then_recreate_versions_strictly_increase_on_every_instance(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    task, last = "reborn-x", 5  # written, deleted, written, deleted, written
    followers = [
        asyncio.create_task(follow(http, app, task, until_version=last))
        for app in cluster.instances
    ]
    await wait_until(
        lambda: _held(http, cluster.instances[2], "polls"),
        10.0,
        "the followers held",
        interval=0.05,
    )
    first, second, third = cluster.instances
    assert (await put(http, first.url, task, {"status": "completed"}))[1]["version"] == 1
    assert (await delete(http, second.url, task))[1]["version"] == 2
    assert (await put(http, third.url, task, {"status": "in_progress"}))[1]["version"] == 3
    assert (await delete(http, first.url, task))[1]["version"] == 4
    assert (await put(http, second.url, task, {"progress": 5}))[1]["version"] == last
    for seen in await asyncio.wait_for(asyncio.gather(*followers), 20):
        versions = [state["version"] for state in seen]
        assert versions == sorted(set(versions)), f"versions went back or repeated: {versions}"
        assert all(state.get("deleted", False) == (state["version"] % 2 == 0) for state in seen)
    for app in cluster.instances:
        async with http.get(f"{app.url}/api/tasks/{task}") as response:
            assert (await response.json())["version"] == last


async def test_several_instances_sweeping_at_once_expire_each_task_once(
    retaining_cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    cluster, count = retaining_cluster, 300
    async with http.get(f"{cluster.url}/api/watch") as response:
        cursor = (await response.json())["cursor"]
    ids = [f"swept-{n}" for n in range(count)]
    answers = await asyncio.gather(
        *(
            put(http, cluster.instances[n % 3].url, task, {"status": "completed"})
            for n, task in enumerate(ids)
        )
    )
    assert {code for code, _ in answers} == {200}
    running = await put(http, cluster.url, "still-running", {"status": "in_progress"})

    async def all_gone() -> bool:
        async with http.get(f"{cluster.url}/api/tasks") as response:
            listed = {state["task"] for state in (await response.json())["tasks"]}
        return not listed & set(ids)

    await wait_until(all_gone, 30, f"{count} finished tasks to expire", interval=0.05)
    async with http.get(f"{cluster.url}/api/watch?since={cursor}") as response:
        changes = (await response.json())["tasks"]
    tombstones = {state["task"]: state for state in changes if state.get("deleted")}
    assert set(tombstones) == set(ids)
    assert {state["version"] for state in tombstones.values()} == {2}, "a task expired twice"
    expired = 0
    for app in cluster.instances:
        async with http.get(f"{app.url}/metrics") as response:
            for line in (await response.text()).splitlines():
                if line.startswith("taskstatus_tasks_expired_total "):
                    expired += int(float(line.split()[1]))
    assert expired == count, "each task must be expired by exactly one sweep"
    async with http.get(f"{cluster.url}/api/tasks/still-running") as response:
        assert await response.json() == running[1]
    due = int(cluster.redis.command("ZCARD", "taskstatus:due"))
    assert due == count, "one purge time per tombstone"
