"""The OpenAPI 3.1 description of every route, built from the config and served as JSON.

The document describes this deployment: the status enum is the configured statuses, and tokens,
the write rate limit and CORS preflights appear when they are configured. It is built and
serialized once per app and served at ``GET /api/openapi.json``. ``tests/test_openapi.py`` keeps
it true (every route of the app is in it and the other way round; real answers validate against
it) and ``tests/test_schemathesis.py`` fuzzes a live instance with it.
"""

from __future__ import annotations

import json
from typing import Any, Final

from aiohttp import web

from .api import MAX_BODY_BYTES, MAX_WATCH_TASKS
from .config import Config
from .dashboard import CLUSTER_WATCH_PATH, MAX_WATCHERS
from .idempotency import KEY_PATTERN as IDEMPOTENCY_KEY_PATTERN
from .keys import CONFIG
from .metrics import METRICS_PATH
from .model import MAX_COUNTER, MESSAGE_MAX_CHARS, TASK_ID_PATTERN

OPENAPI_PATH: Final = "/api/openapi.json"

Schema = dict[str, Any]


def digits_at_most(limit: int) -> str:
    """A regex of the decimal numerals no wider than ``limit`` (leading zeros allowed) whose value
    is at most ``limit``.

    For MAX_COUNTER (16 digits) that is what ``model.parse_counter`` accepts, said as a pattern
    (the sequence number of a watch cursor): every numeral narrower than ``limit``, then, digit by
    digit, ``limit``'s first digits followed by a smaller digit and anything; and ``limit`` itself.
    999: ``[0-9]{1,2}``, ``[0-8][0-9]{2}``, ``9[0-8][0-9]``, ``99[0-8]``, ``999``.
    """
    text = str(limit)
    width = len(text)
    options = [f"[0-9]{{1,{width - 1}}}"] if width > 1 else []
    for i, digit in enumerate(text):
        if digit != "0":
            rest = width - i - 1
            tail = f"[0-9]{{{rest}}}" if rest else ""
            options.append(f"{text[:i]}[0-{int(digit) - 1}]{tail}")
    options.append(text)
    return "(?:" + "|".join(options) + ")"


TASK_ID: Final = f"^{TASK_ID_PATTERN}$"
CURSOR_EPOCH: Final = "[a-z0-9]{1,32}"
# ``since`` of a watch: empty or 0 (a snapshot), or a cursor as /api/watch returns it.
WATCH_SINCE: Final = f"^(?:0|{CURSOR_EPOCH}-{digits_at_most(MAX_COUNTER)})?$"
WATCH_TASKS: Final = f"^{TASK_ID_PATTERN}(?:,{TASK_ID_PATTERN}){{0,{MAX_WATCH_TASKS - 1}}}$"
# Text without C0 control characters other than tab, newline and carriage return, and no DEL.
MESSAGE_TEXT: Final = "^[^\\u0000-\\u0008\\u000b\\u000c\\u000e-\\u001f\\u007f]*$"
ERROR_CODE: Final = "^[a-z0-9_]+$"
# The token scope each task operation needs (``x-scope``), as auth.py decides it from the method.
READ: Final = "tasks:read"
WRITE: Final = "tasks:write"


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _response(
    description: str,
    schema: Schema | None = None,
    *,
    api: bool = True,
    media_type: str = "application/json",
    headers: tuple[str, ...] = (),
) -> Schema:
    """One response. Every answer names the instance and forbids sniffing; /api/ ones are not
    cached."""
    names = ("X-Served-By", "X-Content-Type-Options", *(("Cache-Control",) if api else ()))
    response: Schema = {
        "description": description,
        "headers": {n: {"$ref": f"#/components/headers/{n}"} for n in (*names, *headers)},
    }
    if schema is not None:
        response["content"] = {media_type: {"schema": schema}}
    return response


def _error(description: str, *, api: bool = True, headers: tuple[str, ...] = ()) -> Schema:
    return _response(description, _ref("Error"), api=api, headers=headers)


def _state(description: str) -> Schema:
    return _response(description, _ref("TaskState"), headers=("ETag",))


def _parameter(name: str, where: str, schema: Schema, description: str, **more: Any) -> Schema:
    return {"name": name, "in": where, "schema": schema, "description": description, **more}


