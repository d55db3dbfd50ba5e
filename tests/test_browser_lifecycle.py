"""Deletion and expiry as people see them: tabs of the board and a task page in Debian's Chromium,
through nginx, in front of three instances and a real redis-server (deploy/cluster.py).

Finished tasks expire after 2 s here (``FINISHED_TASK_TTL=2``, sweeps every 100 ms). A card's
removal is timed by the tab's own clock (``removed_at``) against the deletion: the one sent, or,
for an expiry, the tombstone's ``updated_at`` (Redis' clock, on the same machine).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime

import pytest
from playwright.async_api import Browser, Dialog, Page, expect

from deploy.cluster import Cluster, running_cluster
from tests.browser import (
    browser_fixture,  # noqa: F401 (the `browser` fixture)
    delete_task,
    go_live,
    new_tab,
    open_board,
    put_task,
    removed_at,
    screenshot,
    task,
)

TABS = 3
SECOND_MS = 1000


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    args = ["--finished-task-ttl", "2", "--sweep-interval", "0.1"]
    with running_cluster(tmp_path_factory.mktemp("lifecycle"), instance_args=args) as running:
        yield running


async def boards_showing(browser: Browser, cluster: Cluster, task_id: str) -> list[Page]:
    tabs = [await open_board(browser, cluster.url) for _ in range(TABS)]
    for tab in tabs:
        await expect(task(tab, task_id)).to_have_count(1)
    return tabs


async def test_a_task_deleted_through_the_api_leaves_every_tab_within_a_second(
    browser: Browser, cluster: Cluster
) -> None:
    await put_task(cluster.url, "deleted-1", status="in_progress", progress=30)
    tabs = await boards_showing(browser, cluster, "deleted-1")
    sent = time.time() * 1000
    tombstone = await delete_task(cluster.url, "deleted-1")
    assert tombstone["deleted"] is True
    for tab in tabs:
        await expect(task(tab, "deleted-1")).to_have_count(0, timeout=5000)
        delay = await removed_at(tab, "deleted-1") - sent
        assert delay < SECOND_MS, f"a tab removed the card {delay:.0f} ms after the deletion"
    await screenshot(tabs[0], "deleted")


async def test_a_finished_task_that_expires_leaves_every_tab_within_a_second(
    browser: Browser, cluster: Cluster
) -> None:
    await put_task(cluster.url, "expiring-1", status="in_progress")
    tabs = await boards_showing(browser, cluster, "expiring-1")
    finished = await put_task(cluster.url, "expiring-1", status="completed")
    for tab in tabs:
        await expect(task(tab, "expiring-1", "status")).to_have_value("completed")
    for tab in tabs:
        await expect(task(tab, "expiring-1")).to_have_count(0, timeout=10_000)
    tombstone = await (await tabs[0].request.get(f"{cluster.url}/api/tasks/expiring-1")).json()
    assert tombstone["deleted"] is True and tombstone["version"] == finished["version"] + 1
    expired = datetime.fromisoformat(tombstone["updated_at"]).timestamp() * 1000
    for tab in tabs:
        delay = await removed_at(tab, "expiring-1") - expired
        assert delay < SECOND_MS, f"a tab removed the card {delay:.0f} ms after the expiry"


async def test_the_delete_button_asks_first_then_the_page_and_every_board_see_it_go(
    browser: Browser, cluster: Cluster
) -> None:
    # (in progress: a finished task would expire during the test)
    await put_task(cluster.url, "doomed", status="in_progress", message="broken build")
    boards = await boards_showing(browser, cluster, "doomed")
    page = await go_live(await new_tab(browser), f"{cluster.url}/tasks/doomed")
    await expect(task(page, "doomed", "status")).to_have_value("in_progress")
    questions: list[str] = []

    async def answer(dialog: Dialog, accept: bool) -> None:
        questions.append(dialog.message)
        await (dialog.accept() if accept else dialog.dismiss())

    page.once("dialog", lambda dialog: answer(dialog, accept=False))
    await page.locator("#delete-task").click()
    await expect(page.locator("#delete-task")).to_be_enabled()
    assert len(questions) == 1 and "doomed" in questions[0]
    await expect(task(page, "doomed")).to_have_count(1)  # dismissed: nothing deleted

    page.once("dialog", lambda dialog: answer(dialog, accept=True))
    await page.locator("#delete-task").click()
    await expect(page.locator("#task-deleted")).to_be_visible()
    await expect(page.locator("#task-deleted")).to_have_text("This task was deleted.")
    await expect(task(page, "doomed")).to_have_count(0)
    await expect(page.locator("#delete-task")).to_be_disabled()
    for board in boards:
        await expect(task(board, "doomed")).to_have_count(0)
    await screenshot(page, "task_deleted")

    # Created again from the board: the page shows it again, at the version after the tombstone.
    await boards[0].locator("#create-id").fill("doomed")
    await boards[0].locator("#create-form button").click()
    await expect(task(page, "doomed", "version")).to_have_text("3")
    await expect(page.locator("#task-deleted")).to_be_hidden()
    for board in boards:
        await expect(task(board, "doomed", "version")).to_have_text("3")
