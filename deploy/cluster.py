"""Start and stop the cluster's real processes: redis-server, service instances, nginx.

One module for `make demo` (deploy/demo.py) and the tests (tests/conftest.py), so both run the
cluster the same way, with the same nginx config (deploy/nginx/nginx.conf). Everything binds to
127.0.0.1; readiness is awaited by probing, with deadlines, never by fixed sleeps.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent
NGINX_CONF = REPO / "deploy" / "nginx" / "nginx.conf"
HOST = "127.0.0.1"


_HANDED_OUT: set[int] = set()  # every port free_port gave in this process


def free_port() -> int:
    """A loopback port nothing listens on, and one this process has not handed out before: the
    ports of a cluster are chosen before its processes bind them, and the kernel may offer a
    port again until then (nginx once got instance-1's port; its probe then reached instance-1)."""
    while True:
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port: int = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def refuse_taken_port(port: int, name: str) -> None:
    """Fail now if something already listens on ``port``: the start probe would reach it, not
    the process about to start, and take it for started."""
    if port_open(port):
        raise RuntimeError(f"{name}: port {port} is already taken by another process")


def find_program(name: str) -> str:
    """A Debian program, which may live in /usr/sbin, outside a normal user's PATH."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")
    if not found:
        raise RuntimeError(f"{name} not found: run `make system-packages` (apt-get install {name})")
    return found


def redis_cli(port: int, *args: str) -> bytes:
    """What redis-cli prints for one command to the server (or Sentinel) on ``port``."""
    cli = find_program("redis-cli")
    return subprocess.run(
        [cli, "-h", HOST, "-p", str(port), *args], check=True, capture_output=True
    ).stdout


# Generous: on a loaded 2-core machine a Python process can take several seconds to start.
STARTUP_TIMEOUT = 30.0


def wait_until(check: object, what: str, timeout: float = 15.0) -> None:
    """Probe ``check()`` until it is true; fail with ``what`` after ``timeout`` seconds."""
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def http_status(port: int, path: str, timeout: float = 1.0) -> int | None:
    """The status of GET path on 127.0.0.1:port, or None when nothing answers."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


SS_LINE = re.compile(r"\S+:(\d+)\s+\S+:(\d+)\s.*\bino:(\d+)")  # `ss -e`: ports and inode


def tcp_connections(local_ports: Iterable[int] = (), peer_ports: Iterable[int] = ()) -> set[int]:
    """Inodes of the established (or connecting) TCP sockets whose local port is in
    ``local_ports`` or whose peer's is in ``peer_ports``.

    Asks the kernel through `ss` (iproute2), which filters before it answers: quick however many
    thousand sockets wait in TIME_WAIT on a busy machine. Without `ss`, reads /proc/net/tcp.
    """
    local, peer = set(local_ports), set(peer_ports)
    terms = [f"sport = :{p}" for p in local] + [f"dport = :{p}" for p in peer]
    ss = shutil.which("ss") or shutil.which("ss", path="/usr/sbin:/usr/bin:/sbin:/bin")
    if ss and terms:
        states = ["state", "established", "state", "syn-sent"]
        command = [ss, "-Htne", *states, f"( {' or '.join(terms)} )"]
        lines = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        return {int(m[3]) for m in map(SS_LINE.search, lines.splitlines()) if m}
    found = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()  # sl local remote state ... inode
            if fields[3] not in ("01", "02"):  # established, syn-sent
                continue
            if int(fields[1][-4:], 16) in local or int(fields[2][-4:], 16) in peer:
                found.add(int(fields[9]))
    return found


def socket_inodes(pid: int) -> list[int]:
    """The inodes of the sockets process ``pid`` has open (none if it is gone)."""
    inodes = []
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.append(int(target[8:-1]))
    return inodes


@dataclass
class Managed:
    """One child process, with its log file."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path = REPO
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (kept open for the child's life)
        self.process = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env},
            cwd=self.cwd,
            # Own session: Ctrl-C reaches only the runner, which stops the children in order.
            start_new_session=True,
        )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def send(self, signum: int) -> None:
        if self.running:
            assert self.process is not None
            self.process.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Send ``signum`` and wait for the exit (SIGKILL after ``timeout``); the exit code."""
        if self.process is None:
            return None
        if self.running:
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.process.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def start_on(self, port: int, ready: Callable[[], bool], what: str) -> None:
        """Start listening on ``port`` (refused when something else already does: its answer
        would be taken for ours) and wait until ``ready()``; a process that exits meanwhile
        fails at once, with the end of its log."""
        refuse_taken_port(port, self.name)
        Managed.start(self)

        def up() -> bool:
            if not self.running:
                raise RuntimeError(f"{self.name} exited:\n{self.log_text()[-3000:]}")
            return ready()

        self.await_start(up, what)

    def await_start(self, up: Callable[[], bool], what: str) -> None:
        """Wait until ``up()``; a start that fails or times out leaves no process or open log."""
        try:
            wait_until(up, what, STARTUP_TIMEOUT)
        except BaseException:
            self.kill()
            raise

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


HA_REDIS_CONF = REPO / "deploy" / "redis" / "ha.conf"  # one file: demo-ha, compose, tests


class RedisServer(Managed):
    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        durable: bool = False,
        replica_of: int | None = None,
        ha: bool = False,
    ) -> None:
        """A redis-server; ``replica_of`` the port of its primary; ``ha`` the options of a node
        watched by Sentinel (a primary refuses writes that no replica receives)."""
        self.port = port or free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        conf = workdir / "redis.conf"
        # The node's own file, including the shared one: Sentinel makes a node rewrite its
        # config (CONFIG REWRITE) when it changes its role, and it must not rewrite ha.conf.
        conf.write_text(f"include {HA_REDIS_CONF}\n" if ha else "")
        argv = [
            find_program("redis-server"),
            str(conf),  # a config file comes first, flags after it
            "--port", str(self.port),
            "--bind", HOST,
            "--dir", str(workdir),
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "yes",
        ]  # fmt: skip
        if durable:  # every acknowledged write is on disk before Redis answers
            argv += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            argv += ["--appendonly", "no"]
        if replica_of is not None:
            argv += ["--replicaof", HOST, str(replica_of)]
        super().__init__(f"redis-{self.port}", argv, workdir / "redis.log")

    def info(self, section: str) -> dict[str, str]:
        """INFO ``section`` as a dict (role, master_port, connected_slaves, ...)."""
        lines = self.command("INFO", section).decode().splitlines()
        pairs = [line.split(":", 1) for line in lines if ":" in line and line[0] != "#"]
        return dict(pairs)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> None:
        self.start_on(self.port, self.ping, f"redis-server on port {self.port}")

    def ping(self) -> bool:
        try:
            with socket.create_connection((HOST, self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """Run one command with redis-cli (test helpers: CLIENT KILL, FLUSHALL, ...)."""
        return redis_cli(self.port, *args)


SENTINEL_SERVICE = "taskstatus"
# Sentinel's down-after-milliseconds for the tests, the demo and compose. 1000 proved too short:
# a Sentinel sometimes judged a primary it had just switched to down before its first PONG and
# started a second, needless failover (redis/redis#8607; seen in CI on two busy cores).
SENTINEL_DOWN_AFTER_MS = 2000


class SentinelServer(Managed):
    """A Redis Sentinel (``redis-server sentinel.conf --sentinel``) watching ``primary_port``.

    Quick to decide, for tests and the demo: the primary is down after ``down_after_ms`` of
    silence, and a quorum of 2 Sentinels must agree before a failover."""

    def __init__(
        self,
        workdir: Path,
        primary_port: int,
        *,
        port: int | None = None,
        down_after_ms: int = SENTINEL_DOWN_AFTER_MS,
        service: str = SENTINEL_SERVICE,
        quorum: int = 2,
    ) -> None:
        self.port = port or free_port()
        self.service = service
        workdir.mkdir(parents=True, exist_ok=True)
        conf = workdir / f"sentinel-{self.port}.conf"  # Sentinel rewrites it: one per process
        conf.write_text(
            f"port {self.port}\n"
            f"bind {HOST}\n"
            f"dir {workdir}\n"
            f"sentinel monitor {service} {HOST} {primary_port} {quorum}\n"
            f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
            f"sentinel failover-timeout {service} {max(3 * down_after_ms, 3000)}\n"
            f"sentinel parallel-syncs {service} 1\n"
        )
        argv = [find_program("redis-server"), str(conf), "--sentinel", "--daemonize", "no"]
        super().__init__(f"sentinel-{self.port}", argv, workdir / f"sentinel-{self.port}.log")

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self) -> None:
        self.start_on(self.port, lambda: self.primary() is not None, f"sentinel on {self.port}")

    def command(self, *args: str) -> bytes:
        return redis_cli(self.port, *args)

    def primary(self) -> int | None:
        """The port of the primary this Sentinel names now, or None when it does not answer."""
        try:
            reply = self.command("SENTINEL", "get-master-addr-by-name", self.service)
        except (subprocess.CalledProcessError, OSError):
            return None
        parts = reply.decode().split()
        return int(parts[1]) if len(parts) == 2 else None

    def knows(self, replicas: int, sentinels: int) -> bool:
        """Whether this Sentinel has found ``replicas`` replicas and ``sentinels`` other Sentinels
        (through the primary's hello channel): until then a failover cannot be agreed."""
        try:
            reply = self.command("SENTINEL", "master", self.service).decode().split()
        except (subprocess.CalledProcessError, OSError):
            return False
        fields = dict(zip(reply[::2], reply[1::2], strict=False))
        return (
            int(fields.get("num-slaves", 0)) >= replicas
            and int(fields.get("num-other-sentinels", 0)) >= sentinels
        )


class Instance(Managed):
    """One service process (`python -m service`)."""

    def __init__(
        self,
        workdir: Path,
        instance_id: str,
        *,
        redis_url: str = "",
        port: int | None = None,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.instance_id = instance_id
        workdir.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable, "-m", "service",
            "--host", HOST,
            "--port", str(self.port),
            "--instance-id", instance_id,
            "--redis-url", redis_url,
            *extra_args,
        ]  # fmt: skip
        super().__init__(instance_id, argv, workdir / f"{instance_id}.log", env=env or {})

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, *, ready: bool = True) -> None:
        """Start, and wait until /readyz answers 200 (or only /healthz, with ready=False)."""
        probe = "/readyz" if ready else "/healthz"
        self.start_on(
            self.port, lambda: http_status(self.port, probe) == 200, f"{self.name} {probe}"
        )


