"""Web sign-in for reviewers: signed session cookies, CSRF tokens, the same-origin check and page headers.

A session is a cookie signed (HMAC-SHA256) with a per-database secret kept in a 0600 file beside the
ledger, so every keyturn process serving that database accepts it. It names the verified reviewer
identity, a fingerprint of the token it was opened with (rotating or removing that token ends the
session) and an expiry. Sign-out revokes the session in the process that served it and clears the
cookie. Every state change needs the session's synchronizer token and a same-origin Origin (or
Referer) header; the login form has its own pre-session token bound to a short-lived cookie.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response

from server.canonical import sha256_hex
from server.errors import ConfigError
from server.secret_files import beside, ensure_secret_file

log = logging.getLogger(__name__)
R = TypeVar("R", bound=Response)

SESSION_COOKIE = "keyturn_session"
LOGIN_COOKIE = "keyturn_login"
FLASH_COOKIE = "keyturn_flash"
SESSION_TTL_S = 8 * 3600
LOGIN_TTL_S = 30 * 60
MAX_COOKIE = 4096

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def secret_path(db: Path) -> Path:
    """Where the web session secret of the ledger `db` lives (mode 0600, beside the database)."""
    return beside(db, "web-secret")


def load_or_create_secret(db: Path) -> bytes:
    """The per-database signing secret; created atomically (first process wins) when missing."""
    path = secret_path(db)
    value = ensure_secret_file(path)
    if len(value) < 32:
        raise ConfigError(f"{path}: the web session secret is too short; delete the file to make a new one")
    return value.encode("utf-8")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    """HMAC-SHA256 signatures, separated by purpose so a value signed for one use is refused for another."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def mac(self, purpose: str, value: str) -> str:
        return _b64(hmac.new(self._key, f"{purpose}\x00{value}".encode(), hashlib.sha256).digest())

    def check(self, purpose: str, value: str, mac: str) -> bool:
        return hmac.compare_digest(self.mac(purpose, value), mac)

    def sign(self, purpose: str, payload: dict[str, Any]) -> str:
        body = _b64(json.dumps(payload, separators=(",", ":")).encode())
        return f"{body}.{self.mac(purpose, body)}"

    def unsign(self, purpose: str, token: str | None) -> dict[str, Any] | None:
        if not token or len(token) > MAX_COOKIE or token.count(".") != 1:
            return None
        body, mac = token.split(".")
        if not self.check(purpose, body, mac):
            return None
        try:
            payload = json.loads(_unb64(body))
        except ValueError:
            return None
        return payload if isinstance(payload, dict) else None


@dataclass(frozen=True)
class Session:
    sid: str
    identity: str
    token_fp: str
    expires: float


def token_fingerprint(token_digest: str) -> str:
    """What a session remembers of its token: enough to notice rotation, nothing that helps guess it."""
    return sha256_hex("keyturn-web-session\x00" + token_digest)[:32]


class Sessions:
    """Opens, reads and revokes reviewer sessions; issues and checks CSRF tokens."""

    def __init__(
        self,
        signer: Signer,
        reviewer_digests: Callable[[], Iterable[tuple[str, str]]],
        *,
        trusted_origins: Iterable[str] = (),
        ttl_s: float = SESSION_TTL_S,
    ) -> None:
        self.signer = signer
        self._reviewer_digests = reviewer_digests  # (token digest, identity) pairs, read live from the credentials
        self._trusted_origins = {o.lower().rstrip("/") for o in trusted_origins}
        self._ttl_s = ttl_s
        self._revoked: dict[str, float] = {}  # sid -> expiry, pruned as they lapse

    # -- sessions ------------------------------------------------------------------------------

    def open(self, identity: str, token: str) -> tuple[Session, str]:
        """A new session (fresh id: no fixation) for a verified identity; returns it and the cookie value."""
        session = Session(sid=secrets.token_urlsafe(18), identity=identity,
                          token_fp=token_fingerprint(sha256_hex(token)), expires=time.time() + self._ttl_s)
        cookie = self.signer.sign("session", {"sid": session.sid, "who": session.identity,
                                              "fp": session.token_fp, "exp": session.expires})
        return session, cookie

    def read(self, request: Request) -> Session | None:
        payload = self.signer.unsign("session", request.cookies.get(SESSION_COOKIE))
        if payload is None:
            return None
        try:
            session = Session(sid=str(payload["sid"]), identity=str(payload["who"]), token_fp=str(payload["fp"]),
                              expires=float(payload["exp"]))
        except (KeyError, TypeError, ValueError):
            return None
        if session.expires <= time.time() or session.sid in self._revoked:
            return None
        still_valid = any(identity == session.identity and hmac.compare_digest(token_fingerprint(digest),
                                                                                session.token_fp)
                          for digest, identity in self._reviewer_digests())
        return session if still_valid else None

    def revoke(self, session: Session) -> None:
        now = time.time()
        self._revoked = {sid: exp for sid, exp in self._revoked.items() if exp > now}
        self._revoked[session.sid] = session.expires

    # -- CSRF ----------------------------------------------------------------------------------

    def csrf_token(self, session: Session) -> str:
        return self.signer.mac("csrf", session.sid)

    def check_csrf(self, request: Request, session: Session, submitted: object) -> bool:
        return (isinstance(submitted, str) and self.signer.check("csrf", session.sid, submitted)
                and self.same_origin(request))

    def login_nonce(self) -> tuple[str, str]:
        """A pre-session CSRF pair for the sign-in form: (cookie value, form token)."""
        nonce = secrets.token_urlsafe(18)
        return nonce, self.signer.mac("login", nonce)

    def check_login(self, request: Request, submitted: object) -> bool:
        nonce = request.cookies.get(LOGIN_COOKIE)
        return (bool(nonce) and isinstance(submitted, str) and nonce is not None
                and self.signer.check("login", nonce, submitted) and self.same_origin(request))

    def same_origin(self, request: Request) -> bool:
        """The browser says the form came from this very origin (Origin, else Referer); absent is refused."""
        origin = request.headers.get("origin")
        if not origin:
            referer = request.headers.get("referer")
            if not referer:
                return False
            parts = urlsplit(referer)
            origin = f"{parts.scheme}://{parts.netloc}"
        own = f"{request.url.scheme}://{request.url.netloc}".lower()
        return origin.lower().rstrip("/") in {own, *self._trusted_origins}


def is_https(request: Request) -> bool:
    return request.url.scheme == "https"


def set_cookie(response: Response, request: Request, name: str, value: str, max_age: int, path: str = "/") -> None:
    response.set_cookie(name, value, max_age=max_age, path=path, secure=is_https(request), httponly=True,
                        samesite="strict")


def clear_cookie(response: Response, request: Request, name: str, path: str = "/") -> None:
    response.delete_cookie(name, path=path, secure=is_https(request), httponly=True, samesite="strict")


def harden(response: R, *, private: bool = True) -> R:
    """The headers every inbox/audit response carries; `private` pages are never cached."""
    for key, value in SECURITY_HEADERS.items():
        response.headers.setdefault(key, value)
    if private:
        response.headers["Cache-Control"] = "no-store"
    return response
