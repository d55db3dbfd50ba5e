"""`make demo`: redis-server, three service instances and nginx as local processes.

nginx listens on http://localhost:8080 (``--port``), the instances on the next three ports. Open the
board in several tabs: nginx spreads them over the instances, and each tab shows which one served
it. Ctrl-C stops everything.

`make demo-ha` (``--ha``): a Redis primary with two replicas and three Sentinels instead of one
redis-server; the instances find the primary through the Sentinels and acknowledge a write once a
replica has it. Kill the primary (its PID is printed) and watch the dashboard follow the failover.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading
from pathlib import Path

from .cluster import REPO, Cluster, HACluster, running_cluster, running_ha_cluster


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m deploy.demo", description=__doc__)
    parser.add_argument("--port", type=int, default=8080, help="nginx port")
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--redis-port", type=int, default=6390)
    parser.add_argument("--workdir", type=Path, default=REPO / ".demo")
    parser.add_argument("--ha", action="store_true", help="primary, 2 replicas, 3 Sentinels")
    args = parser.parse_args()

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())

    instance_ports = [args.port + 1 + n for n in range(args.instances)]
    common = {"instances": args.instances, "port": args.port, "instance_ports": instance_ports}
    cluster_context: contextlib.AbstractContextManager[Cluster]
    if args.ha:
        redis_ports = [args.redis_port + n for n in range(3)]
        sentinel_ports = [args.redis_port + 100 + n for n in range(3)]
        cluster_context = running_ha_cluster(
            args.workdir, redis_ports=redis_ports, sentinel_ports=sentinel_ports, **common
        )
    else:
        cluster_context = running_cluster(
            args.workdir, redis_port=args.redis_port, durable_redis=True, **common
        )
    with cluster_context as cluster:
        describe(cluster, args.workdir)
        while not stop.wait(1.0):
            dead = [c.name for c in cluster.processes() if not c.running]
            if dead and not args.ha:
                print(f"stopped unexpectedly: {', '.join(dead)} (see the logs); shutting down")
                break
    print("cluster stopped")


def describe(cluster: Cluster, workdir: Path) -> None:
    print(f"\nboard (through nginx): http://localhost:{cluster.nginx.port}/")
    print(f"dashboard: http://localhost:{cluster.nginx.port}/dashboard")
    for app in cluster.instances:
        print(f"  {app.instance_id}: http://localhost:{app.port}/")
    if isinstance(cluster, HACluster):
        for node in cluster.nodes:
            role = "primary" if node is cluster.redis else "replica"
            pid = node.process.pid if node.process else "?"
            print(f"redis {role}: 127.0.0.1:{node.port} (pid {pid})")
        print(f"sentinels: {', '.join(s.address for s in cluster.sentinels)}")
        print("kill the primary (kill -9 <pid>) and watch the dashboard follow the failover")
    else:
        print(f"redis: {cluster.redis.url}")
    print(f"logs: {workdir}/")
    print("Ctrl-C stops everything.\n", flush=True)


if __name__ == "__main__":
    main()
