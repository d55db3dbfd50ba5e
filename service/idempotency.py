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
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from .errors import ApiError
from .model import TaskState

HEADER = "Idempotency-Key"
KEY_TTL_SECONDS = 24 * 3600  # a repeat within a day gets the first answer
MAX_KEY_LENGTH = 255
# What the header may hold, and so what the OpenAPI document says: an sf-string of 1 to 255
# characters (printable ASCII, with \" and \\ escaped), or the key bare (printable ASCII without
# '"', no space at either end); spaces and tabs around either are HTTP's, not the key's.
KEY_PATTERN = r'^[ \t]*(?:"(?:[ !#-\[\]-~]|\\["\\]){1,255}"|[!#-~](?:[ !#-~]{0,253}[!#-~])?)[ \t]*$'
_QUOTED = re.compile(r'[ \t]*"(.*)"[ \t]*', re.S)


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    key: str
    fingerprint: str  # of the request: method, task and body, so a different one is told apart


def parse_key(raw: str) -> str:
    """The key of an ``Idempotency-Key`` header (``KEY_PATTERN``): an sf-string's content, or
    the bare text; 400 ``invalid_idempotency_key`` for anything else."""
    if not re.fullmatch(KEY_PATTERN, raw):
        raise ApiError(
            400,
            "invalid_idempotency_key",
            f"{HEADER} must be a string of 1 to {MAX_KEY_LENGTH} printable ASCII characters, "
            'quoted ("...") or bare',
        )
    quoted = _QUOTED.fullmatch(raw)
    return re.sub(r"\\([\"\\])", r"\1", quoted[1]) if quoted else raw.strip(" \t")


def idempotency_key(
    header: str | None, method: str, task_id: str, request: dict[str, Any]
) -> IdempotencyKey | None:
    """The key a write names (None: it names none) with the fingerprint of the request."""
    if header is None:
        return None
    described = json.dumps([method, task_id, request], sort_keys=True, separators=(",", ":"))
    return IdempotencyKey(parse_key(header), hashlib.sha256(described.encode()).hexdigest())


class IdempotencyKeyReused(Exception):
    """The key was used for another request (another body, task or method)."""


class KeptAnswers:
    """The answers kept for idempotency keys in this process (the embedded backend), oldest
    first, each for ``ttl`` seconds. The Redis backend keeps them in Redis, in its scripts."""

    def __init__(self, ttl: float = KEY_TTL_SECONDS) -> None:
        self.ttl = ttl
        self._kept: OrderedDict[str, tuple[str, TaskState, float]] = OrderedDict()

    def recall(self, key: IdempotencyKey | None) -> TaskState | None:
        """The state answered to the first request with ``key``; None if there was none (or it
        is too old); IdempotencyKeyReused if that request was another."""
        now = time.monotonic()
        while self._kept and next(iter(self._kept.values()))[2] < now:
            self._kept.popitem(last=False)
        if key is None or (kept := self._kept.get(key.key)) is None:
            return None
        fingerprint, state, _ = kept
        if fingerprint != key.fingerprint:
            raise IdempotencyKeyReused
        return state

    def keep(self, key: IdempotencyKey | None, state: TaskState) -> None:
        if key is not None:
            self._kept[key.key] = (key.fingerprint, state, time.monotonic() + self.ttl)


def mismatch() -> ApiError:
    return ApiError(
        422,
        "idempotency_key_reused",
        f"this {HEADER} was used for another request; use a new key for a new request",
    )
