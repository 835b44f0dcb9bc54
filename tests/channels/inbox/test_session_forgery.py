"""The attacker who can read keyturn's files, against real servers: the ledger database (with its session table),
a `<db>.web-secret` left by an older version, and the config with every reviewer's token_sha256. None of it makes
a cookie the inbox accepts. A stolen session dies at sign-out, an expired one is refused, and a session opened in
one process works in another serving the same database (and ends there too)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import sqlite3
import time

import httpx2
import yaml

from server.secret_files import ensure_secret_file
from tests.conftest import TOKENS, Home


def form_token(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None
    return found.group(1)


async def sign_in(http: httpx2.AsyncClient, who: str) -> str:
    """Sign in through the real form; returns the session cookie's value."""
    csrf = form_token((await http.get("/login")).text)
    r = await http.post("/login", data={"csrf": csrf, "token": TOKENS[who], "next": "/inbox"},
                        headers={"Origin": str(http.base_url).rstrip("/")})
    assert r.status_code == 303, r.text
    return r.cookies["keyturn_session"]


async def accepted(base: str, cookie: str) -> bool:
    """Does the inbox take `cookie` as a session? (pages and the live stream must agree)"""
    async with httpx2.AsyncClient(base_url=base, cookies={"keyturn_session": cookie}) as http:
        page = await http.get("/inbox")
        listing = await http.get("/inbox/list")
    assert (page.status_code == 200) == (listing.status_code == 200), (page.status_code, listing.status_code)
    return page.status_code == 200


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def old_format_cookie(secret: bytes, payload: dict[str, object]) -> str:
    """How keyturn signed session cookies before they lived in the database (HMAC with `<db>.web-secret`)."""
    body = _b64(json.dumps(payload, separators=(",", ":")).encode())
    mac = _b64(hmac.new(secret, b"session\x00" + body.encode(), hashlib.sha256).digest())
    return f"{body}.{mac}"


async def test_nothing_in_keyturns_files_makes_a_session_the_inbox_accepts(home: Home) -> None:
    web_secret = home.db.with_name(home.db.name + ".web-secret")
    ensure_secret_file(web_secret)  # as an older keyturn left it beside the ledger
    base = home.serve_http()
    async with httpx2.AsyncClient(base_url=base) as alice:
        real = await sign_in(alice, "alice")
    assert await accepted(base, real)

    # What the attacker reads:
    secret = web_secret.read_text().strip().encode()
    digest = next(r["token_sha256"] for r in yaml.safe_load(home.config.read_text())["reviewers"]
                  if r["identity"] == "api:alice")
    with sqlite3.connect(home.db) as conn:
        rows = conn.execute("SELECT id_sha256, identity, token_fp, expires FROM web_sessions").fetchall()
    assert len(rows) == 1 and real not in repr(rows)  # the database holds a hash, never the cookie
    stored, identity, token_fp, expires = rows[0]
    old_fp = hashlib.sha256(("keyturn-web-session\x00" + digest).encode()).hexdigest()[:32]
    assert old_fp == token_fp  # the fingerprint is derivable from the config: it must open nothing

    forged = [
        old_format_cookie(secret, {"sid": "x" * 24, "who": identity, "fp": old_fp, "exp": time.time() + 3600}),
        old_format_cookie(secret, {"sid": stored, "who": identity, "fp": token_fp, "exp": expires}),
        stored, digest, old_fp, token_fp, secret.decode(), stored[:43], digest[:43],
        _b64(bytes.fromhex(stored)), _b64(bytes.fromhex(digest)),
    ]
    for cookie in forged:
        assert not await accepted(base, cookie), cookie

    # nor can the old format's CSRF token (an HMAC of the session id with the same file) cast a vote
    async with httpx2.AsyncClient(base_url=base, cookies={"keyturn_session": forged[1]}) as http:
        old_csrf = _b64(hmac.new(secret, b"csrf\x00" + stored.encode(), hashlib.sha256).digest())
        r = await http.post("/inbox/requests/nope/vote", data={"csrf": old_csrf, "verdict": "approve"},
                            headers={"Origin": base})
        assert r.status_code == 303 and r.headers["location"].startswith("/login")
        assert (await http.get("/inbox/events")).status_code == 401
    assert web_secret.read_text().strip().encode() == secret  # ignored, not rewritten
    assert await accepted(base, real)


async def test_a_stolen_session_is_refused_after_sign_out_and_an_expired_one_is_refused(home: Home) -> None:
    base = home.serve_http()
    async with httpx2.AsyncClient(base_url=base) as alice:
        stolen = await sign_in(alice, "alice")
        assert await accepted(base, stolen)  # the thief's copy works while the session lives
        csrf = form_token((await alice.get("/inbox")).text)
        out = await alice.post("/logout", data={"csrf": csrf}, headers={"Origin": base})
        assert out.status_code == 303 and out.headers["location"] == "/login"
    assert not await accepted(base, stolen)
    with sqlite3.connect(home.db) as conn:
        assert conn.execute("SELECT revoked IS NOT NULL FROM web_sessions").fetchall() == [(1,)]

    async with httpx2.AsyncClient(base_url=base) as carol:
        lapsing = await sign_in(carol, "carol")
    assert await accepted(base, lapsing)
    with sqlite3.connect(home.db) as conn:  # eight hours pass
        conn.execute("UPDATE web_sessions SET expires = ? WHERE revoked IS NULL", (time.time() - 1,))
    assert not await accepted(base, lapsing)


async def test_a_session_opened_in_one_process_works_and_ends_in_another_serving_the_same_database(
        home: Home) -> None:
    first, second = home.serve_http(), home.serve_http()
    async with httpx2.AsyncClient(base_url=first) as alice:
        cookie = await sign_in(alice, "alice")
    assert await accepted(first, cookie) and await accepted(second, cookie)
    async with httpx2.AsyncClient(base_url=second, cookies={"keyturn_session": cookie}) as there:
        csrf = form_token((await there.get("/inbox")).text)
        async with httpx2.AsyncClient(base_url=first, cookies={"keyturn_session": cookie}) as here:
            assert form_token((await here.get("/inbox")).text) == csrf  # the same token in every process
        out = await there.post("/logout", data={"csrf": csrf}, headers={"Origin": second})
        assert out.status_code == 303 and out.headers["location"] == "/login"
    assert not await accepted(first, cookie) and not await accepted(second, cookie)
