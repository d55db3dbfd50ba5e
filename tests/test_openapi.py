"""The OpenAPI document is true: it lists exactly the app's routes, it is valid OpenAPI 3.1, and
real answers (every status the sample provokes) conform to it: documented status, content type,
body schema and headers.

The document depends on the configuration (tokens, rate limit, CORS), so each check runs over the
configurations that change it.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, Protocol

import jsonschema_rs
import pytest
import schemathesis
from aiohttp import ClientResponse, web
from schemathesis.core.result import Ok

from service.app import create_app
from service.config import Config
from service.dashboard import CLUSTER_WATCH_PATH
from service.keys import CONFIG
from service.metrics import METRICS_PATH
from service.openapi import OPENAPI_PATH, build_openapi

from .conftest import (
    INSTANCE_ID,
    SECRET,
    Client,
    ClientFactory,
    bearer,
    token,
    wait_for_waiters,
)

ALLOWED_ORIGIN = "http://allowed.example"
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "tokens": {"auth_secret": SECRET},
    "tokens, public reads": {"auth_secret": SECRET, "auth_public_reads": True},
    "write rate limit": {"write_rate_limit": 0.001, "write_rate_burst": 1},
    "cors": {"cors_origins": (ALLOWED_ORIGIN,)},
    "other statuses": {"statuses": ("queued", "done")},
}
JSON = {"Content-Type": "application/json"}
# A fresh connection per request: an answer to a hostile body may close its connection.
CLOSE = {"Connection": "close"}


def config_of(overrides: dict[str, Any]) -> Config:
    return Config(instance_id=INSTANCE_ID, **overrides)


def routes_of(app: web.Application) -> set[tuple[str, str]]:
    """Every (path, method) the app routes, but static files (not an API, and not described)."""
    resources = list(app.router.resources())
    static = [r for r in resources if isinstance(r, web.StaticResource)]
    assert [r.canonical for r in static] == ["/static"]
    return {
        (resource.canonical, route.method)
        for resource in resources
        if resource not in static
        for route in resource
    }


def operations_of(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (path, method.upper())
        for path, item in document["paths"].items()
        for method in item
        if method in ("get", "head", "put", "post", "delete", "options")
    }


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS)
def test_every_route_is_documented_and_every_documented_operation_is_routed(
    overrides: dict[str, Any],
) -> None:
    app = create_app(config_of(overrides))
    assert operations_of(build_openapi(app[CONFIG])) == routes_of(app)


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS)
def test_document_is_valid_openapi_3_1_with_resolvable_references(
    overrides: dict[str, Any],
) -> None:
    document = build_openapi(config_of(overrides))
    schema = schemathesis.openapi.from_dict(document)
    schema.validate()  # against the OpenAPI 3.1 meta-schema
    operations = list(schema.get_all_operations())
    assert all(isinstance(result, Ok) for result in operations), operations
    assert len(operations) == len(operations_of(document))
    ids = [op["operationId"] for item in document["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))


def test_document_follows_the_configuration() -> None:
    default = build_openapi(config_of({}))
    assert "security" not in default["paths"]["/api/tasks/{task_id}"]["put"]
    assert default["components"]["schemas"]["LiveTaskState"]["properties"]["status"]["enum"] == [
        "pending",
        "in_progress",
        "completed",
        "failed",
        "cancelled",
    ]
    tokens = build_openapi(config_of(CONFIGS["tokens"]))
    put = tokens["paths"]["/api/tasks/{task_id}"]["put"]
    assert put["security"] == [{"bearer": []}]
    assert {"401", "403"} <= set(put["responses"])
    assert "security" not in tokens["paths"][OPENAPI_PATH]["get"]
    public = build_openapi(config_of(CONFIGS["tokens, public reads"]))
    assert public["paths"]["/api/tasks/{task_id}"]["get"]["security"] == [{}, {"bearer": []}]
    limited = build_openapi(config_of(CONFIGS["write rate limit"]))
    assert "429" in limited["paths"]["/api/update-status"]["post"]["responses"]
    assert "429" not in limited["paths"]["/api/status"]["get"]["responses"]


async def test_served_document_is_the_one_built_for_this_config(make_client: ClientFactory) -> None:
    for overrides in (CONFIGS["default"], CONFIGS["other statuses"]):
        client = await make_client(**overrides)
        response = await client.get(OPENAPI_PATH)
        assert response.status == 200
        assert response.content_type == "application/json"
        assert await response.json() == build_openapi(client.app[CONFIG])


# --- real answers against the document --------------------------------------------------------


@dataclass
class Conformance:
    """Checks answers against one document, and records which (path, method, status) it saw."""

    document: dict[str, Any]
    seen: set[tuple[str, str, int]] = field(default_factory=set)

    def resolve(self, node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            target: Any = self.document
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            node = target
        return node

    def validate(self, schema: dict[str, Any], instance: object, what: str) -> None:
        rooted = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "components": self.document["components"],
            **schema,
        }
        validator = jsonschema_rs.validator_for(rooted, validate_formats=True)
        errors = [str(e) for e in validator.iter_errors(instance)]
        assert not errors, f"{what}: {errors}"

    async def check(self, path: str, method: str, response: ClientResponse) -> bytes:
        operation = self.document["paths"][path][method.lower()]
        what = f"{method} {path} -> {response.status}"
        spec = operation["responses"].get(str(response.status))
        assert spec is not None, f"{what}: status not documented"
        spec = self.resolve(spec)
        body = await response.read()
        content = spec.get("content")
        if content is None:
            assert body == b"", what
        else:
            (media_type,) = content
            assert response.content_type == media_type, what
            if media_type == "application/json":
                self.validate(content[media_type]["schema"], json.loads(body), what)
        for name, header in spec.get("headers", {}).items():
            header = self.resolve(header)
            value = response.headers.get(name)
            if header.get("required"):
                assert value is not None, f"{what}: no {name} header"
            if value is not None:
                self.validate(header["schema"], value, f"{what}, header {name}")
        self.seen.add((path, method, response.status))
        return body


@dataclass
class Sampler:
    client: Client
    conformance: Conformance

    async def send(
        self, method: str, path: str, url: str, status: int, **kwargs: Any
    ) -> dict[str, Any] | None:
        """Send, check the status is ``status`` and the answer conforms; the JSON body if any."""
        response = await self.client.request(method, url, **kwargs)
        assert response.status == status, (method, url, await response.text())
        body = await self.conformance.check(path, method, response)
        return json.loads(body) if body and response.content_type == "application/json" else None


class SamplerFactory(Protocol):
    async def __call__(self, **overrides: Any) -> Sampler: ...


@pytest.fixture
def sampler_factory(make_client: ClientFactory) -> SamplerFactory:
    """A server (on each backend) with ``Config(**overrides)``, and its document's checker."""

    async def make(**overrides: Any) -> Sampler:
        client = await make_client(**overrides)
        return Sampler(client, Conformance(build_openapi(client.app[CONFIG])))

    return make


