"""Settings, from environment variables overridden by command-line flags, frozen into one object.

``create_app`` takes a ``Config``; nothing else in the service reads the environment.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .history import DEFAULT_HISTORY_LENGTH, MAX_HISTORY_LENGTH
from .model import DEFAULT_STATUSES, DEFAULT_TERMINAL_STATUSES, TASK_ID_PATTERN

MIN_SECRET_BYTES = 32  # HS256 keys shorter than the hash are weak (RFC 7518, 3.2)
_ORIGIN_RE = re.compile(
    r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?"
)


Address = tuple[str, int]  # (host, port)


def parse_addresses(raw: str) -> tuple[Address, ...]:
    """``host:port,host:port`` -> ((host, port), ...); ValueError names what is wrong."""
    found = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"REDIS_SENTINELS: {part!r} is not host:port")
        found.append((host.strip("[]"), int(port)))
    if not found:
        raise ValueError("REDIS_SENTINELS names no Sentinel")
    return tuple(found)


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8080
    poll_timeout: int = 30  # seconds a poll is held when the client names no timeout
    poll_timeout_max: int = 55  # cap on any hold; keep it below the proxy's read timeout
    # Seconds between SSE heartbeat comments and WebSocket pings; keep it below the proxy's read
    # timeout, or it closes quiet streams.
    stream_heartbeat: float = 15.0
    statuses: tuple[str, ...] = DEFAULT_STATUSES
    log_level: str = "INFO"
    instance_id: str = ""
    redis_url: str = ""  # empty: the embedded in-process backend
    redis_prefix: str = "taskstatus:"
    # High availability (backend/sentinel.py): the primary found and followed through Sentinel.
    redis_sentinels: tuple[str, ...] = ()  # host:port of each Sentinel; set: REDIS_URL unused
    redis_sentinel_service: str = "taskstatus"  # the name the Sentinels monitor the primary by
    redis_sentinel_password: str = field(default="", repr=False)  # the Sentinels' requirepass
    redis_password: str = field(default="", repr=False)  # the Redis nodes' (with Sentinel)
    # Replicas that must hold a write before it is acknowledged (WAIT); None: 1 with Sentinel,
    # else 0. REDIS_REPLICATION_TIMEOUT is how long a write waits for them, in milliseconds.
    redis_min_replicas: int | None = None
    redis_replication_timeout: int = 500
    log_interval: float = 30.0  # seconds between "waiting clients" log lines
    shutdown_timeout: float = 10.0  # seconds to finish in-flight requests on SIGTERM
    max_held_polls: int = 20000  # past it, new polls and watches get 503 + Retry-After
    max_tasks: int = 100000  # past it, a write that would create a task gets 507
    history_length: int = DEFAULT_HISTORY_LENGTH  # changes kept per task; 0: no history
    # Task lifecycle (retention.py): a task in one of the terminal statuses that nobody wrote for
    # FINISHED_TASK_TTL seconds is deleted by the service (0: kept forever); a deleted task's
    # tombstone is kept TOMBSTONE_TTL seconds, then the task reads as never written.
    finished_task_ttl: int = 7 * 24 * 3600
    # The default keeps those of completed, failed, cancelled that are configured statuses.
    terminal_statuses: tuple[str, ...] = DEFAULT_TERMINAL_STATUSES
    tombstone_ttl: int = 3600
    sweep_interval: float = 1.0  # seconds between this instance's retention sweeps; 0: none
    stats_interval: float = 1.0  # seconds between this instance's dashboard records; 0: none
    event_loop: str = "auto"  # auto (uvloop when installed) | uvloop | asyncio
    body_read_timeout: float = 10.0  # seconds for a write's whole body to arrive, else 408
    # Authentication (auth.py): off unless a secret (HS256) or a public key file (RS256/ES256).
    auth_secret: str = field(default="", repr=False)  # never in logs or tracebacks
    auth_public_key_file: str = ""
    auth_audience: str = "taskstatus"  # the `aud` every token must carry
    auth_issuer: str = ""  # when set, the `iss` every token must carry
    auth_public_reads: bool = False  # reads need no token (writes still do)
    cors_origins: tuple[str, ...] = ()  # origins whose pages may call the API; empty: none
    write_rate_limit: float = 0.0  # writes per second per token subject or client; 0: no limit
    write_rate_burst: int = 10  # writes a client may make at once before the rate applies
    trusted_proxies: tuple[str, ...] = ()  # addresses/networks whose X-Forwarded-For is believed
    max_header_bytes: int = 8190  # the request line and each header line; longer: 400
    # Idle keep-alive connections close after this, and so do connections that have not sent
    # complete request headers by then (slowloris). Keep it above the proxy's upstream keep-alive.
    keepalive_timeout: float = 75.0
    # Plain long polls are taken at the connection and held without a handler (fastpoll.py);
    # off: every poll goes through aiohttp's routing and middlewares (for comparison).
    fast_poll: bool = True

    def __post_init__(self) -> None:
        if not self.statuses or len(set(self.statuses)) != len(self.statuses):
            raise ValueError("STATUSES must list at least one status, each once")
        for status in self.statuses:
            if not re.fullmatch(TASK_ID_PATTERN, status):
                raise ValueError(f"status {status!r} must match {TASK_ID_PATTERN}")
        # At least a second: a zero hold turns every client's "poll again at once" into a busy loop.
        if not 1 <= self.poll_timeout <= self.poll_timeout_max:
            raise ValueError("POLL_TIMEOUT must be between 1 and POLL_TIMEOUT_MAX")
        if not 0 < self.stream_heartbeat <= 60:
            raise ValueError("STREAM_HEARTBEAT must be more than 0 and at most 60 seconds")
        if self.max_held_polls < 1 or self.max_tasks < 1:
            raise ValueError("MAX_HELD_POLLS and MAX_TASKS must be at least 1")
        if not 0 <= self.history_length <= MAX_HISTORY_LENGTH:
            raise ValueError(f"HISTORY_LENGTH must be between 0 and {MAX_HISTORY_LENGTH}")
        if self.stats_interval != 0 and not 0.1 <= self.stats_interval <= 60:
            raise ValueError("STATS_INTERVAL must be 0 or between 0.1 and 60 seconds")
        self._check_lifecycle_settings()
        self._check_security_settings()
        self._check_redis_settings()
        if not self.instance_id:
            object.__setattr__(self, "instance_id", f"{socket.gethostname()}:{self.port}")

    def _check_lifecycle_settings(self) -> None:
        if self.terminal_statuses == DEFAULT_TERMINAL_STATUSES:
            configured = tuple(s for s in self.terminal_statuses if s in self.statuses)
            object.__setattr__(self, "terminal_statuses", configured)
        unknown = [s for s in self.terminal_statuses if s not in self.statuses]
        if unknown:
            raise ValueError(
                f"TERMINAL_STATUSES must be configured statuses; not in STATUSES: {unknown}"
            )
        if self.finished_task_ttl < 0:
            raise ValueError("FINISHED_TASK_TTL must be 0 (keep forever) or more seconds")
        # A poll held on a deleted task must find the tombstone: it may come back at most
        # POLL_TIMEOUT_MAX later, and once more after an error.
        if self.tombstone_ttl < 2 * self.poll_timeout_max:
            raise ValueError("TOMBSTONE_TTL must be at least twice POLL_TIMEOUT_MAX")
        if self.sweep_interval != 0 and not 0.01 <= self.sweep_interval <= 60:
            raise ValueError("SWEEP_INTERVAL must be 0 or between 0.01 and 60 seconds")

    def _check_security_settings(self) -> None:
        if self.auth_secret and self.auth_public_key_file:
            raise ValueError("set AUTH_SECRET or AUTH_PUBLIC_KEY_FILE, not both")
        if self.auth_secret and len(self.auth_secret.encode()) < MIN_SECRET_BYTES:
            raise ValueError(f"AUTH_SECRET must be at least {MIN_SECRET_BYTES} bytes")
        if self.auth_enabled and not self.auth_audience:
            raise ValueError("AUTH_AUDIENCE must not be empty")
        for origin in self.cors_origins:
            if origin != "*" and not _ORIGIN_RE.fullmatch(origin):
                raise ValueError(f"CORS origin {origin!r} must look like https://host[:port]")
        if self.write_rate_limit < 0 or self.write_rate_burst < 1:
            raise ValueError("WRITE_RATE_LIMIT must be >= 0 and WRITE_RATE_BURST >= 1")
        try:
            _ = self.trusted_networks
        except ValueError as exc:
            raise ValueError(f"TRUSTED_PROXIES: {exc}") from None
        if self.max_header_bytes < 1024:
            raise ValueError("MAX_HEADER_BYTES must be at least 1024")
        if self.keepalive_timeout <= 0:
            raise ValueError("KEEPALIVE_TIMEOUT must be positive")

    def _check_redis_settings(self) -> None:
        if self.redis_sentinels:
            self.sentinel_addresses  # noqa: B018 (parsed to fail now, naming the bad entry)
            if not self.redis_sentinel_service:
                raise ValueError("REDIS_SENTINEL_SERVICE must not be empty")
        if self.redis_min_replicas is not None and not 0 <= self.redis_min_replicas <= 16:
            raise ValueError("REDIS_MIN_REPLICAS must be between 0 and 16")
        if not 1 <= self.redis_replication_timeout <= 60000:
            raise ValueError("REDIS_REPLICATION_TIMEOUT must be between 1 and 60000 ms")

    @property
    def backend_name(self) -> str:
        return "redis" if self.redis_url or self.redis_sentinels else "memory"

    @property
    def sentinel_addresses(self) -> tuple[Address, ...]:
        return parse_addresses(",".join(self.redis_sentinels)) if self.redis_sentinels else ()

    @property
    def min_replicas(self) -> int:
        """Replicas a write must reach before it is acknowledged."""
        if self.redis_min_replicas is not None:
            return self.redis_min_replicas
        return 1 if self.redis_sentinels else 0

    @property
    def auth_enabled(self) -> bool:
        return bool(self.auth_secret or self.auth_public_key_file)

    @property
    def trusted_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(entry, strict=False) for entry in self.trusted_proxies)


def _comma_list(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {raw!r}")


def load_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Build the config: defaults, then environment variables, then command-line flags."""
    env = os.environ if env is None else env
    d = Config()  # the defaults
    parser = argparse.ArgumentParser(
        prog="python -m service", description="Real-time task status over HTTP long polling."
    )
    parser.add_argument("--host", default=env.get("HOST", d.host))
    parser.add_argument("--port", type=int, default=env.get("PORT", str(d.port)))
    parser.add_argument(
        "--poll-timeout", type=int, default=env.get("POLL_TIMEOUT", str(d.poll_timeout))
    )
    parser.add_argument(
        "--poll-timeout-max",
        type=int,
        default=env.get("POLL_TIMEOUT_MAX", str(d.poll_timeout_max)),
    )
    parser.add_argument(
        "--stream-heartbeat",
        type=float,
        default=env.get("STREAM_HEARTBEAT", str(d.stream_heartbeat)),
        help="seconds between SSE heartbeats and WebSocket pings",
    )
    parser.add_argument(
        "--statuses",
        type=_comma_list,
        default=env.get("STATUSES", ",".join(DEFAULT_STATUSES)),
        help="comma-separated; the first is the status of a task never written",
    )
    parser.add_argument("--log-level", default=env.get("LOG_LEVEL", d.log_level))
    parser.add_argument("--instance-id", default=env.get("INSTANCE_ID", ""))
    parser.add_argument("--redis-url", default=env.get("REDIS_URL", ""))
    parser.add_argument("--redis-prefix", default=env.get("REDIS_PREFIX", d.redis_prefix))
    _add_high_availability_arguments(parser, env, d)
    parser.add_argument(
        "--log-interval",
        type=float,
        default=env.get("LOG_INTERVAL", str(d.log_interval)),
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=env.get("SHUTDOWN_TIMEOUT", str(d.shutdown_timeout)),
    )
    parser.add_argument(
        "--max-held-polls",
        type=int,
        default=env.get("MAX_HELD_POLLS", str(d.max_held_polls)),
        help="held polls and watches per instance; past it, new ones get 503",
    )
    parser.add_argument(
        "--max-tasks",
        type=int,
        default=env.get("MAX_TASKS", str(d.max_tasks)),
        help="tasks in the store; past it, writes creating a task get 507",
    )
    parser.add_argument(
        "--history-length",
        type=int,
        default=env.get("HISTORY_LENGTH", str(d.history_length)),
        help="changes kept per task for GET /api/tasks/{id}/history; 0: none",
    )
    _add_lifecycle_arguments(parser, env, d)
    parser.add_argument(
        "--stats-interval",
        type=float,
        default=env.get("STATS_INTERVAL", str(d.stats_interval)),
        help="seconds between this instance's records for the dashboard; 0: share none",
    )
    _add_security_arguments(parser, env, d)
    parser.add_argument(
        "--body-read-timeout",
        type=float,
        default=env.get("BODY_READ_TIMEOUT", str(d.body_read_timeout)),
    )
    parser.add_argument(
        "--event-loop",
        choices=("auto", "uvloop", "asyncio"),
        default=env.get("EVENT_LOOP", d.event_loop),
    )
    args = parser.parse_args(argv)
    try:
        return Config(**vars(args))
    except ValueError as exc:
        parser.error(str(exc))


