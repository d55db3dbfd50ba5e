"""Settings, from environment variables overridden by command-line flags, frozen into one object.

``create_app`` takes a ``Config``; nothing else in the service reads the environment.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .model import DEFAULT_STATUSES, TASK_ID_PATTERN


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8080
    poll_timeout: int = 30  # seconds a poll is held when the client names no timeout
    poll_timeout_max: int = 55  # cap on any hold; keep it below the proxy's read timeout
    statuses: tuple[str, ...] = DEFAULT_STATUSES
    log_level: str = "INFO"
    instance_id: str = ""
    redis_url: str = ""  # empty: the embedded in-process backend
    redis_prefix: str = "taskstatus:"
    log_interval: float = 30.0  # seconds between "waiting clients" log lines
    shutdown_timeout: float = 10.0  # seconds to finish in-flight requests on SIGTERM
    max_held_polls: int = 20000  # past it, new polls and watches get 503 + Retry-After
    max_tasks: int = 100000  # past it, a write that would create a task gets 507

    def __post_init__(self) -> None:
        if not self.statuses or len(set(self.statuses)) != len(self.statuses):
            raise ValueError("STATUSES must list at least one status, each once")
        for status in self.statuses:
            if not re.fullmatch(TASK_ID_PATTERN, status):
                raise ValueError(f"status {status!r} must match {TASK_ID_PATTERN}")
        # At least a second: a zero hold turns every client's "poll again at once" into a busy loop.
        if not 1 <= self.poll_timeout <= self.poll_timeout_max:
            raise ValueError("POLL_TIMEOUT must be between 1 and POLL_TIMEOUT_MAX")
        if self.max_held_polls < 1 or self.max_tasks < 1:
            raise ValueError("MAX_HELD_POLLS and MAX_TASKS must be at least 1")
        if not self.instance_id:
            object.__setattr__(self, "instance_id", f"{socket.gethostname()}:{self.port}")

    @property
    def backend_name(self) -> str:
        return "redis" if self.redis_url else "memory"


def _statuses(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


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
        "--statuses",
        type=_statuses,
        default=env.get("STATUSES", ",".join(DEFAULT_STATUSES)),
        help="comma-separated; the first is the status of a task never written",
    )
    parser.add_argument("--log-level", default=env.get("LOG_LEVEL", d.log_level))
    parser.add_argument("--instance-id", default=env.get("INSTANCE_ID", ""))
    parser.add_argument("--redis-url", default=env.get("REDIS_URL", ""))
    parser.add_argument("--redis-prefix", default=env.get("REDIS_PREFIX", d.redis_prefix))
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
    args = parser.parse_args(argv)
    try:
        return Config(**vars(args))
    except ValueError as exc:
        parser.error(str(exc))