TASK_ID_PARAMETER: Final = {"$ref": "#/components/parameters/TaskId"}
TIMEOUT_PARAMETER: Final = {"$ref": "#/components/parameters/Timeout"}
BAD_REQUEST: Final = _error("Malformed input: a task id, a query parameter or the body")
NO_ROUTE: Final = _error("No such route: an empty task id, or one the URL normalizes away (`..`)")
UNAVAILABLE: Final = _error(
    "The state store is unreachable, or this instance holds its maximum of polls; retry after "
    "`Retry-After` seconds",
    headers=("Retry-After",),
)
IDEMPOTENCY_KEY_PARAMETER: Final = _parameter(
    "Idempotency-Key",
    "header",
    {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN},
    'names the write (a structured-field string, `"8e03978e-..."`, or bare): a repeat with the '
    "same key within 24 h gets the first answer and changes nothing; 422 if it asks another thing",
)
KEY_REUSED: Final = _error("The Idempotency-Key was used for another request: nothing changed")
NOTHING_NEW: Final = _response(
    "The hold passed with no change (or the instance is shutting down: then with `Retry-After`)",
    headers=("Retry-After",),
)


# --- operations -------------------------------------------------------------------------------


def _read(operation_id: str, summary: str, parameters: list[Schema], responses: Schema) -> Schema:
    return {
        "operationId": operation_id,
        "summary": summary,
        "parameters": parameters,
        "responses": responses,
        "x-scope": READ,
    }


def _write(operation_id: str, summary: str, task_id: bool) -> Schema:
    return {
        "operationId": operation_id,
        "summary": summary,
        "parameters": [*([TASK_ID_PARAMETER] if task_id else []), IDEMPOTENCY_KEY_PARAMETER],
        "requestBody": {
            "required": True,
            "description": f"at most {MAX_BODY_BYTES} bytes; integers are written as integers "
            "(50, not 50.0)",
            "content": {"application/json": {"schema": _ref("TaskUpdate")}},
        },
        "responses": {
            "200": _state("The new state; the version grew by exactly 1"),
            "400": BAD_REQUEST,
            **({"404": NO_ROUTE} if task_id else {}),
            "409": _response(
                "expected_version is not the current version: nothing changed", _ref("Conflict")
            ),
            "408": _error("The body did not arrive in time"),
            "413": _error(f"The body is over {MAX_BODY_BYTES} bytes"),
            "415": _error("The body is not sent as application/json"),
            "422": KEY_REUSED,
            "503": UNAVAILABLE,
            "507": _error("The write would create a task past the store's cap (MAX_TASKS)"),
        },
        "x-scope": WRITE,
    }


def _delete() -> Schema:
    expected = _parameter(
        "expected_version",
        "query",
        {"type": "integer", "minimum": 0, "maximum": MAX_COUNTER},
        "the version the client has: if it is not the task's version, nothing is deleted (409)",
    )
    return {
        "operationId": "deleteTask",
        "summary": "Delete a task: its tombstone (version + 1, `deleted`) replaces it, and every "
        "watcher gets it as a change; a later write continues from the tombstone's version",
        "parameters": [TASK_ID_PARAMETER, expected, IDEMPOTENCY_KEY_PARAMETER],
        "responses": {
            "200": _response("The tombstone", _ref("Tombstone"), headers=("ETag",)),
            "400": BAD_REQUEST,
            "404": _error(
                "No such task (`task_not_found`: never written, or deleted already; nothing "
                "changed), or no such route"
            ),
            "409": _response(
                "expected_version is not the current version: nothing changed", _ref("Conflict")
            ),
            "422": KEY_REUSED,
            "503": UNAVAILABLE,
        },
        "x-scope": WRITE,
    }


def _poll(operation_id: str, summary: str, version: str, task_id: bool) -> Schema:
    version_parameter = _parameter(
        version,
        "query",
        {"type": "integer", "minimum": 0, "maximum": MAX_COUNTER},
        "the version the client has; the answer comes once the task's version differs",
        required=True,
    )
    return _read(
        operation_id,
        summary,
        [*([TASK_ID_PARAMETER] if task_id else []), version_parameter, TIMEOUT_PARAMETER],
        {
            "200": _state(
                "The state, whose version is not the one given (a tombstone once the "
                "task is deleted)"
            ),
            "204": NOTHING_NEW,
            "400": BAD_REQUEST,
            **({"404": NO_ROUTE} if task_id else {}),
            "503": UNAVAILABLE,
        },
    )


