"""What the benchmark runs against, each started fresh from real processes on loopback ports.

- ``service-1``: one service instance on the Redis backend, polled directly.
- ``service-3``: the demo's cluster, redis-server + 3 instances + nginx (``deploy/cluster.py``).
- ``seed``: the seed's design (``bench/seed_flask.py``), Flask threaded dev server.
- ``nchan-1``: one nginx with Nchan, messages in Redis.
- ``nchan-2``: two of those behind a load-balancer nginx, which runs the repo's own nginx config
  (``deploy/nginx/nginx.conf``), the same balancer as ``service-3``.

Every target reports which processes are its server (for CPU and memory) and how many polls its
server side holds now (``/healthz`` of each instance, ``nchan_stub_status`` of each Nchan); a
target of this service also the port of each instance, whose ``/metrics`` is read directly (nginx
answers it 404).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil

from deploy.cluster import (
    HOST,
    Cluster,
    Instance,
    Managed,
    Nginx,
    RedisServer,
    find_program,
    free_port,
    http_status,
    port_open,
    running_cluster,
    wait_until,
)

BENCH = Path(__file__).resolve().parent
NCHAN_MODULE_PATHS = ("/usr/lib/nginx/modules/ngx_nchan_module.so",)


def get_json(port: int, path: str, timeout: float = 5.0) -> object:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def get_text(port: int, path: str, timeout: float = 5.0) -> str:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def healthz_polls(port: int) -> int:
    data = get_json(port, "/healthz")
    assert isinstance(data, dict)
    return int(data["waiting"]["polls"])


def process_tree(pid: int) -> list[int]:
    """A process and its children (nginx: the master and its workers)."""
    try:
        proc = psutil.Process(pid)
        return [pid, *(child.pid for child in proc.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def nchan_module() -> str:
    for path in NCHAN_MODULE_PATHS:
        if Path(path).exists():
            return path
    raise RuntimeError("Nchan not found: apt-get install libnginx-mod-nchan (make bench does)")


class NchanServer(Managed):
    """nginx with the Nchan module (``bench/nchan.conf``), storing messages in ``redis_url``."""

    def __init__(self, workdir: Path, name: str, redis_url: str, workers: str = "auto") -> None:
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        redis_server = redis_url.removeprefix("redis://").split("/")[0]
        conf = (BENCH / "nchan.conf").read_text()
        for key, value in {
            "NCHAN_MODULE": nchan_module(),
            "WORKERS": workers,
            "REDIS_URL": f"redis://{redis_server}",
            "PORT": str(self.port),
        }.items():
            conf = conf.replace(f"@{key}@", value)
        (workdir / "nginx.conf").write_text(conf)
        argv = [
            find_program("nginx"), "-p", f"{workdir}/", "-c", str(workdir / "nginx.conf"),
            "-e", "stderr", "-g", "daemon off; user root;",
        ]  # fmt: skip
        super().__init__(name, argv, workdir / "nginx.log")

    def start(self) -> None:
        super().start()

        def up() -> bool:
            if not self.running:
                raise RuntimeError(f"{self.name} exited:\n{self.log_text()[-3000:]}")
            return port_open(self.port)

        wait_until(up, f"{self.name} on port {self.port}")
        # Publishing answers 503 until Nchan has connected to Redis: wait for that too.
        wait_until(lambda: self.status("redis connected servers") >= 1, f"{self.name} on Redis")

    def status(self, field: str) -> int:
        text = get_text(self.port, "/nchan_status")
        match = re.search(rf"^{field}: (\d+)", text, re.M)
        return int(match.group(1)) if match else 0

    def subscribers(self) -> int:
        return self.status("subscribers")


class Target:
    key = "target"
    title = "target"
    dialect = "tasks"
    #: the server processes, by role, for CPU and memory (filled by start)
    roles: dict[str, Managed]

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.roles = {}
        self._stack = contextlib.ExitStack()

    @property
    def port(self) -> int:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self._stack.close()
        for child in reversed(list(self.roles.values())):
            with contextlib.suppress(Exception):
                child.stop()

    def waiting_by_role(self) -> dict[str, int]:
        """Polls held by each server node (instance or Nchan), by its own count."""
        raise NotImplementedError

    def waiting(self) -> int:
        return sum(self.waiting_by_role().values())

    def instance_ports(self) -> dict[str, int]:
        """Each service instance's own port, by role (none for the seed and Nchan)."""
        return {}

    def pids(self) -> dict[str, list[int]]:
        out = {}
        for role, child in self.roles.items():
            if child.process is not None and child.running:
                out[role] = process_tree(child.process.pid)
        return out

    def logs(self) -> dict[str, str]:
        return {role: str(child.log_path) for role, child in self.roles.items()}


