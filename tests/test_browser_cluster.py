"""The seed's manual test plan, automated: several tabs of the board in Debian's Chromium, through
nginx, in front of three service instances and a real redis-server (deploy/cluster.py).

Every tab is a page in its own browser context, so it holds its own connections and nginx
(least_conn) spreads the tabs over the instances. Tests that kill an instance or stop Redis run a
cluster of their own; the others share the module's and use their own task ids. Every wait is on a
condition with a deadline. Each scenario saves a screenshot of the board under test-artifacts/.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Dialog, Locator, Page, Request, expect

from deploy.cluster import Cluster, Instance, running_cluster
from tests.browser import (
    WatchCount,
    browser_fixture,  # noqa: F401 (the `browser` fixture)
    connection_states,
    go_live,
    history,
    is_watch,
    is_write,
    new_tab,
    now_ms,
    open_board,
    put_task,
    screenshot,
    sent_at,
    shown_as,
    shown_since,
    shown_within,
    task,
)

from .conftest import wait_until

REDIS_OUTAGE = 5.0  # seconds Redis stays down in the outage scenario
# After a fault the page retries with jittered backoff (capped at 15 s) and nginx counts a failed
# instance out for 5 s: the longest a tab may take to be live again once the fault is gone.
RECOVERY_MS = 40_000


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("browser-cluster")) as running:
        yield running


async def open_tabs(browser: Browser, cluster: Cluster, count: int) -> list[Page]:
    """``count`` live boards through nginx, opened one after the other as a person would."""
    return [await open_board(browser, cluster.url) for _ in range(count)]


def connection(page: Page) -> Locator:
    return page.locator("#connection")


def _held_watches(instances: Iterable[Instance]) -> int:
    total = 0
    for app in instances:
        with urllib.request.urlopen(f"{app.url}/healthz", timeout=2) as response:
            total += json.load(response)["waiting"]["watches"]
    return total


async def held_watches(instances: Iterable[Instance]) -> int:
    """How many watches the instances hold right now: one per open tab, when all is well."""
    return await asyncio.to_thread(_held_watches, list(instances))


async def until_held(instances: Iterable[Instance], count: int) -> None:
    apps = list(instances)

    async def held() -> bool:
        return await held_watches(apps) == count

    await wait_until(held, 10.0, f"{count} watches held on the instances", interval=0.05)


async def write(cluster: Cluster, task_id: str, **update: Any) -> dict[str, Any]:
    """PUT through nginx as a program would. nginx never retries a write; its own 502 means it sent
    the write to no instance (the one it picked just died, or it still counts every instance out
    after a fault), so that answer, and only that one, is worth another try."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return await put_task(cluster.url, task_id, **update)
        except urllib.error.HTTPError as error:
            if error.code != 502 or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.1)


# --- 1. several tabs, one change ---------------------------------------------------------------


async def test_status_changed_in_one_of_five_tabs_shows_in_the_others_within_a_second(
    browser: Browser, cluster: Cluster
) -> None:
    await write(cluster, "s1-deploy", status="in_progress", progress=40, message="rolling out")
    first, *others = await open_tabs(browser, cluster, 5)
    for tab in [first, *others]:
        await expect(task(tab, "s1-deploy", "status")).to_have_value("in_progress")
    await until_held(cluster.instances, 5)  # every tab is following: its second is the change's

    async with first.expect_response(is_write):  # (its timing entry exists once it is done)
        await task(first, "s1-deploy", "status").select_option("completed")
    for tab in others:
        await expect(task(tab, "s1-deploy", "status")).to_have_value("completed")
    # Within a second of the choice, timed by the tabs' own clocks (from the moment the first
    # one sent its write to the moment each other one showed it), not by how often Playwright
    # looks: on two busy cores its checks can be half a second apart.
    sent = await sent_at(first, "/api/tasks/s1-deploy")
    delays = [await shown_since(tab, "s1-deploy", "completed") - sent for tab in others]
    assert max(delays) < 1000, f"shown after {delays} ms"

    await expect(task(first, "s1-deploy", "status")).to_have_value("completed")
    await expect(task(first, "s1-deploy", "error")).to_be_hidden()
    for tab in others:
        await expect(task(tab, "s1-deploy")).to_have_attribute("data-status", "completed")
    served = {await tab.locator("#served-by").text_content() for tab in [first, *others]}
    assert served <= {app.instance_id for app in cluster.instances}
    assert len(served) > 1, f"every tab served by {served}"
    await screenshot(others[-1], "cluster_five_tabs")


