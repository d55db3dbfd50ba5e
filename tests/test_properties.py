"""Properties of the model and the request parsing, checked by hypothesis on generated input.

Each parser is compared with an independent statement of its language (and with the document's
pattern or schema for it), and must refuse everything else with a 400, never another exception.
The last tests send generated input to a live instance (``python -m service``, on each backend).
"""

from __future__ import annotations

import http.client
import json
import re
import string
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from deploy.cluster import Instance, RedisServer
from service.config import Config
from service.errors import ApiError
from service.model import (
    DEFAULT_STATUSES,
    MAX_COUNTER,
    MESSAGE_MAX_CHARS,
    TASK_ID_PATTERN,
    UNSET,
    Cursor,
    TaskState,
    TaskUpdate,
    parse_counter,
    parse_cursor,
    parse_update,
    validate_task_id,
)
from service.openapi import TASK_ID, WATCH_SINCE, build_openapi, digits_at_most

ALNUM = string.ascii_letters + string.digits
# No per-example deadline and no "slow data" health check: on a loaded machine (CI, many test
# processes) a slow example is not a failure; every property still runs its full count.
BASE = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
NOW = "2030-01-02T03:04:05.678Z"
DOCUMENT = build_openapi(Config(instance_id="properties"))
# Characters that look like the allowed ones, or that parsers have been known to let through.
TRICKY = "-_./ \t\n\r\x00\x7f,+é١１²ａ\u200b\u0430"


def documented(schema: dict[str, Any]) -> jsonschema_rs.Validator:
    """A validator for a schema of the document, its references resolved within the document."""
    rooted = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "components": DOCUMENT["components"],
        **schema,
    }
    return jsonschema_rs.validator_for(rooted, validate_formats=True)


TASK_ID_SCHEMA = documented({"type": "string", "pattern": TASK_ID})
SINCE_SCHEMA = documented({"type": "string", "pattern": WATCH_SINCE})
STATE_SCHEMA = documented({"$ref": "#/components/schemas/TaskState"})


def refused(call: Any, *args: Any) -> ApiError:
    """``call(*args)`` raises an ApiError with status 400 (and no other exception)."""
    with pytest.raises(ApiError) as exc:
        call(*args)
    assert exc.value.status == 400
    return exc.value


# --- task ids ---------------------------------------------------------------------------------

task_ids = st.from_regex(TASK_ID_PATTERN, fullmatch=True)
near_ids = st.text(alphabet=ALNUM + TRICKY, max_size=70) | st.from_regex(
    r"[A-Za-z0-9_.-][A-Za-z0-9_.-]{62,64}", fullmatch=True
)


def is_task_id(text: str) -> bool:
    return 1 <= len(text) <= 64 and text[0] in ALNUM and all(c in ALNUM + "_.-" for c in text)


@settings(BASE, max_examples=300)
@given(st.one_of(task_ids, near_ids, st.text(max_size=70)))
def test_validate_task_id_accepts_exactly_the_task_id_language(text: str) -> None:
    assert TASK_ID_SCHEMA.is_valid(text) == is_task_id(text)
    if is_task_id(text):
        assert validate_task_id(text) == text
    else:
        assert refused(validate_task_id, text).code == "invalid_task_id"


# --- counters and cursors ---------------------------------------------------------------------


def is_counter(text: str) -> bool:
    return re.fullmatch(r"[0-9]{1,16}", text) is not None and int(text) <= MAX_COUNTER


counter_texts = st.one_of(
    st.integers(min_value=0, max_value=MAX_COUNTER).map(str),
    st.builds(
        lambda zeros, value: "0" * zeros + str(value),
        st.integers(min_value=1, max_value=6),
        st.sampled_from([0, 1, MAX_COUNTER, MAX_COUNTER + 1]) | st.integers(min_value=0),
    ),
    st.integers().map(str),
    st.text(alphabet=string.digits, min_size=1, max_size=20),
    st.floats().map(str),
    st.text(alphabet=string.digits + TRICKY, max_size=20),
    st.text(max_size=20),
)


@settings(BASE)
@given(st.integers(min_value=0, max_value=MAX_COUNTER), st.integers(min_value=0, max_value=15))
def test_parse_counter_round_trips_every_valid_integer(value: int, zeros: int) -> None:
    raw = "0" * zeros + str(value)
    assume(len(raw) <= 16)  # longer is refused (the other test): draw again, assert nothing less
    assert parse_counter("since", raw) == value


