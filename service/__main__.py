"""``python -m service [flags]`` runs the server; ``python -m service token ...`` mints a token.

    python -m service token --scope tasks:write --ttl 1h [--task ID] [--subject NAME]

signs with ``AUTH_SECRET`` (HS256), or with ``--private-key FILE`` (or ``AUTH_PRIVATE_KEY_FILE``:
RS256 for an RSA key, ES256 for an EC P-256 key), for ``AUTH_AUDIENCE`` and ``AUTH_ISSUER`` as the
server reads them, and prints the token.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping, Sequence

from .app import main
from .auth import SCOPES, load_private_key, mint_token
from .config import MIN_SECRET_BYTES, Config

_TTL_RE = re.compile(r"([0-9]+)([smhd]?)")
_TTL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(raw: str) -> int:
    """Seconds in ``30s``, ``15m``, ``1h``, ``7d`` (or plain seconds)."""
    match = _TTL_RE.fullmatch(raw.strip())
    if match is None or int(match[1]) == 0:
        raise argparse.ArgumentTypeError(
            f"expected a duration like 30s, 15m, 1h or 7d, not {raw!r}"
        )
    return int(match[1]) * _TTL_UNITS[match[2]]


def _scopes(raw: str) -> list[str]:
    scopes = raw.replace(",", " ").split()
    for scope in scopes:
        if scope not in SCOPES:
            raise argparse.ArgumentTypeError(f"{scope!r} is not one of {', '.join(SCOPES)}")
    return scopes


def token_command(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """The token that ``python -m service token <argv>`` prints."""
    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(
        prog="python -m service token",
        description="Mint an access token. Signs with AUTH_SECRET (HS256), or with a private key.",
    )
    parser.add_argument(
        "--scope",
        type=_scopes,
        action="extend",
        required=True,
        help=f"{' or '.join(SCOPES)}; repeat the flag, or separate with spaces, for both",
    )
    parser.add_argument("--ttl", type=parse_ttl, required=True, help="lifetime: 30s, 15m, 1h, 7d")
    parser.add_argument(
        "--task",
        action="append",
        default=[],
        help="limit the token to this task id (or id prefix ending in *); repeat for more",
    )
    parser.add_argument("--subject", default="operator", help="the sub claim: who holds it")
    parser.add_argument(
        "--private-key",
        default=env.get("AUTH_PRIVATE_KEY_FILE", ""),
        help="PEM private key for RS256/ES256 (default: AUTH_PRIVATE_KEY_FILE); else AUTH_SECRET",
    )
    parser.add_argument("--audience", default=env.get("AUTH_AUDIENCE", Config.auth_audience))
    parser.add_argument("--issuer", default=env.get("AUTH_ISSUER", ""))
    args = parser.parse_args(argv)

    secret = env.get("AUTH_SECRET", "")
    try:
        if args.private_key:
            key, algorithm = load_private_key(args.private_key)
        elif len(secret.encode()) >= MIN_SECRET_BYTES:
            key, algorithm = secret, "HS256"
        else:
            parser.error(
                f"set AUTH_SECRET (at least {MIN_SECRET_BYTES} bytes, as the server has it), "
                "or pass --private-key"
            )
        return mint_token(
            key,
            algorithm,
            scopes=args.scope,
            ttl=args.ttl,
            audience=args.audience,
            subject=args.subject,
            tasks=args.task,
            issuer=args.issuer,
        )
    except ValueError as exc:
        parser.error(str(exc))


def run(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["token"]:
        print(token_command(args[1:]))
    else:
        main(args)


if __name__ == "__main__":
    run()