# --- 2. a program reports progress ------------------------------------------------------------


async def test_progress_reported_through_the_api_shows_in_every_tab_step_by_step(
    browser: Browser, cluster: Cluster
) -> None:
    states = [await write(cluster, "s2-encode", status="pending", message="queued")]
    tabs = await open_tabs(browser, cluster, 3)
    steps: list[dict[str, Any]] = [
        {"status": "in_progress", "progress": 10, "message": "downloading"},
        {"progress": 50, "message": "encoding"},
        {"progress": 100, "message": "uploading"},
        {"status": "completed", "message": "done"},
    ]
    for step in steps:
        asked = now_ms()
        states.append(await write(cluster, "s2-encode", **step))
        for tab in tabs:  # within a second of the write, by the tab's clock
            delay = await shown_within(tab, "s2-encode", states[-1], asked)
            assert delay < 1000, f"step {len(states) - 1} shown after {delay:.0f} ms"

    for tab in tabs:  # each step shown, in order, none skipped or repeated
        assert await history(tab, "s2-encode") == [shown_as(state) for state in states]
        await expect(task(tab, "s2-encode", "progress")).to_have_attribute("aria-valuenow", "100")
        await expect(task(tab, "s2-encode", "message")).to_have_text("done")
    await screenshot(tabs[0], "cluster_progress")


# --- 3. close and reopen ----------------------------------------------------------------------


async def test_closed_tabs_release_their_request_and_reopened_tabs_show_the_current_state_at_once(
    browser: Browser, cluster: Cluster
) -> None:
    await write(cluster, "s3-import", status="pending")
    kept, *closing = await open_tabs(browser, cluster, 3)
    await until_held(cluster.instances, 3)
    for tab in closing:
        await tab.context.close()
    await until_held(cluster.instances, 1)  # nginx ends the closed tabs' requests on the instances

    await write(cluster, "s3-import", status="in_progress", progress=60, message="rows 6000")
    latest = await write(cluster, "s3-import", status="failed", message="row 7311: bad date")
    await expect(task(kept, "s3-import", "version")).to_have_text(str(latest["version"]))

    for _ in closing:
        reopened = await open_board(browser, cluster.url)
        # Live means its first answer is shown: the current state, and nothing before it.
        assert await history(reopened, "s3-import") == [shown_as(latest)]
    await until_held(cluster.instances, 3)
    await screenshot(reopened, "cluster_reopened")


# --- 4. offline and back ----------------------------------------------------------------------


async def test_tab_offline_shows_reconnecting_and_the_latest_state_within_2s_of_coming_back(
    browser: Browser, cluster: Cluster
) -> None:
    before = await write(cluster, "s4-backup", status="pending")
    offline, bystander = await open_tabs(browser, cluster, 2)

    await offline.context.set_offline(True)
    await expect(connection(offline)).to_have_attribute("data-state", "reconnecting")
    await write(cluster, "s4-backup", status="in_progress", progress=30, message="copying")
    latest = await write(cluster, "s4-backup", status="completed", progress=100, message="12 GB")
    await expect(task(bystander, "s4-backup", "version")).to_have_text(str(latest["version"]))
    await expect(connection(offline)).to_have_attribute("data-state", "reconnecting")
    assert await history(offline, "s4-backup") == [shown_as(before)]  # it really was cut off
    await screenshot(offline, "cluster_offline")

    await offline.context.set_offline(False)
    await expect(task(offline, "s4-backup", "version")).to_have_text(
        str(latest["version"]), timeout=2000
    )
    await expect(task(offline, "s4-backup", "status")).to_have_value("completed")
    await expect(task(offline, "s4-backup", "message")).to_have_text("12 GB")
    await expect(connection(offline)).to_have_attribute("data-state", "live")
    await screenshot(offline, "cluster_back_online")