def _add_high_availability_arguments(
    parser: argparse.ArgumentParser, env: Mapping[str, str], d: Config
) -> None:
    """Redis Sentinel and replicated writes. Passwords have no flag (ps shows command lines)."""
    parser.set_defaults(
        redis_sentinel_password=env.get("REDIS_SENTINEL_PASSWORD", ""),
        redis_password=env.get("REDIS_PASSWORD", ""),
    )
    parser.add_argument(
        "--redis-sentinels",
        type=_comma_list,
        default=env.get("REDIS_SENTINELS", ""),
        help="host:port,host:port: find and follow the Redis primary through these Sentinels",
    )
    parser.add_argument(
        "--redis-sentinel-service",
        default=env.get("REDIS_SENTINEL_SERVICE", d.redis_sentinel_service),
        help="the name the Sentinels monitor the primary by",
    )
    parser.add_argument(
        "--redis-min-replicas",
        type=int,
        default=env.get("REDIS_MIN_REPLICAS"),
        help="replicas that must hold a write before it is acknowledged (default: 1 with "
        "Sentinel, else 0)",
    )
    parser.add_argument(
        "--redis-replication-timeout",
        type=int,
        default=env.get("REDIS_REPLICATION_TIMEOUT", str(d.redis_replication_timeout)),
        help="milliseconds a write waits for its replicas; then 503 not_replicated",
    )


