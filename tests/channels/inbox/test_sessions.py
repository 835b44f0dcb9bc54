"""Sessions and CSRF in isolation, on a real ledger: random server-side ids, expiry, token rotation, sign-out,
CSRF tokens bound to the session, same-origin, and nothing a file holds that opens a session."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from starlette.requests import Request

from server.canonical import sha256_hex
from server.channels.inbox.sessions import FLASH_COOKIE, SESSION_COOKIE, Sessions, session_key
from server.channels.inbox.site import safe_next
from server.ledger import Store
from tests.stores import Stores


def request(cookie: str | None = None, *, origin: str | None = None, referer: str | None = None,
            host: str = "127.0.0.1:8765", scheme: str = "http", flash: str | None = None) -> Request:
    headers = [(b"host", host.encode())]
    cookies = [f"{SESSION_COOKIE}={cookie}"] if cookie is not None else []
    cookies += [f"{FLASH_COOKIE}={flash}"] if flash is not None else []
    if cookies:
        headers.append((b"cookie", "; ".join(cookies).encode()))
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    if referer is not None:
        headers.append((b"referer", referer.encode()))
    return Request({"type": "http", "method": "POST", "path": "/inbox", "headers": headers, "scheme": scheme,
                    "query_string": b"", "server": ("127.0.0.1", 8765)})


@pytest.fixture
async def ledger(stores: Stores) -> AsyncIterator[Store]:
    async with stores.new() as opened:
        yield opened


def make(ledger: Store, reviewers: dict[str, str] | None = None,
         **kwargs: object) -> tuple[Sessions, dict[str, str]]:
    table = reviewers if reviewers is not None else {sha256_hex("tok-alice"): "api:alice"}
    return Sessions(ledger, lambda: table.items(), **kwargs), table  # type: ignore[arg-type]


async def test_a_session_reads_back_and_a_changed_or_unknown_cookie_does_not(ledger: Store, stores: Stores) -> None:
    sessions, _ = make(ledger)
    session, cookie = await sessions.open("api:alice", "tok-alice")
    assert len(cookie) == 43 and await sessions.read(request(cookie)) == session
    assert await sessions.read(request(cookie[:-2] + ("AA" if not cookie.endswith("AA") else "BB"))) is None
    assert await sessions.read(request(cookie + "x")) is None
    assert await sessions.read(request("")) is None
    # the database holds only the id's sha256: what it holds is no cookie
    [(stored,)] = stores.tamper("SELECT id_sha256 FROM web_sessions")
    assert stored == session_key(cookie) and cookie not in stored
    assert await sessions.read(request(stored)) is None
    # a second Sessions on the same database (another process's view) knows the session
    again, _ = make(ledger)
    assert await again.read(request(cookie)) == session


async def test_expiry_rotation_removal_and_sign_out_end_a_session(ledger: Store) -> None:
    sessions, table = make(ledger, ttl_s=-1)
    _, cookie = await sessions.open("api:alice", "tok-alice")
    assert await sessions.read(request(cookie)) is None  # expired

    sessions, table = make(ledger)
    session, cookie = await sessions.open("api:alice", "tok-alice")
    table[sha256_hex("tok-alice-2")] = table.pop(sha256_hex("tok-alice"))  # the token was rotated
    assert await sessions.read(request(cookie)) is None
    table[sha256_hex("tok-alice")] = "api:alice"
    assert await sessions.read(request(cookie)) == session
    await sessions.revoke(session)
    assert await sessions.read(request(cookie)) is None
    assert await make(ledger)[0].read(request(cookie)) is None  # everywhere


async def test_last_seen_is_written_now_and_then_and_expired_rows_are_forgotten(ledger: Store, stores: Stores) -> None:
    sessions, _ = make(ledger, touch_every_s=0)
    _, cookie = await sessions.open("api:alice", "tok-alice")
    [(before,)] = stores.tamper("SELECT last_seen FROM web_sessions")
    assert await sessions.read(request(cookie)) is not None
    [(after,)] = stores.tamper("SELECT last_seen FROM web_sessions")
    stores.tamper("UPDATE web_sessions SET expires = 0")
    assert after >= before
    await sessions.open("api:alice", "tok-alice")
    assert stores.tamper("SELECT count(*) FROM web_sessions") == [(1,)]
    assert (await ledger.verify()).count == 0  # sessions are not chained events


async def test_csrf_needs_the_sessions_token_and_the_same_origin(ledger: Store) -> None:
    sessions, _ = make(ledger, trusted_origins=["https://keyturn.example.com"])
    session, cookie = await sessions.open("api:alice", "tok-alice")
    other, _ = await sessions.open("api:alice", "tok-alice")
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
    # the token is the same in every process (it depends on the session alone) and on nothing a file holds
    assert make(ledger)[0].csrf_token(session) == token
    assert token != sessions.csrf_token(other)


async def test_login_tokens_are_bound_to_their_form_cookie(ledger: Store) -> None:
    sessions, _ = make(ledger)
    nonce, token = sessions.login_nonce()
    own = "http://127.0.0.1:8765"

    def login_request(cookie_nonce: str | None) -> Request:
        r = request(origin=own)
        if cookie_nonce is not None:
            r.scope["headers"].append((b"cookie", f"keyturn_login={cookie_nonce}".encode()))
        return Request(r.scope)

    assert sessions.check_login(login_request(nonce), token)
    assert make(ledger)[0].check_login(login_request(nonce), token)  # any process
    assert not sessions.check_login(login_request(None), token)
    assert not sessions.check_login(login_request("another"), token)
    assert not sessions.check_login(login_request(sessions.login_nonce()[0]), token)
    session, _ = await sessions.open("api:alice", "t")
    assert not sessions.check_login(login_request(nonce), sessions.csrf_token(session))


async def test_a_flash_message_reads_back_only_with_its_session(ledger: Store) -> None:
    sessions, _ = make(ledger)
    session, cookie = await sessions.open("api:alice", "tok-alice")
    other, _ = await sessions.open("api:alice", "tok-alice")
    value = sessions.flash(session, "You approved it")
    assert sessions.read_flash(request(cookie, flash=value), session) == "You approved it"
    assert sessions.read_flash(request(cookie, flash=value), other) is None
    body, mac = value.split(".")
    assert sessions.read_flash(request(cookie, flash=body[:-2] + "xx." + mac), session) is None


@pytest.mark.parametrize(("target", "expected"), [
    (None, "/inbox"), ("/audit?tool=x", "/audit?tool=x"), ("/inbox/requests/abc", "/inbox/requests/abc"),
    ("https://evil.example/inbox", "/inbox"), ("//evil.example/inbox", "/inbox"), ("/\\evil.example", "/inbox"),
    ("/api/requests", "/inbox"), ("javascript:alert(1)", "/inbox"),
])
def test_after_sign_in_only_our_own_pages_are_a_destination(target: str | None, expected: str) -> None:
    assert safe_next(target) == expected


async def test_a_session_cookie_is_small_and_expires_in_hours(ledger: Store) -> None:
    sessions, _ = make(ledger)
    session, cookie = await sessions.open("api:alice", "tok-alice")
    assert len(cookie) < 400 and 3600 < session.expires - time.time() <= 24 * 3600
    assert "tok-alice" not in repr(session) and cookie not in repr(session)
