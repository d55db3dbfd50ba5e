"""`make screenshot`: docs/board.png, the board of a running cluster with a few tasks on it.

Starts redis-server, three instances and nginx (deploy/cluster.py) in a temporary folder, writes the
tasks through nginx as job runners would, and photographs the board in Debian's Chromium.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

from playwright.async_api import expect

from deploy.cluster import REPO, running_cluster
from tests.browser import chromium, open_board, put_task, task

OUTPUT = REPO / "docs" / "board.png"
TASKS: list[tuple[str, dict[str, Any]]] = [
    ("build-42", {"status": "in_progress", "progress": 65, "message": "linking"}),
    ("deploy-web", {"status": "completed", "progress": 100, "message": "rolled out to 12 hosts"}),
    ("import-users", {"status": "failed", "progress": 40, "message": "row 7311: bad date"}),
    ("nightly-backup", {"status": "pending", "message": "starts at 02:00"}),
    ("report-q3", {"status": "cancelled", "message": "superseded by report-q3-v2"}),
    ("video-encode", {"status": "in_progress", "progress": 20, "message": "encoding 1080p"}),
]


async def main() -> None:
    with tempfile.TemporaryDirectory() as workdir, running_cluster(Path(workdir)) as cluster:
        for task_id, update in TASKS:
            await put_task(cluster.url, task_id, **update)
        async with chromium() as browser:
            page = await open_board(browser, cluster.url)
            for task_id, update in TASKS:
                await expect(task(page, task_id)).to_have_attribute("data-status", update["status"])
            await page.set_viewport_size({"width": 1280, "height": 600})  # no empty bottom half
            OUTPUT.parent.mkdir(exist_ok=True)
            await page.screenshot(path=OUTPUT, full_page=True, animations="disabled")
    print(f"wrote {OUTPUT.relative_to(REPO)}")


if __name__ == "__main__":
    asyncio.run(main())
