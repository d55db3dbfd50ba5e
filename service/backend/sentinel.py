"""Finding the Redis primary through Sentinel, and following it when Sentinel moves it.

The backend asks ``PrimaryFollower.discover`` for the primary's address before it connects, and
runs ``follow`` beside its subscriber. ``follow`` listens to ``+switch-master`` on one Sentinel at
a time (the next one when it fails), and asks the Sentinels again every ``RECHECK_INTERVAL`` and
whenever the backend reports a failure that may mean the primary moved (``suspect``): a switch
announced while no Sentinel connection was up is caught that way too. A new address goes to
``on_switch``; the backend then moves its connections and its one subscription there, and resyncs
as after any reconnect.

Discovery itself is redis-py's (``redis.asyncio.sentinel.Sentinel.discover_master``): it asks
each Sentinel in turn and accepts a primary only where that Sentinel sees it up and a primary.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio.sentinel import MasterNotFoundError, Sentinel
from redis.exceptions import RedisError

from ..config import Address

log = logging.getLogger(__name__)

RECHECK_INTERVAL = 2.0  # seconds between checks that do not wait for an announcement
SENTINEL_TIMEOUT = 0.5  # seconds for a Sentinel to answer; the next one is asked after it


@dataclass(frozen=True)
class SentinelSettings:
    """Where the Sentinels are and what they call our primary (REDIS_SENTINELS, ...)."""

    addresses: tuple[Address, ...]
    service: str = "taskstatus"
    password: str = ""  # the Sentinels' own (requirepass in sentinel.conf)


class PrimaryFollower:
    def __init__(self, settings: SentinelSettings, on_switch: Callable[[Address], Awaitable[None]]):
        self.settings = settings
        self._on_switch = on_switch
        sentinel_kwargs: dict[str, Any] = {"socket_timeout": SENTINEL_TIMEOUT}
        if settings.password:
            sentinel_kwargs["password"] = settings.password
        self._sentinel = Sentinel(
            list(settings.addresses),
            sentinel_kwargs=sentinel_kwargs,
            socket_timeout=SENTINEL_TIMEOUT,
        )
        self.primary: Address | None = None
        self.switches = 0  # times the primary moved while this instance followed it
        self._suspect = asyncio.Event()

    async def discover(self) -> Address:
        """The primary's address now; MasterNotFoundError when no Sentinel names one."""
        host, port = await self._sentinel.discover_master(self.settings.service)
        return str(host), int(port)

    def suspect(self) -> None:
        """A command failed in a way that may mean the primary moved: check at once."""
        self._suspect.set()

    async def follow(self) -> None:
        """Until cancelled: listen for announcements and check the primary; never dies."""
        listener = asyncio.create_task(self._listen(), name="sentinel-listener")
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._suspect.wait(), RECHECK_INTERVAL)
                self._suspect.clear()
                await self.check()
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    async def check(self) -> None:
        """Ask the Sentinels; hand a primary that moved to ``on_switch``."""
        try:
            address = await self.discover()
        except (MasterNotFoundError, RedisError, OSError) as exc:
            log.warning("no Redis primary from the Sentinels yet: %s", exc)
            return
        if address != self.primary:
            if self.primary is not None:
                self.switches += 1
                log.warning("Redis primary moved: %s:%d -> %s:%d", *self.primary, *address)
            self.primary = address
            await self._on_switch(address)

    async def _listen(self) -> None:
        """``+switch-master`` from one Sentinel at a time; any failure moves to the next."""
        turn = 0
        while True:
            client = self._sentinel.sentinels[turn % len(self._sentinel.sentinels)]
            turn += 1
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe("+switch-master")
                while True:
                    # A hung Sentinel is silent, not failed: the check every RECHECK_INTERVAL
                    # (which asks each Sentinel with a timeout) covers for it meanwhile.
                    message = await pubsub.get_message(timeout=RECHECK_INTERVAL)
                    if message is None:
                        continue
                    # "<service> <old ip> <old port> <new ip> <new port>"
                    data = message["data"] if message["type"] == "message" else b""
                    if data.decode().split(" ", 1)[0] == self.settings.service:
                        self.suspect()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next Sentinel, after a short pause
                log.debug("sentinel listener: %s", exc)
                await asyncio.sleep(0.2)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def close(self) -> None:
        for client in self._sentinel.sentinels:
            with contextlib.suppress(Exception):
                await client.aclose()
