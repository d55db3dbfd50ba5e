"""How much client CPU one poll costs, per way of writing the load client.

``python -m bench.client_cost``: against one service instance (embedded backend), 200 keep-alive
connections each ask 100 polls whose answer is immediate (``since`` behind the version), with
(a) raw ``asyncio.Protocol`` connections on the default loop, (b) the same on uvloop, (c) aiohttp's
client. Prints client CPU (user + system, so the kernel's loopback work counted on the client side
too) per request. The cheapest is what ``bench/load.py`` uses.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import aiohttp

from deploy.cluster import Instance

from .load import HttpConn, Response

CONNS, EACH = 200, 100
TASK = "cost"


class _Ask(HttpConn):
    def __init__(
        self, port: int, left: int, done: asyncio.Future[None], counter: list[int]
    ) -> None:
        super().__init__()
        self.raw = (
            f"GET /api/tasks/{TASK}/poll?since=99999&timeout=1 HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        self.left = left
        self.done = done
        self.counter = counter

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.write(self.raw)

    def on_response(self, response: Response) -> None:
        self.left -= 1
        if self.left > 0 and self.transport is not None:
            self.transport.write(self.raw)
            return
        self.counter[0] -= 1
        if self.counter[0] == 0 and not self.done.done():
            self.done.set_result(None)

    def on_error(self, kind: str) -> None:
        raise RuntimeError(kind)


async def raw(port: int) -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    counter = [CONNS]
    for _ in range(CONNS):
        await loop.create_connection(lambda: _Ask(port, EACH, done, counter), "127.0.0.1", port)
    await done


async def with_aiohttp(port: int) -> None:
    url = f"http://127.0.0.1:{port}/api/tasks/{TASK}/poll?since=99999&timeout=1"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONNS)) as session:

        async def one() -> None:
            for _ in range(EACH):
                async with session.get(url) as response:
                    await response.read()

        await asyncio.gather(*(one() for _ in range(CONNS)))


def measure(name: str, run: Callable[[], Coroutine[Any, Any, None]], loop: str) -> float:
    cpu, wall = time.process_time(), time.monotonic()
    if loop == "uvloop":
        import uvloop

        uvloop.run(run())
    else:
        asyncio.run(run())
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    per = cpu / (CONNS * EACH) * 1e6
    print(f"{name:28s} {per:6.1f} µs client CPU per poll   ({CONNS * EACH / wall:,.0f} polls/s)")
    return per


def main() -> None:
    with TemporaryDirectory() as tmp:
        server = Instance(Path(tmp), "cost")
        server.start()
        try:
            port = server.port
            measure("raw asyncio.Protocol", lambda: raw(port), "asyncio")
            measure("raw Protocol on uvloop", lambda: raw(port), "uvloop")
            measure("aiohttp ClientSession", lambda: with_aiohttp(port), "asyncio")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