def _add_lifecycle_arguments(
    parser: argparse.ArgumentParser, env: Mapping[str, str], d: Config
) -> None:
    """Deletion and retention (retention.py)."""
    parser.add_argument(
        "--finished-task-ttl",
        type=int,
        default=env.get("FINISHED_TASK_TTL", str(d.finished_task_ttl)),
        help="seconds a task in a terminal status is kept after its last write, then deleted "
        "(default 604800, 7 days); 0: kept forever",
    )
    parser.add_argument(
        "--terminal-statuses",
        type=_comma_list,
        default=env.get("TERMINAL_STATUSES", ",".join(DEFAULT_TERMINAL_STATUSES)),
        help="comma-separated statuses (of --statuses) that FINISHED_TASK_TTL applies to "
        "(default completed,failed,cancelled)",
    )
    parser.add_argument(
        "--tombstone-ttl",
        type=int,
        default=env.get("TOMBSTONE_TTL", str(d.tombstone_ttl)),
        help="seconds a deleted task's tombstone is kept (default 3600; at least twice "
        "POLL_TIMEOUT_MAX), then the task reads as never written",
    )
    parser.add_argument(
        "--sweep-interval",
        type=float,
        default=env.get("SWEEP_INTERVAL", str(d.sweep_interval)),
        help="seconds between this instance's retention sweeps (default 1); 0: it sweeps "
        "nothing, other instances do",
    )


