"""Abuse and exposure, over real HTTP: CORS, the write rate limit, header size, slow clients, and
the headers that keep the page from being framed, sniffed or made to run someone else's script.

The slow-client tests open thousands of real sockets that trickle a request header byte by byte,
against an instance directly and through nginx with the repo's config, and time a normal request
meanwhile. Their pace is bounded: a few rounds of one byte per socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections.abc import AsyncIterator, Iterator
from html.parser import HTMLParser
from typing import Any

import aiohttp
import pytest
from aiohttp import ClientResponse

from deploy.cluster import Cluster, running_cluster
from service.config import Config
from service.ratelimit import WriteLimiter

from .conftest import SECRET, Client, ClientFactory, bearer, get_state, token

ORIGIN = "https://board.example"
JSON = {"Content-Type": "application/json"}


# --- CORS -------------------------------------------------------------------------------------


def preflight(client: Client, origin: str, method: str = "PUT") -> Any:
    return client.options(
        "/api/tasks/x",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )


async def test_by_default_no_origin_is_allowed(client: Client) -> None:
    response = await client.get("/api/tasks/x", headers={"Origin": ORIGIN})
    assert response.status == 200
    assert "Access-Control-Allow-Origin" not in response.headers
    answer = await preflight(client, ORIGIN)
    assert answer.status == 405
    assert "Access-Control-Allow-Origin" not in answer.headers


async def test_an_allowed_origin_may_read_and_write_with_a_token_header(
    make_client: ClientFactory,
) -> None:
    client = await make_client(cors_origins=(ORIGIN, "http://localhost:3000"))
    answer = await preflight(client, ORIGIN)
    assert answer.status == 200
    assert answer.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "PUT" in answer.headers["Access-Control-Allow-Methods"]
    allowed = {h.strip().lower() for h in answer.headers["Access-Control-Allow-Headers"].split(",")}
    assert allowed >= {"authorization", "content-type"}
    assert "Access-Control-Allow-Credentials" not in answer.headers  # tokens, never cookies

    response = await client.put(
        "/api/tasks/x", json={"progress": 1}, headers={"Origin": "http://localhost:3000"}
    )
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    exposed = set(response.headers["Access-Control-Expose-Headers"].split(","))
    assert exposed >= {"X-Served-By", "ETag", "Retry-After", "WWW-Authenticate"}


async def test_another_origin_gets_no_cors_answer(make_client: ClientFactory) -> None:
    client = await make_client(cors_origins=(ORIGIN,))
    answer = await preflight(client, "https://evil.example")
    assert answer.status == 403
    assert "Access-Control-Allow-Origin" not in answer.headers
    response = await client.get("/api/tasks/x", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in response.headers
    page = await client.get("/", headers={"Origin": ORIGIN})
    assert "Access-Control-Allow-Origin" not in page.headers  # only the API is shared


async def test_with_auth_on_preflight_needs_no_token_and_a_401_is_readable_cross_origin(
    make_client: ClientFactory,
) -> None:
    client = await make_client(cors_origins=(ORIGIN,), auth_secret=SECRET)
    assert (await preflight(client, ORIGIN)).status == 200
    refused = await client.put("/api/tasks/x", json={"progress": 1}, headers={"Origin": ORIGIN})
    assert refused.status == 401
    assert refused.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "WWW-Authenticate" in refused.headers["Access-Control-Expose-Headers"]


@pytest.mark.parametrize(
    "origin", ["board.example", "https://board.example/", "https://board.example/x", "null", ""]
)
def test_malformed_cors_origin_is_refused(origin: str) -> None:
    with pytest.raises(ValueError, match="CORS origin"):
        Config(cors_origins=(origin,))


# --- write rate limit -------------------------------------------------------------------------


async def write(client: Client, task: str = "rl", **headers: str) -> ClientResponse:
    return await client.put(f"/api/tasks/{task}", json={"progress": 1}, headers=headers)


async def assert_rate_limited(response: ClientResponse, retry_after: int) -> None:
    assert response.status == 429, await response.text()
    assert response.headers["Retry-After"] == str(retry_after)
    assert (await response.json())["error"]["code"] == "rate_limited"


async def test_writes_past_the_burst_get_429_with_retry_after_and_change_nothing(
    make_client: ClientFactory,
) -> None:
    client = await make_client(write_rate_limit=0.5, write_rate_burst=3)
    for _ in range(3):
        assert (await write(client)).status == 200
    await assert_rate_limited(await write(client), retry_after=2)  # 1 write / 0.5 per s
    await assert_rate_limited(await write(client, "other"), retry_after=2)  # per client, not task
    posted = await client.post("/api/update-status", json={"progress": 2})
    await assert_rate_limited(posted, retry_after=2)
    assert (await get_state(client, "rl"))["version"] == 3
    assert (await get_state(client, "other"))["version"] == 0
    for _ in range(20):  # reads are never limited
        assert (await client.get("/api/tasks/rl")).status == 200


async def test_a_limited_client_may_write_again_once_its_bucket_refills(
    make_client: ClientFactory,
) -> None:
    client = await make_client(write_rate_limit=10, write_rate_burst=1)
    assert (await write(client)).status == 200
    await assert_rate_limited(await write(client), retry_after=1)
    statuses: list[int] = []

    async def retry() -> None:
        statuses.append((await write(client)).status)

    deadline = time.monotonic() + 2
    while statuses[-1:] != [200]:
        assert time.monotonic() < deadline, f"still refused after 2 s: {statuses}"
        await retry()
    assert (await get_state(client, "rl"))["version"] == 2


async def test_each_token_subject_has_its_own_bucket(make_client: ClientFactory) -> None:
    client = await make_client(auth_secret=SECRET, write_rate_limit=0.1, write_rate_burst=2)
    alice_1, alice_2 = (
        bearer(token("tasks:write", subject="alice")),
        bearer(token("tasks:write", subject="alice")),
    )
    assert (await write(client, **alice_1)).status == 200
    assert (await write(client, **alice_2)).status == 200  # a second token of hers: same bucket
    await assert_rate_limited(await write(client, **alice_1), retry_after=10)
    assert (await write(client, **bearer(token("tasks:write", subject="bob")))).status == 200
    # Refused before the limiter: a request without a valid token spends nobody's writes.
    for _ in range(5):
        assert (await write(client)).status == 401


async def test_without_trusted_proxies_x_forwarded_for_is_ignored(
    make_client: ClientFactory,
) -> None:
    client = await make_client(write_rate_limit=0.1, write_rate_burst=1)
    assert (await write(client, **{"X-Forwarded-For": "203.0.113.1"})).status == 200
    spoofed = await write(client, **{"X-Forwarded-For": "203.0.113.2"})
    await assert_rate_limited(spoofed, retry_after=10)


async def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_bucket(
    make_client: ClientFactory,
) -> None:
    client = await make_client(
        write_rate_limit=0.1, write_rate_burst=1, trusted_proxies=("127.0.0.0/8", "10.0.0.9")
    )
    assert (await write(client, **{"X-Forwarded-For": "203.0.113.1"})).status == 200
    await assert_rate_limited(
        await write(client, **{"X-Forwarded-For": "203.0.113.1"}), retry_after=10
    )
    # A client cannot pick its address by sending the header itself: the proxy appends the
    # address it saw, and that one counts. Trusted hops (10.0.0.9) are looked through.
    forged = await write(client, **{"X-Forwarded-For": "198.51.100.7, 203.0.113.1, 10.0.0.9"})
    await assert_rate_limited(forged, retry_after=10)
    assert (await write(client, **{"X-Forwarded-For": "203.0.113.2"})).status == 200


def test_token_bucket_spends_a_burst_then_refills_at_the_rate() -> None:
    now = [100.0]
    limiter = WriteLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5)
    assert limiter.take("b") == 0.0  # another client: a full bucket of its own
    now[0] += 0.25
    assert limiter.take("a") == pytest.approx(0.25)  # half a write earned; refusals cost nothing
    now[0] += 0.25
    assert limiter.take("a") == 0.0
    now[0] += 60
    assert [limiter.take("a") for _ in range(4)][-1] == pytest.approx(0.5)  # capped at the burst


def test_token_bucket_forgets_the_least_recently_seen_clients_past_its_cap() -> None:
    now = [0.0]
    limiter = WriteLimiter(rate=1.0, burst=1, max_clients=2, clock=lambda: now[0])
    for client in ("a", "b"):
        limiter.take(client)
    assert limiter.take("a") > 0  # seen again: the most recent now
    limiter.take("c")  # "b" is forgotten
    assert limiter.take("a") > 0
    assert limiter.take("b") == 0.0


@pytest.mark.parametrize(
    ("settings", "why"),
    [
        ({"write_rate_limit": -1}, "WRITE_RATE_LIMIT"),
        ({"write_rate_burst": 0}, "WRITE_RATE_BURST"),
        ({"trusted_proxies": ("10.0.0.0/33",)}, "TRUSTED_PROXIES"),
        ({"trusted_proxies": ("proxy.local",)}, "TRUSTED_PROXIES"),
        ({"max_header_bytes": 100}, "MAX_HEADER_BYTES"),
        ({"keepalive_timeout": 0}, "KEEPALIVE_TIMEOUT"),
    ],
)
def test_unusable_limit_settings_are_refused(settings: dict[str, Any], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        Config(**settings)


# --- header size ------------------------------------------------------------------------------


async def raw_exchange(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """Send ``request`` on a fresh connection and read the answer until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(timeout):
            return await reader.read(65536)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def request_with(path: str = "/api/tasks/x", header_value: str = "ok") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: t\r\nX-Pad: {header_value}\r\nConnection: close\r\n\r\n"
    ).encode()