@settings(BASE)
@given(counter_texts)
def test_parse_counter_accepts_plain_decimals_up_to_the_cap_and_refuses_the_rest(
    text: str,
) -> None:
    if is_counter(text):
        assert parse_counter("since", text) == int(text)
    else:
        error = refused(parse_counter, "since", text)
        assert error.code == "invalid_parameter"
        assert "since" in error.message


@settings(BASE)
@given(
    st.integers(min_value=0, max_value=10**20),
    st.text(alphabet=string.digits, min_size=1, max_size=22),
)
def test_digits_at_most_matches_exactly_the_numerals_up_to_its_limit(
    limit: int, numeral: str
) -> None:
    expected = len(numeral) <= len(str(limit)) and int(numeral) <= limit
    assert (re.fullmatch(digits_at_most(limit), numeral) is not None) == expected


epochs = st.from_regex(r"[a-z0-9]{1,32}", fullmatch=True)
near_epochs = st.from_regex(r"[a-z0-9]{32,33}", fullmatch=True) | st.text(
    alphabet=ALNUM + TRICKY, max_size=34
)
cursor_texts = st.one_of(
    st.builds(lambda e, s: f"{e}-{s}", epochs, counter_texts),
    st.builds(lambda e, s: f"{e}-{s}", near_epochs, counter_texts),
    st.builds(
        lambda e, s: f"{e}-{s}", st.text(alphabet=ALNUM + TRICKY, max_size=34), counter_texts
    ),
    st.sampled_from(["", "0", "00", "-", "-0", "a-", "a--1"]),
    st.text(max_size=40),
)


@settings(BASE)
@given(epochs, st.integers(min_value=0, max_value=MAX_COUNTER))
def test_a_cursor_round_trips_through_its_string(epoch: str, seq: int) -> None:
    cursor = Cursor(epoch, seq)
    assert parse_cursor(str(cursor)) == cursor


@settings(BASE, max_examples=300)
@given(cursor_texts)
def test_parse_cursor_accepts_exactly_the_documented_since(text: str) -> None:
    accepted = SINCE_SCHEMA.is_valid(text)
    if not accepted:
        assert refused(parse_cursor, text).code in ("invalid_cursor", "invalid_parameter")
        return
    cursor = parse_cursor(text)
    if text in ("", "0"):
        assert cursor is None
    else:
        epoch, _, seq = text.rpartition("-")
        assert cursor == Cursor(epoch, int(seq))


# --- update bodies ----------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
CONTROLS = "".join(map(chr, [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F]))
valid_text = st.text(
    alphabet=st.characters(exclude_categories=("Cs", "Cc")) | st.sampled_from("\t\n\r"),
    max_size=MESSAGE_MAX_CHARS,
)
# Values of each field that the service accepts, boundaries included...
valid_fields: dict[str, st.SearchStrategy[Any]] = {
    "status": st.sampled_from(DEFAULT_STATUSES),
    "progress": st.none() | st.integers(min_value=0, max_value=100) | st.sampled_from([0, 100]),
    "message": st.none() | valid_text | st.just("é" * MESSAGE_MAX_CHARS),
    "expected_version": st.none()
    | st.integers(min_value=0, max_value=MAX_COUNTER)
    | st.sampled_from([0, MAX_COUNTER]),
}
# ...and values that are wrong for it, or only nearly right.
hostile_fields: dict[str, st.SearchStrategy[Any]] = {
    "status": json_values
    | st.text(alphabet=TRICKY + "abc", max_size=12)
    | st.sampled_from(
        [*(s.upper() for s in DEFAULT_STATUSES), *(s + " " for s in DEFAULT_STATUSES)]
    ),
    "progress": json_values
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.sampled_from([-1, 101, 50.0, 1e2, -0.0, True, "50"]),
    "message": json_values
    | st.text(alphabet=CONTROLS + "ab", min_size=1, max_size=8)
    | st.just("m" * (MESSAGE_MAX_CHARS + 1)),
    "expected_version": json_values
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.sampled_from([-1, MAX_COUNTER + 1, 1.0, -0.0, False, "1"]),
}
valid_bodies = st.fixed_dictionaries({}, optional=valid_fields)


def one_field_wrong(body: dict[str, Any], wrong: tuple[str, Any]) -> dict[str, Any]:
    return {**body, wrong[0]: wrong[1]}