def _conditional_parameters() -> list[Schema]:
    """Standard HTTP long polling: a conditional GET that may wait (RFC 9110, RFC 7240)."""
    return [
        _parameter(
            "If-None-Match",
            "header",
            {"type": "string"},
            'the ETag the client has, e.g. `"7"`: 304 while it is still the current one',
        ),
        _parameter(
            "Prefer",
            "header",
            {"type": "string"},
            "`wait=<seconds>` (with `If-None-Match`): hold until the state changes, at most so "
            "long (capped by POLL_TIMEOUT_MAX); other preferences are ignored",
        ),
    ]


def _watch() -> Schema:
    since = _parameter(
        "since",
        "query",
        {"type": "string", "pattern": WATCH_SINCE},
        "a cursor from an earlier answer; empty or 0 for a snapshot",
    )
    tasks = _parameter(
        "tasks",
        "query",
        {"type": "string", "pattern": WATCH_TASKS},
        f"comma-separated task ids, at most {MAX_WATCH_TASKS}",
    )
    return _read(
        "watch",
        "Long poll over every task (or those in `tasks`) changed after a cursor",
        [since, tasks, TIMEOUT_PARAMETER],
        {
            "200": _response(
                "The tasks changed after the cursor, or a snapshot", _ref("WatchBatch")
            ),
            "204": NOTHING_NEW,
            "400": BAD_REQUEST,
            "503": UNAVAILABLE,
        },
    )


def _event_streams() -> Schema:
    """Server-Sent Events (sse.py): a task's states, or a board's changes, resumable."""
    last_event_id = _parameter(
        "Last-Event-ID",
        "header",
        {"type": "string"},
        "the id of the last event the client has (sent by EventSource when it reconnects): the "
        "stream resumes after it; over `since`",
    )
    stream = _response(
        "The stream: `id:` (version or cursor) and `data:` (JSON) per event, a comment line as "
        "heartbeat",
        {"type": "string"},
        media_type="text/event-stream",
    )
    errors = {"400": BAD_REQUEST, "503": UNAVAILABLE}
    since = _parameter(
        "since",
        "query",
        {"type": "integer", "minimum": 0, "maximum": MAX_COUNTER},
        "the version the client has: the first event is the state only if it is another one",
    )
    cursor = _parameter(
        "since",
        "query",
        {"type": "string", "pattern": WATCH_SINCE},
        "a cursor the client has: the first event is what changed after it; none: a snapshot",
    )
    tasks = _parameter(
        "tasks",
        "query",
        {"type": "string", "pattern": WATCH_TASKS},
        f"comma-separated task ids, at most {MAX_WATCH_TASKS}",
    )
    return {
        "/api/tasks/{task_id}/events": {
            "get": _read(
                "taskEvents",
                "Server-Sent Events: the task's state, then every change of it",
                [TASK_ID_PARAMETER, since, last_event_id],
                {"200": stream, **errors, "404": NO_ROUTE},
            )
        },
        "/api/events": {
            "get": _read(
                "boardEvents",
                "Server-Sent Events: a snapshot (or what changed after a cursor), then every "
                "change of every task (or those in `tasks`)",
                [cursor, tasks, last_event_id],
                {"200": stream, **errors},
            )
        },
    }


def _websocket() -> Schema:
    """The WebSocket handshake (RFC 6455); the messages are in ws.py and the README."""
    handshake = [
        _parameter("Upgrade", "header", {"const": "websocket"}, "the protocol", required=True),
        _parameter("Connection", "header", {"const": "Upgrade"}, "an upgrade", required=True),
        _parameter(
            "Sec-WebSocket-Key",
            "header",
            {"type": "string", "pattern": "^[A-Za-z0-9+/]{21}[AQgw]==$"},
            "16 random bytes in base64",
            required=True,
        ),
        _parameter("Sec-WebSocket-Version", "header", {"const": "13"}, "RFC 6455", required=True),
    ]
    return _read(
        "websocket",
        "WebSocket: subscribe to tasks and boards with JSON messages (see the README)",
        handshake,
        {
            "101": _response("Switched to WebSocket"),
            "400": _error("Not a WebSocket handshake"),
            "503": UNAVAILABLE,
        },
    )


