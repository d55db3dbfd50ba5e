"""A TCP proxy in front of a real redis-server that can lose the reply to one script call: the
fault "the write ran, then its connection broke", which redis-py meets as a ConnectionError and
a client library may answer by sending the write again."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from deploy.cluster import HOST


class ReplyDroppingProxy:
    """Forwards every byte both ways; once ``drop_next_script_reply()`` is called, the next
    EVALSHA/EVAL is passed on, Redis' reply to it is awaited and thrown away, and the connection
    is closed on both sides: the script ran, the client never hears of it."""

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.port = 0
        self.dropped = asyncio.Event()  # set once a reply was thrown away
        self._armed = False
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def drop_next_script_reply(self) -> None:
        self._armed = True
        self.dropped.clear()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            await self._pump(client_r, client_w)
        finally:
            self._handlers.discard(handler)

    async def _pump(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        redis_r, redis_w = await asyncio.open_connection(HOST, self.redis_port)

        swallowing = False  # the next bytes from Redis are the reply to drop

        async def upstream() -> None:
            nonlocal swallowing
            while data := await client_r.read(65536):
                if self._armed and (b"EVALSHA" in data or b"EVAL\r\n" in data):
                    self._armed, swallowing = False, True
                redis_w.write(data)
                await redis_w.drain()

        async def downstream() -> None:
            while data := await redis_r.read(65536):
                if swallowing:  # the script ran: its reply goes nowhere, the connection ends
                    self.dropped.set()
                    return
                client_w.write(data)
                await client_w.drain()

        pumps = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when the proxy stops: every socket it opened is closed
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for writer in (client_w, redis_w):  # both first: a cancelled wait skips no close
                writer.close()
            for writer in (client_w, redis_w):
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ReplyDroppingProxy]:
        self._server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            self._server.close()
            for handler in list(self._handlers):
                handler.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()