one_wrong_field = st.sampled_from(sorted(hostile_fields)).flatmap(
    lambda name: st.tuples(st.just(name), hostile_fields[name])
) | st.tuples(st.sampled_from(["owner", "Status", ""]), json_values)
bodies = st.one_of(
    valid_bodies,
    st.builds(one_field_wrong, valid_bodies, one_wrong_field),
    st.fixed_dictionaries(
        {}, optional={name: valid_fields[name] | hostile_fields[name] for name in valid_fields}
    ),
    json_values,
)
UPDATE_SCHEMA = documented({"$ref": "#/components/schemas/TaskUpdate"})
INTEGER_FIELDS = ("progress", "expected_version")


def written_as_integers(data: object) -> bool:
    """Integers are written as such: JSON Schema takes 50.0 for 50, the service does not."""
    return not isinstance(data, dict) or not any(
        isinstance(data.get(name), float) for name in INTEGER_FIELDS
    )


def parses_as_documented(data: Any) -> None:
    """parse_update accepts ``data`` (sent as JSON) exactly when the document's TaskUpdate schema
    does and its integers are written as integers; what it accepts, it keeps unchanged."""
    valid = UPDATE_SCHEMA.is_valid(data) and written_as_integers(data)
    raw = json.dumps(data).encode()
    if not valid:
        refused(parse_update, raw, DEFAULT_STATUSES)
        return
    update = parse_update(raw, DEFAULT_STATUSES)
    for name in ("status", "progress", "message"):
        assert getattr(update, name) == data.get(name, UNSET)
    assert update.expected_version == data.get("expected_version")


@settings(BASE, max_examples=300)
@given(bodies)
def test_parse_update_accepts_exactly_the_documented_bodies_and_keeps_their_values(
    data: Any,
) -> None:
    parses_as_documented(data)


# One field at a time, around its limits: a wrong value alone in an otherwise valid body.
FIELD_EDGES: dict[str, st.SearchStrategy[Any]] = {
    "status": st.sampled_from(DEFAULT_STATUSES)
    | st.sampled_from([s.upper() for s in DEFAULT_STATUSES])
    | st.text(alphabet="abcdefgilmnoprstu_ " + TRICKY, max_size=12),
    "progress": st.integers(min_value=-3, max_value=103)
    | st.sampled_from([True, False, 50.0, 1e2, "50", None, [50]]),
    "message": st.text(min_size=MESSAGE_MAX_CHARS - 2, max_size=MESSAGE_MAX_CHARS + 2)
    | st.builds(
        lambda before, control, after: before + control + after,
        st.text(alphabet="ab\t\n\ré ", max_size=3),
        st.sampled_from(CONTROLS),
        st.text(alphabet="ab\t\n\ré ", max_size=3),
    )
    | st.sampled_from([None, 5, ["m"], {"m": 1}]),
    "expected_version": st.integers(min_value=-3, max_value=3)
    | st.integers(min_value=MAX_COUNTER - 3, max_value=MAX_COUNTER + 3)
    | st.sampled_from([True, False, 1.0, -0.0, "1", None]),
}


@pytest.mark.parametrize("name", sorted(FIELD_EDGES))
@settings(BASE, max_examples=400)
@given(data=st.data())
def test_each_field_alone_is_accepted_exactly_within_its_documented_limits(
    name: str, data: st.DataObject
) -> None:
    body = data.draw(valid_bodies)
    body[name] = data.draw(FIELD_EDGES[name], label=name)
    parses_as_documented(body)


@settings(BASE)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
def test_parse_update_on_any_bytes_gives_an_update_or_a_400(raw: bytes) -> None:
    try:
        update = parse_update(raw, DEFAULT_STATUSES)
    except ApiError as error:
        assert error.status == 400
        return
    assert isinstance(update, TaskUpdate)


# --- states and writes ------------------------------------------------------------------------

states = st.builds(
    TaskState,
    task=task_ids,
    status=st.sampled_from(DEFAULT_STATUSES),
    version=st.integers(min_value=0, max_value=MAX_COUNTER - 1),
    updated_at=st.none() | st.just("2029-12-31T23:59:59.999Z"),
    progress=st.none() | st.integers(min_value=0, max_value=100),
    message=st.none() | st.text(max_size=MESSAGE_MAX_CHARS),
)
updates = st.builds(
    TaskUpdate,
    status=st.just(UNSET) | st.sampled_from(DEFAULT_STATUSES),
    progress=st.just(UNSET) | st.none() | st.integers(min_value=0, max_value=100),
    message=st.just(UNSET) | st.none() | st.text(max_size=MESSAGE_MAX_CHARS),
    expected_version=st.none() | st.integers(min_value=0, max_value=MAX_COUNTER),
)