@pytest.mark.parametrize(("limit", "fits", "too_long"), [(8190, 8000, 8300), (2048, 1900, 2200)])
async def test_header_and_request_line_longer_than_the_cap_are_refused_with_400(
    make_client: ClientFactory, limit: int, fits: int, too_long: int
) -> None:
    client = await make_client(max_header_bytes=limit)
    port = client.server.port
    assert port is not None
    ok = await raw_exchange(port, request_with(header_value="a" * fits))
    assert ok.startswith(b"HTTP/1.1 200 "), ok[:200]
    for request in (
        request_with(header_value="a" * too_long),
        request_with(path="/api/tasks/x?pad=" + "a" * too_long),
    ):
        answer = await raw_exchange(port, request)
        assert answer.startswith(b"HTTP/1.0 400 "), answer[:200]
        assert f"Got more than {limit} bytes".encode() in answer
    assert (await client.get("/api/tasks/x")).status == 200  # the server serves on


# --- slow clients (slowloris) -----------------------------------------------------------------

SLOW_CLIENTS = 2000
TRICKLE_ROUNDS = 3
TRICKLE_INTERVAL = 1.0  # seconds between two header bytes of one slow client
PROMPT = 1.0  # seconds a normal request may take meanwhile
BATCH = 64  # slow clients that connect at once


