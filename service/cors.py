"""Cross-origin access to the API (aiohttp-cors): only for the origins configured, none by default.

With no origin configured no CORS header is ever sent, so a browser lets only pages of this
service's own origin read its answers. Tokens travel in ``Authorization`` and never in cookies, so
credentials are not allowed: a page of an allowed origin can act only with a token it was given.
"""

from __future__ import annotations

import aiohttp_cors
from aiohttp import web

ALLOW_METHODS = ("GET", "PUT", "POST", "DELETE")
# What a page of another origin may send and read besides the CORS-safelisted headers.
ALLOW_HEADERS = ("Authorization", "Content-Type", "Idempotency-Key", "If-None-Match", "Prefer")
EXPOSE_HEADERS = ("ETag", "Preference-Applied", "Retry-After", "WWW-Authenticate", "X-Served-By")
PREFLIGHT_MAX_AGE = 600  # seconds a browser may cache a preflight answer


def setup_cors(app: web.Application, origins: tuple[str, ...]) -> None:
    """Allow ``origins`` on every ``/api/`` route. Call it after all routes are added."""
    if not origins:
        return
    options = aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]
        allow_credentials=False,
        allow_methods=ALLOW_METHODS,
        allow_headers=ALLOW_HEADERS,
        expose_headers=EXPOSE_HEADERS,
        max_age=PREFLIGHT_MAX_AGE,
    )
    cors = aiohttp_cors.setup(app, defaults=dict.fromkeys(origins, options))
    for resource in list(app.router.resources()):
        if resource.canonical.startswith("/api/"):
            cors.add(resource)