class Nginx(Managed):
    """nginx with the repo's config, listening on ``port``, balancing over ``upstream_ports``."""

    def __init__(self, workdir: Path, upstream_ports: Sequence[int], port: int | None = None):
        self.port = port or free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        conf = workdir / "nginx.conf"
        conf.unlink(missing_ok=True)
        conf.symlink_to(NGINX_CONF)  # the very same file compose mounts
        (workdir / "listen.conf").write_text(f"listen {HOST}:{self.port};\n")
        self.ever_routed: set[int] = set()  # every instance port in any upstream.conf written
        self.write_upstreams(upstream_ports)
        directives = "daemon off;"
        if os.geteuid() == 0:
            directives += " user root;"  # workers can reach a private temp folder
        argv = [
            find_program("nginx"), "-p", f"{workdir}/", "-c", str(conf), "-e", "stderr",
            "-g", directives,
        ]  # fmt: skip
        super().__init__("nginx", argv, workdir / "nginx.log")

    def write_upstreams(self, ports: Sequence[int]) -> None:
        self.ever_routed.update(ports)
        lines = [f"server {HOST}:{p} max_fails=1 fail_timeout=5s;" for p in ports]
        (self.workdir / "upstream.conf").write_text("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        self.start_on(self.port, lambda: port_open(self.port), f"nginx on port {self.port}")

    def workers(self) -> dict[int, str]:
        """This nginx's worker processes: pid -> title ("nginx: worker process", or "... is
        shutting down" for one that, after a reload, only finishes the requests it has)."""
        if not self.running:
            return {}
        assert self.process is not None
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == self.process.pid:
                    title = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
                    found[int(entry.name)] = title.decode(errors="replace").strip()
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile, or not ours to read
        return found

    def reload(self, timeout: float = 15.0) -> None:
        """Re-read the config (SIGHUP, as `nginx -s reload`) and return once it is in force.

        The master starts new workers and tells the old ones to stop taking requests: they close
        their listening sockets and idle connections and finish the requests they have (a held
        poll keeps its old worker until it is answered). But a connection an old worker accepted
        before the reload and whose request had not arrived yet is not idle: its request still
        arrives there and is routed by the OLD upstream list. So in force means: new workers are
        up, every old one is shutting down, and no old one holds a client connection that it has
        not passed on to an instance (client_header_timeout bounds the wait).
        """
        old = {pid for pid, title in self.workers().items() if not title.endswith("shutting down")}
        self.send(signal.SIGHUP)

        def in_force() -> bool:
            if not self.running:
                raise RuntimeError(f"nginx exited on reload:\n{self.log_text()[-3000:]}")
            now = self.workers()
            fresh = [p for p, title in now.items() if p not in old and "worker process" in title]
            serving_old = [p for p in old if p in now and not now[p].endswith("shutting down")]
            if not fresh or serving_old:
                return False
            draining = [p for p, title in now.items() if title.endswith("shutting down")]
            return self.unrouted(draining) == 0

        wait_until(in_force, "nginx to reload", timeout)

    def unrouted(self, pids: Iterable[int]) -> int:
        """Client connections of these workers beyond their connections to instances: requests
        they may still route (or answers they are finishing)."""
        pids = list(pids)
        if not pids:
            return 0
        clients = tcp_connections(local_ports=[self.port])
        upstreams = tcp_connections(peer_ports=self.ever_routed)
        total = 0
        for pid in pids:
            inodes = set(socket_inodes(pid))
            total += max(0, len(inodes & clients) - len(inodes & upstreams))
        return total


@dataclass
class Cluster:
    redis: RedisServer
    instances: list[Instance]
    nginx: Nginx

    @property
    def url(self) -> str:
        return self.nginx.url

    def take_out(self, app: Instance) -> None:
        """Drain ``app`` at nginx before stopping it (rolling restart): nginx sends it nothing new.

        Stopping an instance that nginx still routes to fails writes: nginx never retries one
        (it may have been applied), so a write sent to the stopping instance's closed port
        (connect refused) or on a keep-alive connection it closes as it stops (reset) gets 502.
        Reads are retried on another instance, but each failure marks the instance down for
        fail_timeout, and restarting all three within it leaves nginx with "no live upstreams".
        """
        self.nginx.write_upstreams([a.port for a in self.instances if a is not app])
        self.nginx.reload()

    def put_back(self, app: Instance) -> None:
        """Route to every instance again (after ``app`` restarted and is ready)."""
        assert app in self.instances
        self.nginx.write_upstreams([a.port for a in self.instances])
        self.nginx.reload()

    def stop(self) -> None:
        for child in self.processes():
            with contextlib.suppress(Exception):
                child.stop()

    def processes(self) -> list[Managed]:
        """Every process of the cluster, in the order they stop: front to back."""
        return [self.nginx, *self.instances, self.redis]


@dataclass
class HACluster(Cluster):
    """A primary (``redis``, the first one), its replicas and the Sentinels watching them, with
    the instances following the primary through the Sentinels."""

    replicas: list[RedisServer] = field(default_factory=list)
    sentinels: list[SentinelServer] = field(default_factory=list)

    def processes(self) -> list[Managed]:
        return [self.nginx, *self.instances, *self.sentinels, self.redis, *self.replicas]

    @property
    def nodes(self) -> list[RedisServer]:
        return [self.redis, *self.replicas]

    def primary(self) -> RedisServer:
        """The node the Sentinels name as the primary now."""
        ports = {s.primary() for s in self.sentinels if s.running} - {None}
        (port,) = ports or {None}  # the Sentinels agree once a failover is done
        return next(node for node in self.nodes if node.port == port)


def sentinel_args(sentinels: Sequence[SentinelServer]) -> list[str]:
    """The instance flags that make it find and follow the primary through ``sentinels``."""
    return ["--redis-sentinels", ",".join(s.address for s in sentinels)]


@contextlib.contextmanager
def running_ha_cluster(
    workdir: Path,
    *,
    instances: int = 3,
    replicas: int = 2,
    sentinels: int = 3,
    port: int | None = None,
    instance_ports: Sequence[int] = (),
    redis_ports: Sequence[int] = (),
    sentinel_ports: Sequence[int] = (),
    down_after_ms: int = SENTINEL_DOWN_AFTER_MS,
    instance_args: Sequence[str] = (),
    prefix: str = "taskstatus:",
) -> Iterator[HACluster]:
    """A primary with ``replicas`` replicas, ``sentinels`` Sentinels, ``instances`` service
    processes following the primary through them, and nginx; all stopped on exit. The nodes keep
    no AOF: what survives a node's death is what its replicas hold."""
    ports = list(redis_ports) + [free_port() for _ in range(1 + replicas - len(redis_ports))]
    primary = RedisServer(workdir / f"redis-{ports[0]}", ports[0], ha=True)
    copies = [
        RedisServer(workdir / f"redis-{p}", p, replica_of=primary.port, ha=True)
        for p in ports[1 : 1 + replicas]
    ]
    watchers = [
        SentinelServer(
            workdir / "sentinels",
            primary.port,
            port=sentinel_ports[n] if n < len(sentinel_ports) else None,
            down_after_ms=down_after_ms,
        )
        for n in range(sentinels)
    ]
    apps = [
        Instance(
            workdir / "instances",
            f"instance-{n + 1}",
            port=instance_ports[n] if n < len(instance_ports) else None,
            extra_args=["--redis-prefix", prefix, *sentinel_args(watchers), *instance_args],
        )
        for n in range(instances)
    ]
    nginx = Nginx(workdir / "nginx", [app.port for app in apps], port)
    cluster = HACluster(primary, apps, nginx, copies, watchers)
    try:
        primary.start()
        for copy in copies:
            copy.start()
        wait_until(
            lambda: primary.info("replication").get("connected_slaves") == str(replicas),
            f"{replicas} replicas in sync with the primary",
        )
        for watcher in watchers:
            watcher.start()
        wait_until(
            lambda: all(w.knows(replicas, sentinels - 1) for w in watchers),
            "every Sentinel to know the replicas and the other Sentinels",
            STARTUP_TIMEOUT,
        )
        for app in apps:
            app.start()
        nginx.start()
        yield cluster
    finally:
        cluster.stop()


@contextlib.contextmanager
def running_cluster(
    workdir: Path,
    *,
    instances: int = 3,
    port: int | None = None,
    instance_ports: Sequence[int] = (),
    redis_port: int | None = None,
    durable_redis: bool = False,
    instance_args: Sequence[str] = (),
    prefix: str = "taskstatus:",
) -> Iterator[Cluster]:
    """redis-server, ``instances`` service processes and nginx in front; all stopped on exit."""
    redis = RedisServer(workdir / "redis", redis_port, durable=durable_redis)
    apps = [
        Instance(
            workdir / "instances",
            f"instance-{n + 1}",
            redis_url=redis.url,
            port=instance_ports[n] if n < len(instance_ports) else None,
            extra_args=["--redis-prefix", prefix, *instance_args],
        )
        for n in range(instances)
    ]
    nginx = Nginx(workdir / "nginx", [app.port for app in apps], port)
    cluster = Cluster(redis, apps, nginx)
    try:
        redis.start()
        for app in apps:
            app.start()
        nginx.start()
        yield cluster
    finally:
        cluster.stop()