@settings(BASE)
@given(states, updates)
def test_apply_bumps_the_version_by_exactly_one_and_keeps_unset_fields(
    current: TaskState, update: TaskUpdate
) -> None:
    new = update.apply(current, NOW)
    assert new.version == current.version + 1
    assert (new.task, new.updated_at) == (current.task, NOW)
    for name in ("status", "progress", "message"):
        sent = getattr(update, name)
        assert getattr(new, name) == (getattr(current, name) if sent is UNSET else sent)


@settings(BASE)
@given(states)
def test_a_state_round_trips_through_its_dict_which_the_document_describes(
    state: TaskState,
) -> None:
    assert TaskState.from_dict(state.to_dict()) == state
    assert STATE_SCHEMA.is_valid(state.to_dict())


# --- through HTTP -----------------------------------------------------------------------------


@dataclass
class Http:
    """A plain HTTP/1.1 client on a fresh connection per request: nothing is shared or retried."""

    port: int

    def request(
        self, method: str, path: str, body: bytes | None = None, content_type: str | None = None
    ) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            headers = {"Content-Type": content_type} if content_type else {}
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def json(self, path: str) -> Any:
        status, body = self.request("GET", path)
        assert status == 200, body
        return json.loads(body)


@pytest.fixture(scope="module", params=["memory", "redis"])
def live(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Http]:
    """``python -m service`` on a free port; polls held at most 1 s."""
    args = ["--poll-timeout", "1", "--poll-timeout-max", "1"]
    if request.param == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        args += ["--redis-url", redis.url, "--redis-prefix", f"props-{uuid.uuid4().hex}:"]
    workdir: Path = tmp_path_factory.mktemp(f"props-{request.param}")
    instance = Instance(workdir, f"props-{request.param}", extra_args=args)
    instance.start()
    try:
        yield Http(instance.port)
    finally:
        instance.stop()


raw_bodies = st.one_of(
    bodies.map(lambda data: json.dumps(data).encode()),
    json_values.map(lambda data: json.dumps(data).encode()),
    st.binary(max_size=100),
)


@settings(BASE, max_examples=40)
@given(
    body=raw_bodies,
    task=st.sampled_from(["prop", "prop-new"]) | task_ids,
    content_type=st.sampled_from(["application/json", "application/json; charset=utf-8"])
    | st.sampled_from(["text/plain", "application/jsonx", ""]),
)
def test_any_body_put_is_never_a_5xx_and_a_refused_one_changes_nothing(
    live: Http, body: bytes, task: str, content_type: str
) -> None:
    before, listing = live.json(f"/api/tasks/{task}"), live.json("/api/tasks")
    status, answer = live.request("PUT", f"/api/tasks/{task}", body, content_type or None)
    if status == 200:
        state = json.loads(answer)
        assert state["version"] == before["version"] + 1
        assert live.json(f"/api/tasks/{task}") == state
    else:
        assert status in (400, 409, 415), answer
        assert json.loads(answer)["error"]["code"]
        assert live.json(f"/api/tasks/{task}") == before
        assert live.json("/api/tasks") == listing


def query(value: str) -> str:
    return urllib.parse.quote(value, safe="")


percent_bytes = st.binary(max_size=8).map(lambda raw: urllib.parse.quote_from_bytes(raw, safe=""))


@settings(BASE, max_examples=40)
@given(since=counter_texts | cursor_texts, raw=percent_bytes)
def test_any_version_or_cursor_in_a_query_is_parsed_as_documented(
    live: Http, since: str, raw: str
) -> None:
    status, _ = live.request("GET", f"/api/tasks/prop/poll?since={query(since)}&timeout=0")
    assert status in ((200, 204) if is_counter(since) else (400,))
    status, _ = live.request("GET", f"/api/watch?since={query(since)}&timeout=0")
    cursor_ok = SINCE_SCHEMA.is_valid(since)
    assert status in ((200, 204) if cursor_ok else (400,))
    for path in (f"/api/tasks/prop/poll?since={raw}&timeout=0", f"/api/watch?since={raw}"):
        status, _ = live.request("GET", path)
        assert status in (200, 204, 400)