class ServiceOne(Target):
    key, title = "service-1", "this service, 1 instance + Redis"

    def start(self) -> None:
        redis = RedisServer(self.workdir / "redis")
        self.roles["redis"] = redis
        redis.start()
        self.instance = Instance(self.workdir / "instances", "instance-1", redis_url=redis.url)
        self.roles["instance-1"] = self.instance
        self.instance.start()

    @property
    def port(self) -> int:
        return self.instance.port

    def waiting_by_role(self) -> dict[str, int]:
        return {"instance-1": healthz_polls(self.instance.port)}

    def instance_ports(self) -> dict[str, int]:
        return {"instance-1": self.instance.port}


class ServiceOneNoGC(ServiceOne):
    """An experiment, not in the default run: ``service-1`` with Python's cyclic GC disabled
    (the same code, started through a one-line prelude), to measure that lever alone."""

    key, title = "service-1-nogc", "this service, 1 instance, cyclic GC off (experiment)"
    PRELUDE = "import gc, runpy; gc.disable(); runpy.run_module('service', run_name='__main__')"

    def start(self) -> None:
        redis = RedisServer(self.workdir / "redis")
        self.roles["redis"] = redis
        redis.start()
        self.instance = Instance(self.workdir / "instances", "instance-1", redis_url=redis.url)
        self.instance.argv[1:3] = ["-c", self.PRELUDE]  # instead of "-m service"
        self.roles["instance-1"] = self.instance
        self.instance.start()


class ServiceCluster(Target):
    key, title = "service-3", "this service, 3 instances + nginx + Redis"

    def start(self) -> None:
        self.cluster: Cluster = self._stack.enter_context(running_cluster(self.workdir))
        self.roles["redis"] = self.cluster.redis
        for instance in self.cluster.instances:
            self.roles[instance.instance_id] = instance
        self.roles["nginx"] = self.cluster.nginx

    @property
    def port(self) -> int:
        return self.cluster.nginx.port

    def waiting_by_role(self) -> dict[str, int]:
        return {i.instance_id: healthz_polls(i.port) for i in self.cluster.instances}

    def instance_ports(self) -> dict[str, int]:
        return {i.instance_id: i.port for i in self.cluster.instances}


class Seed(Target):
    key, title = "seed", "seed design: Flask threaded, thread per poll"

    def start(self) -> None:
        self.seed_port = free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "bench.seed_flask", "--port", str(self.seed_port)]
        seed = Managed("seed", argv, self.workdir / "seed.log")
        self.roles["seed"] = seed
        seed.start()

        def up() -> bool:
            if not seed.running:
                raise RuntimeError(f"seed exited:\n{seed.log_text()[-3000:]}")
            return http_status(self.seed_port, "/healthz") == 200

        wait_until(up, "the seed reference")

    @property
    def port(self) -> int:
        return self.seed_port

    def waiting_by_role(self) -> dict[str, int]:
        return {"seed": healthz_polls(self.seed_port)}


class NchanOne(Target):
    key, title = "nchan-1", "Nchan, 1 nginx + Redis"
    dialect = "nchan"
    servers = 1

    def start(self) -> None:
        redis = RedisServer(self.workdir / "redis")
        self.roles["redis"] = redis
        redis.start()
        self.nchans = [
            NchanServer(self.workdir / f"nchan-{n + 1}", f"nchan-{n + 1}", redis.url)
            for n in range(self.servers)
        ]
        for server in self.nchans:
            self.roles[server.name] = server
            server.start()
        self.front = self.nchans[0].port

    @property
    def port(self) -> int:
        return self.front

    def waiting_by_role(self) -> dict[str, int]:
        return {server.name: server.subscribers() for server in self.nchans}


class NchanCluster(NchanOne):
    key, title = "nchan-2", "Nchan, 2 nginx + load balancer + Redis"
    servers = 2

    def start(self) -> None:
        super().start()
        balancer = Nginx(self.workdir / "balancer", [s.port for s in self.nchans])
        self.roles["nginx"] = balancer
        balancer.start()
        self.front = balancer.port


TARGETS: dict[str, type[Target]] = {
    t.key: t for t in (ServiceOne, ServiceOneNoGC, ServiceCluster, Seed, NchanOne, NchanCluster)
}


@contextlib.contextmanager
def running(key: str, workdir: Path) -> Iterator[Target]:
    target = TARGETS[key](workdir)
    try:
        target.start()
        yield target
    finally:
        target.stop()
