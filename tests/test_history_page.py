"""The task page's history list (web/static/history.js) in Debian's Chromium, against a real server.

The server keeps 3 changes per task (``--history-length 3``), so the page also shows the trimming.
Every wait is on a condition with a deadline.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, expect

from deploy.cluster import Instance
from tests.browser import (
    browser_fixture,  # noqa: F401 (the `browser` fixture)
    open_board,
    put_task,
    screenshot,
    task,
)

HISTORY_LENGTH = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    workdir: Path = tmp_path_factory.mktemp("history-page")
    args = ["--poll-timeout", "3", "--history-length", str(HISTORY_LENGTH)]
    instance = Instance(workdir, "history-page", extra_args=args)
    instance.start()
    yield instance
    instance.stop()


async def test_task_page_lists_the_last_changes_newest_first_and_follows_new_ones(
    browser: Browser, server: Instance
) -> None:
    await put_task(server.url, "hist-build", status="in_progress", progress=10, message="compiling")
    await put_task(server.url, "hist-build", progress=70, message="linking")
    page = await open_board(browser, server.url, "/tasks/hist-build")
    items = page.locator("#history .history-entry")
    await expect(items).to_have_count(2)
    await expect(items.first).to_have_attribute("data-version", "2")
    await expect(items.first.locator('[data-part="message"]')).to_have_text("linking")
    await expect(items.first.locator('[data-part="progress"]')).to_have_text("70%")
    await expect(items.last.locator('[data-part="status"]')).to_have_text("in progress")
    await expect(page.locator("#history-note")).to_be_hidden()

    # Live: each change the page learns of shows on top; past HISTORY_LENGTH the oldest goes.
    await put_task(server.url, "hist-build", status="completed", progress=100, message="done")
    await expect(task(page, "hist-build", "status")).to_have_value("completed")
    await expect(items.first).to_have_attribute("data-version", "3")
    await put_task(server.url, "hist-build", message="archived")
    await expect(items.first).to_have_attribute("data-version", "4")
    await expect(items).to_have_count(HISTORY_LENGTH)
    versions = [await item.get_attribute("data-version") for item in await items.all()]
    assert versions == ["4", "3", "2"]
    await screenshot(page, "task_history")


async def test_history_shows_markup_in_messages_as_text(browser: Browser, server: Instance) -> None:
    hostile = '<img src=x onerror="window.pwned = 1"><b>bold</b><script>window.pwned = 2</script>'
    await put_task(server.url, "hist-hostile", status="failed", message=hostile)
    page = await open_board(browser, server.url, "/tasks/hist-hostile")
    message = page.locator('#history .history-entry [data-part="message"]')
    await expect(message).to_have_text(hostile)
    assert await page.locator("#history img, #history b, #history script").count() == 0
    assert await page.evaluate("window.pwned === undefined")


async def test_a_task_never_written_says_it_has_no_history(
    browser: Browser, server: Instance
) -> None:
    page = await open_board(browser, server.url, "/tasks/hist-never")
    await expect(page.locator("#history-note")).to_have_text("No changes yet.")
    await expect(page.locator("#history .history-entry")).to_have_count(0)

    await put_task(server.url, "hist-never", status="in_progress")
    await expect(page.locator("#history .history-entry")).to_have_count(1)
    await expect(page.locator("#history-note")).to_be_hidden()
