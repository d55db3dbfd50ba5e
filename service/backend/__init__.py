"""State stores, picked by configuration: memory when no Redis URL is set, else redis."""

from __future__ import annotations

from ..config import Config
from .base import (
    Backend,
    Retention,
    SweepResult,
    TaskLimitReached,
    TaskNotFound,
    VersionConflict,
    WriteResult,
)
from .memory import MemoryBackend

__all__ = [
    "Backend",
    "MemoryBackend",
    "Retention",
    "SweepResult",
    "TaskLimitReached",
    "TaskNotFound",
    "VersionConflict",
    "WriteResult",
    "create_backend",
]


def create_backend(config: Config) -> Backend:
    retention = Retention(config.finished_task_ttl, config.terminal_statuses, config.tombstone_ttl)
    if config.backend_name == "memory":
        return MemoryBackend(config.statuses, config.max_tasks, config.history_length, retention)
    # Imported only when used: the embedded mode needs no redis.
    from .redis import RedisBackend
    from .sentinel import SentinelSettings

    sentinel = None
    if config.redis_sentinels:
        sentinel = SentinelSettings(
            config.sentinel_addresses,
            config.redis_sentinel_service,
            config.redis_sentinel_password,
        )
    return RedisBackend(
        config.statuses,
        config.max_tasks,
        url=config.redis_url,
        prefix=config.redis_prefix,
        history_length=config.history_length,
        retention=retention,
        sentinel=sentinel,
        password=config.redis_password,
        min_replicas=config.min_replicas,
        replication_timeout_ms=config.redis_replication_timeout,
    )
