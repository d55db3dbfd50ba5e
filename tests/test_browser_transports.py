"""The board on each transport (?transport=longpoll|sse|ws), in Debian's Chromium, through nginx in
front of three instances on a real redis-server: the browser issue's scenario 1 on all three, then
what the streaming clients must survive (going offline, an instance killed under them).

Every tab is a page in its own browser context, so it holds its own connections and nginx spreads
the tabs over the instances. Every wait is on a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, Request, WebSocket, expect

from deploy.cluster import Cluster, Instance, running_cluster
from tests.browser import (
    browser_fixture,  # noqa: F401 (the `browser` fixture)
    connection_states,
    go_live,
    history,
    is_write,
    new_tab,
    now_ms,
    put_task,
    screenshot,
    sent_at,
    shown_as,
    shown_since,
    shown_within,
    task,
)

from .conftest import SECRET, token, wait_until

TRANSPORTS = ["longpoll", "sse", "ws"]
STREAMING = ["sse", "ws"]
LABELS = {"longpoll": "long polling", "sse": "Server-Sent Events", "ws": "WebSocket"}
READ, WRITE = "tasks:read", "tasks:write"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("transports-cluster")) as running:
        yield running


class Traffic:
    """What a tab asked the API for: each request's path, and each WebSocket opened."""

    def __init__(self, page: Page) -> None:
        self.paths: list[str] = []
        self.sockets: list[WebSocket] = []
        page.on("request", self._requested)
        page.on("websocket", self._opened)

    def _requested(self, request: Request) -> None:
        self.paths.append(request.url.split("?")[0])

    def _opened(self, socket: WebSocket) -> None:
        self.sockets.append(socket)

    def used(self, fragment: str) -> bool:
        return any(fragment in path for path in self.paths)


async def open_board(browser: Browser, cluster: Cluster, transport: str) -> tuple[Page, Traffic]:
    page = await new_tab(browser)
    traffic = Traffic(page)
    await go_live(page, f"{cluster.url}/?transport={transport}")
    return page, traffic


def assert_used_only(traffic: Traffic, transport: str) -> None:
    """The tab followed the board over its transport, and over nothing else."""
    assert traffic.used("/api/watch") == (transport == "longpoll"), traffic.paths
    assert traffic.used("/api/events") == (transport == "sse"), traffic.paths
    assert bool(traffic.sockets) == (transport == "ws")
    assert all(socket.url.endswith("/api/ws") for socket in traffic.sockets)


def _held(instances: Iterable[Instance]) -> int:
    total = 0
    for app in instances:
        with urllib.request.urlopen(f"{app.url}/healthz", timeout=2) as response:
            total += json.load(response)["waiting"]["watches"]
    return total


async def until_held(instances: Iterable[Instance], count: int, timeout: float = 10.0) -> None:
    """Wait until the instances hold ``count`` board followers (watches, streams, sockets)."""
    apps = list(instances)
    held: list[int] = []

    async def reached() -> bool:
        held[:] = [await asyncio.to_thread(_held, apps)]
        return held == [count]

    await wait_until(reached, timeout, lambda: f"{held} board followers held, not {count}")


# --- scenario 1, on every transport -----------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_status_changed_in_one_of_five_tabs_shows_in_the_others_within_a_second(
    browser: Browser, cluster: Cluster, transport: str
) -> None:
    task_id = f"t1-{transport}"
    await put_task(cluster.url, task_id, status="in_progress", progress=40, message="rolling out")
    opened = [await open_board(browser, cluster, transport) for _ in range(5)]
    tabs = [page for page, _ in opened]
    for tab in tabs:
        shown = tab.locator("#transport")
        await expect(shown).to_have_attribute("data-transport", transport)
        await expect(shown).to_have_text(LABELS[transport])
        await expect(task(tab, task_id, "status")).to_have_value("in_progress")
    await until_held(cluster.instances, 5)  # every tab is following: its second is the change's

    first, *others = tabs
    async with first.expect_response(is_write):  # (its timing entry exists once it is done)
        await task(first, task_id, "status").select_option("completed")
    for tab in others:
        await expect(task(tab, task_id, "status")).to_have_value("completed")
    # Within a second of the choice, timed by the tabs' own clocks (see the cluster test).
    sent = await sent_at(first, f"/api/tasks/{task_id}")
    delays = [await shown_since(tab, task_id, "completed") - sent for tab in others]
    assert max(delays) < 1000, f"shown after {delays} ms"

    await expect(task(first, task_id, "status")).to_have_value("completed")
    await expect(task(first, task_id, "error")).to_be_hidden()
    for tab in others:
        await expect(task(tab, task_id)).to_have_attribute("data-status", "completed")
    for _, traffic in opened:
        assert_used_only(traffic, transport)
    served = {await tab.locator("#served-by").text_content() for tab in tabs}
    assert served <= {app.instance_id for app in cluster.instances}
    assert len(served) > 1, f"every tab served by {served}"
    await screenshot(others[-1], f"transport_{transport}_five_tabs")


