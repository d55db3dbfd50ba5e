"""Validation and update rules of ``service.model``: pure functions, no server."""

from __future__ import annotations

import json

import pytest

from service.errors import ApiError
from service.model import (
    DEFAULT_STATUSES,
    MAX_COUNTER,
    UNSET,
    Cursor,
    TaskState,
    TaskUpdate,
    initial_state,
    parse_counter,
    parse_cursor,
    parse_update,
    validate_task_id,
)


def error_code(exc: pytest.ExceptionInfo[ApiError]) -> str:
    assert exc.value.status == 400
    return exc.value.code


# --- task ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize("task_id", ["a", "default", "A9", "job-1.part_2", "x" * 64, "9"])
def test_validate_task_id_accepts_well_formed_ids(task_id: str) -> None:
    assert validate_task_id(task_id) == task_id


@pytest.mark.parametrize(
    "task_id",
    ["", "-x", ".x", "_x", "x" * 65, "a b", "a/b", "tâche", "a\n", "*", "a,b", "a\x00"],
)
def test_validate_task_id_rejects_malformed_ids(task_id: str) -> None:
    with pytest.raises(ApiError) as exc:
        validate_task_id(task_id)
    assert error_code(exc) == "invalid_task_id"


# --- counters and cursors ---------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["0", "1", "42", "007", str(MAX_COUNTER)])
def test_parse_counter_accepts_plain_decimal_digits(raw: str) -> None:
    assert parse_counter("since", raw) == int(raw)


@pytest.mark.parametrize(
    "raw",
    [
        *["", "-1", "+1", "1.5", "1e3", "abc", " 1", "1 ", "0x10", str(MAX_COUNTER + 1)],
        *["\u0661", "\u00b2", "99999999999999999999", "9" * 5000],  # Arabic-Indic 1, superscript 2
    ],
)
def test_parse_counter_rejects_anything_else(raw: str) -> None:
    with pytest.raises(ApiError) as exc:
        parse_counter("since", raw)
    assert error_code(exc) == "invalid_parameter"
    assert "since" in exc.value.message


@pytest.mark.parametrize("raw", ["", "0"])
def test_parse_cursor_empty_or_zero_asks_for_a_snapshot(raw: str) -> None:
    assert parse_cursor(raw) is None


def test_parse_cursor_round_trips_its_string_form() -> None:
    cursor = Cursor("0a1b2c3d", 17)
    assert str(cursor) == "0a1b2c3d-17"
    assert parse_cursor(str(cursor)) == cursor


@pytest.mark.parametrize("raw", ["5", "-5", "abc", "ABC-1", "a_b-1", "a" * 33 + "-1", "a b-1"])
def test_parse_cursor_rejects_a_malformed_epoch(raw: str) -> None:
    with pytest.raises(ApiError) as exc:
        parse_cursor(raw)
    assert error_code(exc) == "invalid_cursor"


@pytest.mark.parametrize("raw", ["abc-", "abc--1", "abc-1.5", "abc-x", f"abc-{MAX_COUNTER + 1}"])
def test_parse_cursor_rejects_a_malformed_sequence_number(raw: str) -> None:
    with pytest.raises(ApiError) as exc:
        parse_cursor(raw)
    assert exc.value.status == 400


# --- updates ----------------------------------------------------------------------------------


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def test_parse_update_keeps_left_out_fields_unset() -> None:
    update = parse_update(body(status="completed"), DEFAULT_STATUSES)
    assert update == TaskUpdate(status="completed")
    assert update.progress is UNSET
    assert update.message is UNSET
    assert update.expected_version is None


def test_parse_update_distinguishes_null_from_left_out() -> None:
    update = parse_update(body(progress=None, message=None), DEFAULT_STATUSES)
    assert update.progress is None
    assert update.message is None
    assert update.status is UNSET


def test_parse_update_reads_every_field() -> None:
    update = parse_update(
        body(status="in_progress", progress=100, message="half\tway\n", expected_version=3),
        DEFAULT_STATUSES,
    )
    assert update == TaskUpdate("in_progress", 100, "half\tway\n", 3)


def test_parse_update_accepts_a_message_of_exactly_500_chars() -> None:
    assert parse_update(body(message="é" * 500), DEFAULT_STATUSES).message == "é" * 500


def test_parse_update_honours_the_configured_statuses() -> None:
    statuses = ("queued", "done")
    assert parse_update(body(status="done"), statuses).status == "done"
    with pytest.raises(ApiError) as exc:
        parse_update(body(status="completed"), statuses)
    assert error_code(exc) == "invalid_status"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"", "invalid_json"),
        (b"{", "invalid_json"),
        (b"\xff\xfe{}", "invalid_json"),
        (b'{"status": "pending", "status": "failed"}', "invalid_json"),
        (b'{"progress": NaN}', "invalid_json"),
        (b'{"progress": Infinity}', "invalid_json"),
        (b'{"progress": -Infinity}', "invalid_json"),
        (b"[" * 100_000, "invalid_json"),
        (b'{"progress": ' + b"9" * 5000 + b"}", "invalid_json"),
        (b"[]", "invalid_body"),
        (b'"completed"', "invalid_body"),
        (b"null", "invalid_body"),
        (b"{}", "empty_update"),
        (b'{"expected_version": 0}', "empty_update"),
        (b'{"status": "pending", "colour": "red"}', "unknown_field"),
        (b'{"status": "done"}', "invalid_status"),
        (b'{"status": null}', "invalid_status"),
        (b'{"status": ["pending"]}', "invalid_status"),
        (b'{"progress": -1}', "invalid_progress"),
        (b'{"progress": 101}', "invalid_progress"),
        (b'{"progress": 50.0}', "invalid_progress"),
        (b'{"progress": 1e400}', "invalid_progress"),
        (b'{"progress": true}', "invalid_progress"),
        (b'{"progress": "50"}', "invalid_progress"),
        (b'{"message": 5}', "invalid_message"),
        (b'{"message": "' + b"x" * 501 + b'"}', "invalid_message"),
        (b'{"message": "a\\u0000b"}', "invalid_message"),
        (b'{"message": "a\\u001bb"}', "invalid_message"),
        (b'{"message": "a\\u007fb"}', "invalid_message"),
        (b'{"message": "\\ud800"}', "invalid_message"),
        (b'{"status": "pending", "expected_version": -1}', "invalid_expected_version"),
        (b'{"status": "pending", "expected_version": 1.0}', "invalid_expected_version"),
        (b'{"status": "pending", "expected_version": true}', "invalid_expected_version"),
        (b'{"status": "pending", "expected_version": "1"}', "invalid_expected_version"),
        (
            b'{"status": "pending", "expected_version": ' + str(MAX_COUNTER + 1).encode() + b"}",
            "invalid_expected_version",
        ),
    ],
)
def test_parse_update_rejects_bad_bodies_with_a_precise_code(raw: bytes, code: str) -> None:
    with pytest.raises(ApiError) as exc:
        parse_update(raw, DEFAULT_STATUSES)
    assert error_code(exc) == code


def test_initial_state_is_the_first_status_at_version_zero() -> None:
    assert initial_state("t", ("queued", "done")) == TaskState(
        task="t", status="queued", version=0, updated_at=None, progress=None, message=None
    )


def test_apply_bumps_the_version_by_one_and_keeps_left_out_fields() -> None:
    current = TaskState("t", "in_progress", version=7, updated_at="x", progress=40, message="m")
    new = TaskUpdate(progress=None).apply(current, "2030-01-01T00:00:00.000Z")
    assert new == TaskState("t", "in_progress", 8, "2030-01-01T00:00:00.000Z", None, "m")