def padded_body(size: int) -> bytes:
    core = b'{"status": "failed"}'
    return core[:-1] + b" " * (size - len(core)) + b"}"


async def test_answers_of_every_default_operation_conform(sampler_factory: SamplerFactory) -> None:
    s = await sampler_factory()
    task, poll = "/api/tasks/{task_id}", "/api/tasks/{task_id}/poll"
    await s.send("GET", "/api/status", "/api/status", 200)
    await s.send("GET", "/api/tasks", "/api/tasks", 200)
    await s.send("GET", task, "/api/tasks/a", 200)
    await s.send("GET", task, "/api/tasks/-a", 400)
    await s.send("GET", task, "/api/tasks/..", 404)
    for method, path, url in (("PUT", task, "/api/tasks/a"), ("POST", *["/api/update-status"] * 2)):
        await s.send(method, path, url, 200, json={"status": "in_progress", "progress": 5})
        await s.send(method, path, url, 200, json={"message": "ünï ✓", "expected_version": 1})
        await s.send(method, path, url, 400, data=b"{", headers=JSON)
        await s.send(method, path, url, 409, json={"progress": 1, "expected_version": 0})
        big = padded_body(16 * 1024 + 1)
        await s.send(method, path, url, 413, data=big, headers={**JSON, **CLOSE})
        await s.send(method, path, url, 415, data=b"{}", headers={"Content-Type": "text/plain"})
    await s.send("DELETE", task, "/api/tasks/gone", 404)
    await s.send("PUT", task, "/api/tasks/gone", 200, json={"status": "completed"})
    await s.send("DELETE", task, "/api/tasks/gone?expected_version=7", 409)
    await s.send("DELETE", task, "/api/tasks/gone?expected_version=x", 400)
    await s.send("DELETE", task, "/api/tasks/-a", 400)
    await s.send("DELETE", task, "/api/tasks/..", 404)
    await s.send("DELETE", task, "/api/tasks/gone?expected_version=1", 200)
    await s.send("GET", task, "/api/tasks/gone", 200)
    await s.send("GET", poll, "/api/tasks/gone/poll?since=1&timeout=0", 200)
    await s.send("GET", poll, "/api/tasks/a/poll?since=0&timeout=0", 200)
    await s.send("GET", poll, "/api/tasks/a/poll?since=2&timeout=0", 204)
    await s.send("GET", poll, "/api/tasks/a/poll?since=x", 400)
    await s.send("GET", poll, "/api/tasks/../poll?since=0", 404)
    await s.send("GET", task, "/api/tasks/a", 304, headers={"If-None-Match": '"2"'})
    waited = {"If-None-Match": '"2"', "Prefer": "wait=0"}
    await s.send("GET", task, "/api/tasks/a", 304, headers=waited)
    await s.send("GET", task, "/api/tasks/a", 200, headers={**waited, "If-None-Match": '"1"'})
    history = "/api/tasks/{task_id}/history"
    await s.send("GET", history, "/api/tasks/a/history", 200)
    await s.send("GET", history, "/api/tasks/-a/history", 400)
    await s.send("GET", history, "/api/tasks/../history", 404)
    await s.send("GET", "/api/poll-status", "/api/poll-status?last_version=0&timeout=0", 200)
    await s.send("GET", "/api/poll-status", "/api/poll-status?last_version=2&timeout=0", 204)
    await s.send("GET", "/api/poll-status", "/api/poll-status", 400)
    snapshot = await s.send("GET", "/api/watch", "/api/watch", 200)
    assert snapshot is not None
    await s.send("GET", "/api/watch", f"/api/watch?since={snapshot['cursor']}&timeout=0", 204)
    await s.send("GET", "/api/watch", "/api/watch?since=0&tasks=a,b&timeout=0", 200)
    await s.send("GET", "/api/watch", "/api/watch?since=nope", 400)
    # Event streams never end, so only their refusals are read to the end here (test_sse.py
    # reads the streams); a plain GET of the WebSocket is refused before any upgrade.
    events = "/api/tasks/{task_id}/events"
    await s.send("GET", events, "/api/tasks/-a/events", 400)
    await s.send("GET", events, "/api/tasks//events", 404)
    await s.send("GET", "/api/events", "/api/events?since=nope", 400)
    await s.send("GET", "/api/ws", "/api/ws", 400)
    await s.send("GET", OPENAPI_PATH, OPENAPI_PATH, 200)
    for method in ("GET", "HEAD"):
        await s.send(method, "/healthz", "/healthz", 200)
        await s.send(method, "/readyz", "/readyz", 200)
        await s.send(method, "/", "/", 200)
        await s.send(method, "/dashboard", "/dashboard", 200)
        await s.send(method, "/tasks/{task_id}", "/tasks/a", 200)
        await s.send(method, "/tasks/{task_id}", "/tasks/-a", 400)
    cluster = await s.send("GET", CLUSTER_WATCH_PATH, CLUSTER_WATCH_PATH, 200)
    assert cluster is not None
    ahead = cluster["cursor"] + 4000  # a sample that late is seconds away: nothing within 0 s
    await s.send("GET", CLUSTER_WATCH_PATH, f"{CLUSTER_WATCH_PATH}?since={ahead}&timeout=0", 204)
    await s.send("GET", CLUSTER_WATCH_PATH, f"{CLUSTER_WATCH_PATH}?since=x", 400)
    await s.send("GET", METRICS_PATH, METRICS_PATH, 200)
    documented = operations_of(s.conformance.document)
    assert {(path, method) for path, method, _ in s.conformance.seen} == documented


