"""Debian's Chromium driven by Playwright, for the browser tests and the README's screenshot.

The launch settings, the ``browser`` fixture (a test module imports ``browser_fixture``), one
board per browser context, locators for the page's test hooks, a recorder of what a tab showed,
and screenshots under ``test-artifacts/``.
Never a browser download: a missing /usr/bin/chromium fails the run (`make system-packages`).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import (
    Browser,
    Locator,
    Page,
    Request,
    Response,
    ViewportSize,
    async_playwright,
    expect,
)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT: ViewportSize = {"width": 1280, "height": 800}
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

# Installed in every board before its scripts run: records, in order, each state a card showed
# ("status|progress|message|version") and each connection state, so a test can check what a person
# would have seen, not only where the tab ended up.
RECORDER = """
(() => {
  const seen = (window.__seen = {});
  const states = (window.__states = []);
  // "task|status" and "task|#version": when the tab first showed it (epoch ms, the tab's clock)
  const since = (window.__since = {});
  const removed = (window.__removed = {});  // task: when its card last left the board (epoch ms)
  let present = new Set();
  const text = (card, name) => card.querySelector(`[data-field="${name}"]`);
  new MutationObserver(() => {
    const shown = document.querySelectorAll("#board [data-task]");
    const cards = new Set([...shown].map((card) => card.dataset.task));
    for (const id of present) {
      if (!cards.has(id)) removed[id] = performance.timeOrigin + performance.now();
    }
    present = cards;
    const connection = document.getElementById("connection")?.dataset.state;
    if (connection && states.at(-1) !== connection) states.push(connection);
    for (const card of document.querySelectorAll("#board [data-task]")) {
      const shown = [
        card.dataset.status,
        text(card, "progress").dataset.value ?? "",
        text(card, "message").textContent,
        text(card, "version").textContent,
      ].join("|");
      const now = performance.timeOrigin + performance.now();
      since[`${card.dataset.task}|${card.dataset.status}`] ??= now;
      since[`${card.dataset.task}|#${text(card, "version").textContent}`] ??= now;
      const history = (seen[card.dataset.task] ??= []);
      if (history.at(-1) !== shown) history.push(shown);
    }
  }).observe(document, { subtree: true, childList: true, attributes: true, characterData: true });
})();
"""


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        raise RuntimeError(f"{CHROMIUM} not found: run `make system-packages` (apt-get chromium)")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture(name="browser")
async def browser_fixture() -> AsyncIterator[Browser]:
    async with chromium() as launched:
        yield launched


async def new_tab(browser: Browser) -> Page:
    """A blank page in its own browser context (like another browser profile): its own
    connections, so nginx may send it to another instance than the other tabs."""
    context = await browser.new_context(viewport=VIEWPORT)
    await context.add_init_script(RECORDER)
    return await context.new_page()


async def go_live(page: Page, url: str) -> Page:
    """Load ``url`` in ``page`` and wait until its long poll is live."""
    await page.goto(url)
    await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    return page


async def open_board(browser: Browser, base_url: str, path: str = "/") -> Page:
    """The board (or another page of the site) in a new tab, once it is live."""
    return await go_live(await new_tab(browser), f"{base_url}{path}")


def task(page: Page, task_id: str, field: str | None = None) -> Locator:
    card = page.locator(f'[data-task="{task_id}"]')
    return card.locator(f'[data-field="{field}"]') if field else card


def shown_as(state: dict[str, Any]) -> str:
    """How RECORDER writes down a card that shows ``state``."""
    progress = "" if state["progress"] is None else str(state["progress"])
    return f"{state['status']}|{progress}|{state['message'] or ''}|{state['version']}"


async def history(page: Page, task_id: str) -> list[str]:
    """Every state the tab showed for ``task_id``, in order (see RECORDER)."""
    seen: list[str] = await page.evaluate("(id) => window.__seen[id] ?? []", task_id)
    return seen


async def shown_since(page: Page, task_id: str, status: str) -> float:
    """When (epoch ms, the tab's clock) the tab first showed ``task_id`` in ``status``."""
    shown: float | None = await page.evaluate(
        "(key) => window.__since[key] ?? null", f"{task_id}|{status}"
    )
    assert shown is not None, f"the tab never showed {task_id} as {status}"
    return shown


async def version_shown_at(page: Page, task_id: str, version: int) -> float:
    """When (epoch ms, the tab's clock) the tab first showed ``task_id`` at ``version``."""
    return await shown_since(page, task_id, f"#{version}")


async def shown_within(page: Page, task_id: str, state: dict[str, Any], since: float) -> float:
    """Milliseconds from ``since`` (epoch ms, e.g. when a write was sent) until the tab showed
    ``task_id`` at ``state``'s version; waits (Playwright's default timeout) until it does.

    A requirement such as "shown within a second" is timed so, by the tab's own clock, not by how
    often Playwright looks: on two busy cores its checks can be half a second apart."""
    await expect(task(page, task_id, "version")).to_have_text(str(state["version"]))
    return await version_shown_at(page, task_id, state["version"]) - since


def now_ms() -> float:
    """The wall clock in epoch ms, as a tab's ``performance.timeOrigin + now()`` reads it."""
    return time.time() * 1000


async def removed_at(page: Page, task_id: str) -> float:
    """When (epoch ms, the tab's clock) the tab last took ``task_id``'s card off the board."""
    removed: float | None = await page.evaluate("(id) => window.__removed[id] ?? null", task_id)
    assert removed is not None, f"the tab never removed the card of {task_id}"
    return removed


async def sent_at(page: Page, path: str) -> float:
    """When (epoch ms) the tab sent its last request of ``path``."""
    sent: float | None = await page.evaluate(
        """(path) => {
          const sent = performance.getEntriesByType("resource")
            .filter((entry) => new URL(entry.name).pathname === path).at(-1);
          return sent ? performance.timeOrigin + sent.startTime : null;
        }""",
        path,
    )
    assert sent is not None, f"the tab sent no request of {path}"
    return sent


async def connection_states(page: Page) -> list[str]:
    """Every connection state the tab showed, in order, repeats collapsed."""
    states: list[str] = await page.evaluate("window.__states")
    return states


def is_write(response: Response) -> bool:
    return response.request.method == "PUT"


def is_watch(request: Request) -> bool:
    return "/api/watch" in request.url


def is_snapshot(request: Request) -> bool:
    return is_watch(request) and "since=&" in request.url


class WatchCount:
    """Counts a page's watch requests: how many were sent, and the most ever in flight at once."""

    def __init__(self, page: Page) -> None:
        self.in_flight: set[Request] = set()
        self.most = 0
        self.sent = 0
        page.on("request", self._started)
        # A hold ends when the server answers: the page may start its next watch as soon as a
        # 204's headers are in, before the browser reports that (empty) request finished.
        page.on("response", lambda response: self._ended(response.request))
        page.on("requestfinished", self._ended)
        page.on("requestfailed", self._ended)

    def _started(self, request: Request) -> None:
        if is_watch(request):
            self.sent += 1
            self.in_flight.add(request)
            self.most = max(self.most, len(self.in_flight))

    def _ended(self, request: Request) -> None:
        self.in_flight.discard(request)


async def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=ARTIFACTS / f"{name}.png", full_page=True, animations="disabled")


async def put_task(base_url: str, task_id: str, **update: Any) -> dict[str, Any]:
    """Write as another program would; in a thread, so the browser's event loop runs on."""
    return await asyncio.to_thread(_put, base_url, task_id, update)


async def delete_task(base_url: str, task_id: str) -> dict[str, Any]:
    """Delete as another program would; the tombstone."""
    return await asyncio.to_thread(_send, base_url, task_id, "DELETE", None)


def _put(base_url: str, task_id: str, update: dict[str, Any]) -> dict[str, Any]:
    return _send(base_url, task_id, "PUT", update)


def _send(
    base_url: str, task_id: str, method: str, update: dict[str, Any] | None
) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{base_url}/api/tasks/{task_id}",
        data=None if update is None else json.dumps(update).encode(),
        headers={} if update is None else {"Content-Type": "application/json"},
        method=method,
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        state: dict[str, Any] = json.load(response)
        return state
