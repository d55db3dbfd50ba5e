"""Settings from the environment and the command line, and how the app honours them."""

from __future__ import annotations

import socket
import time

import pytest

from service.config import Config, load_config
from service.model import DEFAULT_STATUSES

from .conftest import ClientFactory, hub_of

ALL_ENV = {
    "HOST": "0.0.0.0",
    "PORT": "9001",
    "POLL_TIMEOUT": "20",
    "POLL_TIMEOUT_MAX": "40",
    "STATUSES": " queued, running ,done,",
    "LOG_LEVEL": "DEBUG",
    "INSTANCE_ID": "env-instance",
    "REDIS_URL": "redis://127.0.0.1:6399/0",
    "REDIS_PREFIX": "ts-test:",
    "LOG_INTERVAL": "2.5",
    "SHUTDOWN_TIMEOUT": "3",
}


def test_defaults_without_environment_or_flags() -> None:
    config = load_config([], {})
    assert config == Config(instance_id=f"{socket.gethostname()}:8080")
    assert (config.host, config.port) == ("127.0.0.1", 8080)
    assert (config.poll_timeout, config.poll_timeout_max) == (30, 55)
    assert config.statuses == DEFAULT_STATUSES
    assert config.backend_name == "memory"


def test_every_setting_is_read_from_the_environment() -> None:
    assert load_config([], ALL_ENV) == Config(
        host="0.0.0.0",
        port=9001,
        poll_timeout=20,
        poll_timeout_max=40,
        statuses=("queued", "running", "done"),
        log_level="DEBUG",
        instance_id="env-instance",
        redis_url="redis://127.0.0.1:6399/0",
        redis_prefix="ts-test:",
        log_interval=2.5,
        shutdown_timeout=3.0,
    )
    assert load_config([], ALL_ENV).backend_name == "redis"


def test_command_line_flags_override_the_environment() -> None:
    argv = [
        "--host=127.0.0.2",
        "--port=9002",
        "--poll-timeout=5",
        "--poll-timeout-max=10",
        "--statuses=new,old",
        "--log-level=WARNING",
        "--instance-id=cli-instance",
        "--redis-url=",
        "--redis-prefix=cli:",
        "--log-interval=0.5",
        "--shutdown-timeout=1.5",
    ]
    assert load_config(argv, ALL_ENV) == Config(
        host="127.0.0.2",
        port=9002,
        poll_timeout=5,
        poll_timeout_max=10,
        statuses=("new", "old"),
        log_level="WARNING",
        instance_id="cli-instance",
        redis_url="",
        redis_prefix="cli:",
        log_interval=0.5,
        shutdown_timeout=1.5,
    )


def test_instance_id_defaults_to_host_name_and_port() -> None:
    assert load_config(["--port", "8123"], {}).instance_id == f"{socket.gethostname()}:8123"


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--poll-timeout=60"], {}),  # above the default cap of 55
        (["--poll-timeout=-1"], {}),
        (["--poll-timeout=0"], {}),  # a zero default hold would make clients busy-loop
        ([], {"POLL_TIMEOUT": "10", "POLL_TIMEOUT_MAX": "5"}),
        (["--statuses=a,b,a"], {}),
        (["--statuses=,"], {}),
        ([], {"STATUSES": "ok,not ok"}),
        (["--statuses=-x"], {}),
        (["--port=http"], {}),
        (["--unknown-flag"], {}),
        ([], {"TERMINAL_STATUSES": "completed,archived"}),  # not a configured status
        (["--statuses=queued,done", "--terminal-statuses=completed"], {}),
        ([], {"TOMBSTONE_TTL": "100"}),  # below twice the default POLL_TIMEOUT_MAX of 55
        (["--poll-timeout-max=100", "--tombstone-ttl=150"], {}),
        (["--finished-task-ttl=-1"], {}),
        (["--sweep-interval=120"], {}),
    ],
)
def test_invalid_settings_stop_with_a_usage_error(
    argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        load_config(argv, env)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "env",
    [{"PORT": "http"}, {"POLL_TIMEOUT": "1.5"}, {"LOG_INTERVAL": "often"}],
)
def test_malformed_number_in_the_environment_is_a_usage_error_not_a_traceback(
    env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        load_config([], env)
    assert exc.value.code == 2
    assert repr(next(iter(env.values()))) in capsys.readouterr().err  # names the bad value


def test_lifecycle_settings_come_from_the_environment_and_flags() -> None:
    env = {"FINISHED_TASK_TTL": "60", "TERMINAL_STATUSES": "done", "STATUSES": "queued,done"}
    config = load_config(["--tombstone-ttl=200", "--sweep-interval=0"], env)
    assert (config.finished_task_ttl, config.terminal_statuses) == (60, ("done",))
    assert (config.tombstone_ttl, config.sweep_interval) == (200, 0.0)
    defaults = load_config([], {})
    assert (defaults.finished_task_ttl, defaults.tombstone_ttl) == (604800, 3600)
    assert defaults.terminal_statuses == ("completed", "failed", "cancelled")
    # The default terminal statuses are those of the three that are configured.
    custom = load_config([], {"STATUSES": "pending,running,completed"})
    assert custom.terminal_statuses == ("completed",)
    assert load_config(["--finished-task-ttl=0"], {}).finished_task_ttl == 0  # keep forever


def test_help_describes_the_lifecycle_settings(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        load_config(["--help"], {})
    text = " ".join(capsys.readouterr().out.split())
    for flag in (
        "--finished-task-ttl",
        "--terminal-statuses",
        "--tombstone-ttl",
        "--sweep-interval",
    ):
        assert flag in text
    assert "604800" in text and "completed,failed,cancelled" in text


# --- the app honours its config ---------------------------------------------------------------


async def test_custom_statuses_are_honoured_by_validation(make_client: ClientFactory) -> None:
    client = await make_client(statuses=("queued", "running", "done"))
    assert (await (await client.get("/api/status")).json())["status"] == "queued"
    rejected = await client.post("/api/update-status", json={"status": "pending"})
    assert rejected.status == 400
    body = await rejected.json()
    assert body["error"]["code"] == "invalid_status"
    assert "queued, running, done" in body["error"]["message"]
    assert (await (await client.get("/api/status")).json())["version"] == 0
    accepted = await client.put("/api/tasks/job", json={"status": "done"})
    assert accepted.status == 200
    assert (await accepted.json())["status"] == "done"


async def test_poll_timeout_above_the_maximum_is_clamped(make_client: ClientFactory) -> None:
    client = await make_client(poll_timeout=1, poll_timeout_max=1)
    started = time.monotonic()
    response = await client.get("/api/poll-status", params={"last_version": 0, "timeout": 1000})
    assert response.status == 204
    assert 0.9 <= time.monotonic() - started < 3
    assert hub_of(client).waiting_total == 0


async def test_responses_name_the_configured_instance(make_client: ClientFactory) -> None:
    client = await make_client()
    other = await make_client(instance_id="other-one")
    assert (await client.get("/api/status")).headers["X-Served-By"] == "test-instance-1"
    assert (await other.get("/api/status")).headers["X-Served-By"] == "other-one"