# --- the streaming clients: reconnect, back off, resync ---------------------------------------


@pytest.mark.parametrize("transport", STREAMING)
async def test_task_page_follows_its_task_step_by_step(
    browser: Browser, cluster: Cluster, transport: str
) -> None:
    task_id = f"t2-{transport}"
    states = [await put_task(cluster.url, task_id, status="pending", message="queued")]
    page = await new_tab(browser)
    traffic = Traffic(page)
    await go_live(page, f"{cluster.url}/tasks/{task_id}?transport={transport}")
    for step in ({"status": "in_progress", "progress": 10}, {"progress": 70}, {"progress": 100}):
        asked = now_ms()
        states.append(await put_task(cluster.url, task_id, **step))
        delay = await shown_within(page, task_id, states[-1], asked)  # by the tab's clock
        assert delay < 1000, f"step {len(states) - 1} shown after {delay:.0f} ms"
    assert await history(page, task_id) == [shown_as(state) for state in states]
    if transport == "sse":
        assert traffic.used(f"/api/tasks/{task_id}/events")
    else:
        assert traffic.sockets
    assert not traffic.used("/poll") and not traffic.used("/api/watch")


@pytest.mark.parametrize("transport", STREAMING)
async def test_tab_offline_shows_reconnecting_and_the_latest_state_within_2s_of_coming_back(
    browser: Browser, cluster: Cluster, transport: str
) -> None:
    task_id = f"t4-{transport}"
    before = await put_task(cluster.url, task_id, status="pending")
    offline, _ = await open_board(browser, cluster, transport)
    bystander, _ = await open_board(browser, cluster, transport)

    await offline.context.set_offline(True)
    await expect(offline.locator("#connection")).to_have_attribute("data-state", "reconnecting")
    await put_task(cluster.url, task_id, status="in_progress", progress=30)
    latest = await put_task(cluster.url, task_id, status="completed", progress=100, message="ok")
    await expect(task(bystander, task_id, "version")).to_have_text(str(latest["version"]))
    assert await history(offline, task_id) == [shown_as(before)]  # it really was cut off

    await offline.context.set_offline(False)
    await expect(task(offline, task_id, "version")).to_have_text(
        str(latest["version"]), timeout=2000
    )
    await expect(task(offline, task_id, "message")).to_have_text("ok")
    await expect(offline.locator("#connection")).to_have_attribute("data-state", "live")
    await screenshot(offline, f"transport_{transport}_back_online")


@pytest.mark.parametrize("transport", STREAMING)
async def test_instance_killed_under_open_tabs_they_reconnect_to_the_others_and_converge(
    browser: Browser, tmp_path: Path, transport: str
) -> None:
    with running_cluster(tmp_path) as cluster:
        task_id = f"t5-{transport}"
        await put_task(cluster.url, task_id, status="in_progress", progress=20)
        tabs = [(await open_board(browser, cluster, transport))[0] for _ in range(5)]
        await until_held(cluster.instances, 5)
        held = {app.instance_id: await asyncio.to_thread(_held, [app]) for app in cluster.instances}
        victim = max(cluster.instances, key=lambda app: held[app.instance_id])
        survivors = [app for app in cluster.instances if app is not victim]
        assert held[victim.instance_id] >= 1, held

        victim.kill()
        # Its streams are cut; each tab backs off, reconnects through nginx to a survivor and
        # resumes from the last event it had.
        await until_held(survivors, 5, timeout=20)
        latest = await put_task(
            cluster.url, task_id, status="completed", progress=100, message="all hosts"
        )
        for tab in tabs:
            await expect(task(tab, task_id, "version")).to_have_text(str(latest["version"]))
            await expect(task(tab, task_id, "status")).to_have_value("completed")
            await expect(tab.locator("#connection")).to_have_attribute("data-state", "live")
            await expect(tab.locator("#served-by")).not_to_have_text(victim.instance_id)
            assert "error" not in await connection_states(tab)
        await screenshot(tabs[0], f"transport_{transport}_instance_killed")