def _with_head(get: Schema) -> Schema:
    """A GET and its HEAD twin: the same answers, headers only."""
    head = {
        "operationId": f"{get['operationId']}Head",
        "summary": f"{get['summary']} (headers only)",
        "parameters": get.get("parameters", []),
        "responses": {
            status: {k: v for k, v in response.items() if k != "content"}
            for status, response in get["responses"].items()
        },
    }
    return {"get": get, "head": head}


def _probe(operation_id: str, summary: str, schema: str, statuses: tuple[str, ...]) -> Schema:
    answers = {"200": "Yes", "503": "No"}
    return _with_head(
        {
            "operationId": operation_id,
            "summary": summary,
            "responses": {s: _response(answers[s], _ref(schema), api=False) for s in statuses},
        }
    )


def _page(operation_id: str, summary: str, task_id: bool) -> Schema:
    errors: Schema = {}
    if task_id:
        errors = {
            "400": _error("Malformed task id", api=False),
            "404": _error(NO_ROUTE["description"], api=False),
        }
    page = _response("The page", {"type": "string"}, api=False, media_type="text/html")
    return _with_head(
        {
            "operationId": operation_id,
            "summary": summary,
            "parameters": [TASK_ID_PARAMETER] if task_id else [],
            "responses": {"200": page, **errors},
        }
    )


def _cluster_watch() -> Schema:
    counter: Schema = {"type": "integer", "minimum": 0, "maximum": MAX_COUNTER}
    since = _parameter(
        "since", "query", counter, "the `cursor` of an earlier answer; none or 0: every sample kept"
    )
    milliseconds: Schema = {"type": ["number", "null"], "minimum": 0}
    figures: Schema = {
        "instance": {"type": "string"},
        "state": {"enum": ["up", "not_ready", "down"]},
        "ready": {"type": "boolean"},
        "held": {"type": "integer"},
        "writes_per_second": {"type": "number"},
        "notify_p50_ms": milliseconds,
        "notify_p99_ms": milliseconds,
        "age_ms": {"type": "integer", "description": "since the instance last shared"},
        "primary": {
            "type": "string",
            "description": "the Redis primary the instance writes to, host:port (empty: embedded)",
        },
        "failovers": {
            "type": "integer",
            "minimum": 0,
            "description": "times the instance has seen Sentinel move the primary",
        },
    }
    instance: Schema = {
        "type": "object",
        "required": list(figures),
        "additionalProperties": False,
        "properties": figures,
    }
    sample: Schema = {
        "type": "object",
        "required": ["t", "held", "writes_per_second"],
        "additionalProperties": False,
        "properties": {
            "t": {**counter, "description": "ms since the epoch"},
            "held": {"type": "integer"},
            "writes_per_second": {"type": "number"},
        },
    }
    view: Schema = {
        "type": "object",
        "required": ["cursor", "reset", "store_reachable", "instances", "samples"],
        "additionalProperties": False,
        "properties": {
            "cursor": {**counter, "description": "the time of the newest sample: the next since"},
            "reset": {"type": "boolean", "description": "every sample kept: replace the chart"},
            "store_reachable": {"type": "boolean"},
            "instances": {"type": "array", "items": instance},
            "samples": {"type": "array", "items": sample},
        },
    }
    return {
        "operationId": "watchCluster",
        "summary": "Long poll on the cluster's figures (the dashboard): each instance's, and "
        "samples of the totals, one a second",
        "parameters": [since, TIMEOUT_PARAMETER],
        "responses": {
            "200": _response("The cluster now, and the samples after `since`", view),
            "204": NOTHING_NEW,
            "400": BAD_REQUEST,
            "503": _error(
                f"This instance holds {MAX_WATCHERS} dashboards already", headers=("Retry-After",)
            ),
        },
    }