async def test_answers_at_the_limits_conform(sampler_factory: SamplerFactory) -> None:
    s = await sampler_factory(max_held_polls=1, max_tasks=1)
    await s.send("PUT", "/api/tasks/{task_id}", "/api/tasks/one", 200, json={"progress": 1})
    await s.send("PUT", "/api/tasks/{task_id}", "/api/tasks/two", 507, json={"progress": 1})
    cursor = (await (await s.client.get("/api/watch")).json())["cursor"]
    held = asyncio.create_task(s.client.get("/api/tasks/one/poll?since=1&timeout=30"))
    await wait_for_waiters(s.client, 1)
    poll, watch = "/api/tasks/{task_id}/poll", "/api/watch"
    await s.send("GET", poll, "/api/tasks/one/poll?since=1", 503)
    await s.send("GET", watch, f"/api/watch?since={cursor}", 503)
    await s.send("PUT", "/api/tasks/{task_id}", "/api/tasks/one", 200, json={"progress": 2})
    await s.conformance.check(poll, "GET", await held)


async def test_answers_with_tokens_required_conform(sampler_factory: SamplerFactory) -> None:
    s = await sampler_factory(**CONFIGS["tokens"])
    task = "/api/tasks/{task_id}"
    await s.send("GET", task, "/api/tasks/a", 401)
    await s.send("GET", task, "/api/tasks/a", 401, headers=bearer("not.a.jwt"))
    await s.send("GET", task, "/api/tasks/a", 200, headers=bearer(token("tasks:read")))
    read_only = bearer(token("tasks:read"))
    await s.send("PUT", task, "/api/tasks/a", 403, json={"progress": 1}, headers=read_only)
    writer = bearer(token("tasks:write"))
    await s.send("PUT", task, "/api/tasks/a", 200, json={"progress": 1}, headers=writer)
    await s.send("DELETE", task, "/api/tasks/a", 401)
    await s.send("DELETE", task, "/api/tasks/a", 403, headers=read_only)  # reading is not deleting
    await s.send("GET", task, "/api/tasks/a", 200, headers=read_only)  # still there
    await s.send("DELETE", task, "/api/tasks/a", 200, headers=writer)
    await s.send("GET", OPENAPI_PATH, OPENAPI_PATH, 200)


