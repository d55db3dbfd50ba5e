"""Who is asking, and may they: bearer tokens (JWTs), what they grant, and the one middleware.

A token is a JWT signed with HS256 (``AUTH_SECRET``) or with RS256/ES256 (the private key of
``AUTH_PUBLIC_KEY_FILE``; the key's type names the one algorithm accepted). Its claims:

- ``aud`` (required): ``AUTH_AUDIENCE``; ``exp`` (required); ``iss`` when ``AUTH_ISSUER`` is set.
- ``scope``: space-separated; ``tasks:read`` (get, poll, watch), ``tasks:write`` (update, create).
- ``tasks`` (optional): the only tasks the token may touch, each an id or a prefix ending in ``*``.
- ``sub`` (optional): who it is; the write rate limit counts per subject.

Which scope a request needs follows from its route: every ``/api/`` route is a read for GET and a
write otherwise; pages, static files and probes are public (the page holds no task data until its
script asks the API with a token). A refusal is an ``ApiError``: 401 with ``WWW-Authenticate`` when
the token is missing or not valid, 403 when it is valid but does not grant the request.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import jwt
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .config import Config
from .errors import ApiError
from .model import DEFAULT_TASK, TASK_ID_PATTERN

log = logging.getLogger(__name__)

READ_SCOPE = "tasks:read"
WRITE_SCOPE = "tasks:write"
SCOPES = (READ_SCOPE, WRITE_SCOPE)
REALM = "taskstatus"
LEEWAY_SECONDS = 10  # clock skew tolerated between the issuer and this service
SUBPROTOCOL_TOKEN_PREFIX = "bearer."  # a WebSocket's token, where no header can carry it
MIN_RSA_BITS = 2048

# The seed's endpoints, which act on the task "default".
_DEFAULT_TASK_ROUTES = frozenset({"/api/status", "/api/poll-status", "/api/update-status"})
# API documents that describe the service, and the cluster's figures: no task data.
_PUBLIC_API_ROUTES = frozenset({"/api/openapi.json", "/api/cluster/watch"})
# Routes that follow the tasks named in `tasks=` (all of them without it): a watch, a board stream.
_WATCH_ROUTES = frozenset({"/api/watch", "/api/events"})
# The WebSocket: its subscriptions name their tasks, and ws.py checks each one with check_grant.
_SUBSCRIPTION_ROUTES = frozenset({"/api/ws"})
# A task restriction entry: a task id, or the start of one followed by "*".
_TASK_PATTERN_RE = re.compile(rf"{TASK_ID_PATTERN}|([A-Za-z0-9][A-Za-z0-9_.-]{{0,63}})?\*")


@dataclass(frozen=True, slots=True)
class TaskScope:
    """The tasks a restricted token may touch: exact ids and id prefixes."""

    ids: frozenset[str]
    prefixes: tuple[str, ...]

    @classmethod
    def parse(cls, patterns: Sequence[str]) -> TaskScope:
        ids = frozenset(p for p in patterns if not p.endswith("*"))
        prefixes = tuple(p[:-1] for p in patterns if p.endswith("*"))
        return cls(ids, prefixes)

    def allows(self, task_id: str) -> bool:
        return task_id in self.ids or task_id.startswith(self.prefixes)


@dataclass(frozen=True, slots=True)
class Grant:
    """What a valid token grants: its scopes, and its tasks (``None``: every task)."""

    subject: str | None
    scopes: frozenset[str]
    tasks: TaskScope | None = None
    # When the token stops being valid (its exp, plus the leeway), in seconds since the epoch: a
    # stream (SSE, WebSocket) opened with it ends then.
    valid_until: float | None = None


@dataclass(frozen=True, slots=True)
class Access:
    """What a request needs: a scope, on some tasks (``None``: every task, e.g. a listing)."""

    scope: str
    tasks: frozenset[str] | None


GRANT = web.RequestKey("grant", Grant)


# --- keys -------------------------------------------------------------------------------------


def _algorithm_for(key: Any, path: str) -> str:
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"{path}: an RSA key must have at least {MIN_RSA_BITS} bits")
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError(f"{path}: an EC key must be on P-256 (ES256)")
        return "ES256"
    raise ValueError(f"{path}: expected an RSA or EC P-256 key")


def load_public_key(path: str) -> tuple[Any, str]:
    """The PEM public key at ``path`` and the one algorithm it verifies."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"AUTH_PUBLIC_KEY_FILE {path}: not a readable PEM public key ({exc})"
        ) from None
    return key, _algorithm_for(key, path)


