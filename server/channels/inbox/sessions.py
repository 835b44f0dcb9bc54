"""Web sign-in for reviewers: server-side sessions, CSRF tokens, the same-origin check and page headers.

A session id is 32 random bytes (`secrets.token_urlsafe(32)`) in an HttpOnly cookie; the database keeps only its
sha256, with the verified reviewer identity, a fingerprint of the token it was opened with (rotating or removing
that token ends the session), when it was made, last seen and expires, and when it was signed out. Every keyturn
process serving the database reads the same table, so a session works in all of them and sign-out ends it in
all of them. Nothing in a file makes a session: not the database (it holds hashes), not the config (it holds token
hashes). Earlier versions signed cookies with `<db>.web-secret`; that file is no longer read or made.

CSRF tokens are HMACs keyed with the session id itself, so only the holder of the cookie can compute them, in any
process; every state change also needs a same-origin Origin (or Referer) header. The sign-in form's pre-session
token is an HMAC keyed with a random nonce held in a short-lived cookie (the same construction), plus the same
origin check. A flash message is authenticated the same way, with the session id.
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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response

from server.canonical import sha256_hex

if TYPE_CHECKING:
    from server.ledger import Store

log = logging.getLogger(__name__)
R = TypeVar("R", bound=Response)

SESSION_COOKIE = "keyturn_session"
LOGIN_COOKIE = "keyturn_login"
FLASH_COOKIE = "keyturn_flash"
SESSION_TTL_S = 8 * 3600
LOGIN_TTL_S = 30 * 60
TOUCH_EVERY_S = 60.0
"""How stale `last_seen` may get before a request writes it again (not a write per page view)."""
MAX_COOKIE = 4096
SESSION_ID_CHARS = 43  # secrets.token_urlsafe(32)

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


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def keyed_mac(key: str, purpose: str, value: str = "") -> str:
    """HMAC-SHA256 keyed with a secret the browser holds (a session id, a login nonce), separated by purpose."""
    return _b64(hmac.new(key.encode(), f"keyturn/{purpose}\x00{value}".encode(), hashlib.sha256).digest())


def session_key(sid: str) -> str:
    """What the database keeps of a session id: its sha256 (a copy of the table opens no session)."""
    return sha256_hex(sid)


@dataclass(frozen=True)
class Session:
    sid: str = field(repr=False)  # the cookie's secret: in memory for this request only, never stored
    identity: str
    token_fp: str
    expires: float


def token_fingerprint(token_digest: str) -> str:
    """What a session remembers of its token: enough to notice rotation, nothing that helps guess it."""
    return sha256_hex("keyturn-web-session\x00" + token_digest)[:32]


class Sessions:
    """Opens, reads and revokes reviewer sessions (in the ledger's database); issues and checks CSRF tokens."""

    def __init__(
        self,
        ledger: Store,
        reviewer_digests: Callable[[], Iterable[tuple[str, str]]],
        *,
        trusted_origins: Iterable[str] = (),
        ttl_s: float = SESSION_TTL_S,
        touch_every_s: float = TOUCH_EVERY_S,
    ) -> None:
        self._ledger = ledger
        self._reviewer_digests = reviewer_digests  # (token digest, identity) pairs, read live from the credentials
        self._trusted_origins = {o.lower().rstrip("/") for o in trusted_origins}
        self._ttl_s = ttl_s
        self._touch_every_s = touch_every_s

    # -- sessions ------------------------------------------------------------------------------

    async def open(self, identity: str, token: str) -> tuple[Session, str]:
        """A new session (fresh id: no fixation) for a verified identity; returns it and the cookie value."""
        session = Session(sid=secrets.token_urlsafe(32), identity=identity,
                          token_fp=token_fingerprint(sha256_hex(token)), expires=time.time() + self._ttl_s)
        await self._ledger.add_web_session(session_key(session.sid), session.identity, session.token_fp,
                                           session.expires)
        return session, session.sid

    async def read(self, request: Request) -> Session | None:
        """The live session the request's cookie names, or None (unknown, signed out, expired, token rotated)."""
        sid = request.cookies.get(SESSION_COOKIE)
        if not sid or len(sid) != SESSION_ID_CHARS:
            return None
        key = session_key(sid)
        row = await self._ledger.web_session(key)
        now = time.time()
        if row is None or row["revoked"] is not None or row["expires"] <= now:
            return None
        session = Session(sid=sid, identity=row["identity"], token_fp=row["token_fp"], expires=row["expires"])
        still_valid = any(identity == session.identity and hmac.compare_digest(token_fingerprint(digest),
                                                                                session.token_fp)
                          for digest, identity in self._reviewer_digests())
        if not still_valid:
            return None
        if now - row["last_seen"] >= self._touch_every_s:
            await self._ledger.touch_web_session(key)
        return session

    async def revoke(self, session: Session) -> None:
        """Sign out: the session ends in every process serving this database."""
        await self._ledger.revoke_web_session(session_key(session.sid))

    # -- CSRF and flash messages ---------------------------------------------------------------

    def csrf_token(self, session: Session) -> str:
        return keyed_mac(session.sid, "csrf")

    def check_csrf(self, request: Request, session: Session, submitted: object) -> bool:
        return (isinstance(submitted, str) and hmac.compare_digest(self.csrf_token(session), submitted)
                and self.same_origin(request))

    def login_nonce(self) -> tuple[str, str]:
        """A pre-session CSRF pair for the sign-in form: (cookie value, form token)."""
        nonce = secrets.token_urlsafe(32)
        return nonce, keyed_mac(nonce, "login")

    def check_login(self, request: Request, submitted: object) -> bool:
        nonce = request.cookies.get(LOGIN_COOKIE)
        return (nonce is not None and len(nonce) == SESSION_ID_CHARS and isinstance(submitted, str)
                and hmac.compare_digest(keyed_mac(nonce, "login"), submitted) and self.same_origin(request))

    def flash(self, session: Session, text: str) -> str:
        """A one-time message for the next page, readable only with this session."""
        body = _b64(json.dumps({"text": text[:500]}).encode())
        return f"{body}.{keyed_mac(session.sid, 'flash', body)}"

    def read_flash(self, request: Request, session: Session) -> str | None:
        value = request.cookies.get(FLASH_COOKIE)
        if not value or len(value) > MAX_COOKIE or value.count(".") != 1:
            return None
        body, mac = value.split(".")
        if not hmac.compare_digest(keyed_mac(session.sid, "flash", body), mac):
            return None
        try:
            text = json.loads(_unb64(body)).get("text")
        except (ValueError, AttributeError):
            return None
        return text if isinstance(text, str) else None

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
