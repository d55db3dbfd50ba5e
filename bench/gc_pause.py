"""What a garbage collection costs with N long polls held: the pauses ``service/runtime.py`` plans.

``python -m bench.gc_pause [N ...]``: the service (embedded backend, the fast path as
``FAST_POLL`` says) runs in this process; a child process opens N keep-alive connections, each
with a poll held. Then, in the server's loop, with the collector's automatic runs off as in the
server: the objects the collector tracks per held poll; a young collection with every
connection's objects still young (what a burst of new connections would cost without
``GcPolicy.young_limit``); a young collection once they are frozen (what one costs in the steady
state); and a full one, unfrozen (``runtime.collect(2)``). Each is a pause of the event loop.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import socket
import sys
import time

from aiohttp import web

from service.app import create_app
from service.config import Config
from service.connections import raise_open_file_limit
from service.fastpoll import PollRunner
from service.keys import HUB
from service.runtime import install_event_loop


def hold_polls(port: int, count: int, opened: multiprocessing.synchronize.Event) -> None:
    """Child process: ``count`` connections, each with a poll held, until killed."""
    raise_open_file_limit()
    request = b"GET /api/tasks/gc/poll?since=0&timeout=55 HTTP/1.1\r\nHost: x\r\n\r\n"
    sockets = []
    for _ in range(count):
        connection = socket.create_connection(("127.0.0.1", port))
        connection.sendall(request)
        sockets.append(connection)
    opened.set()
    time.sleep(120)


def timed(action: object) -> float:
    start = time.perf_counter()
    action()  # type: ignore[operator]
    return (time.perf_counter() - start) * 1000


async def measure(count: int) -> None:
    gc.disable()
    fast = os.environ.get("FAST_POLL", "1") != "0"
    app = create_app(Config(instance_id="gc", fast_poll=fast))
    runner = PollRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    gc.collect()
    gc.freeze()
    before = len(gc.get_objects()) + gc.get_freeze_count()
    opened = multiprocessing.get_context("spawn").Event()
    child = multiprocessing.get_context("spawn").Process(
        target=hold_polls, args=(port, count, opened)
    )
    child.start()
    hub = app[HUB]
    while hub.waiting_total < count:  # noqa: ASYNC110 (the hub has no event for a count)
        await asyncio.sleep(0.05)
    if os.environ.get("GC_TYPES"):
        from collections import Counter

        print(Counter(type(o).__name__ for o in gc.get_objects()).most_common(25))
    tracked = len(gc.get_objects()) + gc.get_freeze_count() - before
    young_all = timed(lambda: gc.collect(0))
    gc.freeze()
    young_frozen = timed(lambda: gc.collect(0))
    gc.unfreeze()
    full = timed(lambda: gc.collect(2))
    gc.freeze()
    print(
        f"{count:>6,} polls held, fast path {'on' if fast else 'off'}:"
        f" {tracked / count:.1f} tracked objects per poll;"
        f" young collection {young_all:.1f} ms with every connection young,"
        f" {young_frozen:.1f} ms once they are frozen; full collection {full:.1f} ms",
        flush=True,
    )
    child.kill()
    child.join()
    await runner.cleanup()
    gc.unfreeze()
    gc.enable()


def main() -> None:
    raise_open_file_limit()
    install_event_loop("auto")  # uvloop, as the server
    counts = [int(arg) for arg in sys.argv[1:]] or [1_000, 10_000]
    for count in counts:
        asyncio.run(measure(count))


if __name__ == "__main__":
    main()
