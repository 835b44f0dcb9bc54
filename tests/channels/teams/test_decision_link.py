"""Signed decision links and their nonces; the per-database link key; the single-use record in the ledger."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest

from server.channels.teams.decision_link import (
    LinkExpired,
    LinkSigner,
    consume,
    ensure_link_secret,
    link_consumed,
    link_secret_path,
    release,
)
from server.errors import AuthError
from server.ledger import Ledger

KEY = b"k" * 32


def test_a_link_names_its_request_and_expiry_and_cannot_be_forged() -> None:
    signer = LinkSigner(KEY)
    token = signer.mint("req-1", time.time() + 60)
    link = signer.open(token)
    assert link.request_id == "req-1" and len(link.link_id) >= 16
    body, _, mac = token.partition(".")
    other = LinkSigner(b"x" * 32).mint("req-2", time.time() + 60).partition(".")[0]
    for forged in (f"{other}.{mac}", f"{body}.{mac[:-2]}AA", body, "", "a.b.c", token + "x"):
        with pytest.raises(AuthError):
            signer.open(forged)
    with pytest.raises(AuthError):
        LinkSigner(b"y" * 32).open(token)


def test_an_expired_link_is_refused() -> None:
    signer = LinkSigner(KEY)
    token = signer.mint("req-1", time.time() + 60)
    with pytest.raises(LinkExpired):
        signer.open(token, now=time.time() + 61)
    with pytest.raises(LinkExpired):
        signer.open(signer.mint("req-1", time.time() - 1))


def test_a_nonce_is_bound_to_its_link_and_expires() -> None:
    signer = LinkSigner(KEY)
    a, b = signer.open(signer.mint("r", time.time() + 60)), signer.open(signer.mint("r", time.time() + 60))
    nonce = signer.nonce(a)
    assert signer.check_nonce(a, nonce)
    with pytest.raises(AuthError):
        signer.check_nonce(b, nonce)  # a nonce from another link of the same request
    with pytest.raises(AuthError):
        signer.check_nonce(a, "")
    value, _, mac = nonce.rpartition(".")
    stale = f"{value.rpartition('.')[0]}.{int(time.time()) - 7200}"
    with pytest.raises(AuthError):
        signer.check_nonce(a, f"{stale}.{mac}")


def test_the_link_key_is_generated_once_per_database_and_private(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    first = ensure_link_secret(db)
    assert ensure_link_secret(db) == first and len(first) >= 32
    assert stat.S_IMODE(link_secret_path(db).stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.db.link-secret"]  # no temporary file left
    assert ensure_link_secret(tmp_path / "other.db") != first


def test_short_keys_are_refused() -> None:
    with pytest.raises(ValueError):
        LinkSigner(b"short")


async def test_a_link_is_consumed_once_released_after_a_refusal_and_each_nonce_spent(tmp_path: Path) -> None:
    signer = LinkSigner(KEY)
    async with Ledger(tmp_path / "ledger.db") as ledger:
        await ledger.open_call(call_id="req-1", tool="t", principal="p", on_behalf_of=None, model=None,
                               args_hash="h", redacted_arguments={}, state="pending", holder=None, events=[])
        link = signer.open(signer.mint("req-1", time.time() + 60))
        assert not await link_consumed(ledger, link)
        assert await consume(ledger, link, "n1", "api:bob") is None
        assert await link_consumed(ledger, link)
        assert await consume(ledger, link, "n2", "api:alice") == "used"
        await release(ledger, link, "self_approval")
        assert not await link_consumed(ledger, link)
        assert await consume(ledger, link, "n1", "api:alice") == "nonce_used"
        assert await consume(ledger, link, "n3", "api:alice") is None
        other = signer.open(signer.mint("req-1", time.time() + 60))
        assert not await link_consumed(ledger, other)  # links are independent
        missing = signer.open(signer.mint("nope", time.time() + 60))
        assert await consume(ledger, missing, "n4", "api:alice") == "unknown"
        kinds = [e.kind for e in await ledger.events("req-1")]
        assert kinds == ["link.used", "link.released", "link.used"]
        assert (await ledger.verify()).ok
