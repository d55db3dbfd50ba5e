"""The answer the hub writes to a held long poll itself: built once per change, shared by all.

A fan-out to 10,000 polls through aiohttp's response machinery costs each of them a response
object, a header dict, the ``on_response_prepare`` signal and a serialization of the head: most of
the time a fan-out takes. A poll that qualifies (``direct_transport``) hands its connection
to its waiter instead, and the hub writes these bytes to every such connection the moment the
change is published; the handler then returns ``AlreadyAnswered``, which sends nothing.

The bytes are the ones the ordinary path sends for the same answer (status line and headers in
the same order and with the same values, the security headers of ``middleware.py`` included);
``tests/test_direct.py`` compares the two.
"""

from __future__ import annotations

import asyncio
from email.utils import formatdate

from aiohttp import hdrs, web
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11

from .hub import AnswerEncoder, Change
from .middleware import OTHER_POLICY


def direct_transport(request: web.Request, cors: bool) -> asyncio.Transport | None:
    """The connection of a plain HTTP/1.1 keep-alive poll whose answer depends on nothing but
    the change (not one from another origin when CORS is on: its headers name the origin); None
    for any other request, which is answered the ordinary way."""
    if (
        request.version == HttpVersion11
        and request.keep_alive
        and not (cors and hdrs.ORIGIN in request.headers)
    ):
        return request.transport
    return None


def encode_poll_answer(instance_id: str) -> AnswerEncoder:
    """The encoder the hub uses for this instance (``Hub(answer=...)``)."""

    def encode(change: Change) -> bytes:
        body = change.body
        head = (
            "HTTP/1.1 200 OK\r\n"
            f'ETag: "{change.state.version}"\r\n'
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"Date: {formatdate(usegmt=True)}\r\n"
            f"Server: {SERVER_SOFTWARE}\r\n"
            f"X-Served-By: {instance_id}\r\n"
            "Cache-Control: no-store\r\n"
            "X-Content-Type-Options: nosniff\r\n"
            f"Content-Security-Policy: {OTHER_POLICY}\r\n"
            "\r\n"
        )
        return head.encode() + body

    return encode


class AlreadyAnswered(web.StreamResponse):
    """What a handler returns for a poll the hub answered: aiohttp has nothing left to send, and
    the connection stays open for the client's next request."""

    def __init__(self) -> None:
        super().__init__(status=200)

    @property
    def keep_alive(self) -> bool:
        return True

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None
