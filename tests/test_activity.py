"""The idle watchers (``service/activity.py``): the loop-lag monitor and the collector's clock
sleep while the process is idle, wake when work arrives, and miss no pause that follows it."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator

import pytest

from service.activity import Activity
from service.backend import create_backend
from service.config import load_config
from service.hub import Hub, Waiter
from service.looplag import IDLE_LOOK, watch
from service.metrics import Metrics
from service.runtime import CollectionClock, GcPolicy, scheduled_gc

from .conftest import Client, hub_of, wait_until


async def test_a_nudge_wakes_the_sleepers_and_a_timeout_ends_a_sleep() -> None:
    activity = Activity()
    assert not await activity.sleep(0.01)  # nobody nudged
    first = asyncio.create_task(activity.sleep(5))
    second = asyncio.create_task(activity.sleep(5))
    await wait_until(lambda: activity.asleep, what="two sleepers")
    activity.nudge()
    assert list(await asyncio.wait_for(asyncio.gather(first, second), 1)) == [True, True]
    assert not activity.asleep
    activity.nudge()  # nobody sleeps: nothing to wake
    assert activity.nudges == 2


@pytest.fixture
async def monitor() -> AsyncIterator[tuple[Metrics, Activity]]:
    metrics, activity = Metrics(create_backend(load_config([], env={}))), Activity()
    task = asyncio.create_task(watch(metrics, activity))
    yield metrics, activity
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_the_monitor_sleeps_once_idle_and_a_pause_right_after_a_nudge_counts_in_full(
    monitor: tuple[Metrics, Activity],
) -> None:
    metrics, activity = monitor
    await wait_until(lambda: activity.asleep, 5, "the monitor asleep in an idle process")
    assert metrics.loop_lag_max < 0.1
    activity.nudge()  # work arrives, and holds the loop (as a fan-out's first turn would)
    time.sleep(0.15)  # noqa: ASYNC251 - the pause under test
    # Asleep for up to IDLE_LOOK, the monitor still counts the pause from the nudge on.
    await wait_until(lambda: metrics.loop_lag_max >= 0.15, IDLE_LOOK / 2, "the pause counted")


async def test_the_monitor_stays_awake_while_work_keeps_arriving(
    monitor: tuple[Metrics, Activity],
) -> None:
    metrics, activity = monitor
    await wait_until(lambda: activity.asleep, 5, "the monitor asleep in an idle process")
    looks = sum(metrics.loop_lag.counts)
    for _ in range(60):  # 0.6 s of requests, 10 ms apart, each too small to show as CPU
        activity.nudge()
        await asyncio.sleep(0.01)
        assert not activity.asleep
    # It looked every 10 ms meanwhile, not once a second.
    assert sum(metrics.loop_lag.counts) - looks >= 30


def test_the_collectors_clock_tells_when_the_next_collection_falls_due() -> None:
    clock = CollectionClock(GcPolicy(young_every=10, full_every=900), last_young=100, last_full=0)
    assert clock.next_due(105) == 5
    assert clock.next_due(200) == 0
    clock = CollectionClock(GcPolicy(young_every=10, full_every=900), last_young=895, last_full=0)
    assert clock.next_due(896) == 4  # the full one comes first


async def test_the_collectors_clock_sleeps_while_idle_and_still_collects_on_time() -> None:
    activity = Activity()
    collections: list[float] = []

    def counted(phase: str, info: dict[str, int]) -> None:
        if phase == "stop":
            collections.append(time.monotonic())

    policy = GcPolicy(young_every=0.5, quiet_check=0.01)
    ctx = scheduled_gc(busy=lambda: False, held=lambda: 0, activity=activity, policy=policy)
    gc.callbacks.append(counted)
    try:
        async for _ in ctx(object()):
            await wait_until(lambda: activity.asleep, 5, "the clock asleep in an idle process")
            started = time.monotonic()
            await wait_until(lambda: len(collections) >= 2, 5, "two collections while idle")
            # Asleep, it woke for each collection due: every young_every, not sooner.
            assert collections[-1] - started >= policy.young_every - 0.05
            await wait_until(lambda: activity.asleep, 5, "asleep again after collecting")
            activity.nudge()
            assert not activity.asleep
            break
    finally:
        gc.callbacks.remove(counted)


async def test_a_request_to_an_idle_instance_wakes_its_watchers(client: Client) -> None:
    activity = hub_of(client).activity
    await wait_until(lambda: activity.asleep, 5, "the watchers asleep in an idle instance")
    nudges = activity.nudges
    assert (await client.get("/api/tasks")).status == 200  # a request that waits for nothing
    assert activity.nudges > nudges
    assert not activity.asleep


async def test_a_handler_starting_to_wait_nudges_and_a_parked_poll_nudges_once() -> None:
    """The ordinary path's waits nudge (with FAST_POLL=0 they are the requests' only nudge); a
    parked poll does not nudge again at registering: its bytes did, at the connection."""
    hub = Hub()
    with hub.waiting("t"):
        assert hub.activity.nudges == 1
    hub.park(Waiter(hub, "t"), hold=1.0)
    assert hub.activity.nudges == 1
    hub.close()
