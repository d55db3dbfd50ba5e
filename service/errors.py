"""The one error type for client mistakes, and the backend's own failures.

Handlers raise these; one middleware (``middleware.py``) turns them into JSON error responses of the
form ``{"error": {"code": ..., "message": ...}}``.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """A request the service refuses: answered with ``status`` and a JSON error body."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}, **self.extra}


def bad_request(code: str, message: str) -> ApiError:
    return ApiError(400, code, message)


class BackendUnavailable(Exception):
    """The state store cannot be reached; the request may be retried later (503)."""

    code = "backend_unavailable"
    explanation = "the state store is unreachable, retry later"


class NotReplicated(BackendUnavailable):
    """A write the primary took but too few replicas confirmed in time (``WAIT``), or that the
    primary refused for want of replicas (``NOREPLICAS``): not acknowledged, may be retried."""

    code = "not_replicated"
    explanation = "the write was not confirmed by enough replicas in time and is not acknowledged"
