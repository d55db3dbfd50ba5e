"""What a connection may cost before its request is served: header sizes, and time to send them.

aiohttp reads a request's headers before any handler or middleware runs, so these limits are
settings of its protocol handler (``handler_args`` of the application, which every server built
from it uses: ``run_app`` and the test servers alike):

- the request line and each header line are capped at ``MAX_HEADER_BYTES``; a longer one is
  answered 400 ("Got more than N bytes when reading") and the connection closed;
- a connection that has not sent complete request headers ``KEEPALIVE_TIMEOUT`` seconds after it
  opened (or after its previous answer) is closed: a slowloris client holds a socket that long at
  most, and costs only that socket meanwhile; the event loop serves everyone else.
"""

from __future__ import annotations

import logging
import resource
from typing import Any

from .config import Config

log = logging.getLogger(__name__)

# Connections the kernel queues before the server accepts them. When an instance dies its clients
# all reconnect to the others at once; past the queue (128 by default) a connection attempt is
# dropped and retried only a second later. The kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 1024


def handler_args(config: Config) -> dict[str, Any]:
    return {
        "max_line_size": config.max_header_bytes,
        "max_field_size": config.max_header_bytes,
        "keepalive_timeout": config.keepalive_timeout,
    }


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to the hard limit, and return it.

    Every held poll and every slow client is a socket; the usual soft limit (1024) would let a
    thousand of them stop the server from accepting anyone else.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open file limit from %d to %d: %s", soft, hard, exc)
    return soft
