# mypy: allow-untyped-decorators
# (Flask is a bench extra: `make typecheck` also runs where it is not installed)
"""The seed's design, as a reference to measure against: Flask's threaded development server.

A thread per connection (so per held poll), the state in a dict, and one ``threading.Condition``
that every poll waits on and every write notifies. Same endpoint shapes as the service:
``GET /api/tasks/{id}/poll?since=V&timeout=S`` and ``PUT /api/tasks/{id}``, plus ``/healthz``
with the number of held polls. Werkzeug's server closes the connection after every answer (no
keep-alive), so each poll comes on a new connection, as it did with the seed. The per-request
access log is off: it would measure logging, not the design.

Run: ``python -m bench.seed_flask --port 8090``.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from datetime import UTC, datetime
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.serving import run_simple

POLL_TIMEOUT, POLL_TIMEOUT_MAX = 30.0, 55.0

app = Flask(__name__)
changed = threading.Condition()
tasks: dict[str, dict[str, Any]] = {}
waiting = 0


def current(task_id: str) -> dict[str, Any]:
    return tasks.get(task_id) or {
        "task": task_id,
        "status": "pending",
        "version": 0,
        "updated_at": None,
        "progress": None,
        "message": None,
    }


@app.get("/api/tasks/<task_id>/poll")
def poll(task_id: str) -> Response | tuple[str, int]:
    global waiting
    since = int(request.args["since"])
    hold = min(float(request.args.get("timeout", POLL_TIMEOUT)), POLL_TIMEOUT_MAX)
    deadline = time.monotonic() + hold
    with changed:
        waiting += 1
        try:
            while (state := current(task_id))["version"] == since:
                left = deadline - time.monotonic()
                if left <= 0:
                    return "", 204
                changed.wait(left)
        finally:
            waiting -= 1
    return jsonify(state)


@app.put("/api/tasks/<task_id>")
def put(task_id: str) -> Response:
    update = request.get_json()
    with changed:
        state = dict(current(task_id))
        state.update({k: update[k] for k in ("status", "progress", "message") if k in update})
        state["version"] += 1
        state["updated_at"] = datetime.now(UTC).isoformat(timespec="milliseconds")
        tasks[task_id] = state
        changed.notify_all()
    return jsonify(state)


@app.get("/api/tasks/<task_id>")
def get(task_id: str) -> Response:
    with changed:
        return jsonify(current(task_id))


@app.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok", "waiting": {"polls": waiting}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    run_simple(args.host, args.port, app, threaded=True)


if __name__ == "__main__":
    main()