@settings(BASE, max_examples=40)
@given(ids=st.lists(task_ids | near_ids, min_size=1, max_size=5))
def test_any_task_id_in_a_path_or_a_watch_is_parsed_as_documented(
    live: Http, ids: list[str]
) -> None:
    for task in ids:
        if not task or task in (".", ".."):
            continue  # no task id at all: another route (404)
        status, _ = live.request("GET", f"/api/tasks/{query(task)}")
        assert status == (200 if is_task_id(task) else 400)
    watched = ",".join(ids)
    status, _ = live.request("GET", f"/api/watch?tasks={query(watched)}&timeout=0")
    assert status == (200 if all(is_task_id(part) for part in watched.split(",")) else 400)


# --- the model of a task's life, against a live instance --------------------------------------


class TaskLife(RuleBasedStateMachine):
    """Writes, deletions and recreations of a few tasks, each checked against a model: a task
    never written reads at version 0; every write and every deletion is the next version; a
    deleted task reads as its tombstone and is not listed; a write after it starts from a fresh
    state at the tombstone's version + 1; refused requests change nothing."""

    server: Http  # set by the test: the live instance of its backend

    def __init__(self) -> None:
        super().__init__()
        self.live = self.server
        run = uuid.uuid4().hex[:8]
        self.ids = [f"life-{run}-{n}" for n in range(3)]
        self.model = {task: TaskState(task, DEFAULT_STATUSES[0]).to_dict() for task in self.ids}

    def _exists(self, task: str) -> bool:
        state = self.model[task]
        return state["version"] > 0 and not state.get("deleted")

    @rule(
        index=st.integers(0, 2),
        body=valid_bodies.filter(
            lambda body: bool(body.keys() & {"status", "progress", "message"})
        ),
        expected=st.sampled_from(["none", "current", "stale"]),
    )
    def write(self, index: int, body: dict[str, Any], expected: str) -> None:
        task = self.ids[index]
        current = self.model[task]
        body = {k: v for k, v in body.items() if k != "expected_version"}  # (a copy: drawn data)
        if expected != "none":
            body["expected_version"] = current["version"] + (expected == "stale")
        status, answer = self.live.request(
            "PUT", f"/api/tasks/{task}", json.dumps(body).encode(), "application/json"
        )
        if expected == "stale":
            assert status == 409, answer
            assert json.loads(answer)["current"] == current
            return
        assert status == 200, answer
        state = json.loads(answer)
        base = current if self._exists(task) else TaskState(task, DEFAULT_STATUSES[0]).to_dict()
        fields: dict[str, Any] = {
            name: body[name] for name in ("status", "progress", "message") if name in body
        }
        assert state == {
            **base,
            **fields,
            "version": current["version"] + 1,
            "updated_at": state["updated_at"],
        }
        self.model[task] = state

    @rule(index=st.integers(0, 2), expected=st.sampled_from(["none", "current", "stale"]))
    def delete(self, index: int, expected: str) -> None:
        task = self.ids[index]
        current = self.model[task]
        query = ""
        if expected != "none":
            query = f"?expected_version={current['version'] + (expected == 'stale')}"
        status, answer = self.live.request("DELETE", f"/api/tasks/{task}{query}")
        if not self._exists(task):
            assert status == 404 and json.loads(answer)["error"]["code"] == "task_not_found"
        elif expected == "stale":
            assert status == 409 and json.loads(answer)["current"] == current
        else:
            assert status == 200, answer
            tombstone = json.loads(answer)
            assert tombstone == {
                "task": task,
                "status": None,
                "version": current["version"] + 1,
                "updated_at": tombstone["updated_at"],
                "progress": None,
                "message": None,
                "deleted": True,
            }
            self.model[task] = tombstone

    @invariant()
    def reads_match_the_model(self) -> None:
        for task in self.ids:
            assert self.live.json(f"/api/tasks/{task}") == self.model[task]
        listed = {state["task"] for state in self.live.json("/api/tasks")["tasks"]}
        assert listed & set(self.ids) == {task for task in self.ids if self._exists(task)}


def test_writes_deletes_and_recreations_follow_the_model(live: Http) -> None:
    TaskLife.server = live
    run_state_machine_as_test(
        TaskLife, settings=settings(BASE, max_examples=15, stateful_step_count=15)
    )