def load_private_key(path: str) -> tuple[Any, str]:
    """The PEM private key at ``path`` (unencrypted) and the one algorithm it signs with."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a readable, unencrypted PEM private key ({exc})") from None
    return key, _algorithm_for(key, path)


# --- tokens -----------------------------------------------------------------------------------


def mint_token(
    key: Any,
    algorithm: str,
    *,
    scopes: Collection[str],
    ttl: float,
    audience: str,
    subject: str | None = None,
    tasks: Sequence[str] = (),
    issuer: str = "",
    now: float | None = None,
) -> str:
    """A signed token granting ``scopes`` (on ``tasks`` only, if any) for ``ttl`` seconds."""
    unknown = set(scopes) - set(SCOPES)
    if not scopes or unknown:
        raise ValueError(f"scopes must be among {', '.join(SCOPES)}")
    for pattern in tasks:
        if not _valid_task_pattern(pattern):
            raise ValueError(f"task {pattern!r} must be a task id, or a prefix ending in *")
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "aud": audience,
        "iat": issued,
        "exp": issued + int(ttl),
        "jti": secrets.token_urlsafe(12),
        "scope": " ".join(sorted(set(scopes))),
    }
    if subject:
        claims["sub"] = subject
    if tasks:
        claims["tasks"] = list(tasks)
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, key, algorithm=algorithm)


def _valid_task_pattern(pattern: object) -> bool:
    return isinstance(pattern, str) and _TASK_PATTERN_RE.fullmatch(pattern) is not None


class TokenVerifier:
    """Checks tokens against one key and one algorithm; a token is valid or it is a 401."""

    def __init__(self, key: Any, algorithm: str, *, audience: str, issuer: str = "") -> None:
        self._key = key
        self.algorithm = algorithm
        self._audience = audience
        self._issuer = issuer

    @classmethod
    def from_config(cls, config: Config) -> TokenVerifier:
        if config.auth_secret:
            key, algorithm = config.auth_secret, "HS256"
        else:
            key, algorithm = load_public_key(config.auth_public_key_file)
        return cls(key, algorithm, audience=config.auth_audience, issuer=config.auth_issuer)

    def verify(self, token: str) -> Grant:
        required = ["exp", "aud", *(["iss"] if self._issuer else [])]
        try:
            # One algorithm, named by the key: "none" and algorithm confusion are refused here.
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[self.algorithm],
                audience=self._audience,
                issuer=self._issuer or None,
                leeway=LEEWAY_SECONDS,
                options={"require": required, "enforce_minimum_key_length": True},
            )
        except jwt.ExpiredSignatureError:
            raise unauthorized("token_expired", "the token has expired") from None
        except jwt.InvalidTokenError as exc:
            raise unauthorized("invalid_token", _why_invalid(exc)) from None
        return _grant(claims)


VERIFIED_KEPT = 10_000  # tokens whose grant is kept (each ~1 KiB); the oldest goes first


class VerifiedTokens:
    """The grants of tokens already verified, until they expire: a client re-polls with the same
    token every few seconds, and a signature check (~30 µs for HS256, more for RS256) on each of
    10,000 re-polls would cost more than the rest of the request. A token is a fixed string
    signed by the issuer: its grant cannot change while it is valid, and one that does not verify
    is never kept."""

    def __init__(self, verifier: TokenVerifier) -> None:
        self._verifier = verifier
        self._grants: dict[str, Grant] = {}

    def verify(self, token: str) -> Grant:
        grant = self._grants.get(token)
        if grant is not None and grant.valid_until is not None and time.time() < grant.valid_until:
            return grant
        grant = self._verifier.verify(token)  # raises for a token that is not valid
        grants = self._grants
        grants.pop(token, None)
        if len(grants) >= VERIFIED_KEPT:
            del grants[next(iter(grants))]
        grants[token] = grant
        return grant


def _why_invalid(exc: jwt.InvalidTokenError) -> str:
    """What is wrong with a token, in words that give an attacker nothing new."""
    if isinstance(exc, jwt.InvalidAudienceError):
        return "the token is not meant for this service (aud)"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "the token was not issued by the expected issuer (iss)"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"the token has no {exc.claim} claim"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "the token's signature does not verify"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "the token's signing algorithm is not accepted"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "the token is not valid yet"
    return "the token is malformed"


def _grant(claims: dict[str, Any]) -> Grant:
    scope = claims.get("scope", "")
    subject = claims.get("sub")
    tasks = claims.get("tasks")
    if not isinstance(scope, str) or (subject is not None and not isinstance(subject, str)):
        raise unauthorized("invalid_token", "the token's scope or sub claim is not a string")
    if tasks is not None and (
        not isinstance(tasks, list) or not all(_valid_task_pattern(t) for t in tasks)
    ):
        raise unauthorized("invalid_token", "the token's tasks claim is not a list of task ids")
    return Grant(
        subject=subject or None,
        scopes=frozenset(scope.split()),
        tasks=None if tasks is None else TaskScope.parse(tasks),
        valid_until=float(claims["exp"]) + LEEWAY_SECONDS,
    )


# --- errors -----------------------------------------------------------------------------------


def unauthorized(code: str, message: str) -> ApiError:
    """401: no token, or one that is not valid. RFC 6750: a missing token gets no error code."""
    challenge = f'Bearer realm="{REALM}"'
    if code != "missing_token":
        challenge += f', error="invalid_token", error_description="{message}"'
    return ApiError(401, code, message, headers={"WWW-Authenticate": challenge})


def forbidden(code: str, message: str, scope: str) -> ApiError:
    """403: a valid token that does not grant this request."""
    challenge = f'Bearer realm="{REALM}", error="insufficient_scope", scope="{scope}"'
    return ApiError(403, code, message, headers={"WWW-Authenticate": challenge})


# --- which request needs what ----------------------------------------------------------------


def required_access(request: web.Request) -> Access | None:
    """The scope and tasks ``request`` needs; ``None`` when it needs no token."""
    match_info = request.match_info
    if match_info.http_exception is not None or match_info.route.resource is None:
        return None  # no such route (404) or method (405): answered as such
    path = match_info.route.resource.canonical
    if not path.startswith("/api/") or path in _PUBLIC_API_ROUTES or request.method == "OPTIONS":
        return None  # pages, static files, probes, API documents, CORS preflights
    scope = READ_SCOPE if request.method in ("GET", "HEAD") else WRITE_SCOPE
    if "task_id" in match_info:
        return Access(scope, frozenset({match_info["task_id"]}))
    if path in _DEFAULT_TASK_ROUTES:
        return Access(scope, frozenset({DEFAULT_TASK}))
    watched = request.query.getall("tasks", [])
    if path in _WATCH_ROUTES and watched:
        return Access(scope, frozenset(t for value in watched for t in value.split(",")))
    if path in _SUBSCRIPTION_ROUTES:
        return Access(scope, frozenset())  # no task yet: each subscription is checked
    return Access(scope, None)  # a listing, or a watch of every task


def bearer_token(request: web.Request) -> str | None:
    """The token of ``Authorization: Bearer <token>``; never from the URL, where it would leak."""
    header = request.headers.get("Authorization")
    if header is None:
        return _subprotocol_token(request)
    token = token_of(header)
    if token is None:
        raise unauthorized("invalid_token", "send the token as Authorization: Bearer <token>")
    return token


def token_of(authorization: str) -> str | None:
    """The token of an ``Authorization`` header's value; None unless it says ``Bearer <token>``."""
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _subprotocol_token(request: web.Request) -> str | None:
    """A WebSocket handshake's token, offered as the subprotocol ``bearer.<token>``: a browser
    cannot set headers on a WebSocket (ws.py answers with the subprotocol ``taskstatus``)."""
    resource = request.match_info.route.resource
    if resource is None or resource.canonical not in _SUBSCRIPTION_ROUTES:
        return None
    for value in request.headers.getall("Sec-WebSocket-Protocol", []):
        for offered in value.split(","):
            name = offered.strip()
            if name.startswith(SUBPROTOCOL_TOKEN_PREFIX):
                return name.removeprefix(SUBPROTOCOL_TOKEN_PREFIX) or None
    return None


