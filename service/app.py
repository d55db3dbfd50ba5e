"""Application assembly (``create_app``) and the process entry point (``main``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from .api import MAX_BODY_BYTES, setup_api_routes
from .auth import setup_auth
from .backend import create_backend
from .config import Config, load_config
from .connections import LISTEN_BACKLOG, handler_args, raise_open_file_limit
from .cors import setup_cors
from .dashboard import dashboard_ctx, setup_dashboard
from .direct import encode_poll_answer
from .fastpoll import serve
from .health import setup_health_routes
from .hub import Hub
from .keys import BACKEND, CONFIG, HUB
from .looplag import loop_lag_ctx
from .metrics import setup_metrics
from .middleware import add_security_headers, add_standard_headers, errors_middleware
from .openapi import setup_openapi_routes
from .ratelimit import setup_rate_limit
from .retention import retention_ctx
from .runtime import freeze_startup_objects, install_event_loop, scheduled_gc
from .sse import setup_sse_routes
from .views import setup_page_routes
from .ws import setup_ws_routes

log = logging.getLogger(__name__)

# Package data: the templates and static files are installed with the code (see pyproject.toml).
WEB_DIR = Path(__file__).resolve().parent / "web"


async def backend_ctx(app: web.Application) -> AsyncIterator[None]:
    backend = app[BACKEND]
    await backend.start(app[HUB])
    yield
    await backend.close()


async def waiting_clients_log_ctx(app: web.Application) -> AsyncIterator[None]:
    """Log the number of waiting clients at an interval, and how many left by disconnecting."""
    hub, interval = app[HUB], app[CONFIG].log_interval

    async def report() -> None:
        last: tuple[int, int] | None = None
        while True:
            await asyncio.sleep(interval)
            disconnected = hub.take_disconnected()
            now = (hub.waiting_total, disconnected)
            if now != last:
                log.info(
                    "waiting clients: %d (%d task polls, %d watches); %d left by disconnecting",
                    hub.waiting_total,
                    hub.waiting_polls,
                    hub.waiting_watches,
                    disconnected,
                )
            last = now

    task = asyncio.create_task(report())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def release_waiters(app: web.Application) -> None:
    """on_shutdown: held polls answer 204 now, so the graceful stop does not wait them out."""
    hub = app[HUB]
    log.info("shutting down: releasing %d waiting clients", hub.waiting_total)
    hub.close()


def create_app(config: Config) -> web.Application:
    app = web.Application(
        middlewares=[errors_middleware],
        client_max_size=MAX_BODY_BYTES,
        handler_args=handler_args(config),  # header size and time limits, for every server
    )
    app[CONFIG] = config
    app[HUB] = Hub(answer=encode_poll_answer(config.instance_id))
    app[BACKEND] = create_backend(config)
    setup_metrics(app)  # GET /metrics; its middleware goes first, to count every answer
    aiohttp_jinja2.setup(
        app, loader=jinja2.FileSystemLoader(WEB_DIR / "templates"), autoescape=True
    )
    setup_api_routes(app)
    setup_sse_routes(app)
    setup_ws_routes(app)
    setup_health_routes(app)
    setup_openapi_routes(app)
    setup_page_routes(app)
    setup_dashboard(app)
    app.router.add_static("/static", WEB_DIR / "static")
    setup_auth(app, config)  # middlewares in order: metrics, errors, auth, write rate limit
    setup_rate_limit(app, config)
    setup_cors(app, config.cors_origins)  # after every route
    app.on_response_prepare.append(add_standard_headers)
    app.on_response_prepare.append(add_security_headers)
    app.cleanup_ctx.append(backend_ctx)
    app.cleanup_ctx.append(dashboard_ctx)  # shares its stats once the backend is up
    app.cleanup_ctx.append(retention_ctx)  # sweeps once the backend is up
    app.cleanup_ctx.append(waiting_clients_log_ctx)
    app.cleanup_ctx.append(loop_lag_ctx)  # the event loop's lag, for /metrics
    app.on_shutdown.append(release_waiters)
    return app


def quiet_bad_requests(record: logging.LogRecord) -> bool:
    """Log filter: a client's malformed HTTP becomes one DEBUG line, not a traceback (aiohttp
    logs most at ERROR, some, such as TLS sent to the plain port, at DEBUG: each with one)."""
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, HttpProcessingError):
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.msg, record.args, record.exc_info = "bad request from a client: %s", (error,), None
        return logging.getLogger("aiohttp.server").isEnabledFor(logging.DEBUG)
    return True


def main(argv: Sequence[str] | None = None) -> None:
    config = load_config(argv)
    logging.basicConfig(
        level=config.log_level.upper(),
        format=f"%(asctime)s %(levelname)s [{config.instance_id}] %(name)s: %(message)s",
    )
    # A malformed request is answered 400 by aiohttp's parser before any handler runs; aiohttp
    # logs each with a traceback at ERROR, which would let any client flood the logs.
    logging.getLogger("aiohttp.server").addFilter(quiet_bad_requests)
    log.info(
        "instance %s on http://%s:%d, backend %s",
        config.instance_id,
        config.host,
        config.port,
        config.backend_name,
    )
    log.info("open file limit: %d", raise_open_file_limit())
    log.info("event loop: %s", install_event_loop(config.event_loop))
    app = create_app(config)
    hub = app[HUB]
    app.cleanup_ctx.append(
        scheduled_gc(busy=lambda: hub.busy, held=lambda: hub.waiting_total, activity=hub.activity)
    )
    freeze_startup_objects()
    serve(
        app,
        host=config.host,
        port=config.port,
        backlog=LISTEN_BACKLOG,
        shutdown_timeout=config.shutdown_timeout,
    )
