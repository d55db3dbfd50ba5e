"""How the load client speaks to each kind of target: request bytes out, versions back.

Two dialects cover every target:

- ``tasks``: this service and the seed reference. ``GET /api/tasks/{id}/poll?since=V&timeout=S``
  held until the version is not V; ``PUT /api/tasks/{id}`` with a JSON update, answered with the
  new state (and its version).
- ``nchan``: Nchan's long-poll subscriber. ``GET /sub/{id}`` with ``If-Modified-Since`` and
  ``If-None-Match`` set to the ``Last-Modified`` and ``Etag`` of the previous answer (none on the
  first request: the newest buffered message comes back at once); ``POST /pub/{id}`` publishes.
  The published body is the same JSON state the service sends, version included, so both dialects
  read a delivery's version from the body the same way.

A poll's state is ``(version, validators)``: the version last seen and, for Nchan, the header
lines that name the last message.
"""

from __future__ import annotations

import json
import re
import time

_VERSION = re.compile(rb'"version":\s*(\d+)')
HOST_HEADER = b"Host: 127.0.0.1\r\n"

PollState = tuple[int, bytes]  # (version seen, extra request header lines)
NO_STATE: PollState = (-1, b"")


def body_version(body: bytes) -> int:
    """The ``version`` of a JSON state body, or -1."""
    match = _VERSION.search(body)
    return int(match.group(1)) if match else -1


def header_value(head: bytes, lower: bytes, name: bytes) -> bytes | None:
    """The value of header ``name`` (lower case) in a response head, or None."""
    at = lower.find(b"\r\n" + name + b":")
    if at < 0:
        return None
    start = at + len(name) + 3
    end = head.find(b"\r\n", start)
    return head[start : end if end >= 0 else len(head)].strip()


def _update_body(task: str, version: int, step: int) -> dict[str, object]:
    return {"status": "in_progress", "progress": step % 101, "message": f"step {step} of {task}"}


class Dialect:
    name = "abstract"
    #: statuses that mean "nothing new, ask again with the same state"
    again = frozenset({204, 304, 408})

    def poll_request(self, task: str, state: PollState, hold: int) -> bytes:
        raise NotImplementedError

    def next_state(self, head: bytes, lower: bytes, body: bytes) -> PollState:
        """The state after a 200 answer."""
        raise NotImplementedError

    def write_request(self, task: str, version: int, step: int) -> bytes:
        """A write of ``task``; ``version`` is what the write will make it (Nchan carries it)."""
        raise NotImplementedError

    def write_result(self, status: int, body: bytes, version: int) -> int:
        """The version a write produced, or -1 if it was not accepted."""
        raise NotImplementedError


class TasksDialect(Dialect):
    """This service's API, which the seed reference copies."""

    name = "tasks"

    def poll_request(self, task: str, state: PollState, hold: int) -> bytes:
        since = max(state[0], 0)
        return (
            f"GET /api/tasks/{task}/poll?since={since}&timeout={hold} HTTP/1.1\r\n".encode()
            + HOST_HEADER
            + b"\r\n"
        )

    def next_state(self, head: bytes, lower: bytes, body: bytes) -> PollState:
        return (body_version(body), b"")

    def write_request(self, task: str, version: int, step: int) -> bytes:
        body = json.dumps(_update_body(task, version, step)).encode()
        return (
            f"PUT /api/tasks/{task} HTTP/1.1\r\n".encode()
            + HOST_HEADER
            + b"Content-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )

    def write_result(self, status: int, body: bytes, version: int) -> int:
        return body_version(body) if status == 200 else -1


class NchanDialect(Dialect):
    """Nchan's long-poll subscriber protocol and its HTTP publisher."""

    name = "nchan"

    def poll_request(self, task: str, state: PollState, hold: int) -> bytes:
        return f"GET /sub/{task} HTTP/1.1\r\n".encode() + HOST_HEADER + state[1] + b"\r\n"

    def next_state(self, head: bytes, lower: bytes, body: bytes) -> PollState:
        validators = b""
        modified = header_value(head, lower, b"last-modified")
        if modified is not None:
            validators += b"If-Modified-Since: " + modified + b"\r\n"
        etag = header_value(head, lower, b"etag")
        if etag is not None:
            validators += b"If-None-Match: " + etag + b"\r\n"
        return (body_version(body), validators)

    def write_request(self, task: str, version: int, step: int) -> bytes:
        now = time.time()
        stamp = (
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        )
        state = {"task": task, "version": version, "updated_at": stamp}
        state.update(_update_body(task, version, step))
        body = json.dumps(state).encode()
        return (
            f"POST /pub/{task} HTTP/1.1\r\n".encode()
            + HOST_HEADER
            + b"Content-Type: application/json\r\nAccept: text/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )

    def write_result(self, status: int, body: bytes, version: int) -> int:
        return version if status in (201, 202) else -1


DIALECTS: dict[str, Dialect] = {d.name: d for d in (TasksDialect(), NchanDialect())}