def check_grant(grant: Grant, access: Access) -> None:
    if access.scope not in grant.scopes:
        raise forbidden(
            "insufficient_scope", f"the token does not grant {access.scope}", access.scope
        )
    if grant.tasks is None:
        return
    if access.tasks is None:
        raise forbidden(
            "task_not_allowed",
            "the token covers only some tasks: read them by id, or watch them with tasks=",
            access.scope,
        )
    refused = sorted(task for task in access.tasks if not grant.tasks.allows(task))
    if refused:
        raise forbidden(
            "task_not_allowed",
            f"the token does not cover task {refused[0]}",
            access.scope,
        )


def enforced_grant(request: web.Request, config: Config) -> Grant | None:
    """The grant a read is held to: its token's, when reads need one (else None: anyone may)."""
    if not config.auth_enabled or config.auth_public_reads:
        return None
    return request.get(GRANT)


def may_read(
    tokens: VerifiedTokens | None, public_reads: bool, authorization: str | None, task: str
) -> bool:
    """Whether a read of ``task`` with this ``Authorization`` header value passes the middleware
    (``tokens`` None: auth is off); False for anything it would refuse or question (the fast
    path then leaves the request to it, which answers the refusal)."""
    if tokens is None:
        return True
    if authorization is None:
        return public_reads
    token = token_of(authorization)
    if token is None:
        return False
    try:
        grant = tokens.verify(token)
        if not public_reads:
            check_grant(grant, Access(READ_SCOPE, frozenset({task})))
    except ApiError:
        return False
    return True


