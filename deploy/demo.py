"""`make demo`: redis-server, three service instances and nginx as local processes.

nginx listens on http://localhost:8080 (``--port``), the instances on the next three ports. Open the
board in several tabs: nginx spreads them over the instances, and each tab shows which one served
it. Ctrl-C stops everything.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from .cluster import REPO, running_cluster


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m deploy.demo", description=__doc__)
    parser.add_argument("--port", type=int, default=8080, help="nginx port")
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--redis-port", type=int, default=6390)
    parser.add_argument("--workdir", type=Path, default=REPO / ".demo")
    args = parser.parse_args()

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())

    instance_ports = [args.port + 1 + n for n in range(args.instances)]
    with running_cluster(
        args.workdir,
        instances=args.instances,
        port=args.port,
        instance_ports=instance_ports,
        redis_port=args.redis_port,
        durable_redis=True,
    ) as cluster:
        print(f"\nboard (through nginx): http://localhost:{cluster.nginx.port}/")
        for app in cluster.instances:
            print(f"  {app.instance_id}: http://localhost:{app.port}/")
        print(f"redis: {cluster.redis.url}   logs: {args.workdir}/")
        print("Ctrl-C stops everything.\n", flush=True)
        while not stop.wait(1.0):
            dead = [
                c.name for c in [cluster.redis, *cluster.instances, cluster.nginx] if not c.running
            ]
            if dead:
                print(f"stopped unexpectedly: {', '.join(dead)} (see the logs); shutting down")
                break
    print("cluster stopped")


if __name__ == "__main__":
    main()
