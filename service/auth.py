"""API keys: minting, the key ring (hashes only), the ASGI middleware and the admin check.

Light on imports (no torch): ``python -m service keys`` and the start-up checks use it.

Everything about authentication lives here; routes only ask :func:`owner_of` (whose job is
this) and depend on :func:`require_admin`.

**Keys at rest.** A key is ``ssk_`` + 32 random bytes (``secrets.token_urlsafe``): 256 bits
of entropy. The service stores and compares only its SHA-256. A fast unsalted hash is the
right tool for such keys, unlike passwords: nobody can enumerate a 2^256 space, so a slow
KDF (bcrypt, argon2) would add nothing but CPU on every request. Leaking the hashes (a
config file, the environment of a container) does not leak a usable key.

**Where the hashes come from.** Entries ``name:sha256hex`` or ``name:sha256hex:admin``:

- ``API_KEYS``: entries separated by commas or whitespace (one environment variable, as
  docker-compose passes it);
- ``API_KEYS_FILE``: one entry per line; blank lines and lines starting with ``#`` are skipped.

Both may be set; their entries are merged, and a name or a hash given twice is an error.
``python -m service keys new NAME [--admin]`` prints a fresh key (once) and its entry.

**Requests.** ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. When at least one
key is configured every route except :data:`PUBLIC_PATHS` needs one: 401 (with
``WWW-Authenticate: Bearer``) without a key, 403 with an unknown one. The lookup hashes the
presented key once and compares it with *every* entry through ``hmac.compare_digest``,
without stopping at a match, so the answer's timing says nothing about which entry (if any)
came close. Keys are never logged: log lines and metrics name the key's ``name`` at most.

**Public routes.** /healthz, /readyz and /metrics (probes and Prometheus carry no key), and
/docs + /openapi.json: the API's description holds no data and clients need it to find out
how to authenticate. The page at / and its /static/ files, which hold no data either: it
asks for a key and sends it with every call it makes.

With no keys configured the API is open (the local ``make run``): start-up logs a loud
WARNING, and ``REQUIRE_API_KEYS=true`` turns that into a refusal to start.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import Request

from service import metrics

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

    from service.settings import Settings

log = logging.getLogger("service.auth")

KEY_PREFIX = "ssk_"
ADMIN_SCOPE = "admin"
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/"})
#: The page's script and style (``service/routers/web.py``), public as the page is.
PUBLIC_PREFIXES = ("/static/",)
#: What ``request.scope["state"]`` holds for an authenticated request.
STATE_KEY = "api_key"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


class KeyConfigError(ValueError):
    """The configured keys cannot be used (the service refuses to start)."""


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes  # sha256 of the key, 32 bytes
    admin: bool = False

    def entry(self) -> str:
        """The line that configures this key (``name:sha256hex[:admin]``)."""
        return f"{self.name}:{self.digest.hex()}" + (f":{ADMIN_SCOPE}" if self.admin else "")


def hash_key(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


def mint(name: str, admin: bool = False) -> tuple[str, ApiKey]:
    """A new random key for ``name``: (the secret, to hand out once; its entry, to store)."""
    if not _NAME.match(name):
        raise KeyConfigError(f"invalid key name {name!r}: 1-64 characters from A-Z a-z 0-9 _ . @ -")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    return secret, ApiKey(name=name, digest=hash_key(secret), admin=admin)


def parse_entry(text: str, where: str) -> ApiKey:
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise KeyConfigError(f"{where}: expected name:sha256hex[:admin], got {len(parts)} field(s)")
    name, digest = parts[0].strip(), parts[1].strip()
    if not _NAME.match(name):
        raise KeyConfigError(f"{where}: invalid key name {name!r} (1-64 characters from A-Z a-z 0-9 _ . @ -)")
    if not _HEX64.match(digest):
        # Never echo the value: it may be a raw key pasted by mistake.
        raise KeyConfigError(
            f"{where}: the hash of key {name!r} is not 64 hex digits (store the sha256 printed by "
            "`python -m service keys new`, never the key itself)"
        )
    scope = parts[2].strip() if len(parts) == 3 else ""
    if scope not in ("", ADMIN_SCOPE):
        raise KeyConfigError(f"{where}: unknown scope {scope!r} for key {name!r} (only {ADMIN_SCOPE!r})")
    return ApiKey(name=name, digest=bytes.fromhex(digest), admin=scope == ADMIN_SCOPE)


def parse_env(value: str) -> list[ApiKey]:
    return [parse_entry(e, f"API_KEYS entry {i + 1}") for i, e in enumerate(re.split(r"[,\s]+", value.strip())) if e]


def parse_file(path: Path) -> list[ApiKey]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise KeyConfigError(f"API_KEYS_FILE {path}: cannot read it ({exc.strerror or exc})") from None
    out = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(parse_entry(line, f"{path}:{number}"))
    return out


class KeyRing:
    """The configured keys (hashes only). Empty: authentication is off."""

    def __init__(self, keys: list[ApiKey]) -> None:
        names: set[str] = set()
        digests: set[bytes] = set()
        for key in keys:
            if key.name in names:
                raise KeyConfigError(f"key name {key.name!r} is configured twice")
            if key.digest in digests:
                raise KeyConfigError(f"key {key.name!r} has the same hash as another key")
            names.add(key.name)
            digests.add(key.digest)
        self.keys: tuple[ApiKey, ...] = tuple(keys)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def lookup(self, secret: str) -> ApiKey | None:
        """The entry whose hash matches ``secret``; every entry is compared (no early exit)."""
        digest = hash_key(secret)
        found: ApiKey | None = None
        for key in self.keys:
            if hmac.compare_digest(key.digest, digest):
                found = key
        return found

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        """Parse API_KEYS and API_KEYS_FILE; :class:`KeyConfigError` when unusable, or when
        REQUIRE_API_KEYS is set and no key is configured."""
        keys = parse_env(settings.api_keys or "")
        if settings.api_keys_file is not None:
            keys += parse_file(settings.api_keys_file)
        ring = cls(keys)
        if settings.require_api_keys and not ring.enabled:
            raise KeyConfigError(
                "REQUIRE_API_KEYS is true but no API key is configured: set API_KEYS or API_KEYS_FILE "
                "(`python -m service keys new NAME` mints one)"
            )
        return ring

    def announce(self) -> None:
        """The start-up log line: which keys (names, never hashes), or a loud warning."""
        if self.enabled:
            admins = sum(k.admin for k in self.keys)
            log.info("API keys: %d configured (%d admin): %s", len(self.keys), admins,
                     ", ".join(k.name for k in self.keys))  # fmt: skip
        else:
            log.warning(
                "!!! API keys are OFF: every route is open to anyone who can reach this port. Set API_KEYS or "
                "API_KEYS_FILE (and REQUIRE_API_KEYS=true to refuse to start without them) !!!"
            )


# -- requests -----------------------------------------------------------------------------------


def current_key(scope: Scope) -> ApiKey | None:
    state = scope.get("state")
    return state.get(STATE_KEY) if isinstance(state, dict) else None


def owner_of(request: Request) -> str | None:
    """The key name that owns what this request creates (None when authentication is off)."""
    key = current_key(request.scope)
    return key.name if key is not None else None


def principal(scope: Scope) -> str:
    """Whom limits count against: the key's name, else (authentication off) the client address."""
    key = current_key(scope)
    if key is not None:
        return f"key:{key.name}"
    client = scope.get("client")
    return f"ip:{client[0] if client else '-'}"


