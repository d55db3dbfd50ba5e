"""schemathesis against a live instance: ``python -m service`` on a free port, on each backend.

For every operation of the document it sends generated requests, valid and invalid (boundary
values, wrong types, other methods, missing parameters), and checks every answer: no 5xx, the
status is documented, the content type, body schema and headers are the documented ones, valid
requests are accepted and invalid ones refused. Polls are held at most 1 s
(``--poll-timeout 1 --poll-timeout-max 1``), so no generated request can hang the run.
"""

from __future__ import annotations

import json
import re
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import settings
from schemathesis import Case
from schemathesis.hooks import HookContext

from deploy.cluster import Instance, RedisServer
from service.config import Config
from service.idempotency import HEADER as IDEMPOTENCY_HEADER
from service.idempotency import KEY_PATTERN
from service.openapi import OPENAPI_PATH, build_openapi

POLL_ARGS = ["--poll-timeout", "1", "--poll-timeout-max", "1"]
# The document of an instance started with POLL_ARGS and nothing else configured. Event streams
# and the WebSocket are left out: a stream never ends by design and the fuzzer reads every answer
# to its end; a handshake's 101 is no HTTP answer to check (tests/test_sse.py and
# tests/test_ws.py cover them, and test_openapi.py their refusals).
schema = schemathesis.openapi.from_dict(
    build_openapi(Config(instance_id="fuzz", poll_timeout=1, poll_timeout_max=1))
).exclude(operation_id=["taskEvents", "boardEvents", "websocket"])


def _integers_as_integers(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _integers_as_integers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integers_as_integers(v) for v in value]
    return value


@schema.hook("map_body")
def integers_as_integers(context: HookContext, body: Any) -> Any:
    """JSON Schema counts 50.0 as an integer; the service, like the README, wants 50 (and says so
    in the document). Send integral numbers as integers: the same values, so a generated valid body
    stays valid and an invalid one stays invalid."""
    return _integers_as_integers(body)


def a_valid_idempotency_key_names_one_request(case: Case[Any]) -> None:
    """A valid Idempotency-Key is made unique to its case: reused with another body it is
    refused (422) by design, a property of the two requests, not of either one
    (tests/test_idempotency.py checks it). An invalid key stays as generated, invalid."""
    key = case.headers.get(IDEMPOTENCY_HEADER) if case.headers is not None else None
    if case.headers is not None and isinstance(key, str) and re.fullmatch(KEY_PATTERN, key):
        case.headers[IDEMPOTENCY_HEADER] = f'"{uuid.uuid4()}"'


@pytest.fixture(scope="module", params=["memory", "redis"])
def live(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Instance]:
    """A running instance, which serves the very document fuzzed here."""
    args = list(POLL_ARGS)
    if request.param == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        args += ["--redis-url", redis.url, "--redis-prefix", f"fuzz-{uuid.uuid4().hex}:"]
    workdir: Path = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    instance = Instance(workdir, f"fuzz-{request.param}", extra_args=args)
    instance.start()
    try:
        with urllib.request.urlopen(instance.url + OPENAPI_PATH, timeout=5) as answer:
            assert json.load(answer) == schema.raw_schema
        # The fuzzer's favourite version is 0: with `default` past it, a poll on it answers at
        # once unless the fuzzer names its version, instead of holding for a second each time.
        for progress in (1, 2):
            write = urllib.request.Request(
                instance.url + "/api/update-status",
                data=json.dumps({"progress": progress}).encode(),
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            with urllib.request.urlopen(write, timeout=5) as answer:
                assert answer.status == 200
        yield instance
    finally:
        instance.stop()


@schema.parametrize()
@settings(max_examples=40, deadline=None)
def test_generated_requests_get_documented_answers_and_never_a_5xx_nor_a_logged_error(
    case: Case[Any], live: Instance
) -> None:
    """Each generated request gets a documented answer, and makes the instance log no error:
    the error middleware logs every unhandled exception before its 500 (a failure names the
    request that caused it, whatever ran before)."""
    logged = len(live.log_text())
    a_valid_idempotency_key_names_one_request(case)
    case.call_and_validate(base_url=live.url)
    new = live.log_text()[logged:]
    assert " ERROR " not in new and "Traceback" not in new, new[-3000:]