TOKENS: Final = web.AppKey("tokens", VerifiedTokens)


def auth_middleware(tokens: VerifiedTokens, *, public_reads: bool) -> Middleware:
    @web.middleware
    async def authorize(request: web.Request, handler: Handler) -> web.StreamResponse:
        access = required_access(request)
        if access is not None:
            public = public_reads and access.scope == READ_SCOPE
            token = bearer_token(request)
            if token is None:
                if not public:
                    raise unauthorized("missing_token", "this request needs a bearer token")
            else:
                # A token sent is checked even where none is needed: a client learns at once
                # that it is expired or wrong, not at its first write.
                grant = tokens.verify(token)
                if not public:
                    check_grant(grant, access)
                request[GRANT] = grant
        return await handler(request)

    return authorize


def setup_auth(app: web.Application, config: Config) -> None:
    """Install the auth middleware, or, with no key configured, say loudly that anyone may write."""
    if config.auth_enabled:
        tokens = app[TOKENS] = VerifiedTokens(TokenVerifier.from_config(config))
        app.middlewares.append(auth_middleware(tokens, public_reads=config.auth_public_reads))
        return

    async def warn_open(app: web.Application) -> None:
        log.warning(OPEN_WARNING)

    app.on_startup.append(warn_open)


OPEN_WARNING = (
    "AUTHENTICATION IS OFF: anyone who can reach this service can read and rewrite every task. "
    "Set AUTH_SECRET or AUTH_PUBLIC_KEY_FILE to require tokens."
)