def _add_security_arguments(
    parser: argparse.ArgumentParser, env: Mapping[str, str], d: Config
) -> None:
    """Authentication, CORS and abuse limits. AUTH_SECRET has no flag: a secret on a command
    line is visible to every user of the machine (ps)."""
    parser.set_defaults(auth_secret=env.get("AUTH_SECRET", ""))
    parser.add_argument(
        "--auth-public-key-file",
        default=env.get("AUTH_PUBLIC_KEY_FILE", ""),
        help="PEM public key (RSA: RS256, EC P-256: ES256) that verifies tokens",
    )
    parser.add_argument("--auth-audience", default=env.get("AUTH_AUDIENCE", d.auth_audience))
    parser.add_argument("--auth-issuer", default=env.get("AUTH_ISSUER", ""))
    parser.add_argument(
        "--auth-public-reads",
        type=_flag,
        default=env.get("AUTH_PUBLIC_READS", "false"),
        help="true: reads need no token (writes still do)",
    )
    parser.add_argument(
        "--cors-origins",
        type=_comma_list,
        default=env.get("CORS_ORIGINS", ""),
        help="comma-separated origins (https://host[:port]) allowed to call the API",
    )
    parser.add_argument(
        "--write-rate-limit",
        type=float,
        default=env.get("WRITE_RATE_LIMIT", str(d.write_rate_limit)),
        help="writes per second per token subject (or client address); 0: no limit",
    )
    parser.add_argument(
        "--write-rate-burst",
        type=int,
        default=env.get("WRITE_RATE_BURST", str(d.write_rate_burst)),
    )
    parser.add_argument(
        "--trusted-proxies",
        type=_comma_list,
        default=env.get("TRUSTED_PROXIES", ""),
        help="comma-separated addresses or networks whose X-Forwarded-For is believed",
    )
    parser.add_argument(
        "--max-header-bytes",
        type=int,
        default=env.get("MAX_HEADER_BYTES", str(d.max_header_bytes)),
    )
    parser.add_argument(
        "--keepalive-timeout",
        type=float,
        default=env.get("KEEPALIVE_TIMEOUT", str(d.keepalive_timeout)),
    )
    parser.add_argument(
        "--fast-poll",
        type=_flag,
        default=env.get("FAST_POLL", str(d.fast_poll)),
        help="true: plain long polls skip aiohttp's routing and middlewares (fastpoll.py)",
    )
