"""Authentication and authorization over real HTTP: who may read, who may write, which tasks.

Every refused request is checked to have changed nothing. Tokens are made the way an operator
makes them (``mint_token``, the code behind ``python -m service token``), or by hand with PyJWT for
the broken ones (expired, wrong signature, ``alg: none``, wrong audience, ...). At the end, the page
with auth on in Chromium: it asks for a token, takes one from ``#token=``, and shows 401 and 403.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import ClientResponse
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from playwright.async_api import Browser, Page, expect

from deploy.cluster import Instance
from service.auth import OPEN_WARNING, load_private_key, mint_token
from service.config import Config, load_config
from tests.browser import (
    browser_fixture,  # noqa: F401 (the `browser` fixture)
    go_live,
    new_tab,
    screenshot,
    task,
)

from .conftest import SECRET, Client, ClientFactory, bearer, put, token, wait_for_waiters

READ, WRITE = "tasks:read", "tasks:write"
REPO = Path(__file__).resolve().parent.parent
JSON = {"Content-Type": "application/json"}


def hand_made(claims: dict[str, Any], key: Any = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=algorithm)


def valid_claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"aud": "taskstatus", "exp": now + 300, "scope": f"{READ} {WRITE}", **overrides}


def _part(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def unsigned(claims: dict[str, Any]) -> str:
    """A token with ``alg: none`` and no signature, as an attacker would forge it."""
    return f"{_part({'alg': 'none', 'typ': 'JWT'})}.{_part(claims)}."


def hmac_forged(claims: dict[str, Any], key: bytes) -> str:
    """An HS256 token made with ``key`` by hand (PyJWT refuses a PEM key as an HMAC secret)."""
    signed = f"{_part({'alg': 'HS256', 'typ': 'JWT'})}.{_part(claims)}"
    mac = hmac.new(key, signed.encode(), hashlib.sha256).digest()
    return f"{signed}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


async def error_of(response: ClientResponse, status: int, code: str) -> dict[str, Any]:
    assert response.status == status, await response.text()
    body: dict[str, Any] = await response.json()
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    return body


async def assert_unauthorized(response: ClientResponse, code: str = "invalid_token") -> None:
    await error_of(response, 401, code)
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="taskstatus"')
    if code == "missing_token":
        assert "error=" not in challenge  # RFC 6750 3.1: no error code when no token was sent
    else:
        assert 'error="invalid_token"' in challenge


async def assert_forbidden(response: ClientResponse, code: str, scope: str) -> None:
    await error_of(response, 403, code)
    challenge = response.headers["WWW-Authenticate"]
    assert 'error="insufficient_scope"' in challenge and f'scope="{scope}"' in challenge


@pytest.fixture
async def secured(make_client: ClientFactory) -> Client:
    """A server that requires tokens, holding task "seen" at version 1."""
    client = await make_client(auth_secret=SECRET)
    response = await client.put(
        "/api/tasks/seen", json={"status": "in_progress"}, headers=bearer(token(WRITE))
    )
    assert response.status == 200
    return client


async def listing(client: Client) -> list[dict[str, Any]]:
    response = await client.get("/api/tasks", headers=bearer(token(READ)))
    assert response.status == 200
    tasks: list[dict[str, Any]] = (await response.json())["tasks"]
    return tasks


# --- refused without a valid token ------------------------------------------------------------

API_REQUESTS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/api/status", None),
    ("GET", "/api/tasks", None),
    ("GET", "/api/tasks/seen", None),
    ("GET", "/api/tasks/seen/poll?since=0&timeout=1", None),
    ("GET", "/api/poll-status?last_version=0&timeout=1", None),
    ("GET", "/api/watch", None),
    ("GET", "/api/watch?tasks=seen", None),
    ("PUT", "/api/tasks/seen", {"status": "failed"}),
    ("PUT", "/api/tasks/new-one", {"status": "failed"}),
    ("POST", "/api/update-status", {"progress": 5}),
]


@pytest.mark.parametrize(("method", "path", "body"), API_REQUESTS)
async def test_every_api_request_without_a_token_is_401_with_a_bearer_challenge(
    secured: Client, method: str, path: str, body: dict[str, Any] | None
) -> None:
    before = await listing(secured)
    response = await secured.request(method, path, json=body)
    await assert_unauthorized(response, "missing_token")
    assert response.headers["Cache-Control"] == "no-store"
    assert await listing(secured) == before


def broken_tokens() -> dict[str, tuple[str, str]]:
    """Tokens the server must refuse, made when asked: "valid for 5 minutes" stays true."""
    now = int(time.time())

    def without(claim: str) -> dict[str, Any]:
        return {k: v for k, v in valid_claims().items() if k != claim}

    return {
        "expired": (hand_made(valid_claims(exp=now - 60)), "token_expired"),
        "wrong signature": (
            hand_made(valid_claims(), key=SECRET.replace("test", "best")),
            "invalid_token",
        ),
        "alg none": (unsigned(valid_claims()), "invalid_token"),
        "wrong audience": (hand_made(valid_claims(aud="another-service")), "invalid_token"),
        "no audience": (hand_made(without("aud")), "invalid_token"),
        "no expiry": (hand_made(without("exp")), "invalid_token"),
        "not yet valid": (hand_made(valid_claims(nbf=now + 3600)), "invalid_token"),
        "HS512 instead of HS256": (hand_made(valid_claims(), algorithm="HS512"), "invalid_token"),
        "garbage": ("not.a.token", "invalid_token"),
        "tasks claim not a list": (hand_made(valid_claims(tasks="seen")), "invalid_token"),
        "tasks claim with a bad id": (hand_made(valid_claims(tasks=["../x"])), "invalid_token"),
        "scope not a string": (hand_made(valid_claims(scope=[READ, WRITE])), "invalid_token"),
    }


@pytest.mark.parametrize("kind", broken_tokens())
async def test_broken_token_is_401_and_changes_nothing(secured: Client, kind: str) -> None:
    raw, code = broken_tokens()[kind]
    before = await listing(secured)
    for method, path, body in API_REQUESTS:
        response = await secured.request(method, path, json=body, headers=bearer(raw))
        await assert_unauthorized(response, code)
    assert await listing(secured) == before


@pytest.mark.parametrize(
    "header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "Token abc", "bearer"]
)
async def test_authorization_header_that_is_not_a_bearer_token_is_401(
    secured: Client, header: str
) -> None:
    response = await secured.get("/api/tasks/seen", headers={"Authorization": header})
    await assert_unauthorized(response)


async def test_bearer_scheme_is_case_insensitive(secured: Client) -> None:
    response = await secured.get(
        "/api/tasks/seen", headers={"Authorization": f"bEaReR {token(READ)}"}
    )
    assert response.status == 200


async def test_token_in_the_query_string_is_not_accepted(secured: Client) -> None:
    response = await secured.get(f"/api/tasks/seen?access_token={token(READ)}")
    await assert_unauthorized(response, "missing_token")


async def test_issuer_is_checked_when_configured(make_client: ClientFactory) -> None:
    client = await make_client(auth_secret=SECRET, auth_issuer="https://issuer.example")
    right = token(READ, issuer="https://issuer.example")
    assert (await client.get("/api/tasks/x", headers=bearer(right))).status == 200
    for wrong in (token(READ), token(READ, issuer="https://other.example")):
        await assert_unauthorized(await client.get("/api/tasks/x", headers=bearer(wrong)))


async def test_audience_is_configurable(make_client: ClientFactory) -> None:
    client = await make_client(auth_secret=SECRET, auth_audience="board-eu")
    ours = token(READ, ttl=60, audience="board-eu")
    assert (await client.get("/api/tasks/x", headers=bearer(ours))).status == 200
    await assert_unauthorized(await client.get("/api/tasks/x", headers=bearer(token(READ))))


# --- scopes -----------------------------------------------------------------------------------


async def test_read_scope_reads_polls_and_watches_but_cannot_write(secured: Client) -> None:
    headers = bearer(token(READ))
    for path in ("/api/status", "/api/tasks", "/api/tasks/seen", "/api/watch"):
        assert (await secured.get(path, headers=headers)).status == 200, path
    poll = await secured.get("/api/tasks/seen/poll?since=0", headers=headers)
    assert (await poll.json())["version"] == 1
    before = await listing(secured)
    for method, path, body in API_REQUESTS:
        if method != "GET":
            response = await secured.request(method, path, json=body, headers=headers)
            await assert_forbidden(response, "insufficient_scope", WRITE)
    assert await listing(secured) == before


async def test_write_scope_writes_and_creates_but_cannot_read(secured: Client) -> None:
    headers = bearer(token(WRITE))
    updated = await secured.put("/api/tasks/seen", json={"progress": 50}, headers=headers)
    assert (await updated.json())["version"] == 2
    created = await secured.put("/api/tasks/fresh", json={"status": "failed"}, headers=headers)
    assert (await created.json())["version"] == 1
    posted = await secured.post("/api/update-status", json={"progress": 1}, headers=headers)
    assert posted.status == 200
    for method, path, _ in API_REQUESTS:
        if method == "GET":
            response = await secured.get(path, headers=headers)
            await assert_forbidden(response, "insufficient_scope", READ)


async def test_token_with_no_known_scope_is_403(secured: Client) -> None:
    headers = bearer(hand_made(valid_claims(scope="tasks:admin")))
    await assert_forbidden(
        await secured.get("/api/tasks/seen", headers=headers), "insufficient_scope", READ
    )


async def test_held_poll_with_a_token_wakes_on_a_write_with_a_token(secured: Client) -> None:
    poll = asyncio.ensure_future(
        secured.get("/api/tasks/seen/poll?since=1&timeout=10", headers=bearer(token(READ)))
    )
    await wait_for_waiters(secured, 1)
    write = await secured.put("/api/tasks/seen", json={"progress": 7}, headers=bearer(token(WRITE)))
    assert write.status == 200
    response = await poll
    assert response.status == 200
    assert (await response.json())["progress"] == 7


# --- tokens limited to some tasks ------------------------------------------------------------


async def test_token_limited_to_ids_and_a_prefix_touches_only_those(secured: Client) -> None:
    headers = bearer(token(READ, WRITE, tasks=("seen", "build-*")))
    for task_id in ("seen", "build-1", "build-x.y"):
        assert (await secured.get(f"/api/tasks/{task_id}", headers=headers)).status == 200
        response = await secured.put(f"/api/tasks/{task_id}", json={"progress": 3}, headers=headers)
        assert response.status == 200, task_id
    before = await listing(secured)
    for task_id in ("other", "build", "seen2", "xbuild-1"):
        for method in ("GET", "PUT"):
            response = await secured.request(
                method, f"/api/tasks/{task_id}", json={"progress": 4}, headers=headers
            )
            await assert_forbidden(response, "task_not_allowed", READ if method == "GET" else WRITE)
        poll = await secured.get(f"/api/tasks/{task_id}/poll?since=0", headers=headers)
        await assert_forbidden(poll, "task_not_allowed", READ)
    assert await listing(secured) == before


async def test_limited_token_reaches_the_default_task_endpoints_only_if_it_names_default(
    secured: Client,
) -> None:
    limited = bearer(token(READ, WRITE, tasks=("seen",)))
    for method, path, body in API_REQUESTS:
        if "status" in path:
            response = await secured.request(method, path, json=body, headers=limited)
            await assert_forbidden(response, "task_not_allowed", READ if method == "GET" else WRITE)
    allowed = bearer(token(READ, WRITE, tasks=("default",)))
    assert (await secured.get("/api/status", headers=allowed)).status == 200
    posted = await secured.post("/api/update-status", json={"progress": 9}, headers=allowed)
    assert posted.status == 200


async def test_limited_token_cannot_list_or_watch_everything_but_watches_its_tasks(
    secured: Client,
) -> None:
    headers = bearer(token(READ, tasks=("seen", "build-*")))
    await assert_forbidden(
        await secured.get("/api/tasks", headers=headers), "task_not_allowed", READ
    )
    await assert_forbidden(
        await secured.get("/api/watch", headers=headers), "task_not_allowed", READ
    )
    outside = await secured.get("/api/watch?tasks=seen,other", headers=headers)
    await assert_forbidden(outside, "task_not_allowed", READ)
    inside = await secured.get("/api/watch?tasks=seen,build-7", headers=headers)
    assert inside.status == 200
    assert [t["task"] for t in (await inside.json())["tasks"]] == ["seen"]


# --- public reads -----------------------------------------------------------------------------


async def test_public_reads_need_no_token_but_writes_still_do(make_client: ClientFactory) -> None:
    client = await make_client(auth_secret=SECRET, auth_public_reads=True)
    for path in ("/api/status", "/api/tasks", "/api/tasks/x", "/api/watch"):
        assert (await client.get(path)).status == 200, path
    poll = await client.get("/api/tasks/x/poll?since=5")
    assert (await poll.json())["version"] == 0
    await assert_unauthorized(
        await client.put("/api/tasks/x", json={"progress": 1}), "missing_token"
    )
    # A read-only token is no hindrance to reading, and still no licence to write.
    limited = bearer(token(READ, tasks=("y",)))
    assert (await client.get("/api/tasks", headers=limited)).status == 200
    refused = await client.put("/api/tasks/x", json={"progress": 1}, headers=limited)
    await assert_forbidden(refused, "insufficient_scope", WRITE)
    assert (await put_with(client, "x", token(WRITE)))["version"] == 1


async def test_public_reads_still_report_a_broken_token(make_client: ClientFactory) -> None:
    client = await make_client(auth_secret=SECRET, auth_public_reads=True)
    expired = hand_made(valid_claims(exp=int(time.time()) - 60))
    await assert_unauthorized(
        await client.get("/api/tasks/x", headers=bearer(expired)), "token_expired"
    )


async def put_with(client: Client, task: str, raw: str, **body: Any) -> dict[str, Any]:
    response = await client.put(
        f"/api/tasks/{task}", json=body or {"progress": 1}, headers=bearer(raw)
    )
    assert response.status == 200, await response.text()
    state: dict[str, Any] = await response.json()
    return state


# --- what stays open --------------------------------------------------------------------------


async def test_pages_probes_and_static_files_need_no_token(secured: Client) -> None:
    for path in ("/", "/tasks/seen", "/healthz", "/readyz", "/static/main.js", "/api/openapi.json"):
        assert (await secured.get(path)).status == 200, path


async def test_unknown_routes_and_methods_answer_404_and_405_not_401(secured: Client) -> None:
    assert (await secured.get("/api/nowhere")).status == 404
    assert (await secured.delete("/api/tasks")).status == 405


async def test_with_auth_off_every_request_is_served_without_a_token(client: Client) -> None:
    assert (await put(client, "open", status="failed"))["version"] == 1
    assert (await client.get("/api/tasks/open")).status == 200


# --- asymmetric keys --------------------------------------------------------------------------


def write_key_pair(folder: Path, private_key: Any) -> tuple[Path, Path]:
    private = folder / "private.pem"
    public = folder / "public.pem"
    private.write_bytes(
        private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


def new_private_key(algorithm: str) -> Any:
    if algorithm == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
async def test_public_key_verifies_tokens_of_its_private_key_and_nothing_else(
    make_client: ClientFactory, tmp_path: Path, algorithm: str
) -> None:
    private_path, public_path = write_key_pair(tmp_path, new_private_key(algorithm))
    client = await make_client(auth_public_key_file=str(public_path))
    key, named = load_private_key(str(private_path))
    assert named == algorithm
    good = mint_token(key, algorithm, scopes=[READ], ttl=60, audience="taskstatus")
    assert (await client.get("/api/tasks/x", headers=bearer(good))).status == 200

    (tmp_path / "other").mkdir()
    other_private, _ = write_key_pair(tmp_path / "other", new_private_key(algorithm))
    other_key, _ = load_private_key(str(other_private))
    forged = [
        mint_token(other_key, algorithm, scopes=[READ], ttl=60, audience="taskstatus"),
        # Algorithm confusion: the public key (which anyone may have) used as an HMAC secret.
        hmac_forged(valid_claims(), public_path.read_bytes()),
        token(READ),
        unsigned(valid_claims()),
    ]
    for raw in forged:
        await assert_unauthorized(await client.get("/api/tasks/x", headers=bearer(raw)))


def test_a_key_file_that_is_not_a_usable_public_key_stops_the_start(tmp_path: Path) -> None:
    from service.app import create_app

    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    _, weak_public = write_key_pair(tmp_path, weak)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    for path, why in (
        (weak_public, "at least 2048 bits"),
        (garbage, "not a readable PEM public key"),
        (tmp_path / "missing.pem", "not a readable PEM public key"),
    ):
        with pytest.raises(ValueError, match=why):
            create_app(Config(auth_public_key_file=str(path)))


# --- settings ---------------------------------------------------------------------------------


def test_auth_settings_are_read_from_the_environment_and_flags() -> None:
    env = {
        "AUTH_SECRET": SECRET,
        "AUTH_AUDIENCE": "aud-1",
        "AUTH_ISSUER": "iss-1",
        "AUTH_PUBLIC_READS": "true",
    }
    config = load_config([], env)
    assert (config.auth_secret, config.auth_audience, config.auth_issuer) == (
        SECRET,
        "aud-1",
        "iss-1",
    )
    assert config.auth_public_reads and config.auth_enabled
    assert not load_config(["--auth-public-reads", "no"], env).auth_public_reads
    assert SECRET not in repr(config)  # the secret never reaches a log line or a traceback


@pytest.mark.parametrize(
    ("settings", "why"),
    [
        ({"auth_secret": "short"}, "at least 32 bytes"),
        ({"auth_secret": SECRET, "auth_public_key_file": "/k.pem"}, "not both"),
        ({"auth_secret": SECRET, "auth_audience": ""}, "AUTH_AUDIENCE"),
    ],
)
def test_unsafe_auth_settings_are_refused(settings: dict[str, Any], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        Config(**settings)


def test_the_secret_has_no_command_line_flag() -> None:
    with pytest.raises(SystemExit):
        load_config(["--auth-secret", SECRET], {})


async def test_open_service_warns_loudly_once_at_start(
    make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="service.auth"):
        await make_client()
    assert [r.getMessage() for r in caplog.records if r.name == "service.auth"] == [OPEN_WARNING]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="service.auth"):
        await make_client(auth_secret=SECRET)
    assert not [r for r in caplog.records if r.name == "service.auth"]


# --- python -m service token ------------------------------------------------------------------


def run_service(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def test_token_command_mints_a_token_the_server_accepts(make_client: ClientFactory) -> None:
    minted = await asyncio.to_thread(
        run_service,
        "token",
        "--scope",
        WRITE,
        "--ttl",
        "1h",
        "--task",
        "job-7",
        env={"AUTH_SECRET": SECRET},
    )
    assert minted.returncode == 0, minted.stderr
    raw = minted.stdout.strip()
    claims = jwt.decode(raw, SECRET, algorithms=["HS256"], audience="taskstatus")
    assert claims["scope"] == WRITE and claims["tasks"] == ["job-7"]
    assert 3590 <= claims["exp"] - time.time() <= 3600
    client = await make_client(auth_secret=SECRET)
    assert (await put_with(client, "job-7", raw))["version"] == 1
    refused = await client.put("/api/tasks/job-8", json={"progress": 1}, headers=bearer(raw))
    await assert_forbidden(refused, "task_not_allowed", WRITE)
    await assert_forbidden(
        await client.get("/api/tasks/job-7", headers=bearer(raw)), "insufficient_scope", READ
    )


def test_token_command_signs_with_a_private_key(tmp_path: Path) -> None:
    private, public = write_key_pair(tmp_path, new_private_key("ES256"))
    minted = run_service(
        "token", "--scope", f"{READ} {WRITE}", "--ttl", "15m", "--private-key", str(private),
        "--subject", "ci-runner", "--audience", "aud-2",
    )  # fmt: skip
    assert minted.returncode == 0, minted.stderr
    key = serialization.load_pem_public_key(public.read_bytes())
    claims = jwt.decode(minted.stdout.strip(), key, algorithms=["ES256"], audience="aud-2")  # type: ignore[arg-type]
    assert (claims["scope"], claims["sub"]) == (f"{READ} {WRITE}", "ci-runner")
    assert 890 <= claims["exp"] - claims["iat"] <= 900


@pytest.mark.parametrize(
    ("args", "env", "why"),
    [
        (["--scope", WRITE, "--ttl", "1h"], {}, "set AUTH_SECRET"),
        (["--scope", WRITE, "--ttl", "1h"], {"AUTH_SECRET": "short"}, "set AUTH_SECRET"),
        (["--scope", "tasks:admin", "--ttl", "1h"], {"AUTH_SECRET": SECRET}, "is not one of"),
        (["--scope", WRITE, "--ttl", "soon"], {"AUTH_SECRET": SECRET}, "expected a duration"),
        (["--scope", WRITE, "--ttl", "0s"], {"AUTH_SECRET": SECRET}, "expected a duration"),
        (["--scope", WRITE, "--ttl", "1h", "--task", "a b"], {"AUTH_SECRET": SECRET}, "task id"),
        (["--ttl", "1h"], {"AUTH_SECRET": SECRET}, "--scope"),
    ],
)
def test_token_command_refuses_what_it_cannot_do(
    args: list[str], env: dict[str, str], why: str
) -> None:
    result = run_service("token", *args, env=env)
    assert result.returncode == 2
    assert why in result.stderr
    assert not result.stdout


def test_server_flags_still_work_beside_the_token_command() -> None:
    result = run_service("--port", "not-a-port")
    assert result.returncode == 2 and "--port" in result.stderr
    assert "token" in run_service("token", "--help").stdout


# --- the page with auth on, in Chromium ------------------------------------------------------

# Records every Content-Security-Policy violation of a page: the page must run with none.
CSP_RECORDER = """
document.addEventListener("securitypolicyviolation", (event) => {
  (window.__csp ??= []).push(`${event.violatedDirective} ${event.blockedURI}`);
});
"""


@pytest.fixture(scope="module")
def secured_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    """The service as a process of its own with auth on (memory backend), short poll holds."""
    instance = Instance(
        tmp_path_factory.mktemp("auth-page"),
        "auth-page-1",
        extra_args=["--poll-timeout", "3", "--shutdown-timeout", "2"],
        env={"AUTH_SECRET": SECRET},
    )
    instance.start()
    yield instance
    instance.stop()


def _api(url: str, method: str, raw_token: str, body: dict[str, Any] | None = None) -> Any:
    request = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **bearer(raw_token)},
        method=method,
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


async def api_put(server: Instance, task_id: str, **update: Any) -> dict[str, Any]:
    """Write as a job runner with a write token would; in a thread, so the browser runs on."""
    url = f"{server.url}/api/tasks/{task_id}"
    state: dict[str, Any] = await asyncio.to_thread(_api, url, "PUT", token(WRITE), update)
    return state


async def api_get(server: Instance, task_id: str) -> dict[str, Any]:
    url = f"{server.url}/api/tasks/{task_id}"
    state: dict[str, Any] = await asyncio.to_thread(_api, url, "GET", token(READ))
    return state


async def tab(browser: Browser, url: str) -> Page:
    page = await new_tab(browser)
    await page.context.add_init_script(CSP_RECORDER)
    await page.goto(url)
    return page


async def csp_violations(page: Page) -> list[str]:
    found: list[str] = await page.evaluate("window.__csp ?? []")
    return found


async def stored_token(page: Page) -> str | None:
    value: str | None = await page.evaluate("sessionStorage.getItem('taskstatus.token')")
    return value


async def test_page_without_a_token_asks_for_one_and_goes_live_with_it(
    browser: Browser, secured_server: Instance
) -> None:
    await api_put(secured_server, "page-auth-1", status="in_progress", progress=10)
    page = await tab(browser, secured_server.url)
    panel = page.locator("#auth")
    await expect(page.locator("#connection")).to_have_attribute("data-state", "error")
    await expect(panel).to_be_visible()
    await expect(panel).to_have_attribute("data-status", "401")
    await expect(page.locator("#auth-message")).to_have_text("This service needs an access token.")
    await expect(page.locator("#token-state")).to_be_hidden()
    await screenshot(page, "auth_needs_token")

    await page.locator("#token-input").fill(token(READ, WRITE))
    await page.locator("#token-form button").click()

    await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    await expect(panel).to_be_hidden()
    await expect(page.locator("#token-state")).to_be_visible()
    await expect(task(page, "page-auth-1", "status")).to_have_value("in_progress")
    # A change made in the page goes out with the token.
    await task(page, "page-auth-1", "status").select_option("completed")
    await expect(task(page, "page-auth-1", "version")).to_have_text("2")
    assert (await api_get(secured_server, "page-auth-1"))["status"] == "completed"
    # ...and a change made elsewhere reaches the page over its long poll, also with the token.
    await api_put(secured_server, "page-auth-1", progress=90)
    await expect(task(page, "page-auth-1", "version")).to_have_text("3")
    # Kept in this tab's sessionStorage, never in a cookie.
    assert await stored_token(page)
    assert await page.context.cookies() == []
    assert await csp_violations(page) == []


async def test_token_in_the_address_is_kept_in_the_tab_and_removed_from_the_address(
    browser: Browser, secured_server: Instance
) -> None:
    raw = token(READ, WRITE)
    page = await new_tab(browser)
    await go_live(page, f"{secured_server.url}/#token={raw}")
    assert page.url == f"{secured_server.url}/"
    assert await stored_token(page) == raw
    await page.reload()
    await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    # Another tab (another browser context) has no token of its own.
    other = await tab(browser, secured_server.url)
    await expect(other.locator("#auth")).to_have_attribute("data-status", "401")
    # A link with a new token, followed in an open page, is taken at once.
    await other.goto(f"{secured_server.url}/#token={raw}")
    await expect(other.locator("#connection")).to_have_attribute("data-state", "live")
    await expect(other.locator("#auth")).to_be_hidden()
    assert other.url == f"{secured_server.url}/"


async def test_read_only_token_follows_the_board_and_a_change_says_it_is_not_allowed(
    browser: Browser, secured_server: Instance
) -> None:
    before = await api_put(secured_server, "page-auth-2", status="pending")
    page = await new_tab(browser)
    await go_live(page, f"{secured_server.url}/#token={token(READ)}")
    await task(page, "page-auth-2", "status").select_option("failed")
    error = task(page, "page-auth-2", "error")
    await expect(error).to_be_visible()
    await expect(error).to_contain_text("Not saved. Your access token does not allow this")
    await expect(error).to_contain_text("tasks:write")
    await expect(task(page, "page-auth-2", "status")).to_have_value("pending")  # reverted
    await expect(page.locator("#auth")).to_have_attribute("data-status", "403")
    await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    assert await api_get(secured_server, "page-auth-2") == before
    await screenshot(page, "auth_not_allowed")


async def test_token_limited_to_one_task_works_on_its_page_and_is_refused_the_board(
    browser: Browser, secured_server: Instance
) -> None:
    await api_put(secured_server, "page-auth-3", status="in_progress")
    limited = token(READ, WRITE, tasks=("page-auth-3",))
    page = await new_tab(browser)
    await go_live(page, f"{secured_server.url}/tasks/page-auth-3#token={limited}")
    await api_put(secured_server, "page-auth-3", progress=55)
    await expect(task(page, "page-auth-3", "progress")).to_have_attribute("data-value", "55")
    await page.goto(f"{secured_server.url}/")
    await expect(page.locator("#connection")).to_have_attribute("data-state", "error")
    await expect(page.locator("#auth")).to_have_attribute("data-status", "403")
    await expect(page.locator("#auth-message")).to_contain_text("covers only some tasks")


async def test_expired_token_says_so_and_forgetting_it_asks_for_a_new_one(
    browser: Browser, secured_server: Instance
) -> None:
    expired = hand_made(valid_claims(exp=int(time.time()) - 60))
    page = await tab(browser, f"{secured_server.url}/#token={expired}")
    await expect(page.locator("#auth-message")).to_have_text("Your access token has expired.")
    await expect(page.locator("#token-state")).to_be_visible()
    await page.locator("#token-forget").click()
    await expect(page.locator("#token-state")).to_be_hidden()
    await expect(page.locator("#auth-message")).to_have_text("This service needs an access token.")
    assert await stored_token(page) is None
    assert await csp_violations(page) == []