def _paths() -> Schema:
    return {
        "/api/status": {
            "get": _read(
                "getStatus",
                "The state of the task `default`",
                [],
                {"200": _state("The state"), "503": UNAVAILABLE},
            )
        },
        "/api/poll-status": {
            "get": _poll("pollStatus", "Long poll on the task `default`", "last_version", False)
        },
        "/api/update-status": {"post": _write("updateStatus", "Write the task `default`", False)},
        "/api/tasks": {
            "get": _read(
                "listTasks",
                "Every live task (written, not deleted), oldest change first",
                [],
                {"200": _response("The tasks", _ref("TaskList")), "503": UNAVAILABLE},
            )
        },
        "/api/tasks/{task_id}": {
            "get": _read(
                "getTask",
                "The state of a task (version 0 if never written, its tombstone if deleted); with "
                "`If-None-Match` and `Prefer: wait`, a long poll",
                [TASK_ID_PARAMETER, *_conditional_parameters()],
                {
                    "200": _response(
                        "The state", _ref("TaskState"), headers=("ETag", "Preference-Applied")
                    ),
                    "304": _response(
                        "The state is still the one `If-None-Match` names (at once without "
                        "`Prefer: wait`, else once the wait passed)",
                        headers=("ETag", "Preference-Applied", "Retry-After"),
                    ),
                    "400": BAD_REQUEST,
                    "404": NO_ROUTE,
                    "503": UNAVAILABLE,
                },
            ),
            "put": _write(
                "putTask",
                "Write a task (created by its first write, or by the first after its deletion)",
                True,
            ),
            "delete": _delete(),
        },
        "/api/tasks/{task_id}/poll": {
            "get": _poll("pollTask", "Long poll on one task", "since", True)
        },
        "/api/tasks/{task_id}/history": {
            "get": _read(
                "getTaskHistory",
                "The last changes of a task (HISTORY_LENGTH), newest first",
                [TASK_ID_PARAMETER],
                {
                    "200": _response("The changes", _ref("TaskHistory")),
                    "400": BAD_REQUEST,
                    "404": NO_ROUTE,
                    "503": UNAVAILABLE,
                },
            )
        },
        "/api/watch": {"get": _watch()},
        **_event_streams(),
        "/api/ws": {"get": _websocket()},
        OPENAPI_PATH: {
            "get": {
                "operationId": "getOpenApi",
                "summary": "This document",
                "responses": {"200": _response("OpenAPI 3.1", {"type": "object"})},
            }
        },
        "/healthz": _probe("healthz", "Alive", "Health", ("200",)),
        "/readyz": _probe("readyz", "Ready to serve", "Readiness", ("200", "503")),
        "/": _page("board", "The live task board (HTML)", False),
        "/tasks/{task_id}": _page("taskPage", "One task's live page (HTML)", True),
        "/dashboard": _page("dashboard", "The live cluster dashboard (HTML)", False),
        CLUSTER_WATCH_PATH: {"get": _cluster_watch()},
        METRICS_PATH: {
            "get": {
                "operationId": "getMetrics",
                "summary": "Prometheus metrics of this instance",
                "responses": {
                    "200": _response(
                        "The Prometheus text format",
                        {"type": "string"},
                        api=False,
                        media_type="text/plain",
                    )
                },
            }
        },
    }


# --- what the configuration adds --------------------------------------------------------------


def _require_tokens(paths: Schema, public_reads: bool) -> None:
    """Every task operation needs a bearer token (reads optionally not): 401 and 403 answers."""
    challenge = ("WWW-Authenticate",)
    unauthorized = _error("No token, or one that is not valid", headers=challenge)
    forbidden = _error("The token does not grant this request", headers=challenge)
    for path_item in paths.values():
        for operation in path_item.values():
            scope = operation.get("x-scope")
            if scope is None:
                continue
            public = public_reads and scope == READ
            operation["security"] = [{}, {"bearer": []}] if public else [{"bearer": []}]
            operation["responses"]["401"] = unauthorized
            if not public:  # a public read checks a token sent, but never its grant
                operation["responses"]["403"] = forbidden


def _limit_writes(paths: Schema) -> None:
    limited = _error("Too many writes from this client; retry later", headers=("Retry-After",))
    for path_item in paths.values():
        for operation in path_item.values():
            if operation.get("x-scope") == WRITE:
                operation["responses"]["429"] = limited


