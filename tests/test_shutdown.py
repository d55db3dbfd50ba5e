"""Graceful stop of the real process: SIGTERM answers held polls with 204 and exits with 0."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parent.parent
STARTUP_DEADLINE = 15.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Service:
    process: asyncio.subprocess.Process
    url: str
    log: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    def fail(self, why: str) -> NoReturn:
        pytest.fail(f"{why}; the service logged:\n" + "".join(self.log))


async def read_log(service: Service) -> None:
    assert service.process.stderr is not None
    async for line in service.process.stderr:
        service.log.append(line.decode(errors="replace"))


@pytest.fixture
async def service() -> AsyncIterator[Service]:
    """``python -m service`` on a free port, ready (``/healthz`` answers); killed if still alive."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name in ("REDIS_URL", "POLL_TIMEOUT", "POLL_TIMEOUT_MAX", "STATUSES", "INSTANCE_ID"):
        env.pop(name, None)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "--port",
        str(port),
        "--instance-id",
        "sigterm-test",
        cwd=ROOT,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    running = Service(process, f"http://127.0.0.1:{port}")
    running.reader = asyncio.create_task(read_log(running))
    try:
        await wait_until_healthy(running)
        yield running
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await running.reader


async def wait_until_healthy(service: Service) -> None:
    deadline = time.monotonic() + STARTUP_DEADLINE
    async with aiohttp.ClientSession() as session:
        while True:
            if service.process.returncode is not None:
                service.fail("the service exited during startup")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{service.url}/healthz") as response:
                    if response.status == 200:
                        return
            if time.monotonic() > deadline:
                service.fail("the service did not answer /healthz in time")
            await asyncio.sleep(0.05)


async def wait_until_waiting(
    session: aiohttp.ClientSession, service: Service, expected: dict[str, int]
) -> None:
    """Poll ``/healthz`` until the process reports ``expected`` held requests."""
    deadline = time.monotonic() + 5
    while True:
        async with session.get(f"{service.url}/healthz") as response:
            waiting = (await response.json())["waiting"]
        if waiting == expected:
            return
        if time.monotonic() > deadline:
            service.fail(f"held requests never reached {expected} (last seen {waiting})")
        await asyncio.sleep(0.01)


async def test_sigterm_answers_held_polls_with_204_promptly_and_exits_zero(
    service: Service,
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
        await wait_until_waiting(session, service, {"polls": 3, "watches": 1})
        assert not any(task.done() for task in held)

        sent = time.monotonic()
        service.process.send_signal(signal.SIGTERM)
        answers = await asyncio.wait_for(asyncio.gather(*held), timeout=5)
        assert [status for status, *_ in answers] == [204] * 4
        assert max(at for _, at, *_ in answers) - sent < 2
        # The drained clients are sent elsewhere after a jittered pause, on a new connection.
        assert all(retry in {"1", "2", "3"} for *_, retry, _ in answers)
        assert all(connection.lower() == "close" for *_, connection in answers)

    assert await asyncio.wait_for(service.process.wait(), timeout=5) == 0
    assert time.monotonic() - sent < 5
