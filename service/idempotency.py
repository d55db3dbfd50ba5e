"""``Idempotency-Key`` on writes (IETF httpapi draft ``draft-ietf-httpapi-idempotency-key-header``).

A client that may send a write twice (a job runner retrying after a 502, 503 or a cut connection)
names it with a key: ``Idempotency-Key: "8e03978e-40d5-43e8-bc93-6894a57f9324"`` (a structured
field string; a bare token is accepted too). The first write with a key is applied and its answer
kept for ``KEY_TTL_SECONDS``; a repeat with the same key and the same request gets that answer
again and changes nothing; the same key with another request is refused with 422.

The key and the request's fingerprint go to the backend with the write, which checks and records
them in the same atomic step as the write itself (the write script in Redis): two copies of one
write racing each other still apply it once.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from .errors import ApiError

HEADER = "Idempotency-Key"
KEY_TTL_SECONDS = 24 * 3600  # a repeat within a day gets the first answer
MAX_KEY_LENGTH = 255
_KEY = re.compile(r"[\x20-\x7e]+")  # printable ASCII: what an sf-string can hold


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    key: str
    fingerprint: str  # of the request: method, task and body, so a different one is told apart


def parse_key(raw: str) -> str:
    """The key of an ``Idempotency-Key`` header: an sf-string (quoted, ``\\"`` and ``\\\\``
    escapes), or the bare text; 400 ``invalid_idempotency_key`` when it is neither."""
    value = raw.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = re.sub(r"\\([\"\\])", r"\1", value[1:-1])
    if len(value) > MAX_KEY_LENGTH or not _KEY.fullmatch(value):
        raise ApiError(
            400,
            "invalid_idempotency_key",
            f"{HEADER} must be a string of 1 to {MAX_KEY_LENGTH} printable ASCII characters",
        )
    return value


def idempotency_key(
    header: str | None, method: str, task_id: str, request: dict[str, Any]
) -> IdempotencyKey | None:
    """The key a write names (None: it names none) with the fingerprint of the request."""
    if header is None:
        return None
    described = json.dumps([method, task_id, request], sort_keys=True, separators=(",", ":"))
    return IdempotencyKey(parse_key(header), hashlib.sha256(described.encode()).hexdigest())


def mismatch() -> ApiError:
    return ApiError(
        422,
        "idempotency_key_reused",
        f"this {HEADER} was used for another request; use a new key for a new request",
    )
