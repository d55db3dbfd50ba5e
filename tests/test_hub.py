"""The hub on its own: one shared wake-up per task, counting of waiters, release on close."""

from __future__ import annotations

import asyncio

from service.hub import WATCH_KEY, Change, Hub

from .conftest import change, wait_until


async def test_publish_wakes_every_waiter_of_the_task_and_every_watch_with_one_change() -> None:
    hub = Hub()

    async def wait(key: str) -> Change | None:
        with hub.waiting(key) as waiter:
            return await waiter.wait(lambda c: True, 5)

    waiters = [asyncio.create_task(wait(key)) for key in ["t", "t", "t", WATCH_KEY]]
    await wait_until(lambda: hub.waiting_total == 4)
    assert (hub.waiting_polls, hub.waiting_watches) == (3, 1)
    published = change("t", 1)
    hub.publish(published)
    assert await asyncio.gather(*waiters) == [published] * 4
    assert hub.waiting_total == 0


async def test_publish_on_another_task_does_not_wake_a_waiter() -> None:
    hub = Hub()
    with hub.waiting("t") as waiter:
        hub.publish(change("other", 1))
        assert await waiter.wait(lambda c: True, 0.05) is None


async def test_wait_skips_changes_it_does_not_accept() -> None:
    hub = Hub()
    seen: list[int] = []

    def accept(c: Change) -> bool:
        seen.append(c.state.version)
        return c.state.version >= 3

    async def wait() -> Change | None:
        with hub.waiting("t") as waiter:
            return await waiter.wait(accept, 5)

    waiter = asyncio.create_task(wait())
    await wait_until(lambda: hub.waiting_total == 1)
    for version in (1, 2, 3):
        hub.publish(change("t", version))
        # accept() returns and the waiter re-arms in one step, before the next publish
        await wait_until(lambda: len(seen) == version)  # noqa: B023
    result = await waiter
    assert result is not None and result.state.version == 3
    assert seen == [1, 2, 3]


async def test_change_published_between_registering_and_waiting_is_not_lost() -> None:
    """The contract of ``Hub.waiting``: register, read the version, wait; nothing falls between.

    With the redis backend the read awaits the network, so a change can be published there.
    """
    hub = Hub()
    with hub.waiting("t") as waiter:
        published = change("t", 1)  # lands while the handler reads the version (0)
        hub.publish(published)
        result = await waiter.wait(lambda c: c.state.version > 0, 0.5)
    assert result is published


async def test_two_changes_published_in_one_loop_step_both_reach_a_waiter() -> None:
    """A burst (two writes before the waiter runs) must not drop the second change."""
    hub = Hub()

    async def wait() -> Change | None:
        with hub.waiting("t") as waiter:
            return await waiter.wait(lambda c: c.state.version == 2, 0.5)

    task = asyncio.create_task(wait())
    await wait_until(lambda: hub.waiting_total == 1)
    hub.publish(change("t", 1))
    hub.publish(change("t", 2))
    result = await task
    assert result is not None and result.state.version == 2


async def test_waiter_registered_after_a_change_starts_at_the_next_one() -> None:
    hub = Hub()
    with hub.waiting("t") as early:
        first, second = change("t", 1), change("t", 2)
        hub.publish(first)
        with hub.waiting("t") as late:
            hub.publish(second)
            assert await late.wait(lambda c: True, 0.5) is second
        assert await early.wait(lambda c: True, 0.5) is first


async def test_close_releases_waiters_and_later_waits_return_at_once() -> None:
    hub = Hub()

    async def wait() -> Change | None:
        with hub.waiting("t") as waiter:
            return await waiter.wait(lambda c: True, 30)

    waiters = [asyncio.create_task(wait()) for _ in range(3)]
    await wait_until(lambda: hub.waiting_total == 3)
    hub.close()
    assert await asyncio.wait_for(asyncio.gather(*waiters), timeout=1) == [None] * 3
    for key in ("t", "never-waited-on", WATCH_KEY):
        with hub.waiting(key) as waiter:
            assert await asyncio.wait_for(waiter.wait(lambda c: True, 30), 1) is None
    assert hub.waiting_total == 0


async def test_cancelled_waiter_is_uncounted_and_reported_as_disconnected() -> None:
    hub = Hub()

    async def wait() -> Change | None:
        with hub.waiting("t") as waiter:
            return await waiter.wait(lambda c: True, 30)

    waiters = [asyncio.create_task(wait()) for _ in range(2)]
    await wait_until(lambda: hub.waiting_total == 2)
    assert hub.watched_tasks() == ["t"]
    for waiter in waiters:
        waiter.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert hub.waiting_total == 0
    assert hub.watched_tasks() == []
    assert hub.take_disconnected() == 2
    assert hub.take_disconnected() == 0


async def test_wait_for_the_newest_takes_the_last_accepted_of_a_burst_and_drops_the_rest() -> None:
    """A long poll answered the ordinary way (cross-origin, HTTP/1.0) gets the newest state of a
    burst, not the first change of it."""
    hub = Hub()
    with hub.waiting("t") as waiter:
        changes = [change("t", version) for version in (1, 2, 3)]
        for published in changes:
            hub.publish(published)
        assert await waiter.wait(lambda c: c.state.version > 0, 0.5, newest=True) is changes[2]
        assert await waiter.wait(lambda c: True, 0.05) is None  # nothing left pending
