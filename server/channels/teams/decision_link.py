"""Signed, single-use, expiring decision links: the no-bot fallback for Teams incoming webhooks.

A webhook posts to a whole channel, so a link cannot tell who clicked it. The page therefore asks the
reviewer for their reviewer bearer token (an `api:` identity from the config) and reports the
verdict with that identity; the link only says *which request* and *until when*. (One signed link
per reviewer would be no better: everybody in the channel sees every link.)

- `GET /teams/decide/<token>` shows the request and a form. It never decides and writes nothing:
  link scanners and previews fetch URLs.
- `POST` carries a one-time nonce minted by the GET and bound to the link by HMAC (CSRF), and the
  reviewer's token. The link is consumed by recording `link.used` in the ledger inside one write
  transaction, so any keyturn process sharing the database refuses it afterwards. When the broker
  refuses the vote (not eligible, the requester, no reason ...), `link.released` gives the link
  back, so a bystander cannot burn it; the nonce stays spent.

HMAC key: `KEYTURN_LINK_SECRET`, else a random key kept 0600 beside the database.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.errors import AuthError
from server.ledger import Row, Store, Tx
from server.secret_files import beside, ensure_secret_file

LINK_USED = "link.used"
LINK_RELEASED = "link.released"
NONCE_MAX_AGE_S = 3600.0


def link_secret_path(db: Path) -> Path:
    return beside(db, "link-secret")


def ensure_link_secret(db: Path) -> bytes:
    """The per-database link key: created once (0600, atomically), then shared by every process."""
    return ensure_secret_file(link_secret_path(db)).encode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class LinkExpired(AuthError):
    """The link's signature is good but its time has passed."""


@dataclass(frozen=True)
class Link:
    request_id: str
    link_id: str
    expires: float


class LinkSigner:
    """Mints and checks link tokens and the form nonces bound to them (HMAC-SHA256, domain-separated)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the link secret must be at least 16 bytes")
        self._key = key

    def _mac(self, purpose: str, message: str) -> str:
        return _b64(hmac.new(self._key, f"keyturn/{purpose}|{message}".encode(), hashlib.sha256).digest())

    def mint(self, request_id: str, expires: float) -> str:
        body = _b64(json.dumps({"r": request_id, "l": secrets.token_urlsafe(12), "e": int(expires)},
                               separators=(",", ":")).encode())
        return f"{body}.{self._mac('link', body)}"

    def open(self, token: str, now: float | None = None) -> Link:
        """The link a token names. AuthError when forged or malformed, LinkExpired when past its time."""
        body, _, mac = token.partition(".")
        if not body or not mac or not hmac.compare_digest(mac, self._mac("link", body)):
            raise AuthError("this is not a valid keyturn decision link")
        try:
            data = json.loads(_unb64(body))
            link = Link(request_id=str(data["r"]), link_id=str(data["l"]), expires=float(data["e"]))
        except (ValueError, KeyError, TypeError) as e:
            raise AuthError("this is not a valid keyturn decision link") from e
        if (now if now is not None else time.time()) >= link.expires:
            raise LinkExpired("this decision link has expired")
        return link

    def nonce(self, link: Link) -> str:
        """A fresh one-time form nonce bound to `link`."""
        value = f"{secrets.token_urlsafe(16)}.{int(time.time())}"
        return f"{value}.{self._mac('csrf', link.link_id + '|' + value)}"

    def check_nonce(self, link: Link, nonce: str) -> str:
        """The nonce's id if it was minted for this link and is fresh; AuthError otherwise."""
        value, _, mac = nonce.rpartition(".")
        if not value or not hmac.compare_digest(mac, self._mac("csrf", link.link_id + "|" + value)):
            raise AuthError("the form is not valid for this link; open the link again")
        issued = value.rpartition(".")[2]
        if not issued.isdigit() or time.time() - int(issued) > NONCE_MAX_AGE_S:
            raise AuthError("the form has expired; open the link again")
        return value


def _link_history(events: Iterable[tuple[str, dict[str, Any]]], link: Link) -> tuple[bool, set[str]]:
    """(is the link currently consumed, nonces already spent on it), from the request's link events."""
    used, nonces = 0, set()
    for kind, data in events:
        if data.get("link") != link.link_id:
            continue
        if kind == LINK_USED:
            used += 1
            nonces.add(str(data.get("nonce")))
        elif kind == LINK_RELEASED:
            used -= 1
    return used > 0, nonces


async def link_consumed(ledger: Store, link: Link) -> bool:
    return _link_history(((e.kind, e.payload) for e in await ledger.events(link.request_id)), link)[0]


async def consume(ledger: Store, link: Link, nonce_id: str, reviewer: str) -> str | None:
    """Record the link's use atomically. None when consumed now, else why not: unknown, used, nonce_used."""

    def body(tx: Tx, row: Row | None) -> str | None:
        if row is None:
            return "unknown"
        consumed, nonces = _link_history(tx.call_events(link.request_id, (LINK_USED, LINK_RELEASED)), link)
        if consumed:
            return "used"
        if nonce_id in nonces:
            return "nonce_used"
        tx.append(LINK_USED, link.request_id, {"link": link.link_id, "nonce": nonce_id, "reviewer": reviewer,
                                               "channel": "teams-link"})
        return None

    return await ledger.mutate_call(link.request_id, body)


async def release(ledger: Store, link: Link, code: str) -> None:
    """Give the link back after the broker refused the vote it carried (nothing was decided)."""
    await ledger.append(LINK_RELEASED, link.request_id, {"link": link.link_id, "code": code})