@pytest.fixture(scope="module", autouse=True)
def enough_open_files() -> None:
    """Each slow client is two sockets here (its end and the server's)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 3 * SLOW_CLIENTS + 1000
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.fail(f"the open file limit ({hard}) is below the {needed} this test needs")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


class SlowClients:
    """Sockets that each started a request and send one more header byte per round, never done."""

    def __init__(self) -> None:
        self.streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def open(self, port: int, count: int, path: str = "/api/tasks/x") -> None:
        async def one() -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\nX-Slow: ".encode())
            self.streams.append((reader, writer))

        # In batches smaller than the listen backlog (128 by default): past it the kernel drops
        # connection attempts and the client retries only a second later.
        for start in range(0, count, BATCH):
            await asyncio.gather(*(one() for _ in range(min(BATCH, count - start))))

    async def trickle(self) -> None:
        """One more header byte from each slow client the server has not closed."""
        open_writers = [writer for reader, writer in self.streams if not _closed(reader)]
        for writer in open_writers:
            writer.write(b"a")
        await asyncio.gather(*(writer.drain() for writer in open_writers), return_exceptions=True)

    def closed_by_server(self) -> int:
        return sum(1 for reader, _ in self.streams if _closed(reader))

    async def close(self) -> None:
        for _, writer in self.streams:
            writer.close()
        for _, writer in self.streams:
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


def _closed(reader: asyncio.StreamReader) -> bool:
    """The server closed the connection: an end of stream, or a reset."""
    return reader.at_eof() or reader.exception() is not None


@pytest.fixture
async def slow_clients() -> AsyncIterator[SlowClients]:
    clients = SlowClients()
    yield clients
    await clients.close()


async def timed_get(url: str) -> float:
    """Seconds a GET on a new connection takes to be answered 200."""
    started = time.monotonic()
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        await response.read()
    return time.monotonic() - started


async def assert_served_promptly_while_trickling(slow: SlowClients, url: str) -> list[float]:
    times = []
    for _ in range(TRICKLE_ROUNDS):
        await slow.trickle()
        times.append(await timed_get(url))
        await asyncio.sleep(TRICKLE_INTERVAL)  # the slow clients' pace, not a wait for a result
    assert max(times) < PROMPT, f"normal requests took {times} s with {SLOW_CLIENTS} slow clients"
    return times


async def test_thousands_of_slow_header_clients_do_not_delay_a_normal_request(
    client: Client, slow_clients: SlowClients
) -> None:
    port = client.server.port
    assert port is not None
    await slow_clients.open(port, SLOW_CLIENTS)
    await assert_served_promptly_while_trickling(slow_clients, f"http://127.0.0.1:{port}/healthz")
    # They were all held by the server the whole time: the attack was real.
    assert slow_clients.closed_by_server() == 0
    runner = client.server.runner
    assert runner is not None and runner.server is not None
    assert len(runner.server.connections) >= SLOW_CLIENTS


async def test_a_client_that_never_finishes_its_headers_is_cut_off_at_the_keepalive_timeout(
    make_client: ClientFactory, slow_clients: SlowClients
) -> None:
    client = await make_client(keepalive_timeout=1)
    port = client.server.port
    assert port is not None
    await slow_clients.open(port, 3)
    started = time.monotonic()
    while slow_clients.closed_by_server() < 3:
        assert time.monotonic() - started < 5, "slow clients still connected after 5 s"
        await slow_clients.trickle()  # still sending: being active does not extend the deadline
        await asyncio.sleep(0.2)
    # A held poll is not idle: the keep-alive timeout never cuts it.
    poll = await client.get("/api/tasks/x/poll?since=0&timeout=2")
    assert poll.status == 204


@pytest.fixture(scope="module")
def nginx_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("security-cluster"), instances=1) as cluster:
        yield cluster


NGINX_HEADER_TIMEOUT = 10  # client_header_timeout in deploy/nginx/nginx.conf


async def test_slow_header_clients_through_nginx_do_not_delay_others_and_are_cut_off(
    nginx_cluster: Cluster, slow_clients: SlowClients
) -> None:
    opened = time.monotonic()
    await slow_clients.open(nginx_cluster.nginx.port, SLOW_CLIENTS)
    url = f"{nginx_cluster.url}/api/tasks/x"
    await assert_served_promptly_while_trickling(slow_clients, url)
    assert slow_clients.closed_by_server() == 0
    # nginx gives the whole header client_header_timeout, however busy the client keeps it.
    while slow_clients.closed_by_server() < SLOW_CLIENTS:
        elapsed = time.monotonic() - opened
        assert elapsed < NGINX_HEADER_TIMEOUT + 5, (
            f"{SLOW_CLIENTS - slow_clients.closed_by_server()} slow clients still connected"
        )
        await slow_clients.trickle()
        await asyncio.sleep(0.5)  # their pace
    assert time.monotonic() - opened >= NGINX_HEADER_TIMEOUT - 1
    assert await timed_get(url) < PROMPT


async def test_nginx_refuses_oversized_headers_with_a_json_error(nginx_cluster: Cluster) -> None:
    port = nginx_cluster.nginx.port
    for request, status in (
        (request_with(header_value="a" * 9000), b"400"),
        (request_with(path="/api/tasks/x?pad=" + "a" * 9000), b"414"),
    ):
        answer = await raw_exchange(port, request)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 " + status), head
        assert b"application/json" in head and b'"code"' in body, answer[:500]
        assert b"nosniff" in head


async def test_metrics_are_served_by_each_instance_but_not_through_nginx(
    nginx_cluster: Cluster,
) -> None:
    """The public entry point hides the instances' counts; the scraper reaches the instances."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{nginx_cluster.url}/metrics") as hidden:
            assert hidden.status == 404
            assert hidden.headers["X-Content-Type-Options"] == "nosniff"
            assert (await hidden.json())["error"]["code"] == "not_found"
        async with http.get(f"{nginx_cluster.instances[0].url}/metrics") as scraped:
            assert scraped.status == 200
            assert "taskstatus_held_polls" in await scraped.text()