# --- 5. an instance dies ----------------------------------------------------------------------


async def test_instance_killed_under_open_tabs_they_move_to_the_others_and_converge(
    browser: Browser, tmp_path: Path
) -> None:
    with running_cluster(tmp_path) as cluster:
        await write(cluster, "s5-rollout", status="in_progress", progress=20)
        tabs = await open_tabs(browser, cluster, 5)
        await until_held(cluster.instances, 5)
        held = {app.instance_id: await held_watches([app]) for app in cluster.instances}
        victim = max(cluster.instances, key=lambda app: held[app.instance_id])
        survivors = [app for app in cluster.instances if app is not victim]
        assert held[victim.instance_id] >= 1, held

        victim.kill()
        # The requests it held are cut; nginx passes each one (a GET) on to another instance.
        await until_held(survivors, 5)
        latest = await write(
            cluster, "s5-rollout", status="completed", progress=100, message="all hosts"
        )

        for tab in tabs:
            await expect(task(tab, "s5-rollout", "version")).to_have_text(str(latest["version"]))
            await expect(task(tab, "s5-rollout", "status")).to_have_value("completed")
            await expect(connection(tab)).to_have_attribute("data-state", "live")
            await expect(tab.locator("#served-by")).not_to_have_text(victim.instance_id)
            assert "error" not in await connection_states(tab)
        await screenshot(tabs[0], "cluster_instance_killed")


# --- 6. Redis goes away -----------------------------------------------------------------------


@pytest.mark.timeout(90)  # a 5 s outage, then up to RECOVERY_MS of the tabs' backoff
async def test_redis_outage_shows_in_tabs_refuses_a_write_visibly_and_tabs_recover(
    browser: Browser, tmp_path: Path
) -> None:
    # Short holds: the tabs ask again every 2 s during the outage, so they meet it (and say so).
    with running_cluster(
        tmp_path, durable_redis=True, instance_args=["--poll-timeout", "2"]
    ) as cluster:
        before = await write(cluster, "s6-report", status="in_progress", progress=30)
        tabs = await open_tabs(browser, cluster, 3)
        writer = tabs[0]

        stopped = time.monotonic()
        cluster.redis.stop()
        for tab in tabs:
            await expect(connection(tab)).to_have_attribute(
                "data-state", "reconnecting", timeout=10_000
            )
        await task(writer, "s6-report", "status").select_option("completed")
        error = task(writer, "s6-report", "error")
        await expect(error).to_be_visible()
        # The service's own 503 reaches the page through nginx, not a generic proxy error.
        await expect(error).to_contain_text("Not saved: the service cannot reach its data store")
        await expect(task(writer, "s6-report", "status")).to_have_value("in_progress")
        await screenshot(writer, "cluster_redis_down")
        # The outage lasts REDIS_OUTAGE seconds whatever the tabs do meanwhile: this is the fault's
        # length, not a wait for something to settle.
        await asyncio.sleep(max(0.0, REDIS_OUTAGE - (time.monotonic() - stopped)))
        cluster.redis.start()  # same port, same append-only file

        for tab in tabs:
            await expect(connection(tab)).to_have_attribute(
                "data-state", "live", timeout=RECOVERY_MS
            )
            # The state outlived the restart, and the refused write was not applied after all.
            await expect(task(tab, "s6-report", "version")).to_have_text(str(before["version"]))
            await expect(task(tab, "s6-report", "status")).to_have_value("in_progress")
        latest = await write(cluster, "s6-report", status="completed", progress=100)
        assert latest["version"] == before["version"] + 1
        for tab in tabs:
            await expect(task(tab, "s6-report", "version")).to_have_text(str(latest["version"]))
            await expect(task(tab, "s6-report", "status")).to_have_value("completed")
            assert "error" not in await connection_states(tab)
        await expect(error).to_contain_text("Not saved")  # still says what happened
        await screenshot(writer, "cluster_redis_back")


