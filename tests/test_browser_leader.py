"""One poll per browser, not per tab (web/static/leader.js), in Debian's Chromium.

Tabs are pages of ONE browser context (one browser profile), so they share an origin's Web Locks
and BroadcastChannels, as tabs of one browser do. What counts is observed twice: the /api/watch
requests in flight across every page of the context, and the watches the server holds (/healthz).
Every wait is on a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, BrowserContext, Page, Request, expect

from deploy.cluster import Instance
from tests.browser import (
    RECORDER,
    VIEWPORT,
    browser_fixture,  # noqa: F401 (the `browser` fixture)
    go_live,
    history,
    is_watch,
    put_task,
    screenshot,
    task,
)

from .conftest import SECRET, token, wait_until

POLL_TIMEOUT = 3  # short holds: the leader also goes through 204 answers and re-polls
TABS = 6
# Keeps a page's one thread busy for ``ms`` milliseconds: it handles no message, timer or answer.
HANG = "(ms) => { const end = Date.now() + ms; while (Date.now() < end) {} }"
HANG_MS = 10_000
# A page that answers "ping" on a channel of the test's own, while it runs at all.
ANSWER_PINGS = """() => {
  const channel = new BroadcastChannel("test-ping");
  channel.onmessage = () => channel.postMessage("pong");
}"""
# True when no page answers a ping within ``ms`` milliseconds.
PING = """(ms) => new Promise((resolve) => {
  const channel = new BroadcastChannel("test-ping");
  const unanswered = setTimeout(() => { channel.close(); resolve(true); }, ms);
  channel.onmessage = () => { clearTimeout(unanswered); channel.close(); resolve(false); };
  channel.postMessage("ping");
})"""


def start_instance(workdir: Path, name: str, env: dict[str, str] | None = None) -> Instance:
    args = ["--poll-timeout", str(POLL_TIMEOUT), "--shutdown-timeout", "2"]
    instance = Instance(workdir, name, extra_args=args, env=env)
    instance.start()
    return instance


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    instance = start_instance(tmp_path_factory.mktemp("leader"), "leader-test")
    yield instance
    instance.stop()


@pytest.fixture
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    """One browser profile: its tabs share Web Locks and BroadcastChannels."""
    context = await browser.new_context(viewport=VIEWPORT)
    await context.add_init_script(RECORDER)
    yield context
    await context.close()


class Watches:
    """The /api/watch requests of every page of a context: those in flight, and who sent them."""

    def __init__(self, context: BrowserContext) -> None:
        self.started: set[Request] = set()
        self.sent: list[tuple[float, Page]] = []
        context.on("request", self._started)
        # A hold ends when the server answers: the next request may start before the browser
        # reports the (empty) 204 finished.
        context.on("response", lambda response: self._ended(response.request))
        context.on("requestfinished", self._ended)
        context.on("requestfailed", self._ended)

    def _started(self, request: Request) -> None:
        if is_watch(request):
            self.started.add(request)
            self.sent.append((time.monotonic(), request.frame.page))

    def _ended(self, request: Request) -> None:
        self.started.discard(request)

    @property
    def in_flight(self) -> set[Request]:
        """Requests not answered yet, of pages still open (a closed page reports no end)."""
        return {request for request in self.started if not request.frame.page.is_closed()}

    def pages(self) -> set[Page]:
        return {request.frame.page for request in self.in_flight}


def _put_with_token(url: str, task_id: str, token: str, update: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{url}/api/tasks/{task_id}",
        data=json.dumps(update).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        method="PUT",
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        state: dict[str, Any] = json.load(response)
        return state


def _held_watches(url: str) -> int:
    with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
        held: int = json.load(response)["waiting"]["watches"]
        return held


async def role(page: Page) -> str | None:
    return await page.locator("#connection").get_attribute("data-poll")


async def unanswered_ping(page: Page, within_ms: int) -> bool:
    """True when the page that answers pings (ANSWER_PINGS) did not answer one from ``page``."""
    answered: bool = await page.evaluate(PING, within_ms)
    return answered


async def leaders(pages: list[Page]) -> list[Page]:
    return [page for page in pages if await role(page) == "leader"]


async def roles_are(pages: list[Page], expected: list[str]) -> bool:
    return sorted([await role(page) or "" for page in pages]) == expected


async def one_poll_between(pages: list[Page], watches: Watches, server_url: str) -> Page:
    """Wait until one tab leads, the others follow, and ONE watch is in flight (and held by the
    server), sent by the leader; return the leader."""

    seen: list[object] = []

    async def settled() -> bool:
        roles = sorted([await role(page) or "" for page in pages])
        held = await asyncio.to_thread(_held_watches, server_url)
        seen[:] = [roles, len(watches.in_flight), held]
        expected = ["follower"] * (len(pages) - 1) + ["leader"]
        return roles == expected and len(watches.in_flight) == 1 and held == 1

    await wait_until(
        settled,
        10,
        lambda: (
            f"one leader, {len(pages) - 1} followers, one watch; roles, in flight, held: {seen}"
        ),
        interval=0.05,
    )
    (leader,) = await leaders(pages)
    assert watches.pages() == {leader}
    return leader


async def open_tabs(context: BrowserContext, url: str, count: int) -> list[Page]:
    return [await go_live(await context.new_page(), url) for _ in range(count)]


async def all_show(pages: list[Page], task_id: str, state: dict[str, Any]) -> None:
    """Every tab shows ``state``, and never showed the task going back in time on the way."""
    for page in pages:
        await expect(task(page, task_id, "version")).to_have_text(str(state["version"]))
        await expect(task(page, task_id, "status")).to_have_value(state["status"])
        versions = [int(shown.rsplit("|", 1)[1]) for shown in await history(page, task_id)]
        assert versions == sorted(versions), versions


async def test_six_tabs_of_one_browser_hold_one_watch_and_all_follow_a_change(
    context: BrowserContext, server: Instance
) -> None:
    await put_task(server.url, "shared-1", status="pending")
    watches = Watches(context)
    tabs = await open_tabs(context, f"{server.url}/", TABS)
    leader = await one_poll_between(tabs, watches, server.url)

    written = await put_task(server.url, "shared-1", status="in_progress", progress=40)
    await all_show(tabs, "shared-1", written)
    # Through the leader's re-polls after 204s too: still one request for the six tabs.
    async with context.expect_event("request", is_watch, timeout=(POLL_TIMEOUT + 5) * 1000):
        pass
    assert await one_poll_between(tabs, watches, server.url) is leader
    written = await put_task(server.url, "shared-1", status="completed", progress=100)
    await all_show(tabs, "shared-1", written)
    for tab in tabs:
        await expect(tab.locator("#connection")).to_have_attribute("data-state", "live")
    await screenshot(tabs[-1], "leader_six_tabs")


async def test_closing_the_leader_tab_hands_the_poll_to_another_within_a_second(
    context: BrowserContext, server: Instance
) -> None:
    await put_task(server.url, "shared-2", status="pending")
    watches = Watches(context)
    tabs = await open_tabs(context, f"{server.url}/", TABS)
    leader = await one_poll_between(tabs, watches, server.url)

    closed_at = time.monotonic()
    await leader.close()
    rest = [tab for tab in tabs if tab is not leader]
    await wait_until(
        lambda: any(at > closed_at for at, _ in watches.sent),
        10,
        "a watch from another tab",
        interval=0.05,
    )
    taken_after = min(at for at, _ in watches.sent if at > closed_at) - closed_at
    assert taken_after < 1.0, taken_after
    successor = await one_poll_between(rest, watches, server.url)
    assert successor is not leader

    written = await put_task(server.url, "shared-2", status="failed", message="after handover")
    await all_show(rest, "shared-2", written)
    for tab in rest:
        await expect(task(tab, "shared-2", "message")).to_have_text("after handover")

    # And once more: the second leader closes too, the four left follow the next change.
    await successor.close()
    rest = [tab for tab in rest if tab is not successor]
    await one_poll_between(rest, watches, server.url)
    written = await put_task(server.url, "shared-2", status="completed")
    await all_show(rest, "shared-2", written)
    await screenshot(rest[0], "leader_handover")


async def test_a_leader_that_does_not_answer_is_replaced_and_follows_once_it_does(
    context: BrowserContext, server: Instance
) -> None:
    await put_task(server.url, "shared-3", status="pending")
    watches = Watches(context)
    tabs = await open_tabs(context, f"{server.url}/", 3)
    leader = await one_poll_between(tabs, watches, server.url)
    others = [tab for tab in tabs if tab is not leader]
    # The leader's page hangs (as a frozen or busy tab does): it runs nothing for a while.
    await leader.evaluate(ANSWER_PINGS)
    # It runs: it answers (a round trip through the browser, which two busy cores may delay
    # well past half a second; a page that runs nothing never answers at all).
    assert not await unanswered_ping(others[1], 10_000)
    hang = asyncio.create_task(leader.evaluate(HANG, HANG_MS))
    await wait_until(lambda: unanswered_ping(others[1], 1000), 10, "the leader hung", interval=0.05)

    # A follower seen again asks the leader for a fresh snapshot; a hung one cannot answer.
    await others[0].evaluate("document.dispatchEvent(new Event('visibilitychange'))")
    await wait_until(
        lambda: roles_are(others, ["follower", "leader"]),
        10,
        "a follower taking the lead",
        interval=0.05,
    )
    written = await put_task(server.url, "shared-3", status="in_progress", progress=5)
    await all_show(others, "shared-3", written)
    assert not hang.done()  # all that while, the old leader ran nothing

    await hang
    new_leader = await one_poll_between(tabs, watches, server.url)
    assert new_leader is not leader
    assert await role(leader) == "follower"
    await all_show(tabs, "shared-3", written)
    written = await put_task(server.url, "shared-3", status="completed", progress=100)
    await all_show(tabs, "shared-3", written)


async def test_tabs_with_different_tokens_do_not_share_a_poll(
    browser: Browser, tmp_path_factory: pytest.TempPathFactory
) -> None:
    env = {"AUTH_SECRET": SECRET, "AUTH_PUBLIC_READS": "true"}
    instance = start_instance(tmp_path_factory.mktemp("leader-auth"), "leader-auth", env)
    context = await browser.new_context(viewport=VIEWPORT)
    await context.add_init_script(RECORDER)
    try:
        raw = token("tasks:read", "tasks:write", ttl=600)
        watches = Watches(context)
        anonymous = await open_tabs(context, f"{instance.url}/", 2)
        with_token = await open_tabs(context, f"{instance.url}/#token={raw}", 2)
        await expect(with_token[0].locator("#token-state")).to_be_visible()
        # Two groups: the tabs without a token share one watch, those with the token another.
        for group in (anonymous, with_token):
            await wait_until(
                functools.partial(roles_are, group, ["follower", "leader"]),
                10,
                "a leader and a follower in each group",
                interval=0.05,
            )
        await wait_until(
            lambda: len(watches.in_flight) == 2, 10, "two watches in flight", interval=0.05
        )
        assert await asyncio.to_thread(_held_watches, instance.url) == 2
        (anonymous_leader,) = await leaders(anonymous)
        (token_leader,) = await leaders(with_token)
        sent_by = {request.frame.page: request for request in watches.in_flight}
        assert set(sent_by) == {anonymous_leader, token_leader}
        assert "authorization" not in await sent_by[anonymous_leader].all_headers()
        token_headers = await sent_by[token_leader].all_headers()
        assert token_headers["authorization"] == f"Bearer {raw}"

        written = await asyncio.to_thread(
            _put_with_token, instance.url, "shared-4", raw, {"status": "in_progress"}
        )
        await all_show([*anonymous, *with_token], "shared-4", written)
    finally:
        await context.close()
        instance.stop()