# --- security headers -------------------------------------------------------------------------


def policy(response: ClientResponse) -> dict[str, list[str]]:
    directives = response.headers["Content-Security-Policy"].split(";")
    parsed = (d.split() for d in directives if d.strip())
    return {name: values for name, *values in parsed}


@pytest.mark.parametrize("path", ["/", "/tasks/build-42"])
async def test_pages_forbid_inline_script_framing_sniffing_and_referrers(
    client: Client, path: str
) -> None:
    response = await client.get(path)
    assert response.status == 200 and response.content_type == "text/html"
    csp = policy(response)
    assert csp["default-src"] == ["'none'"]
    assert csp["script-src"] == ["'self'"]  # no 'unsafe-inline', no 'unsafe-eval', no hosts
    assert csp["style-src"] == ["'self'"]
    assert csp["connect-src"] == ["'self'"]
    assert csp["frame-ancestors"] == ["'none'"]
    assert csp["base-uri"] == ["'none'"]
    assert "unsafe" not in response.headers["Content-Security-Policy"]
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert response.headers["X-Content-Type-Options"] == "nosniff"


class InlineCode(HTMLParser):
    """Collects what a CSP without 'unsafe-inline' would block: inline scripts, handlers, styles."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self.scripts = 0
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {name for name, _ in attrs}
        if tag == "script":
            self.scripts += 1
            self._in_script = True
            if "src" not in names:
                self.found.append("<script> without src")
        if tag == "style":
            self.found.append("<style>")
        self.found += [f"{tag} {name}=" for name in names if name.startswith("on")]
        if "style" in names:
            self.found.append(f"{tag} style=")
        if any(value and value.strip().lower().startswith("javascript:") for _, value in attrs):
            self.found.append(f"{tag} javascript: URL")

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.found.append("inline script text")


@pytest.mark.parametrize("path", ["/", "/tasks/build-42"])
async def test_pages_contain_no_inline_script_or_style(client: Client, path: str) -> None:
    parser = InlineCode()
    parser.feed(await (await client.get(path)).text())
    assert parser.scripts >= 1
    assert parser.found == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/tasks/x"),
        ("GET", "/api/tasks/x/poll?since=0&timeout=1"),
        ("GET", "/api/nowhere"),
        ("DELETE", "/api/tasks/x"),
        ("GET", "/healthz"),
        ("GET", "/static/main.js"),
        ("GET", "/static/app.css"),
        ("GET", "/static/favicon.svg"),
        ("GET", "/static/missing.js"),
    ],
)
async def test_every_answer_is_nosniff_and_nothing_but_a_page_may_run_or_be_framed(
    client: Client, method: str, path: str
) -> None:
    response = await client.request(method, path)
    assert response.status in (200, 204, 404, 405)
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert (
        response.headers["Content-Security-Policy"] == "default-src 'none'; frame-ancestors 'none'"
    )


async def test_refusals_of_auth_and_rate_limit_are_nosniff_too(make_client: ClientFactory) -> None:
    client = await make_client(auth_secret=SECRET, write_rate_limit=0.1, write_rate_burst=1)
    headers = bearer(token("tasks:write", subject="s"))
    responses = [await client.get("/api/tasks/x")]
    responses += [await write(client, **headers) for _ in range(2)]
    assert [r.status for r in responses] == [401, 200, 429]
    assert all(r.headers["X-Content-Type-Options"] == "nosniff" for r in responses)


async def test_the_open_file_limit_is_raised_for_many_held_connections() -> None:
    from service.connections import raise_open_file_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
        assert raise_open_file_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
