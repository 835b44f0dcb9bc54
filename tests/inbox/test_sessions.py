"""Sessions and CSRF in isolation: signatures, expiry, token rotation, revocation, same-origin, the secret file."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
from starlette.requests import Request

from server.canonical import sha256_hex
from server.channels.inbox.sessions import (
    SESSION_COOKIE,
    Sessions,
    Signer,
    load_or_create_secret,
    secret_path,
)
from server.channels.inbox.site import safe_next
from server.errors import ConfigError


def request(cookie: str | None = None, *, origin: str | None = None, referer: str | None = None,
            host: str = "127.0.0.1:8765", scheme: str = "http") -> Request:
    headers = [(b"host", host.encode())]
    if cookie is not None:
        headers.append((b"cookie", f"{SESSION_COOKIE}={cookie}".encode()))
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    if referer is not None:
        headers.append((b"referer", referer.encode()))
    return Request({"type": "http", "method": "POST", "path": "/inbox", "headers": headers, "scheme": scheme,
                    "query_string": b"", "server": ("127.0.0.1", 8765)})


def make(reviewers: dict[str, str] | None = None, **kwargs: object) -> tuple[Sessions, dict[str, str]]:
    table = reviewers if reviewers is not None else {sha256_hex("tok-alice"): "api:alice"}
    return Sessions(Signer(b"k" * 48), lambda: table.items(), **kwargs), table  # type: ignore[arg-type]


def test_a_session_reads_back_and_a_tampered_or_foreign_cookie_does_not() -> None:
    sessions, _ = make()
    session, cookie = sessions.open("api:alice", "tok-alice")
    assert sessions.read(request(cookie)) == session
    body, mac = cookie.split(".")
    assert sessions.read(request(body + "." + mac[:-2] + "AA")) is None
    assert sessions.read(request(body[:-2] + "xx." + mac)) is None
    other, _ = make()
    other.signer = Signer(b"z" * 48)
    assert other.read(request(cookie)) is None  # another database's secret
    # a value signed for another purpose is no session
    assert sessions.read(request(sessions.signer.sign("flash", {"sid": "s", "who": "api:alice"}))) is None


def test_expiry_rotation_removal_and_revocation_end_a_session() -> None:
    sessions, table = make(ttl_s=-1)
    _, cookie = sessions.open("api:alice", "tok-alice")
    assert sessions.read(request(cookie)) is None  # expired

    sessions, table = make()
    session, cookie = sessions.open("api:alice", "tok-alice")
    table[sha256_hex("tok-alice-2")] = table.pop(sha256_hex("tok-alice"))  # the token was rotated
    assert sessions.read(request(cookie)) is None
    table[sha256_hex("tok-alice")] = "api:alice"
    assert sessions.read(request(cookie)) == session
    sessions.revoke(session)
    assert sessions.read(request(cookie)) is None


def test_csrf_needs_the_sessions_token_and_the_same_origin() -> None:
    sessions, _ = make(trusted_origins=["https://keyturn.example.com"])
    session, cookie = sessions.open("api:alice", "tok-alice")
    other, _ = sessions.open("api:alice", "tok-alice")
    token = sessions.csrf_token(session)
    own = "http://127.0.0.1:8765"
    assert sessions.check_csrf(request(cookie, origin=own), session, token)
    assert sessions.check_csrf(request(cookie, referer=own + "/inbox"), session, token)
    assert sessions.check_csrf(request(cookie, origin="https://keyturn.example.com"), session, token)
    assert not sessions.check_csrf(request(cookie, origin=own), other, token)  # another session's token
    assert not sessions.check_csrf(request(cookie, origin=own), session, None)
    assert not sessions.check_csrf(request(cookie, origin=own), session, "")
    assert not sessions.check_csrf(request(cookie), session, token)  # no Origin, no Referer
    assert not sessions.check_csrf(request(cookie, origin="http://127.0.0.1:9999"), session, token)
    assert not sessions.check_csrf(request(cookie, origin="null"), session, token)
    assert not sessions.check_csrf(request(cookie, origin="https://127.0.0.1:8765"), session, token)


def test_login_tokens_are_bound_to_their_form_cookie() -> None:
    sessions, _ = make()
    nonce, token = sessions.login_nonce()
    own = "http://127.0.0.1:8765"

    def login_request(cookie_nonce: str | None) -> Request:
        r = request(origin=own)
        if cookie_nonce is not None:
            r.scope["headers"].append((b"cookie", f"keyturn_login={cookie_nonce}".encode()))
        return Request(r.scope)

    assert sessions.check_login(login_request(nonce), token)
    assert not sessions.check_login(login_request(None), token)
    assert not sessions.check_login(login_request("another"), token)
    assert not sessions.check_login(login_request(nonce), sessions.csrf_token(sessions.open("api:alice", "t")[0]))


def test_the_secret_file_is_made_once_with_mode_0600_and_a_loose_one_is_tightened(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    first = load_or_create_secret(db)
    assert load_or_create_secret(db) == first and len(first) >= 32
    path = secret_path(db)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    os.chmod(path, 0o644)
    assert load_or_create_secret(db) == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    path.write_text("short\n")
    with pytest.raises(ConfigError, match="too short"):
        load_or_create_secret(db)


@pytest.mark.parametrize(("target", "expected"), [
    (None, "/inbox"), ("/audit?tool=x", "/audit?tool=x"), ("/inbox/requests/abc", "/inbox/requests/abc"),
    ("https://evil.example/inbox", "/inbox"), ("//evil.example/inbox", "/inbox"), ("/\\evil.example", "/inbox"),
    ("/api/requests", "/inbox"), ("javascript:alert(1)", "/inbox"),
])
def test_after_sign_in_only_our_own_pages_are_a_destination(target: str | None, expected: str) -> None:
    assert safe_next(target) == expected


def test_a_session_cookie_is_small_and_expires_in_hours() -> None:
    sessions, _ = make()
    session, cookie = sessions.open("api:alice", "tok-alice")
    assert len(cookie) < 400 and 3600 < session.expires - time.time() <= 24 * 3600