# --- 7. a busy board --------------------------------------------------------------------------


async def test_board_of_thirty_tasks_holds_one_request_per_tab_and_shows_new_tasks_everywhere(
    browser: Browser, cluster: Cluster
) -> None:
    ids = [f"s7-job-{n:02d}" for n in range(1, 31)]
    statuses = ["pending", "in_progress", "completed", "failed", "cancelled"]
    for n, task_id in enumerate(ids):
        await write(cluster, task_id, status=statuses[n % 5], progress=n * 3)
    tabs: list[Page] = []
    watches: list[WatchCount] = []
    other_reads: list[str] = []  # any other API read would be a request per task

    def note_other_read(request: Request) -> None:
        if "/api/" in request.url and request.method == "GET" and not is_watch(request):
            other_reads.append(request.url)

    for _ in range(3):
        tab = await new_tab(browser)
        watches.append(WatchCount(tab))
        tab.on("request", note_other_read)
        tabs.append(await go_live(tab, f"{cluster.url}/"))
    for tab in tabs:
        await expect(tab.locator('[data-task^="s7-"]')).to_have_count(30)
    await until_held(cluster.instances, 3)

    creator = tabs[0]
    await creator.locator("#create-id").fill("s7-new-release")
    await creator.locator("#create-status").select_option("in_progress")
    await creator.locator("#create-form button[type=submit]").click()
    for tab in tabs:  # no reload: the tabs' watches bring it
        await expect(task(tab, "s7-new-release", "status")).to_have_value(
            "in_progress", timeout=2000
        )
        await expect(tab.locator('[data-task^="s7-"]')).to_have_count(31)
    await expect(creator.locator("#create-error")).to_be_hidden()
    changes = 1

    for task_id in ids[:5]:
        state = await write(cluster, task_id, status="completed", progress=100)
        changes += 1
        for tab in tabs:
            await expect(task(tab, task_id, "version")).to_have_text(str(state["version"]))

    await until_held(cluster.instances, 3)  # each tab waits again, on one request
    for count in watches:

        def one_in_flight(count: WatchCount = count) -> bool:
            return len(count.in_flight) == 1

        await wait_until(one_in_flight, 10.0, "one watch in flight", interval=0.05)
        assert count.most == 1
        # A snapshot, then at most one request per change: nothing per task.
        assert 2 <= count.sent <= 2 + changes, count.sent
    assert other_reads == []
    await screenshot(tabs[1], "cluster_thirty_tasks")


# --- 8. hostile content -----------------------------------------------------------------------


async def test_message_with_script_and_html_shows_as_text_in_every_tab(
    browser: Browser, cluster: Cluster
) -> None:
    hostile = (
        '<script>window.pwned = "script"</script>'
        "<img src=x onerror=\"window.pwned = 'img'\"><b>bold</b> & <i>it</i>"
    )
    await write(cluster, "s8-hostile", status="failed", message=hostile)
    tabs = await open_tabs(browser, cluster, 3)
    dialogs: list[str] = []

    def note_dialog(dialog: Dialog) -> None:
        dialogs.append(dialog.message)

    for tab in tabs:
        tab.on("dialog", note_dialog)
        await expect(task(tab, "s8-hostile", "message")).to_have_text(hostile)  # the snapshot
    await write(cluster, "s8-hostile", message=f"again: {hostile}")

    for tab in tabs:
        message = task(tab, "s8-hostile", "message")
        await expect(message).to_have_text(f"again: {hostile}")  # a watch answer
        assert await message.locator("*").count() == 0
        assert await tab.locator("#board script, #board img").count() == 0
        assert await tab.evaluate("window.pwned") is None
    assert dialogs == []
    await screenshot(tabs[0], "cluster_hostile_message")
