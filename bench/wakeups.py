"""Server CPU per long poll when polls arrive one at a time, and when they arrive all at once.

``python -m bench.wakeups [N]`` (default 5,000): for one instance of this service and one Nchan
node, each on Redis as in the fan-out: N keep-alive connections are opened, then a poll is sent
on each, either one every 200 µs (*trickle*: the server wakes for each) or back to back
(*burst*: many per wake-up). The server CPU (``bench.scenarios.cpu_seconds``, every process but
Redis) from the first send until all N are held, per poll. The difference between the two is the
cost of waking up for one request on this machine, whoever the server is. (It does not decide the
cluster's cost: making an instance's re-polls arrive in batches left its CPU where it was,
bench/RESULTS.md.) Two rounds of each target, alternately.
"""

from __future__ import annotations

import http.client
import socket
import sys
import tempfile
import time
from pathlib import Path

from bench.scenarios import cpu_seconds
from bench.targets import NchanOne, ServiceOne, Target
from service.connections import raise_open_file_limit

GAP = 0.0002  # seconds between two polls of a trickle
TASK = "wakeups"


def server_cpu(target: Target) -> float:
    """CPU seconds used so far by the target's server processes (Redis left out)."""
    return sum(seconds for role, seconds in cpu_seconds(target.pids()).items() if role != "redis")


def poll_request(target: Target) -> bytes:
    """A poll that is held: this service's at the task's version; Nchan's on an empty channel."""
    if target.dialect == "nchan":
        return f"GET /sub/{TASK} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    connection = http.client.HTTPConnection("127.0.0.1", target.port, timeout=10)
    body = b'{"status": "in_progress"}'
    connection.request("PUT", f"/api/tasks/{TASK}", body, {"Content-Type": "application/json"})
    assert connection.getresponse().status == 200
    connection.close()
    poll = f"GET /api/tasks/{TASK}/poll?since=1&timeout=55 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    return poll.encode()


def cpu_per_poll(target: Target, request: bytes, count: int, gap: float) -> float:
    """µs of server CPU per poll: ``count`` polls sent ``gap`` seconds apart, until all held."""
    sockets = [socket.create_connection(("127.0.0.1", target.port)) for _ in range(count)]
    try:
        deadline = time.monotonic() + 30
        while target.waiting() != 0:  # the last call's polls, whose clients left, let go
            if time.monotonic() > deadline:
                raise RuntimeError(f"{target.key}: {target.waiting()} polls still held")
            time.sleep(0.05)
        time.sleep(0.5)  # the accepts' own work done: count only the polls
        before = server_cpu(target)
        for sock in sockets:
            sock.send(request)
            until = time.perf_counter() + gap
            while time.perf_counter() < until:
                pass  # (a busy wait: sleeping for 200 µs is not that precise)
        deadline = time.monotonic() + 30
        while target.waiting() < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{target.key}: {target.waiting()} of {count} polls held")
            time.sleep(0.02)
        return (server_cpu(target) - before) * 1e6 / count
    finally:
        for sock in sockets:
            sock.close()


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    raise_open_file_limit()
    print(f"server CPU per poll, {count:,} polls, µs: trickle (one per {GAP * 1e6:.0f} µs) / burst")
    for kind in (ServiceOne, NchanOne, ServiceOne, NchanOne):
        with tempfile.TemporaryDirectory() as workdir:
            target = kind(Path(workdir))
            try:
                target.start()
                request = poll_request(target)
                trickle = cpu_per_poll(target, request, count, GAP)
                burst = cpu_per_poll(target, request, count, 0.0)
            finally:
                target.stop()
        print(f"{target.key}: {trickle:.1f} / {burst:.1f}", flush=True)


if __name__ == "__main__":
    main()