async def test_answers_with_public_reads_conform(sampler_factory: SamplerFactory) -> None:
    s = await sampler_factory(**CONFIGS["tokens, public reads"])
    task = "/api/tasks/{task_id}"
    await s.send("GET", task, "/api/tasks/a", 200)
    await s.send("GET", task, "/api/tasks/a", 401, headers=bearer("not.a.jwt"))
    await s.send("PUT", task, "/api/tasks/a", 401, json={"progress": 1})


async def test_answers_under_the_write_rate_limit_conform(sampler_factory: SamplerFactory) -> None:
    s = await sampler_factory(**CONFIGS["write rate limit"])
    await s.send("POST", "/api/update-status", "/api/update-status", 200, json={"progress": 1})
    await s.send("POST", "/api/update-status", "/api/update-status", 429, json={"progress": 2})


async def test_answers_to_cors_preflights_conform(sampler_factory: SamplerFactory) -> None:
    s = await sampler_factory(**CONFIGS["cors"])
    preflight = {"Access-Control-Request-Method": "PUT"}
    for origin, status in (("http://elsewhere.example", 403), (ALLOWED_ORIGIN, 200)):
        headers = {**preflight, "Origin": origin}
        await s.send("OPTIONS", "/api/tasks/{task_id}", "/api/tasks/a", status, headers=headers)