def _allow_preflights(paths: Schema) -> None:
    """CORS preflights, on every /api/ route, for the configured origins."""
    for path, path_item in paths.items():
        if not path.startswith("/api/"):
            continue
        parameters = next(iter(path_item.values())).get("parameters", [])
        path_item["options"] = {
            "operationId": f"{next(iter(path_item.values()))['operationId']}Preflight",
            "summary": "CORS preflight",
            "parameters": [p for p in parameters if p is TASK_ID_PARAMETER],
            "responses": {
                "200": _response("The origin may send this request"),
                "403": _error("The origin, method or headers are not allowed"),
            },
        }


# --- the document -----------------------------------------------------------------------------


def _components(statuses: tuple[str, ...]) -> Schema:
    counter: Schema = {"type": "integer", "minimum": 0, "maximum": MAX_COUNTER}
    error_body: Schema = {
        "type": "object",
        "required": ["code", "message"],
        "additionalProperties": False,
        "properties": {
            "code": {"type": "string", "pattern": ERROR_CODE},
            "message": {"type": "string", "minLength": 1},
        },
    }
    tasks: Schema = {"type": "array", "items": _ref("TaskState")}
    return {
        "schemas": {
            "TaskState": {
                "description": "A task's state: live, or its tombstone once deleted",
                "oneOf": [_ref("LiveTaskState"), _ref("Tombstone")],
            },
            "Tombstone": {
                "type": "object",
                "description": "What a deletion leaves for TOMBSTONE_TTL seconds: the deletion's "
                "version and time; then the task reads as never written",
                "required": [
                    "task",
                    "status",
                    "version",
                    "updated_at",
                    "progress",
                    "message",
                    "deleted",
                ],
                "additionalProperties": False,
                "properties": {
                    "task": {"type": "string", "pattern": TASK_ID},
                    "status": {"type": "null"},
                    "version": {**counter, "minimum": 2},
                    "updated_at": {"type": "string", "format": "date-time"},
                    "progress": {"type": "null"},
                    "message": {"type": "null"},
                    "deleted": {"const": True},
                },
            },
            "LiveTaskState": {
                "type": "object",
                "required": ["task", "status", "version", "updated_at", "progress", "message"],
                "additionalProperties": False,
                "properties": {
                    "task": {"type": "string", "pattern": TASK_ID},
                    "status": {"type": "string", "enum": list(statuses)},
                    "version": {**counter, "description": "grows by exactly 1 on every write"},
                    "updated_at": {
                        "type": ["string", "null"],
                        "format": "date-time",
                        "description": "the last write (UTC, milliseconds); null if never written",
                    },
                    "progress": {"type": ["integer", "null"], "minimum": 0, "maximum": 100},
                    "message": {"type": ["string", "null"], "maxLength": MESSAGE_MAX_CHARS},
                },
            },
            "TaskUpdate": {
                "type": "object",
                "description": "A field left out keeps its value; null clears progress or "
                "message. With expected_version not the current version nothing changes (409).",
                "additionalProperties": False,
                "anyOf": [
                    {"required": ["status"]},
                    {"required": ["progress"]},
                    {"required": ["message"]},
                ],
                "properties": {
                    "status": {"type": "string", "enum": list(statuses)},
                    "progress": {"type": ["integer", "null"], "minimum": 0, "maximum": 100},
                    "message": {
                        "type": ["string", "null"],
                        "maxLength": MESSAGE_MAX_CHARS,
                        "pattern": MESSAGE_TEXT,
                    },
                    "expected_version": {**counter, "type": ["integer", "null"]},
                },
            },
            "TaskHistory": {
                "type": "object",
                "required": ["task", "history"],
                "additionalProperties": False,
                "properties": {
                    "task": {"type": "string", "pattern": TASK_ID},
                    "history": {"type": "array", "items": _ref("HistoryEntry")},
                },
            },
            "HistoryEntry": {
                "type": "object",
                "description": "One change: the state right after it, and who made it",
                "required": ["version", "status", "progress", "message", "updated_at", "subject"],
                "additionalProperties": False,
                "properties": {
                    "version": {**counter, "minimum": 1},
                    "status": {"type": "string"},
                    "progress": {"type": ["integer", "null"], "minimum": 0, "maximum": 100},
                    "message": {"type": ["string", "null"], "maxLength": MESSAGE_MAX_CHARS},
                    "updated_at": {"type": "string", "format": "date-time"},
                    "subject": {
                        "type": ["string", "null"],
                        "description": "the `sub` of the writer's token; null without one",
                    },
                },
            },
            "TaskList": {
                "type": "object",
                "required": ["tasks"],
                "additionalProperties": False,
                "properties": {"tasks": tasks},
            },
            "WatchBatch": {
                "type": "object",
                "required": ["cursor", "reset", "tasks"],
                "additionalProperties": False,
                "properties": {
                    "cursor": {"type": "string", "pattern": f"^{CURSOR_EPOCH}-[0-9]+$"},
                    "reset": {"type": "boolean", "description": "a snapshot: replace everything"},
                    "tasks": tasks,
                },
            },
            "Error": {
                "type": "object",
                "required": ["error"],
                "additionalProperties": False,
                "properties": {"error": error_body},
            },
            "Conflict": {
                "type": "object",
                "required": ["error", "current"],
                "additionalProperties": False,
                "properties": {"error": error_body, "current": _ref("TaskState")},
            },
            "Health": {
                "type": "object",
                "required": ["status", "instance", "waiting"],
                "additionalProperties": False,
                "properties": {
                    "status": {"const": "ok"},
                    "instance": {"type": "string"},
                    "waiting": {
                        "type": "object",
                        "required": ["polls", "watches"],
                        "additionalProperties": False,
                        "properties": {
                            "polls": {"type": "integer", "minimum": 0},
                            "watches": {"type": "integer", "minimum": 0},
                        },
                    },
                },
            },
            "Readiness": {
                "type": "object",
                "required": ["ready", "instance"],
                "additionalProperties": False,
                "properties": {"ready": {"type": "boolean"}, "instance": {"type": "string"}},
            },
        },
        "headers": {
            "X-Served-By": {
                "description": "the instance that answered",
                "required": True,
                "schema": {"type": "string", "minLength": 1},
            },
            "X-Content-Type-Options": {
                "description": "the content type is to be believed",
                "required": True,
                "schema": {"const": "nosniff"},
            },
            "Cache-Control": {
                "description": "API answers are never cached",
                "required": True,
                "schema": {"const": "no-store"},
            },
            "ETag": {
                "description": "the version of the state, quoted",
                "required": True,
                "schema": {"type": "string", "pattern": '^"[0-9]+"$'},
            },
            "Preference-Applied": {
                "description": "the wait honoured (RFC 7240), capped by POLL_TIMEOUT_MAX",
                "schema": {"type": "string", "pattern": "^wait=[0-9]+$"},
            },
            "Retry-After": {
                "description": "seconds to wait before trying again",
                "schema": {"type": "string", "pattern": "^[0-9]+$"},
            },
            "WWW-Authenticate": {
                "description": "the bearer challenge (RFC 6750)",
                "required": True,
                "schema": {"type": "string", "pattern": "^Bearer "},
            },
        },
        "parameters": {
            "TaskId": _parameter(
                "task_id", "path", {"type": "string", "pattern": TASK_ID}, "the task", required=True
            ),
            "Timeout": _parameter(
                "timeout", "query", counter, "seconds to hold at most; capped by POLL_TIMEOUT_MAX"
            ),
        },
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
    }


def build_openapi(config: Config) -> Schema:
    """The whole description of an app built from ``config``."""
    paths = _paths()
    if config.auth_enabled:
        _require_tokens(paths, config.auth_public_reads)
    if config.write_rate_limit > 0:
        _limit_writes(paths)
    if config.cors_origins:
        _allow_preflights(paths)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "taskstatus",
            "version": "1",
            "description": "Real-time task status over HTTP long polling. Errors are "
            '`{"error": {"code", "message"}}`; bad input never changes state.',
        },
        "paths": paths,
        "components": _components(config.statuses),
    }


def setup_openapi_routes(app: web.Application) -> None:
    body = json.dumps(build_openapi(app[CONFIG])).encode()

    async def openapi(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app.router.add_get(OPENAPI_PATH, openapi, allow_head=False)