async def test_unknown_transport_falls_back_to_long_polling(
    browser: Browser, cluster: Cluster
) -> None:
    page, traffic = await open_board(browser, cluster, "carrier-pigeon")
    await expect(page.locator("#transport")).to_have_attribute("data-transport", "longpoll")
    assert_used_only(traffic, "longpoll")


# --- with tokens required: the streams carry the tab's token too -----------------------------


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    instance = Instance(
        tmp_path_factory.mktemp("transports-auth"), "transports-auth", env={"AUTH_SECRET": SECRET}
    )
    instance.start()
    yield instance
    instance.stop()


def _put_with_token(url: str, update: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(update).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token(WRITE)}"},
        method="PUT",
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        state: dict[str, Any] = json.load(response)
        return state


@pytest.mark.parametrize("transport", STREAMING)
async def test_stream_with_the_tab_token_goes_live_and_without_one_asks_for_it(
    browser: Browser, secured: Instance, transport: str
) -> None:
    task_id = f"auth-{transport}"
    url = f"{secured.url}/api/tasks/{task_id}"
    await asyncio.to_thread(_put_with_token, url, {"status": "pending"})
    page = await new_tab(browser)
    await go_live(page, f"{secured.url}/?transport={transport}#token={token(READ)}")
    latest = await asyncio.to_thread(_put_with_token, url, {"status": "completed"})
    await expect(task(page, task_id, "version")).to_have_text(str(latest["version"]))
    await expect(page.locator("#served-by")).to_have_text("transports-auth")

    if transport == "sse":  # a refused stream says why (a refused WebSocket handshake cannot)
        anonymous = await new_tab(browser)
        await anonymous.goto(f"{secured.url}/?transport=sse")
        await expect(anonymous.locator("#connection")).to_have_attribute("data-state", "error")
        await expect(anonymous.locator("#auth")).to_have_attribute("data-status", "401")


# --- a quiet board stays connected ------------------------------------------------------------

QUIET_HEARTBEAT = 0.3  # seconds: the client calls a connection dead after three quiet ones


@pytest.fixture(scope="module")
def quick_heartbeat(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    instance = Instance(
        tmp_path_factory.mktemp("transports-heartbeat"),
        "transports-heartbeat",
        extra_args=["--stream-heartbeat", str(QUIET_HEARTBEAT)],
    )
    instance.start()
    yield instance
    instance.stop()


@pytest.mark.parametrize("transport", STREAMING)
async def test_quiet_stream_stays_on_one_connection_over_many_heartbeats(
    browser: Browser, quick_heartbeat: Instance, transport: str
) -> None:
    page = await new_tab(browser)
    traffic = Traffic(page)
    # What arrives on the tab's stream: chunks of the event stream, or text messages on the socket.
    streams: set[str] = set()
    arrivals: list[str] = []

    def requested(event: dict[str, Any]) -> None:
        if event["request"]["url"].split("?")[0].endswith("/api/events"):
            streams.add(event["requestId"])

    def chunk(event: dict[str, Any]) -> None:
        if event["requestId"] in streams:
            arrivals.append("chunk")

    def frame(event: dict[str, Any]) -> None:
        if event["response"]["opcode"] == 1:
            arrivals.append(event["response"]["payloadData"])

    cdp = await page.context.new_cdp_session(page)
    cdp.on("Network.requestWillBeSent", requested)
    cdp.on("Network.dataReceived", chunk)
    cdp.on("Network.webSocketFrameReceived", frame)
    await cdp.send("Network.enable")
    await go_live(page, f"{quick_heartbeat.url}/?transport={transport}")
    # Ten heartbeats (SSE comments, or pongs to the page's pings): over three times the silence
    # after which the page would call the connection dead and open another.
    await wait_until(lambda: len(arrivals) >= 10, 30, lambda: f"ten heartbeats: {arrivals}")
    assert await connection_states(page) == ["connecting", "live"]
    if transport == "sse":
        assert sum(path.endswith("/api/events") for path in traffic.paths) == 1, traffic.paths
    else:
        assert len(traffic.sockets) == 1
    state = await put_task(quick_heartbeat.url, "quiet", status="completed")
    await expect(task(page, "quiet", "version")).to_have_text(str(state["version"]))
