"""Liveness and readiness probes for load balancers and orchestrators."""

from __future__ import annotations

from aiohttp import web

from .keys import BACKEND, CONFIG, HUB


async def healthz(request: web.Request) -> web.Response:
    """Alive: the process answers HTTP. Also tells how many clients wait here now."""
    hub = request.app[HUB]
    return web.json_response(
        {
            "status": "ok",
            "instance": request.app[CONFIG].instance_id,
            "waiting": {"polls": hub.waiting_polls, "watches": hub.waiting_watches},
        }
    )


async def readyz(request: web.Request) -> web.Response:
    """Ready: the backend can take writes and no change can be missed (subscription live)."""
    ready = request.app[BACKEND].is_ready()
    return web.json_response(
        {"ready": ready, "instance": request.app[CONFIG].instance_id},
        status=200 if ready else 503,
    )


def setup_health_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
