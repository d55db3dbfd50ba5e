"""HTML pages: thin handlers returning template context; the page script does the live part.

The templates hand this context to the script through data- attributes (no inline script), so the
page keeps working under a Content-Security-Policy that forbids inline code.
"""

from __future__ import annotations

from typing import Any

import aiohttp_jinja2
from aiohttp import web

from .dashboard import DASHBOARD, DELAY_WINDOW, HISTORY
from .keys import CONFIG
from .model import DEFAULT_TASK, initial_state, validate_task_id


def _page_context(request: web.Request) -> dict[str, Any]:
    config = request.app[CONFIG]
    return {
        "statuses": config.statuses,
        "instance_id": config.instance_id,
        "default_task": DEFAULT_TASK,
        "poll_timeout": config.poll_timeout,
        "stream_heartbeat": config.stream_heartbeat,  # SSE and WebSocket clients (transports.js)
        # A snapshot lists only tasks ever written; the board still shows "default" first, as the
        # model defines a task never written (so the script does not restate that rule).
        "default_state": initial_state(DEFAULT_TASK, config.statuses).to_dict(),
    }


@aiohttp_jinja2.template("board.html")
async def board(request: web.Request) -> dict[str, Any]:
    return _page_context(request)


@aiohttp_jinja2.template("task.html")
async def task_page(request: web.Request) -> dict[str, Any]:
    task_id = validate_task_id(request.match_info["task_id"])
    return {**_page_context(request), "task_id": task_id}


@aiohttp_jinja2.template("dashboard.html")
async def dashboard(request: web.Request) -> dict[str, Any]:
    """The whole cluster, live: the script follows GET /api/cluster/watch (dashboard.py)."""
    figures = request.app[DASHBOARD]
    tick = figures.interval or 1.0  # 0: nothing is shared; the page still needs a time scale
    return {
        **_page_context(request),
        "stats_interval": figures.interval,
        "stale_after": figures.stale_after,
        "stats_ttl": figures.ttl,
        "delay_window": DELAY_WINDOW * tick,
        "history_seconds": HISTORY * tick,
    }


def setup_page_routes(app: web.Application) -> None:
    app.router.add_get("/", board)
    app.router.add_get("/tasks/{task_id}", task_page)
    app.router.add_get("/dashboard", dashboard)
