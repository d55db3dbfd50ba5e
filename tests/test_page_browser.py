"""The web page in a real browser (Debian's Chromium driven by Playwright) against a real server.

The server runs as a subprocess on a free port, as in production. Each test uses its own task ids,
so tests sharing the server do not see each other's writes as their own. Every wait is on a
condition with a timeout, never a fixed sleep.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from playwright.async_api import Browser, Route, expect

from deploy.cluster import Instance
from tests.browser import (
    WatchCount,
    browser_fixture,  # noqa: F401 (the `browser` fixture)
    go_live,
    is_snapshot,
    is_watch,
    is_write,
    new_tab,
    now_ms,
    open_board,
    put_task,
    screenshot,
    sent_at,
    shown_since,
    shown_within,
    task,
)

INSTANCE_ID = "browser-test-1"
# Short holds, so the page also goes through 204 answers and re-polls during a test.
POLL_TIMEOUT = 3


@dataclass(frozen=True)
class Server:
    url: str

    async def put(self, task_id: str, **update: Any) -> dict[str, Any]:
        return await put_task(self.url, task_id, **update)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    instance = Instance(
        tmp_path_factory.mktemp("page"),
        INSTANCE_ID,
        extra_args=["--poll-timeout", str(POLL_TIMEOUT), "--shutdown-timeout", "2"],
    )
    instance.start()
    try:
        yield Server(instance.url)
    finally:
        instance.stop()


async def test_status_change_in_one_tab_shows_in_the_other_within_a_second(
    browser: Browser, server: Server
) -> None:
    await server.put("deploy-web", status="in_progress", progress=40, message="rolling out")
    one = await open_board(browser, server.url)
    other = await open_board(browser, server.url)
    await expect(task(other, "deploy-web", "status")).to_have_value("in_progress")

    async with one.expect_response(is_write):  # (its timing entry exists once it is done)
        await task(one, "deploy-web", "status").select_option("completed")

    await expect(task(other, "deploy-web", "status")).to_have_value("completed")
    # Within a second, by the tabs' clocks: from the write one sent to the moment other showed it.
    sent = await sent_at(one, "/api/tasks/deploy-web")
    delay = await shown_since(other, "deploy-web", "completed") - sent
    assert delay < 1000, f"shown after {delay:.0f} ms"
    await expect(task(other, "deploy-web")).to_have_attribute("data-status", "completed")
    await expect(task(one, "deploy-web", "status")).to_have_value("completed")
    await expect(task(one, "deploy-web", "error")).to_be_hidden()
    await expect(other.locator("#served-by")).to_have_text(INSTANCE_ID)
    await screenshot(other, "status_change")


async def test_task_created_in_one_tab_appears_in_the_other(
    browser: Browser, server: Server
) -> None:
    one = await open_board(browser, server.url)
    other = await open_board(browser, server.url)
    count_before = int(await other.locator("#task-count").get_attribute("data-count") or "0")

    await one.locator("#create-id").fill("nightly-backup")
    await one.locator("#create-status").select_option("in_progress")
    await one.locator("#create-form button[type=submit]").click()

    await expect(task(other, "nightly-backup")).to_be_visible(timeout=2000)
    await expect(task(other, "nightly-backup", "status")).to_have_value("in_progress")
    await expect(other.locator("#task-count")).to_have_attribute(
        "data-count", str(count_before + 1)
    )
    # The default task stays first on the board, whatever else is created.
    await expect(other.locator("[data-task]").first).to_have_attribute("data-task", "default")
    await expect(one.locator("#create-error")).to_be_hidden()
    await screenshot(other, "task_created")


async def test_creating_an_existing_task_is_reported_not_overwritten(
    browser: Browser, server: Server
) -> None:
    await server.put("existing-task", status="failed")
    page = await open_board(browser, server.url)

    await page.locator("#create-id").fill("existing-task")
    await page.locator("#create-status").select_option("completed")
    await page.locator("#create-form button[type=submit]").click()

    await expect(page.locator("#create-error")).to_contain_text("already exists")
    await expect(task(page, "existing-task", "status")).to_have_value("failed")
    await screenshot(page, "create_existing")


async def test_message_with_markup_shows_as_literal_text(browser: Browser, server: Server) -> None:
    hostile = "<script>alert(1)</script><b>x</b>"
    await server.put("hostile", status="failed", message=hostile)
    page = await open_board(browser, server.url)
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: dialogs.append(dialog.message))

    message = task(page, "hostile", "message")
    await expect(message).to_have_text(hostile)  # from the snapshot
    await server.put("hostile", message=f"again {hostile}")
    await expect(message).to_have_text(f"again {hostile}")  # from a watch update

    assert await message.locator("b, script").count() == 0
    assert await page.locator("#board script").count() == 0
    assert dialogs == []
    await screenshot(page, "literal_message")


async def test_page_holds_one_watch_request_however_many_tasks(
    browser: Browser, server: Server
) -> None:
    ids = [f"batch-{n}" for n in range(6)]
    for n, task_id in enumerate(ids):
        await server.put(task_id, status="in_progress", progress=n * 20)
    page = await new_tab(browser)
    watches = WatchCount(page)
    await go_live(page, f"{server.url}/")
    for task_id in ids:
        await expect(task(page, task_id)).to_be_visible()

    # Changes to several tasks, each answered on the one watch, then a re-poll.
    for n, task_id in enumerate(ids):
        await server.put(task_id, progress=100 - n)
        await expect(task(page, task_id, "progress")).to_have_attribute(
            "aria-valuenow", str(100 - n)
        )
    # Outlive one hold: nothing changes, the server answers 204 and the page asks again at once.
    wait_ms = (POLL_TIMEOUT + 5) * 1000
    async with (
        page.expect_response(lambda r: is_watch(r.request), timeout=wait_ms) as held,
        page.expect_request(is_watch, timeout=wait_ms) as repoll,
    ):
        pass
    assert (await held.value).status == 204
    assert (await repoll.value).url == (await held.value).url  # the same cursor again
    await expect(page.locator("#connection")).to_have_attribute("data-state", "live")

    assert watches.most == 1
    assert len(watches.in_flight) == 1
    await screenshot(page, "one_watch")


async def test_failed_update_shows_an_error_and_restores_the_selector(
    browser: Browser, server: Server
) -> None:
    await server.put("flaky", status="pending")
    page = await open_board(browser, server.url)

    async def backend_down(route: Route) -> None:
        await route.fulfill(
            status=503,
            headers={"Retry-After": "2", "X-Served-By": INSTANCE_ID},
            content_type="application/json",
            body=json.dumps({"error": {"code": "backend_unavailable", "message": "down"}}),
        )

    await page.route("**/api/tasks/flaky", backend_down)
    await task(page, "flaky", "status").select_option("completed")

    await expect(task(page, "flaky", "error")).to_be_visible()
    await expect(task(page, "flaky", "error")).to_contain_text("Not saved")
    await expect(task(page, "flaky", "status")).to_have_value("pending")
    await screenshot(page, "failed_update")


async def test_version_conflict_shows_an_error_and_the_current_state(
    browser: Browser, server: Server
) -> None:
    await server.put("contested", status="pending")
    page = await open_board(browser, server.url)
    await expect(task(page, "contested", "version")).to_have_text("1")

    # Cut this page's watch (a write elsewhere ends the request it holds; the next ones fail), so
    # it still shows version 1 when another client writes.
    await page.route("**/api/watch*", lambda route: route.abort())
    await server.put("contested-bystander", status="pending")
    await expect(page.locator("#connection")).to_have_attribute("data-state", "reconnecting")
    await server.put("contested", status="failed")
    await task(page, "contested", "status").select_option("completed")

    await expect(task(page, "contested", "error")).to_contain_text("changed elsewhere")
    await expect(task(page, "contested", "status")).to_have_value("failed")
    await screenshot(page, "version_conflict")

    await page.unroute("**/api/watch*")
    await expect(page.locator("#connection")).to_have_attribute(
        "data-state", "live", timeout=20_000
    )
    await expect(task(page, "contested", "status")).to_have_value("failed")


async def test_refused_watch_shows_an_error_until_the_tab_is_visible_again(
    browser: Browser, server: Server
) -> None:
    page = await open_board(browser, server.url)

    async def refused(route: Route) -> None:
        body = {"error": {"code": "invalid_cursor", "message": "since must be a cursor"}}
        await route.fulfill(status=400, content_type="application/json", body=json.dumps(body))

    await page.route("**/api/watch*", refused)
    await server.put("refused-watch", status="pending")  # ends the watch the page holds
    await expect(page.locator("#connection")).to_have_attribute("data-state", "error")
    await expect(page.locator("#connection-detail")).to_contain_text("since must be a cursor")
    await screenshot(page, "watch_refused")
    await page.unroute("**/api/watch*")

    # A 4xx is not retried; the tab becoming visible again starts over with a snapshot.
    async with page.expect_request(is_watch) as next_watch:
        await page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")
    assert is_snapshot(await next_watch.value)
    await expect(page.locator("#connection")).to_have_attribute("data-state", "live")


async def test_tab_visible_again_drops_its_watch_and_resyncs(
    browser: Browser, server: Server
) -> None:
    page = await open_board(browser, server.url)

    async with (
        page.expect_event("requestfailed", is_watch) as aborted,
        page.expect_request(is_snapshot) as snapshot,
    ):
        await page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")

    assert (await aborted.value).failure is not None  # the held request, dropped
    await snapshot.value
    await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    await screenshot(page, "visible_again")


async def test_task_page_follows_its_task(browser: Browser, server: Server) -> None:
    await server.put("single", status="pending", progress=10)
    page = await open_board(browser, server.url, "/tasks/single")
    await expect(task(page, "single", "progress")).to_have_attribute("aria-valuenow", "10")

    asked = now_ms()
    written = await server.put("single", status="in_progress", progress=55, message="halfway")

    delay = await shown_within(page, "single", written, asked)
    assert delay < 1000, f"shown {delay:.0f} ms after the write was sent"
    await expect(task(page, "single", "status")).to_have_value("in_progress")
    await expect(task(page, "single", "message")).to_have_text("halfway")
    await expect(page.locator("[data-task]")).to_have_count(1)
    await screenshot(page, "task_page")
