"""An optional limit on writes: a token bucket per token subject, or per client address.

Each client may write ``burst`` times at once, then ``rate`` times a second; past that a write gets
429 with ``Retry-After`` and changes nothing. The buckets live in this instance (behind nginx with N
instances a client gets up to N times the rate), and only the most recently seen clients keep one:
a forgotten client starts again with a full bucket, as one that had paused would.

The client address is the peer's, unless the peer is a trusted proxy (``TRUSTED_PROXIES``): then it
is the last address in ``X-Forwarded-For`` that is not a trusted proxy, so a client cannot pick its
own address by sending the header itself.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from .auth import GRANT
from .config import Config
from .errors import ApiError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_CLIENTS = 10_000  # buckets kept; the least recently seen client is forgotten past it
_READS = frozenset({"GET", "HEAD", "OPTIONS"})


class WriteLimiter:
    """Token buckets: ``burst`` writes at once, refilled at ``rate`` per second."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_clients: int = MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, when

    def take(self, client: str) -> float:
        """Spend one write of ``client``'s: 0 if it may write now, else the seconds to wait."""
        now = self._clock()
        tokens, then = self._buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate
        self._buckets[client] = (tokens, now)  # most recently seen last
        while len(self._buckets) > self._max_clients:
            self._buckets.popitem(last=False)
        return wait


def client_address(request: web.Request, trusted: Sequence[IPNetwork]) -> str:
    """The address of whoever sent ``request``, looking through trusted proxies only."""
    peer = request.remote or ""
    if not trusted or not _is_trusted(peer, trusted):
        return peer
    hops = [
        hop.strip()
        for header in request.headers.getall("X-Forwarded-For", [])
        for hop in header.split(",")
        if hop.strip()
    ]
    for hop in reversed(hops):
        if not _is_trusted(hop, trusted):
            return hop
    return hops[0] if hops else peer


def _is_trusted(address: str, trusted: Sequence[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def rate_limit_middleware(limiter: WriteLimiter, trusted: Sequence[IPNetwork]) -> Middleware:
    @web.middleware
    async def limit_writes(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method not in _READS and request.path.startswith("/api/"):
            grant = request.get(GRANT)
            if grant is not None and grant.subject:
                client = f"sub:{grant.subject}"
            else:
                client = f"addr:{client_address(request, trusted)}"
            wait = limiter.take(client)
            if wait > 0:
                seconds = max(1, math.ceil(wait))
                raise ApiError(
                    429,
                    "rate_limited",
                    f"too many writes; retry in {seconds} s",
                    headers={"Retry-After": str(seconds)},
                )
        return await handler(request)

    return limit_writes


def setup_rate_limit(app: web.Application, config: Config) -> None:
    """Install the write limit, after authentication so it counts per subject; 0 means none."""
    if config.write_rate_limit > 0:
        limiter = WriteLimiter(config.write_rate_limit, config.write_rate_burst)
        app.middlewares.append(rate_limit_middleware(limiter, config.trusted_networks))
