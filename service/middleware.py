"""Response headers every answer carries, and the one place errors become JSON."""

from __future__ import annotations

import json
import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from .errors import ApiError, BackendUnavailable
from .keys import CONFIG

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = "2"

_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


def error_response(error: ApiError) -> web.Response:
    return web.Response(
        status=error.status,
        body=json.dumps(error.body()).encode(),
        content_type="application/json",
        headers=error.headers,
    )


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as error:
        return error_response(error)
    except BackendUnavailable as exc:
        return error_response(
            ApiError(
                503,
                exc.code,
                f"{exc.explanation} ({exc})",
                headers={"Retry-After": RETRY_AFTER_SECONDS},
            )
        )
    except web.RequestPayloadError:
        # The body could not be decoded as its headers say (a corrupt gzip or deflate stream):
        # the client's mistake, not a bug.
        return error_response(
            ApiError(
                400,
                "invalid_body_encoding",
                "the body cannot be decoded as its Content-Encoding or Transfer-Encoding says",
            )
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, f"http_{exc.status}")
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
        return error_response(ApiError(exc.status, code, exc.reason, headers=headers))
    except Exception:
        # A bug, not a client mistake: keep the traceback, answer in the same JSON shape.
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(ApiError(500, "internal_error", "internal server error"))


async def add_standard_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: runs for every response, errors and static files included."""
    response.headers["X-Served-By"] = request.app[CONFIG].instance_id
    if request.path.startswith("/api/"):
        response.headers["Cache-Control"] = "no-store"


# The page runs its own scripts, styles and images only: nothing inline, nothing from elsewhere,
# no plugins, no <base> or form target elsewhere, and it is never framed (clickjacking).
PAGE_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
# Anything else (JSON, scripts, styles) opened as a document runs nothing and is never framed.
OTHER_POLICY = "default-src 'none'; frame-ancestors 'none'"


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every answer is taken as the type it says it is (no sniffing); an
    HTML page also gets its Content-Security-Policy, no referrer and no framing."""
    response.headers["X-Content-Type-Options"] = "nosniff"
    if response.content_type == "text/html":
        response.headers.setdefault("Content-Security-Policy", PAGE_POLICY)
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Frame-Options"] = "DENY"
    else:
        response.headers.setdefault("Content-Security-Policy", OTHER_POLICY)
