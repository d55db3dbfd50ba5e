"""A write whose body stops arriving is answered 408 and changes nothing."""

from __future__ import annotations

import asyncio
import time

from .conftest import ClientFactory, get_state


async def test_a_body_that_stops_arriving_gets_408_in_time_and_changes_nothing(
    make_client: ClientFactory,
) -> None:
    client = await make_client(body_read_timeout=1.0)
    assert client.server.host is not None and client.server.port is not None
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        started = time.monotonic()
        writer.write(
            b"PUT /api/tasks/slow HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n"
            b'{"status": '  # ... and nothing more, with the connection left open
        )
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), timeout=5)
        waited = time.monotonic() - started
    finally:
        writer.close()
    assert status_line.startswith(b"HTTP/1.1 408"), status_line
    assert 0.9 <= waited < 3
    assert (await get_state(client, "slow"))["version"] == 0
