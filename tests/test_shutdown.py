"""Graceful stop of the real process: SIGTERM answers held polls with 204 and exits with 0."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from deploy.cluster import Instance

from .conftest import exits_cleanly, wait_until


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Instance]:
    """``python -m service`` on a free port, alive (``/healthz`` answers); stopped after."""
    instance = Instance(tmp_path, "sigterm-test")
    instance.start(ready=False)
    yield instance
    instance.stop(signal.SIGKILL)


async def until_waiting(
    session: aiohttp.ClientSession, service: Instance, expected: dict[str, int]
) -> None:
    """Until the process reports ``expected`` held requests on ``/healthz``."""
    seen: list[object] = []

    async def reached() -> bool:
        async with session.get(f"{service.url}/healthz") as response:
            seen[:] = [(await response.json())["waiting"]]
        return seen == [expected]

    await wait_until(reached, 5, lambda: f"held requests {expected}, last seen {seen}")


async def test_sigterm_answers_held_polls_with_204_promptly_and_exits_zero(
    service: Instance,
) -> None:
    async with aiohttp.ClientSession() as session:

        async def hold(path: str) -> tuple[int, float, str, str]:
            async with session.get(f"{service.url}{path}") as response:
                await response.read()
                headers = response.headers
                return (
                    response.status,
                    time.monotonic(),
                    headers.get("Retry-After", ""),
                    headers.get("Connection", ""),
                )

        async with session.get(f"{service.url}/api/watch") as response:
            cursor = (await response.json())["cursor"]
        held = [
            asyncio.create_task(hold("/api/poll-status?last_version=0&timeout=50")),
            asyncio.create_task(hold("/api/poll-status?last_version=0&timeout=50")),
            asyncio.create_task(hold("/api/tasks/job/poll?since=0&timeout=50")),
            asyncio.create_task(hold(f"/api/watch?since={cursor}&timeout=50")),
        ]
        await until_waiting(session, service, {"polls": 3, "watches": 1})
        assert not any(task.done() for task in held)

        sent = time.monotonic()
        service.send(signal.SIGTERM)
        answers = await asyncio.wait_for(asyncio.gather(*held), timeout=5)
        assert [status for status, *_ in answers] == [204] * 4
        assert max(at for _, at, *_ in answers) - sent < 2
        # The drained clients are sent elsewhere after a jittered pause, on a new connection.
        assert all(retry in {"1", "2", "3"} for *_, retry, _ in answers)
        assert all(connection.lower() == "close" for *_, connection in answers)

    await exits_cleanly(service, timeout=5)
    assert time.monotonic() - sent < 5
