"""Bearer tokens (RFC 6750), their roles and their sites: who may export what.

A token is ``secrets.token_urlsafe(32)``: 256 random bits that ``gateway token new`` makes and
prints once. The configuration holds only its SHA-256. Why a plain SHA-256 and not a password
KDF (bcrypt, scrypt, Argon2): a KDF exists to slow down guessing a low-entropy secret from its
stored hash, and 256 random bits cannot be guessed at any speed, so the slowness would buy
nothing; it would cost tens of milliseconds of CPU on every request instead. The comparison is
``hmac.compare_digest`` over the hashes, against every configured token (no early exit), so
the time taken says nothing about how close a guess was.

The token itself never reaches a log, an error body or ``repr``; the token's ``name`` is what
logs and audit rows show (``api:<name>``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.config import ALL_SITES, ApiToken, SiteConfig
from gateway.export.select import SiteScope, site_scope

GRANT = "gateway.grant"  # the scope key the routes read the caller's grant from


@dataclass(frozen=True)
class Grant:
    """An authenticated caller: ``sites`` None means every study (a ``["*"]`` token)."""

    name: str
    role: str
    sites: SiteScope | None

    @property
    def actor(self) -> str:
        return f"api:{self.name}"


class Tokens:
    def __init__(self, tokens: Sequence[ApiToken], sites: Sequence[SiteConfig]) -> None:
        defined = {s.name: s for s in sites}
        self._tokens = [
            (t.sha256, Grant(t.name, t.role, None if t.sites == (ALL_SITES,) else
                             site_scope(defined[name] for name in t.sites)))
            for t in tokens
        ]

    def grant(self, authorization: str | None) -> Grant | None:
        """The grant of an ``Authorization: Bearer <token>`` header; None when it is missing,
        not Bearer, or names no configured token."""
        token = bearer_token(authorization)
        if token is None:
            return None
        digest = token_sha256(token)
        found = None
        for expected, grant in self._tokens:
            if hmac.compare_digest(digest, expected):
                found = grant
        return found


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (RFC 6750 2.1), or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def _authorization(scope: Scope) -> str | None:
    headers = [v for k, v in scope["headers"] if k == b"authorization"]
    return headers[0].decode("latin-1") if len(headers) == 1 else None


async def _unauthorized(send: Send, given: bool, error: str, fix: str) -> None:
    """401 with ``WWW-Authenticate: Bearer`` (RFC 6750 3.1: ``invalid_token`` when one was
    given) and a JSON body saying what to do; never the token back."""
    challenge = 'Bearer realm="gateway"' + (', error="invalid_token"' if given else "")
    body = json.dumps({"error": error, "fix": fix}).encode()
    await send({"type": "http.response.start", "status": 401, "headers": [
        (b"content-type", b"application/json"),
        (b"www-authenticate", challenge.encode()),
        (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class SharedSecretAuth:
    """ASGI middleware for the nodes' internal endpoint (gateway.cluster.internal): the caller
    must send ``Authorization: Bearer <cluster secret>``, whose SHA-256 is compared with
    ``cluster.secret_sha256`` the way tokens are (``hmac.compare_digest`` over the hashes)."""

    def __init__(self, app: ASGIApp, sha256: str) -> None:
        self._app = app
        self._sha256 = sha256

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        given = _authorization(scope)
        token = bearer_token(given)
        if token is None or not hmac.compare_digest(token_sha256(token), self._sha256):
            await _unauthorized(
                send, bool(given),
                "the cluster secret is wrong" if given else "this endpoint needs the cluster secret",
                "every node sends 'Authorization: Bearer <secret>' with the secret whose sha256 "
                "is cluster.secret_sha256 (the same on every node)")
            return
        await self._app(scope, receive, send)


def new_token() -> str:
    return secrets.token_urlsafe(32)


def toml_entry(name: str, token: str, role: str, sites: Sequence[str]) -> str:
    """The ``[[api.tokens]]`` block for ``token`` (its hash only)."""
    listed = ", ".join(json.dumps(s) for s in sites)
    return (f'[[api.tokens]]\nname = {json.dumps(name)}\nsha256 = "{token_sha256(token)}"\n'
            f'role = "{role}"\nsites = [{listed}]\n')


class BearerAuth:
    """ASGI middleware: the one place a request is authenticated. Without a valid token: 401
    with ``WWW-Authenticate: Bearer`` (RFC 6750 3.1: ``invalid_token`` when one was given) and
    a JSON body saying what to do; never the token back. With one: its ``Grant`` in the scope
    for the routes (which check the role and the sites)."""

    def __init__(self, app: ASGIApp, tokens: Tokens) -> None:
        self._app = app
        self._tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        given = _authorization(scope)
        grant = self._tokens.grant(given)
        if grant is None:
            await _unauthorized(
                send, bool(given),
                ("the bearer token is not one this gateway knows" if given else
                 "this API needs a bearer token"),
                ("send the header 'Authorization: Bearer <token>' with a token made by "
                 "`gateway token new` and listed (as its sha256) under [[api.tokens]]"))
            return
        scope[GRANT] = grant
        await self._app(scope, receive, send)