def presented_key(headers: list[tuple[bytes, bytes]]) -> tuple[str | None, str]:
    """(the key in the request, or None; why not). Both header forms may be given if equal."""
    bearer = api_key = None
    other_scheme = False
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                bearer = token.strip()
            else:
                other_scheme = True
        elif name == b"x-api-key" and value.strip():
            api_key = value.decode("latin-1").strip()
    if bearer is not None and api_key is not None and not hmac.compare_digest(bearer.encode(), api_key.encode()):
        return None, "conflicting"
    if bearer or api_key:
        return bearer or api_key, ""
    return None, "other_scheme" if other_scheme else "missing"


_401_MESSAGES = {
    "missing": "this route needs an API key: send `Authorization: Bearer <key>` or `X-API-Key: <key>`",
    "other_scheme": "the Authorization header must use the Bearer scheme (`Authorization: Bearer <key>`), "
    "or send `X-API-Key: <key>`",
    "conflicting": "Authorization and X-API-Key carry different keys: send one",
}


class AuthMiddleware:
    """Pure ASGI: checks the key before the route (and before any upload is read)."""

    def __init__(self, app: ASGIApp, keyring: KeyRing) -> None:
        self.app = app
        self.keyring = keyring

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keyring.enabled or (
            scope["path"] in PUBLIC_PATHS or scope["path"].startswith(PUBLIC_PREFIXES)
        ):
            await self.app(scope, receive, send)
            return
        from service.errors import error_response

        secret, why = presented_key(scope["headers"])
        if secret is None:
            metrics.AUTH_FAILURES.labels("missing_key").inc()
            response = error_response(
                401, "unauthorized", _401_MESSAGES[why], headers={"WWW-Authenticate": 'Bearer realm="shapserve"'}
            )
            await response(scope, receive, send)
            return
        key = self.keyring.lookup(secret)
        if key is None:
            metrics.AUTH_FAILURES.labels("invalid_key").inc()
            client = scope.get("client")
            log.warning("refused %s %s from %s: unknown API key", scope["method"], scope["path"],
                        client[0] if client else "-")  # fmt: skip
            await error_response(403, "forbidden", "the API key is not valid")(scope, receive, send)
            return
        scope.setdefault("state", {})[STATE_KEY] = key
        await self.app(scope, receive, send)


def require_admin(request: Request) -> None:
    """Route dependency: an admin key when authentication is on (anything goes when it is off)."""
    from shapcore.errors import ShapserveError

    keyring: KeyRing | None = getattr(request.app.state, "keyring", None)
    if keyring is None or not keyring.enabled:
        return
    key = current_key(request.scope)
    if key is None or not key.admin:
        metrics.AUTH_FAILURES.labels("not_admin").inc()
        who = f"key {key.name!r}" if key is not None else "this request"
        raise ShapserveError(
            403, "admin_required", f"{request.method} {request.url.path} needs an admin key; {who} has no admin scope"
        )


def keys_cli(argv: list[str]) -> int:
    """``python -m service keys new NAME [--admin]``."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m service keys", description="Mint API keys.")
    sub = parser.add_subparsers(dest="action", required=True)
    new = sub.add_parser("new", help="print a new key (once) and the entry that configures it")
    new.add_argument("name", help="who holds the key (shown in logs and metrics; 1-64 of A-Z a-z 0-9 _ . @ -)")
    new.add_argument("--admin", action="store_true", help="may call POST /model/reload")
    args = parser.parse_args(argv)
    try:
        secret, key = mint(args.name, admin=args.admin)
    except KeyConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"key:   {secret}")
    print(f"entry: {key.entry()}")
    print(
        "Give the key to its holder now: it is not stored anywhere and cannot be shown again. Store the entry\n"
        "as a line of API_KEYS_FILE, or in API_KEYS (entries separated by commas).",
        file=sys.stderr,
    )
    return 0
